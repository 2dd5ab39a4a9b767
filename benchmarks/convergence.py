"""Learning curves: train named configs (default: the capsule network's `converge` and the baseline CNN's
`converge-cnn`) and write their test error on unseen object instances against steps and minutes.

    python benchmarks/convergence.py --out runs/convergence [--minutes 60] [--set routing.iterations=2]
    python benchmarks/convergence.py --out runs/convergence --plot-only     # curves of runs already there
    python benchmarks/convergence.py --out docs/results/convergence --plot-only   # redraw from curves.json

Each config trains in OUT/NAME with `emcaps train` (checkpoints, log.jsonl); a run that is there already
resumes, so a killed benchmark continues where it stopped. `--minutes` stops each run after that much training
time and checkpoints the model it reached (test it on every test image with `emcaps eval OUT/NAME`).
The curves come from the runs' 'eval' events (every
`train.eval_steps`) and 'epoch' events: OUT/curves.json and OUT/curves.png (with --plot-only, a config
whose run folder is not in OUT keeps its curve from OUT/curves.json). `--set` applies to every config
(routing settings included, which the CNN ignores). Not a timing benchmark: the minutes are this machine's.

Under torchrun every process trains its shard (train.batch_size is per process: `--set train.batch_size=16`
on two processes keeps the batch of 32); rank 0's clock decides when `--minutes` is up, and rank 0 alone
writes the curves.

    torchrun --nproc-per-node 2 benchmarks/convergence.py --configs converge --set train.batch_size=16 ...
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from emcaps import config as cfgmod
from emcaps.plots import line_plot
from emcaps.training import loop


def curve(run_dir: Path) -> list[dict]:
    """[{'step', 'elapsed', 'test_error'}] from a run's log.jsonl, in step order (the last record of a step wins)."""
    points = {}
    log = run_dir / "log.jsonl"
    if not log.exists():
        return []
    for line in log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") in ("eval", "epoch") and "test_error" in event:
            points[event["step"]] = {k: event.get(k) for k in ("step", "elapsed", "test_error")}
    return [points[s] for s in sorted(points)]


def run_dir_of(out: Path, name: str) -> Path:
    """Where a config's run goes: OUT/NAME for a named config, OUT/STEM for a TOML file."""
    return out / Path(name).stem


def run(name: str, overrides: list[str], out: Path, minutes: float | None) -> dict:
    run_dir = run_dir_of(out, name)
    started = time.monotonic()

    def limit(step: int, model) -> bool:
        """True once the time is up: the loop stops after this step (every rank at once, on rank 0's answer)
        and checkpoints it, so the final model is the one trained for `minutes`."""
        return minutes is not None and time.monotonic() - started > 60 * minutes

    if (run_dir / "checkpoint.pt").exists():
        summary = loop.resume(run_dir, overrides, quiet=True, callback=limit)
    else:
        config = cfgmod.load(cfgmod.named_config_path(name) or name, overrides)
        summary = loop.train(config, run_dir, quiet=True, callback=limit)
    if summary.get("stopped_early"):
        summary["stopped"] = f"after {minutes} minutes"
    points = curve(run_dir)
    best = min((p["test_error"] for p in points), default=None)
    return {"config": name, "run_dir": str(run_dir), "summary": summary, "curve": points, "best_error": best}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=["converge", "converge-cnn"], help="named configs or TOML files")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for every config")
    p.add_argument("--out", default="runs/convergence")
    p.add_argument("--minutes", type=float, help="training minutes per run at most (default: the configs' epochs)")
    p.add_argument("--plot-only", action="store_true", help="train nothing: curves of the runs already in OUT")
    args = p.parse_args()
    out = Path(args.out)
    main_rank = os.environ.get("RANK", "0") == "0"          # under torchrun, rank 0 reports
    saved = out / "curves.json"
    stored = ({r["config"]: r for r in json.loads(saved.read_text())}
              if args.plot_only and saved.is_file() else {})
    results = []
    for name in args.configs:
        run_dir = run_dir_of(out, name)
        if args.plot_only and not (run_dir / "log.jsonl").exists() and name in stored:
            result = stored[name]
        elif args.plot_only:
            points = curve(run_dir)
            result = {"config": name, "run_dir": str(run_dir), "curve": points,
                      "best_error": min((p["test_error"] for p in points), default=None)}
        else:
            result = run(name, args.set, out, args.minutes)
        results.append(result)
        if not main_rank:
            continue
        if result["best_error"] is None:
            print(f"{name}: no test yet (stopped before its first check)", flush=True)
        else:
            points = ", ".join(f"{p['step']}: {100 * p['test_error']:.1f}%" for p in result["curve"])
            print(f"{name}: test error at step {points}", flush=True)
            last = result["curve"][-1]
            print(f"{name}: best {100 * result['best_error']:.2f}%, last {100 * last['test_error']:.2f}% after "
                  f"{last['step']} steps, {last['elapsed'] / 60:.1f} min", flush=True)
    if not main_rank:
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "curves.json").write_text(json.dumps(results, indent=2) + "\n")
    series = {r["config"]: ([p["elapsed"] / 60 for p in r["curve"]], [100 * p["test_error"] for p in r["curve"]])
              for r in results if r["curve"]}
    if series:
        line_plot(out / "curves.png", series, title="test error on unseen object instances",
                  xlabel="training time (minutes, this machine)", ylabel="test error (%)", ylim=(0, 100))
    print(f"curves in {out / 'curves.json'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
