"""The CLI: every user error is one line `emcaps: error: ...` and a non-zero exit; --help everywhere."""

import subprocess
import sys

import pytest
import torch

from emcaps import cli
from emcaps.config import ConfigError

TOY = ["--set", "data.dataset=toy", "--set", "data.resize=36", "--set", "data.train_limit=32", "--set",
       "data.test_limit=16", "--set", "model.name=tiny", "--set", "train.epochs=1", "--set", "train.batch_size=16",
       "--set", "train.threads=1"]


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("emcaps: error: "), err
    return lines[0]


@pytest.mark.parametrize("argv, code, text", [
    (["train", "--config", "no-such.toml"], 2, "config file 'no-such.toml' does not exist"),
    (["train", "--set", "train.epoch=2"], 2, "did you mean 'train.epochs'"),
    (["train", "--set", "model.name=huge"], 2, "model.name must be one of"),
    (["train", "--set", "train.epochs=two"], 2, "train.epochs must be int"),
    (["train", "--config", "quick", "--resume", "x"], 2, "not both"),
    (["train", "--bogus"], 2, "unrecognized arguments"),
    (["frobnicate"], 2, "invalid choice"),
    (["eval"], 2, "give a checkpoint or run directory, or --pretrained NAME"),
    (["eval", "--pretrained", "imagenet"], 2, "no pretrained weights named 'imagenet'"),
    (["eval", "/no/such/run"], 1, "no checkpoint or run directory"),
    (["train", "--resume", "/no/such/run"], 1, "no checkpoint or run directory"),
    (["train", "--set", "data.dataset=smallnorb", "--set", "data.root=/no/such/dir"], 1, "does not exist"),
    (["train", "--config", "quik"], 2,
     "named configs: converge, converge-cnn, converge-gpu, mnist, paper, quick, small"),
    (["experiment", "adversarial", "--eps", "0.1,x"], 2, "--eps takes comma-separated numbers"),
    (["report", "/no/such/results"], 1, "is not a directory of results"),
    (["eval", "/no/such/run", "--device", "gpu"], 2,
     "argument --device: expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["experiment", "viewpoint", "--device", "cuda:x"], 2,
     "argument --device: expected auto, cpu, cuda or cuda:N, got 'cuda:x'"),
    (["eval", "/no/such/run", "--batch-size", "-1"], 2,
     "argument --batch-size: expected a whole number >= 1, got '-1'"),
])
def test_user_errors_are_one_line(capsys, monkeypatch, tmp_path, argv, code, text):
    monkeypatch.chdir(tmp_path)                  # where a default run folder would go
    status, _, err = run(capsys, *argv)
    assert status == code
    assert text in one_error_line(err)
    assert not (tmp_path / "runs").exists()     # a run that cannot start leaves no folder behind


@pytest.mark.parametrize("backend, text", [
    ("triton", "runtime.backend 'triton' needs "),           # a CUDA device, or first the triton package
    ("native", "runtime.backend 'native' needs the emcaps C++ kernels"),
])
def test_a_backend_that_cannot_run_on_the_device_is_one_line(capsys, monkeypatch, tmp_path, backend, text):
    """Checked before the run directory is made, not at the first batch."""
    from emcaps.training import loop

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRITON_INTERPRET", "0")                          # no Triton interpreter
    monkeypatch.setattr(loop, "native_available", lambda device: False)  # as without a C++ compiler
    status, _, err = run(capsys, "train", "--config", "quick", *TOY, "--set", "train.device=cpu",
                         "--set", f"runtime.backend={backend}")
    assert status == 2 and text in one_error_line(err)
    assert not (tmp_path / "runs").exists()


def test_check_backend_names_what_the_device_lacks(monkeypatch):
    from emcaps.kernels import triton_kernels
    from emcaps.training.loop import check_backend

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    with pytest.raises(ConfigError, match="'native' needs a CPU; the device is cuda:0"):
        check_backend("native", cuda)
    monkeypatch.setattr(triton_kernels, "triton", None)
    with pytest.raises(ConfigError, match="'triton' needs the triton package; the device is cuda:0"):
        check_backend("triton", cuda)
    for backend in ("auto", "torch", "compile"):
        check_backend(backend, cuda)
        check_backend(backend, cpu)


def test_eval_pretrained_tests_the_whole_split(capsys, monkeypatch, tmp_path):
    """The shipped weights' config tests 2,000 images; their documented error is on the whole split."""
    from emcaps import evaluate

    seen = []

    def fake_evaluate_run(path, **kwargs):
        seen.append(kwargs["overrides"])
        return {"name": "x", "test_error": 0.1, "images": 1, "out_dir": str(tmp_path)}

    monkeypatch.setattr(evaluate, "evaluate_run", fake_evaluate_run)
    for argv in (["--pretrained", "synthnorb"], ["--pretrained", "synthnorb", "--set", "data.test_limit=50"],
                 ["--pretrained", "synthnorb", "--set", "data.cameras=left"], [str(tmp_path)]):
        assert run(capsys, "eval", *argv, "--out", str(tmp_path))[0] == 0
    assert seen == [["data.test_limit=0"], ["data.test_limit=50"], ["data.cameras=left", "data.test_limit=0"], []]


def test_bad_toml_is_one_line(capsys, tmp_path):
    (tmp_path / "bad.toml").write_text("[train]\nepochs = = 3\n")
    status, _, err = run(capsys, "train", "--config", str(tmp_path / "bad.toml"))
    assert status == 2 and "bad.toml: not valid TOML" in one_error_line(err)


def test_a_bug_keeps_its_traceback(monkeypatch):
    """Only the project's user-error types become one line; any other exception is a bug to report."""
    from emcaps.training import loop

    def broken(*args, **kwargs):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(loop, "train", broken)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        cli.main(["train", "--config", "quick"])


def test_train_help_lists_the_named_configs(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "converge, converge-cnn, converge-gpu, mnist, paper, quick, small" in help_text


def test_corrupt_checkpoint_is_an_error(capsys, tmp_path):
    (tmp_path / "checkpoint.pt").write_bytes(b"\x00" * 100)
    status, _, err = run(capsys, "eval", str(tmp_path))
    assert status == 1 and "not a readable emcaps checkpoint" in one_error_line(err)
    torch.save({"weights": 1}, tmp_path / "checkpoint.pt")
    status, _, err = run(capsys, "train", "--resume", str(tmp_path))
    assert status == 1 and "not an emcaps checkpoint" in one_error_line(err)


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["demo"]])
def test_help_everywhere(capsys, command):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    assert "usage: emcaps" in capsys.readouterr().out


def test_train_eval_and_rerun_refusal(capsys, tmp_path):
    run_dir = str(tmp_path / "run")
    status, out, _ = run(capsys, "train", *TOY, "--run-dir", run_dir, "--quiet")
    assert status == 0 and '"finished": true' in out
    status, out, _ = run(capsys, "eval", run_dir, "--quiet")
    assert status == 0 and "test error" in out and (tmp_path / "run" / "eval" / "confusion.png").is_file()
    status, _, err = run(capsys, "train", *TOY, "--run-dir", run_dir, "--quiet")
    assert status == 1 and "already holds a checkpoint" in one_error_line(err)


def test_python_dash_m_entry_point():
    done = subprocess.run([sys.executable, "-m", "emcaps", "train", "--set", "optim.lr=-1"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip() == "emcaps: error: optim.lr must be a finite number > 0, got -1.0"


def test_only_rank_zero_prints_the_summary(capsys, monkeypatch, tmp_path):
    """Under torchrun every rank runs `emcaps train`; the summary JSON is printed once, by rank 0."""
    monkeypatch.setattr(cli, "_is_main_process", lambda: False)
    status, out, _ = run(capsys, "train", *TOY, "--run-dir", str(tmp_path / "run"), "--quiet")
    assert status == 0 and out == ""
    monkeypatch.undo()
    monkeypatch.setenv("RANK", "1")
    assert not cli._is_main_process()
    monkeypatch.setenv("RANK", "0")
    assert cli._is_main_process()
