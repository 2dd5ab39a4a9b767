"""The demo's capsule run over several seeds: how far one routing setting takes the small capsule network in
the demo's budget (1,272 steps of SynthNORB's small subset), and how much that moves from seed to seed.

    python benchmarks/demo_seeds.py --seeds 0,1,2 --threads 1
    python benchmarks/demo_seeds.py --seeds 0,1,2 --threads 1 --set routing.class_floor_start=0   # no anneal

Each seed trains exactly the capsule run `emcaps demo --set train.seed=S --set KEY=VALUE` trains (the CNN's
run is left out) into OUT/seedS, then tests it on the demo's 1,000 unseen-instance test images. Prints one
JSON line per seed and a Markdown row: the test error per seed and their mean. Runs already finished under
OUT are reused.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from emcaps.data.splits import eval_batches, load_split
from emcaps.demo import demo_configs
from emcaps.evaluate import summarise
from emcaps.predict import predict
from emcaps.training.checkpoint import CHECKPOINT_NAME, load_checkpoint, model_from_checkpoint
from emcaps.training.loop import train


def run_seed(out: Path, seed: int, threads: int, overrides: list[str]) -> dict:
    """Train (or reuse) one seed's capsule run; its test error on the demo's test images."""
    cfg = demo_configs(capsules=[f"train.seed={seed}", f"train.threads={threads}", *overrides])["capsules"]
    started = time.monotonic()
    if not (out / CHECKPOINT_NAME).is_file() or not load_checkpoint(out).get("finished"):
        train(cfg, out, quiet=True)
    model, _, state = model_from_checkpoint(out)
    test = load_split(cfg.data, "test", seed=cfg.train.seed)
    scores, labels = predict(model, eval_batches(test, cfg.train.eval_batch_size, cfg.data.crop))
    error = summarise(scores, labels, test.class_names)["test_error"]
    return {"seed": seed, "test_error": error, "steps": state["step"], "threads": threads,
            "overrides": overrides, "seconds": round(time.monotonic() - started, 1), "run": str(out)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each run (default 1)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="an override of the capsule run, as `emcaps demo --set` takes (repeatable)")
    p.add_argument("--out", default="runs/demo-seeds", help="runs go to OUT/seedS (default runs/demo-seeds)")
    args = p.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    errors = []
    for seed in seeds:
        result = run_seed(Path(args.out) / f"seed{seed}", seed, args.threads, args.overrides)
        print(json.dumps(result), flush=True)
        errors.append(100 * result["test_error"])
    label = " ".join(f"--set {o}" for o in args.overrides) or "the defaults"
    cells = " | ".join(f"{e:.1f}%" for e in errors)
    print(f"| {label} | {cells} | {sum(errors) / len(errors):.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
