"""Ablations of the capsule network (the paper's Table 1): routing iterations, coordinate addition, loss.

Each variant changes one thing from the base (3 iterations, coordinate addition, spread loss); the base is
trained once and shared by the groups. All variants get the same data, budget and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from emcaps import config as cfgmod
from emcaps import plots
from emcaps.config import ConfigError
from emcaps.data.splits import eval_batches
from emcaps.evaluate import error_rate, predict
from emcaps.experiments import common
from emcaps.routing import RoutingConfig

GROUPS = ("iterations", "coord", "loss")


@dataclass(frozen=True)
class Variant:
    iterations: int = 3
    coord_add: bool = True
    loss: str = "spread"

    @property
    def key(self) -> str:
        return f"iter{self.iterations}-{'coord' if self.coord_add else 'nocoord'}-{self.loss}"


# The paper's smallNORB test error for each variant (percent).
PAPER = {Variant(1): 9.7, Variant(2): 2.2, Variant(3): 1.8, Variant(5): 3.9, Variant(coord_add=False): 2.6,
         Variant(loss="margin"): 3.2, Variant(loss="cross_entropy"): 5.8}


def variants(only: Sequence[str] | None = None) -> dict[str, list[Variant]]:
    """The variants of each chosen group, base included in every group."""
    chosen = list(only) if only else list(GROUPS)
    unknown = [g for g in chosen if g not in GROUPS]
    if unknown or not chosen:
        raise ConfigError(f"unknown ablation group(s) {', '.join(unknown) or '(none)'}; "
                         f"choose from {', '.join(GROUPS)}")
    table = {"iterations": [Variant(i) for i in (1, 2, 3, 5)],
             "coord": [Variant(), Variant(coord_add=False)],
             "loss": [Variant(loss=name) for name in ("spread", "margin", "cross_entropy")]}
    return {g: table[g] for g in GROUPS if g in chosen}


def run_ablation(out_dir: str | Path = "ablation", fast: bool = False, dataset: str = "synthnorb",
                 root: str = "", seed: int = 0, only: Sequence[str] | None = None,
                 quiet: bool = True, device: str = "cpu", steps: int | None = None,
                 capsnet_lr: float | None = None, routing: Sequence[str] = ()) -> dict[str, Any]:
    """Train every distinct variant, test it; writes results.json, results.md and test-error.png.
    `steps` and `capsnet_lr` replace each variant's training budget, `routing` ('routing.KEY=VALUE') every
    variant's routing but its iterations (see `common.settings`)."""
    groups = variants(only)
    if any(cfgmod.parse_override(text)[0] == ["routing", "iterations"] for text in routing):
        raise ConfigError("--set routing.iterations: the ablation sets each variant's iterations itself")
    cfg = common.settings(fast, steps, capsnet_lr, routing=routing)
    data_cfg = common.data_config(dataset, root, fast)
    train, test = common.load(data_cfg, "train"), common.load(data_cfg, "test")
    say = (lambda text: None) if quiet else (lambda text: print(text, flush=True))
    out = Path(out_dir)
    runs: dict[str, dict[str, Any]] = {}
    for v in dict.fromkeys(v for vs in groups.values() for v in vs):
        config = common.run_config("ablation", v.key, data_cfg, cfg["capsnet"], cfg["capsules"], seed, device,
                                   routing=RoutingConfig(iterations=v.iterations),
                                   coord_add=v.coord_add, loss=v.loss, overrides=cfg["overrides"])
        model, fitted = common.fit(config, out, v.key, quiet=quiet)
        err = error_rate(predict(model, eval_batches(test, 64, 32))[0].argmax(1), test.labels)
        paper = PAPER.get(v)
        runs[v.key] = {"iterations": v.iterations, "coord_add": v.coord_add, "loss": v.loss,
                       "test_error": err,
                       "paper_error": None if paper is None else paper / 100, **fitted,
                       **common.describe_model(model, cfg["capsnet"])}
        say(f"{v.key}: test error {common.pct(err)}")
    figures = []
    if "iterations" in groups:
        its = [runs[v.key] for v in groups["iterations"]]
        plots.line_plot(out / "error-vs-iterations.png",
                        {"this run": ([r["iterations"] for r in its], [100 * r["test_error"] for r in its]),
                         "paper": ([r["iterations"] for r in its], [100 * r["paper_error"] for r in its])},
                        title="test error against routing iterations", xlabel="EM routing iterations",
                        ylabel="test error (%)")
        figures.append("error-vs-iterations.png")
    results = {"experiment": "ablation", "dataset": dataset, "fast": fast, "seed": seed,
               "model": cfg["capsnet"], "budget": asdict(cfg["capsules"]),
               "train_images": len(train), "test_images": len(test),
               "groups": {g: [v.key for v in vs] for g, vs in groups.items()}, "runs": runs,
               "figures": figures}
    return common.write_results(out, results, _markdown(results))


def _markdown(r: dict[str, Any]) -> str:
    rows = []
    for group, keys in r["groups"].items():
        for key in keys:
            run = r["runs"][key]
            rows.append([group, run["iterations"], run["loss"].replace("_", "-"),
                         "yes" if run["coord_add"] else "no",
                         common.pct(run["test_error"]), common.pct(run["paper_error"])])
    parts = [
        "# Ablation", "",
        f"'{r['model']}' capsule networks on {r['dataset']} ({r['train_images']} training, "
        f"{r['test_images']} test "
        f"images); one change from the base (3 iterations, spread loss, coordinate addition) per row"
        f"{' (fast mode: a smoke test, not a result)' if r['fast'] else ''}. "
        "The paper's column is smallNORB.", "",
        *([f"Each variant trained for {r['budget']['steps']} steps of {r['budget']['batch_size']} random "
           f"crops (Adam, lr {r['budget']['lr']:g}), the same data order and initial seed for all.", ""]
          if r.get("budget") else []),
        common.markdown_table(["group", "routing iterations", "loss", "coordinate addition", "test error",
                               "paper"], rows)]
    parts += [f"\n![{name}]({name})" for name in r["figures"]]
    return "\n".join(parts)
