"""Routing diagnostics: the entropy measure at its extremes, the per-layer report of a network, the CLI."""

import json

import pytest
import torch

from emcaps import cli
from emcaps.diagnostics import assignment_entropy, format_report, routing_report
from emcaps.models import create_model
from emcaps.routing import PositionCompetition, RoutingConfig

TOY = ["--set", "data.dataset=toy", "--set", "data.resize=36", "--set", "data.train_limit=32", "--set",
       "data.test_limit=16", "--set", "model.name=tiny", "--set", "train.epochs=1", "--set", "train.batch_size=16",
       "--set", "train.threads=1"]


def test_entropy_is_one_for_uniform_and_zero_for_one_hot_assignments():
    uniform = torch.full((3, 4, 5), 0.25)
    assert assignment_entropy(uniform, None) == pytest.approx(1.0)
    one_hot = torch.zeros(3, 4, 5)
    one_hot[:, 2] = 1.0
    assert assignment_entropy(one_hot, None) == pytest.approx(0.0)
    # Across positions: a child of a 4x4 grid, 3x3 kernel, stride 1, feeds up to 4 positions x 2 types.
    comp = PositionCompetition(4, 4, 3, 1, 1)
    r0 = comp.initial(1, 2, torch.float64).expand(-1, 2, -1)            # uniform over every parent a child feeds
    assert assignment_entropy(r0, comp) == pytest.approx(1.0)


def test_report_has_a_row_per_layer_and_per_iteration():
    torch.manual_seed(0)
    model = create_model("tiny", routing=RoutingConfig.named("paper"), class_transform_std=0.01)
    rows = routing_report(model, torch.randn(4, 1, 32, 32))
    assert [r["layer"] for r in rows] == ["primary", "conv_caps1", "conv_caps2", "class_caps"]
    for row in rows[1:]:
        its = row["iterations"]
        assert len(its) == 3
        assert its[0]["entropy"] == pytest.approx(1.0)                   # EM starts from uniform assignments
        assert its[-1]["entropy"] < 1.0
        assert all(0.0 <= it["var_at_floor"] <= 1.0 for it in its)
        assert all(it["logit_min"] <= it["logit_max"] for it in its)
    # The paper's tiny logits (with the authors' class transforms): every class activation of a fresh
    # network alike.
    assert rows[-1]["act_spread"] < 0.01
    spread = routing_report(create_model("tiny"), torch.randn(4, 1, 32, 32))[-1]["act_spread"]
    assert spread > 0.1                                                  # the default's standardised costs
    text = format_report(rows)
    assert "class_caps" in text and "entropy" in text


def test_report_needs_a_capsule_network():
    with pytest.raises(ValueError, match="capsule network"):
        routing_report(create_model("cnn"), torch.randn(2, 1, 32, 32))


def test_cli_diagnoses_a_fresh_network_and_a_checkpoint(capsys, tmp_path):
    assert cli.main(["diagnose", "--config", "quick", *TOY, "--images", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "at initialisation" in out and "conv_caps2" in out and "gradient norms" in out
    run_dir = tmp_path / "run"
    assert cli.main(["train", *TOY, "--run-dir", str(run_dir), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["diagnose", str(run_dir), "--json", "--images", "8"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 2 and len(result["layers"]) == 4


@pytest.mark.parametrize("argv, text", [
    (["diagnose"], "give a CHECKPOINT_OR_RUN_DIR or --config"),
    (["diagnose", "/no/such/run"], "no checkpoint or run directory"),
    (["diagnose", "--config", "quick", *TOY, "--set", "model.name=cnn"], "need a capsule network"),
    (["diagnose", "--config", "quick", *TOY, "--images", "1"], "at least 2 images"),
    (["diagnose", "--config", "quick", *TOY, "--device", "gpu"], "expected auto, cpu, cuda or cuda:N, got 'gpu'"),
    pytest.param(["diagnose", "--config", "quick", *TOY, "--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")),
])
def test_cli_diagnose_errors_are_one_line(capsys, argv, text):
    assert cli.main(argv) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emcaps: error: ") and text in err[0]


def test_cli_diagnose_refuses_a_backend_the_device_cannot_run(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert cli.main(["diagnose", "--config", "quick", *TOY, "--device", "cpu",
                     "--set", "runtime.backend=triton"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "runtime.backend 'triton' needs " in err[0] and "the device is cpu" in err[0]
