"""Compare learning curves check by check: how often each curve is at least as good as the one before it.

Issue 13's order ("3 iterations at least as fast as 2, and 2 faster than 1, at every check after 1,000
steps") is a statement about every shared check, not about the last one. Give the curves.json files that
`benchmarks/convergence.py` writes, in the order the claim runs (fewest iterations first):

    python benchmarks/iteration_order.py docs/results/iterations/ep10-it1.json \
        docs/results/iterations/ep10-it2.json docs/results/convergence/curves.json

It prints, over the checks after --after steps (multiples of --every), how many times each curve is at
least as good as each earlier one, every curve's mean test error over those checks, and the errors at the
last shared check. An argument may list several files joined by commas (the seeds of one setting): their
mean error at each shared check is the curve compared.

    python benchmarks/iteration_order.py A-s0.json,A-s1.json B-s0.json,B-s1.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def checks(path: Path, config: str, every: int) -> dict[int, float]:
    """{step: test error} of the named config's curve in a convergence.py curves.json (every `every` steps)."""
    for entry in json.loads(path.read_text()):
        if entry["config"] == config:
            return {p["step"]: p["test_error"] for p in entry["curve"] if p["step"] % every == 0}
    raise SystemExit(f"{path}: no curve of config {config!r}")


def mean_checks(paths: list[Path], config: str, every: int) -> dict[int, float]:
    """{step: mean test error over the files} at the steps every file checked."""
    each = [checks(p, config, every) for p in paths]
    shared = set.intersection(*(set(c) for c in each))
    return {s: sum(c[s] for c in each) / len(each) for s in shared}


def label(paths: list[Path]) -> str:
    names = [p.stem if p.name != "curves.json" else p.parent.name for p in paths]
    return names[0] if len(names) == 1 else "mean(" + ", ".join(names) + ")"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("curves", nargs="+", help="curves.json files (comma-joined: their mean), in the order claimed")
    parser.add_argument("--config", default="converge", help="the config whose curve to read (default converge)")
    parser.add_argument("--after", type=int, default=1000, help="count only checks after this step (default 1000)")
    parser.add_argument("--every", type=int, default=250, help="the check interval (default 250)")
    args = parser.parse_args()

    groups = [[Path(f) for f in arg.split(",") if f] for arg in args.curves]
    curves = [mean_checks(g, args.config, args.every) for g in groups]
    steps = sorted(set.intersection(*(set(c) for c in curves)))
    late = [s for s in steps if s > args.after]
    if not late:
        raise SystemExit(f"no shared check after step {args.after}")
    names = [label(g) for g in groups]
    print(f"{len(late)} shared checks from step {late[0]} to {late[-1]}")
    for i in range(1, len(curves)):
        for j in range(i):
            wins = sum(curves[i][s] <= curves[j][s] for s in late)
            print(f"  {names[i]} <= {names[j]}: {wins} of {len(late)}")
    for name, c in zip(names, curves):
        mean = 100 * sum(c[s] for s in late) / len(late)
        print(f"  {name}: mean {mean:.2f}% over the checks, {100 * c[steps[-1]]:.2f}% at step {steps[-1]}")


if __name__ == "__main__":
    main()
