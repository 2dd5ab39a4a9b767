"""Two processes under torchrun on the CPU (gloo): replicas stay identical, only rank 0 writes."""

import json
import subprocess
import sys
import textwrap

import torch

from emcaps.training import build, checkpoint

SETS = ["name=ddp", "data.dataset=toy", "data.resize=36", "data.train_limit=64", "data.test_limit=32",
        "model.name=tiny", "train.epochs=2", "train.batch_size=8", "train.device=cpu", "train.log_every=1"]
STEPS = 2 * (64 // 2) // 8        # each rank trains on half of every epoch


def torchrun(*args: str, cwd=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=cwd)


def test_two_ranks_hold_identical_weights(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(f"""
        import os
        import sys
        import torch
        import torch.distributed as dist
        from emcaps import config
        from emcaps.training import loop

        def dump(step, model):
            if step == {STEPS}:
                torch.save(model.state_dict(), f"{{sys.argv[1]}}/rank{{dist.get_rank()}}.pt")

        cfg = config.load(None, {SETS!r})
        loop.train(cfg, sys.argv[2], quiet=True, callback=dump)
        assert not dist.is_initialized()      # ended by train, and its gloo threads joined: left running,
        threads = [open(f"/proc/self/task/{{t}}/comm").read() for t in os.listdir("/proc/self/task")]
        assert not any("gloo" in t for t in threads), threads     # they could abort the exit
    """))
    done = torchrun(str(script), str(tmp_path), str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    saved = checkpoint.load_checkpoint(tmp_path / "run")
    assert saved["world_size"] == 2 and saved["step"] == STEPS and len(saved["rng"]) == 2
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
        assert torch.equal(rank0[key], saved["model"][key]), key
    initial = build.build_model(checkpoint.config_of(saved), 5, 1).state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)     # it did train


def test_torchrun_module_entry_point(tmp_path):
    sets = [a for s in SETS for a in ("--set", s)]
    done = torchrun("-m", "emcaps", "train", *sets, "--set", "train.epochs=1", "--quiet", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["finished"]   # rank 0 alone prints the summary, once
    assert [p.name.startswith("ddp-") for p in (tmp_path / "runs").iterdir()] == [True]   # one shared run dir
    start = json.loads((next((tmp_path / "runs").iterdir()) / "log.jsonl").read_text().splitlines()[0])
    assert start["world"] == 2 and start["process_group"] == "gloo"
