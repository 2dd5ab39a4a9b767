"""The training loop: exact resume, crash safety (SIGKILL), divergence handling, checkpoint checks, the step
budget and callbacks that stop a run."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from emcaps import config
from emcaps.training import checkpoint, loop
from emcaps.training.checkpoint import CheckpointError
from emcaps.training.divergence import TrainingDiverged

TOY = ["name=toy", "data.dataset=toy", "data.resize=36", "data.crop=32", "data.train_limit=64",
       "data.test_limit=32", "model.name=tiny", "train.epochs=2", "train.batch_size=16", "train.threads=1",
       "train.log_every=1"]


def toy_config(*overrides: str) -> config.RunConfig:
    return config.load(None, TOY + list(overrides))


def weights(run_dir) -> dict[str, torch.Tensor]:
    return checkpoint.load_checkpoint(run_dir)["model"]


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_run_directory_contents(tmp_path):
    summary = loop.train(toy_config(), tmp_path / "run", quiet=True)
    run = tmp_path / "run"
    assert summary["finished"] and summary["steps"] == 8 and 0 <= summary["test_error"] <= 1
    made = sorted(p.name for p in run.iterdir() if p.name != "tensorboard")
    assert made == ["checkpoint.pt", "config.toml", "log.jsonl"]
    assert config.load(run / "config.toml") == toy_config()
    state = checkpoint.load_checkpoint(run)
    assert state["format"] == checkpoint.CHECKPOINT_FORMAT and state["version"] == checkpoint.CHECKPOINT_VERSION
    for key in ("optimizer", "scheduler", "rng", "order_state", "margin", "position", "config"):
        assert key in state
    assert state["step"] == 8 and state["epoch"] == 2 and state["finished"]
    assert set(state["rng"][0]) == {"torch", "cuda", "numpy", "python"}


@pytest.mark.parametrize("stop_at", [4, 5])        # at the epoch boundary, and in the middle of an epoch
def test_resume_is_exact(tmp_path, stop_at):
    straight = loop.train(toy_config(), tmp_path / "straight", quiet=True)
    part = loop.train(toy_config(), tmp_path / "split", quiet=True, stop_at_step=stop_at)
    assert not part["finished"] and part["steps"] == stop_at
    assert checkpoint.load_checkpoint(tmp_path / "split")["step"] == stop_at
    resumed = loop.resume(tmp_path / "split", quiet=True)
    assert resumed["steps"] == straight["steps"] == 8
    assert_same_weights(weights(tmp_path / "straight"), weights(tmp_path / "split"))
    assert resumed["test_error"] == straight["test_error"]
    # The log is continued, not duplicated: the same step events as the straight run.
    steps = [line for line in (tmp_path / "split" / "log.jsonl").read_text().splitlines() if '"step", "step"' in line]
    assert len(steps) == 8


def test_resume_of_a_finished_run_does_nothing(tmp_path):
    loop.train(toy_config(), tmp_path / "run", quiet=True)
    before = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    assert loop.resume(tmp_path / "run", quiet=True)["finished"]
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == before


def test_new_run_refuses_a_directory_with_a_checkpoint(tmp_path):
    loop.train(toy_config(), tmp_path / "run", quiet=True, stop_at_step=1)
    with pytest.raises(FileExistsError, match="--resume"):
        loop.train(toy_config(), tmp_path / "run", quiet=True)


def test_corrupt_truncated_and_foreign_checkpoints_fail_clearly(tmp_path):
    loop.train(toy_config(), tmp_path / "run", quiet=True, stop_at_step=2)
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    cases = {
        "garbage": (b"not a checkpoint at all" * 10, "not a readable emcaps checkpoint"),
        "truncated": (good[: len(good) // 2], "not a readable emcaps checkpoint"),
    }
    for data, message in cases.values():
        (tmp_path / "run" / "checkpoint.pt").write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            loop.resume(tmp_path / "run", quiet=True)
    torch.save({"state_dict": {}}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not an emcaps checkpoint"):
        loop.resume(tmp_path / "run", quiet=True)
    torch.save({"format": checkpoint.CHECKPOINT_FORMAT, "version": 99}, tmp_path / "run" / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="format version 99"):
        loop.resume(tmp_path / "run", quiet=True)
    with pytest.raises(CheckpointError, match="holds no checkpoint.pt"):
        loop.resume(tmp_path, quiet=True)


def test_max_steps_ends_the_run_inside_an_epoch(tmp_path):
    """train.max_steps is the budget (4 steps an epoch here: 6 = one epoch and a half): the lr schedule
    spans those steps, and the last, partial epoch is tested and checkpointed as the end of the run."""
    cfg = toy_config("train.max_steps=6", "optim.lr_schedule=cosine")
    summary = loop.train(cfg, tmp_path / "run", quiet=True)
    assert summary["finished"] and (summary["steps"], summary["epochs"]) == (6, 2) and "test_error" in summary
    state = checkpoint.load_checkpoint(tmp_path / "run")
    assert state["step"] == 6 and state["finished"]
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    steps = [e for e in lines if e["event"] == "step"]
    assert [e["step"] for e in steps] == [1, 2, 3, 4, 5, 6]
    assert steps[-1]["lr"] == pytest.approx(cfg.optim.lr * cfg.optim.min_lr_ratio)
    assert loop.resume(tmp_path / "run", quiet=True)["steps"] == 6             # nothing left to train


def test_a_callback_can_stop_the_run(tmp_path):
    """A true answer from the callback ends the run after that step, checkpointed; it stays stopped."""
    seen = []

    def stop_at_3(step, model):
        seen.append(step)
        return step == 3

    summary = loop.train(toy_config(), tmp_path / "run", quiet=True, callback=stop_at_3)
    assert seen == [1, 2, 3] and summary["stopped_early"] and summary["finished"] and summary["steps"] == 3
    state = checkpoint.load_checkpoint(tmp_path / "run")
    assert state["step"] == 3 and state["stopped_early"]
    assert '"event": "stop"' in (tmp_path / "run" / "log.jsonl").read_text()
    loop.train(toy_config(), tmp_path / "split", quiet=True, stop_at_step=3)
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "split"))
    assert loop.resume(tmp_path / "run", quiet=True)["stopped_early"]


def _poison_after(step_to_poison: int):
    def callback(step: int, model: torch.nn.Module) -> None:
        if step == step_to_poison:
            with torch.no_grad():
                model.class_caps.weight.view(-1)[0] = float("nan")
    return callback


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = toy_config("train.checkpoint_steps=2")
    with pytest.raises(TrainingDiverged) as err:
        loop.train(cfg, tmp_path / "run", quiet=True, callback=_poison_after(5))
    message = str(err.value)
    assert "non-finite loss at step 6" in message and "class_caps.weight" in message
    state = checkpoint.load_checkpoint(tmp_path / "run")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in state["model"].values())


def test_non_finite_weights_are_never_checkpointed(tmp_path):
    cfg = toy_config("train.checkpoint_steps=2")
    with pytest.raises(TrainingDiverged, match="class_caps.weight became non-finite by step 4"):
        loop.train(cfg, tmp_path / "run", quiet=True, callback=_poison_after(4))
    assert checkpoint.load_checkpoint(tmp_path / "run")["step"] == 2


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "emcaps", *args]


def test_sigkill_then_resume_loses_nothing_before_the_checkpoint(tmp_path):
    """Kill -9 a real training process mid-run; resuming finishes it with the uninterrupted run's weights."""
    overrides = TOY + ["data.train_limit=256", "train.batch_size=8", "train.checkpoint_steps=1"]
    sets = [a for o in overrides for a in ("--set", o)]
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", *sets, "--run-dir", str(run), "--quiet"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    killed_at = None
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if checkpoint.load_checkpoint(run)["step"] >= 6:
                os.kill(proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
                break
        except CheckpointError:
            pass                                  # not written yet
        time.sleep(0.05)
    proc.wait()
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    assert killed_at is not None, f"the run ended before it could be killed: {stderr}"
    step = checkpoint.load_checkpoint(run)["step"]        # whatever the last complete checkpoint holds
    assert 6 <= step < 64
    done = subprocess.run(_cli("train", "--resume", str(run), "--quiet"), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    final = checkpoint.load_checkpoint(run)
    assert final["finished"] and final["step"] == 64
    log = (run / "log.jsonl").read_text()
    assert f'{{"event": "resume", "step": {step},' in log
    straight = loop.train(config.load(None, overrides), tmp_path / "straight", quiet=True)
    assert straight["steps"] == 64
    assert_same_weights(weights(tmp_path / "straight"), final["model"])


def test_bf16_precision_trains_in_bf16_autocast_with_float32_weights(tmp_path):
    plain = loop.train(toy_config("train.epochs=1"), tmp_path / "fp32", quiet=True)
    mixed = loop.train(toy_config("train.epochs=1", "train.precision=bf16"), tmp_path / "bf16", quiet=True)
    assert mixed["finished"] and 0 <= mixed["test_error"] <= 1
    w32, w16 = weights(tmp_path / "fp32"), weights(tmp_path / "bf16")
    assert all(w.dtype == torch.float32 and torch.isfinite(w).all() for w in w16.values())
    # The convolutions ran in bf16: the weights moved, and not as in float32.
    assert any(not torch.equal(w32[k], w16[k]) for k in w32)
    assert abs(mixed["final_loss"] - plain["final_loss"]) < 0.5
    with pytest.raises(config.ConfigError, match="train.precision must be one of 'float32', 'bf16'"):
        toy_config("train.precision=fp16")


def test_deterministic_runs_repeat_and_leave_the_global_mode_as_it_was(tmp_path):
    before = torch.are_deterministic_algorithms_enabled()
    a = loop.train(toy_config("train.epochs=1", "train.deterministic=true"), tmp_path / "a", quiet=True)
    assert torch.are_deterministic_algorithms_enabled() == before
    b = loop.train(toy_config("train.epochs=1", "train.deterministic=true"), tmp_path / "b", quiet=True)
    assert a["final_loss"] == b["final_loss"]
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))


def test_the_class_capsules_floor_anneals_over_training_and_resumes_exactly(tmp_path):
    """routing.class_floor_start: the class capsules start at that floor and reach their own by the given
    fraction of the run, geometrically; the saved model and its config route with their own floor."""
    anneal = ["routing.class_floor_start=5e-4", "routing.class_floor_anneal=0.5", "train.ema_decay=0.5"]
    floors = []

    def seen(step, model):
        floors.append(model.class_caps.floor)

    loop.train(toy_config(*anneal), tmp_path / "run", quiet=True, callback=seen)
    # the floor the step ran with, seen after it: 5e-4 at step 1, 1e-9 ** (1/4) * 5e-4 ** (3/4) at step 2, ...
    expected = [5e-4 * (1e-9 / 5e-4) ** (k / 4) for k in range(4)]
    assert floors[:4] == pytest.approx(expected, rel=1e-12) and floors[4:] == [None] * 4
    model, cfg, _ = checkpoint.model_from_checkpoint(tmp_path / "run")
    assert model.class_caps.floor is None and cfg.routing.class_layer().var_floor == 1e-9
    loop.train(toy_config(*anneal), tmp_path / "split", quiet=True, stop_at_step=2)
    loop.resume(tmp_path / "split", quiet=True)
    assert_same_weights(weights(tmp_path / "run"), weights(tmp_path / "split"))
    loop.train(toy_config("train.ema_decay=0.5", "routing.class_floor_start=0"), tmp_path / "plain", quiet=True)
    key = "class_caps.weight"
    assert not torch.equal(weights(tmp_path / "plain")[key], weights(tmp_path / "run")[key])
