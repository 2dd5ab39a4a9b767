"""The experiment commands end to end in fast mode, on a small smallNORB-format data set written here
(class-dependent blobs at the tiny SynthNORB subset's viewpoints), so no rendering or download is needed."""

import json
import struct

import numpy as np
import pytest
import torch

from emcaps import cli, config, plots
from emcaps.data.norb_format import write_norb
from emcaps.data.smallnorb import SPLIT_FILES, TEST_INSTANCES, TRAIN_INSTANCES
from emcaps.data.transforms import center_crop
from emcaps.experiments import common, viewpoint
from emcaps.models import create_model
from emcaps.training import checkpoint, loop

ELEVATIONS = (0, 4, 8)
AZIMUTHS = (0, 3, 9, 15, 17)        # x 20 degrees: 0, 60, 180, 300, 340


@pytest.fixture(scope="module")
def norb(tmp_path_factory):
    root = tmp_path_factory.mktemp("norb")
    rng = np.random.default_rng(0)
    for split, instances in (("train", TRAIN_INSTANCES[:2]), ("test", TEST_INSTANCES[:2])):
        grid = np.meshgrid(np.arange(5), instances, ELEVATIONS, AZIMUTHS, indexing="ij")
        cat, inst, elev, azim = (g.reshape(-1) for g in grid)
        images = rng.integers(0, 60, (len(cat), 2, 32, 32)).astype(np.uint8)
        for i, (c, a) in enumerate(zip(cat, azim)):
            top, left = 4 + 5 * c, 6 + (a % 4)
            images[i, :, top:top + 6, left:left + 12] = 230
        info = np.stack([inst, elev, 2 * azim, np.zeros_like(cat)], 1).astype(np.int32)
        names = SPLIT_FILES[split]
        write_norb(root / names["dat"], images)
        write_norb(root / names["cat"], cat.astype(np.int32))
        write_norb(root / names["info"], info)
    return root


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and data.endswith(b"IEND\xaeB`\x82")
    return struct.unpack(">II", data[16:24])                                # (width, height)


def _png_ok(path):
    w, h = _png_size(path)
    assert w > 50 and h > 50


def _fast_test_set(norb):
    """The test images the fast experiments see: (N, C, 32, 32) centre crops and labels (N,)."""
    test = common.load(common.data_config("smallnorb", str(norb), fast=True), "test")
    return center_crop(test.images, 32), test.labels


def _run(args, capsys):
    status = cli.main(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    return captured


@pytest.mark.parametrize("split", ["azimuth", "elevation"])
def test_viewpoint_fast(norb, tmp_path, capsys, split):
    out = tmp_path / split
    _run(["experiment", "viewpoint", "--split", split, "--fast", "--quiet", "--data", "smallnorb",
          "--root", str(norb), "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    models = results["models"]
    matched = models["capsules"]["matched"]
    expected = {"cnn", "capsules"} if matched else {"cnn", "capsules", "cnn_matched"}
    assert results["split"] == split and set(models) == expected
    for m in models.values():
        assert 0 <= m["familiar_error"] <= 1 and 0 <= m["novel_error"] <= 1 and m["params"] > 0
        assert 1 <= m["steps"] <= 8
    checks = models["capsules"]["checks"]                    # the early-stopping checks on the way
    assert checks and all(c["step"] % common.FAST["check_every"] == 0 and 0 <= c["familiar_error"] <= 1
                          for c in checks)
    assert [c["step"] for c in models["cnn"]["checks"]] == list(range(1, 8))    # every step of its 8
    values = results["per_view"]["values"]
    assert len(values) == (5 if split == "azimuth" else 3)
    assert all(0 <= e <= 1 for e in results["per_view"]["capsules"])
    md = (out / "results.md").read_text()
    assert "familiar error" in md and "| CNN" in md and "| capsules" in md
    assert ("| CNN, stopped to match" in md) == (not matched)
    assert results["figures"] == [f"error-per-{split}.png", "routing-histograms.png", "parse-map.png"]
    for name in results["figures"]:
        _png_ok(out / name)
    assert "![parse map](parse-map.png)" in md
    assert set(results["budgets"]) == {"cnn", "capsules"} and "decoder" not in results
    assert not (out / "pose-perturbation.png").exists()


def test_first_match_is_where_the_protocol_stops():
    checks = [{"step": s, "familiar_error": e} for s, e in ((2, 0.5), (4, 0.3), (6, 0.35), (8, 0.1))]
    assert [viewpoint.first_match(checks, t)["step"] for t in (0.5, 0.35, 0.3, 0.29, 0.1)] == [2, 4, 4, 8, 8]
    assert viewpoint.first_match(checks, 0.05)["step"] == 8            # none is as good: the last
    with pytest.raises(ValueError, match="no checks"):
        viewpoint.first_match([], 0.1)


def test_the_page_gives_the_spread_of_cnn_checks_near_the_capsules_familiar_error():
    def check(step, familiar, novel):
        return {"step": step, "familiar_error": familiar, "novel_error": novel}

    models = {"capsules": check(600, 0.20, 0.30),
              "cnn": {**check(300, 0.05, 0.2), "checks": [check(100, 0.5, 0.6), check(200, 0.21, 0.41),
                                                          check(250, 0.18, 0.35), check(280, 0.17, 0.3)]}}
    assert viewpoint._near(models) == "2 checks within 2 points of that familiar error had novel error " \
                                      "35.0% to 41.0%"
    models["capsules"]["familiar_error"] = 0.4
    assert viewpoint._near(models) == "checks all missed that familiar error by more than 2 points"


def test_unmatched_capsules_are_compared_with_the_cnn_stopped_to_match(norb, tmp_path, capsys):
    """A capsule network trained for 1 step cannot match the CNN: the page then adds the CNN as it was at its
    first check no worse than the capsule network, with that check's numbers."""
    out = tmp_path / "vp"
    _run(["experiment", "viewpoint", "--fast", "--quiet", "--data", "smallnorb", "--root",
          str(norb), "--out", str(out), "--capsnet-steps", "1"], capsys)
    r = json.loads((out / "results.json").read_text())
    models = r["models"]
    caps, cnn, match = models["capsules"], models["cnn"], models["cnn_matched"]
    assert caps["steps"] == 1 and not caps["matched"] and cnn["familiar_error"] < caps["familiar_error"]
    history = cnn["checks"] + [{"step": cnn["steps"], "familiar_error": cnn["familiar_error"]}]
    before = [c for c in history if c["step"] < match["steps"]]
    assert all(c["familiar_error"] > caps["familiar_error"] for c in before)
    assert match["familiar_error"] <= caps["familiar_error"] and set(r["per_view"]) >= set(models)
    md = (out / "results.md").read_text()
    assert f"the CNN as it was at step {match['steps']}, the first of its checks (every 1 steps)" in md
    assert f"One check's error is noisy: the CNN's {viewpoint._near(models)}." in md
    row = f"| CNN, stopped to match (cnn, {match['params']:,} params) | {common.pct(match['familiar_error'])} |"
    assert row in md

    assert match["familiar_error"] == {c["step"]: c["familiar_error"] for c in history}[match["steps"]]


def test_models_start_from_the_seed_whatever_drew_random_numbers_before(norb, tmp_path, capsys):
    """Both models of a run are initialised from --seed: a second run in the same process, after other
    code has drawn random numbers, gives the same results (on the CPU: bit-equal results on CUDA need
    train.deterministic, tests/test_cuda.py)."""
    results = []
    for run in range(2):
        torch.rand(run * 7 + 1)
        out = tmp_path / f"run{run}"
        _run(["experiment", "viewpoint", "--fast", "--quiet", "--data", "smallnorb", "--device", "cpu",
              "--root", str(norb), "--out", str(out)], capsys)
        models = json.loads((out / "results.json").read_text())["models"]
        results.append({name: (models[name]["final_loss"], models[name]["familiar_error"])
                        for name in ("cnn", "capsules")})
    assert results[0] == results[1]


def test_adversarial_fast(norb, tmp_path, capsys):
    out = tmp_path / "adv"
    _run(["experiment", "adversarial", "--fast", "--quiet", "--data", "smallnorb", "--root", str(norb),
          "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["curves"]) == {"fgsm", "bim"} and results["eps"] == [0.0, 0.5]
    for method in results["curves"].values():
        for kind in ("untargeted_accuracy", "targeted_success"):
            assert set(method[kind]) == {"cnn", "capsules"}
            assert all(0 <= v <= 1 and len(vals) == 2 for vals in method[kind].values() for v in vals)
    # eps 0 leaves the images alone: FGSM and BIM agree on the clean accuracy.
    for name in ("cnn", "capsules"):
        assert results["curves"]["fgsm"]["untargeted_accuracy"][name][0] == \
            results["curves"]["bim"]["untargeted_accuracy"][name][0]
    for name in results["figures"]:
        _png_ok(out / name)
    assert "FGSM: untargeted accuracy" in (out / "results.md").read_text()
    assert ", Adam lr 0.01, 3 routing iterations)" in (out / "results.md").read_text()     # the capsule net


def test_adversarial_needs_both_checkpoints(capsys):
    assert cli.main(["experiment", "adversarial", "--capsnet", "x.pt"]) == 2          # a usage error
    assert "give both --capsnet" in capsys.readouterr().err


def _save(path, name, model, step=7, classes=5):
    """Save `model` as `emcaps train` does, so that model_from_checkpoint rebuilds it from the config."""
    checkpoint.save_checkpoint(path, {"config": config.load(None, [f"model.name={name}"]).to_dict(),
                                 "model": model.state_dict(), "step": step, "epoch": 1,
                                 "data_shape": {"classes": classes, "in_channels": 1}})
    return path


def _rigged(name, answer):
    """A model that answers class `answer` whatever the image: its scores do not depend on the weights
    a fresh or briefly trained model would have, so the accuracies tell which weights were used."""
    torch.manual_seed(0)
    model = create_model(name)
    with torch.no_grad():
        if name == "cnn":
            model.classifier[-1].weight.zero_()
            model.classifier[-1].bias.copy_(10.0 * torch.nn.functional.one_hot(torch.tensor(answer), 5))
        else:
            model.class_caps.beta_a.copy_(torch.where(torch.arange(5) == answer, 50.0, -50.0))
    return model


def test_adversarial_uses_the_checkpoints(norb, tmp_path, capsys):
    """--capsnet/--cnn: no training, and every reported number comes from the saved weights. The two
    models always answer different classes with different frequencies among the attacked images, so
    the clean accuracies are known in advance (a swap, a fresh model or training would show); they also
    match the accuracy of the models reloaded here."""
    x, y = _fast_test_set(norb)
    x, y = x[:8], y[:8]                                      # the images fast mode attacks
    counts = torch.bincount(y, minlength=5)
    cnn_class = int(counts.argmax())
    caps_class = int((counts != counts[cnn_class]).nonzero()[0])
    paths = {"cnn": _save(tmp_path / "cnn.pt", "cnn", _rigged("cnn", cnn_class), step=11),
             "capsules": _save(tmp_path / "caps.pt", "tiny", _rigged("tiny", caps_class), step=13)}
    out = tmp_path / "adv"
    _run(["experiment", "adversarial", "--fast", "--quiet", "--data", "smallnorb", "--root", str(norb),
          "--capsnet", str(paths["capsules"]), "--cnn", str(paths["cnn"]), "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    expected = {"cnn": float((y == cnn_class).float().mean()),
                "capsules": float((y == caps_class).float().mean())}
    assert expected["cnn"] != expected["capsules"]
    for name, path in paths.items():
        m = results["models"][name]
        assert m["source"] == str(path) and m["steps"] == (11 if name == "cnn" else 13)
        assert "seconds" not in m                            # nothing was trained
        model = checkpoint.model_from_checkpoint(path)[0]
        assert m["params"] == sum(p.numel() for p in model.parameters())
        with torch.no_grad():
            direct = float((model(x).argmax(1) == y).float().mean())
        for method in ("fgsm", "bim"):
            assert results["curves"][method]["untargeted_accuracy"][name][0] == direct == expected[name]


@pytest.mark.parametrize("problem", ["missing", "garbage", "truncated", "wrong kind", "wrong classes"])
def test_adversarial_bad_checkpoint_is_one_clear_line(norb, tmp_path, capsys, problem):
    good_cnn = _save(tmp_path / "cnn.pt", "cnn", create_model("cnn"))
    caps = tmp_path / "caps.pt"
    message = {"missing": "no checkpoint or run directory", "garbage": "not a readable emcaps checkpoint",
               "truncated": "not a readable emcaps checkpoint", "wrong kind": "wrong kind of model",
               "wrong classes": "trained on 10 classes"}[problem]
    if problem == "garbage":
        caps.write_bytes(b"not a checkpoint at all" * 10)
    elif problem == "truncated":
        data = _save(caps, "tiny", create_model("tiny")).read_bytes()
        caps.write_bytes(data[:len(data) // 2])
    elif problem == "wrong kind":
        caps = good_cnn
    elif problem == "wrong classes":
        _save(caps, "tiny", create_model("tiny", classes=10), classes=10)
    out = tmp_path / "adv"
    status = cli.main(["experiment", "adversarial", "--fast", "--quiet", "--data", "smallnorb", "--root",
                       str(norb), "--capsnet", str(caps), "--cnn", str(good_cnn), "--out", str(out)])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("emcaps: error: ") and err.count("\n") == 1, err
    assert message in err and str(caps) in err and "--capsnet" in err
    assert not out.exists()


def test_ablation_fast(norb, tmp_path, capsys):
    out = tmp_path / "abl"
    _run(["experiment", "ablation", "--fast", "--quiet", "--only", "coord,loss", "--data", "smallnorb",
          "--root", str(norb), "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert set(results["groups"]) == {"coord", "loss"}
    assert len(results["runs"]) == 4                    # the base is shared by both groups
    for run in results["runs"].values():
        assert 0 <= run["test_error"] <= 1 and run["steps"] == 4
    md = (out / "results.md").read_text()
    groups = [line.split("|")[1].strip() for line in md.splitlines() if line.startswith("| ")][1:]
    assert groups == ["coord"] * 2 + ["loss"] * 3 and "cross-entropy" in md


def test_steps_replace_the_training_budget(norb, tmp_path, capsys):
    """--steps N trains every model for N steps and says so in results.json; the RunConfig written beside
    the results (train.max_steps N) trains the same model with `emcaps train`'s loop (bit-equal: on the CPU)."""
    out = tmp_path / "abl"
    _run(["experiment", "ablation", "--fast", "--quiet", "--only", "coord", "--steps", "3", "--data",
          "smallnorb", "--device", "cpu", "--root", str(norb), "--out", str(out)], capsys)
    results = json.loads((out / "results.json").read_text())
    assert results["budget"] == {"steps": 3, "batch_size": common.FAST["capsules"].batch_size,
                                 "lr": common.FAST["capsules"].lr, "schedule": "cosine"}
    assert [run["steps"] for run in results["runs"].values()] == [3, 3]
    key = "iter3-nocoord-spread"
    saved = config.load(out / f"{key}.toml")
    assert (saved.train.max_steps, saved.model.coord_add, saved.optim.lr_schedule) == (3, False, "cosine")
    again = loop.train(saved, tmp_path / "again", quiet=True)
    assert again["steps"] == 3
    ours = checkpoint.load_checkpoint(out / "runs" / key)["model"]
    theirs = checkpoint.load_checkpoint(tmp_path / "again")["model"]
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    cfg = common.settings(fast=False, steps=40)
    assert cfg["cnn"].steps == cfg["capsules"].steps == 40 and cfg["check_every"] == 4
    assert common.settings(fast=False)["capsules"].steps == common.FULL["capsules"].steps   # not mutated
    cfg = common.settings(fast=False, steps=40, capsnet_steps=1000)          # the capsule network's alone
    assert (cfg["cnn"].steps, cfg["capsules"].steps, cfg["check_every"]) == (40, 1000, 4)
    with pytest.raises(SystemExit):
        cli.main(["experiment", "viewpoint", "--help"])
    assert f"(default {viewpoint.CAPSNET_STEPS}," in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("experiment", ["viewpoint", "adversarial", "ablation"])
def test_steps_must_be_positive(experiment, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["experiment", experiment, "--fast", "--steps", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--steps must be a positive number of training steps, got 0" in err and err.count("\n") == 1
    assert not out.exists()


def test_capsnet_lr_and_routing_iterations_reach_the_capsule_network(norb, tmp_path, capsys):
    """--capsnet-lr and --routing-iterations change the capsule network only, and the results say so."""
    out = tmp_path / "vp"
    _run(["experiment", "viewpoint", "--fast", "--quiet", "--data", "smallnorb", "--root",
          str(norb), "--out", str(out), "--routing-iterations", "2", "--capsnet-lr", "0.005"], capsys)
    caps, cnn = config.load(out / "capsules.toml"), config.load(out / "cnn.toml")
    assert (caps.model.name, caps.routing.iterations, caps.optim.lr) == ("tiny", 2, 0.005)
    assert (cnn.model.name, cnn.optim.lr) == ("cnn", common.FAST["cnn"].lr)
    budgets = json.loads((out / "results.json").read_text())["budgets"]
    assert budgets["capsules"]["lr"] == 0.005 and budgets["capsules"]["routing_iterations"] == 2
    assert budgets["cnn"]["lr"] == common.FAST["cnn"].lr
    assert "(Adam, lr 0.005, 2 routing iterations)" in (out / "results.md").read_text()
    full = common.settings(fast=False)                         # by default the library's 3 iterations, lr 1e-2
    assert full["routing"].iterations == common.ITERATIONS == 3 and full["capsules"].lr == 1e-2
    assert full["capsules"].schedule == full["cnn"].schedule == "cosine"


def test_set_routing_reaches_the_capsule_network_alone(norb, tmp_path, capsys):
    """--set routing.KEY=VALUE changes the capsule network's routing as `emcaps train --set` does (a named
    parameterisation brings its initialisation), leaves the CNN alone, and the page says it."""
    out = tmp_path / "adv"
    sets = ["routing.var_floor=5e-4", "routing.class_floor_start=0", "routing.parameterisation=authors"]
    _run(["experiment", "adversarial", "--fast", "--quiet", "--data", "smallnorb", "--root", str(norb),
          "--out", str(out), *(a for s in sets for a in ("--set", s))], capsys)
    caps, cnn = config.load(out / "capsules.toml"), config.load(out / "cnn.toml")
    like_train = config.from_dict({**caps.to_dict(), "routing": config.RunConfig().to_dict()["routing"],
                                   "model": {"name": "tiny"}}, sets)
    assert (caps.routing.var_floor, caps.routing.class_floor_start) == (5e-4, 0.0)
    assert caps.routing == like_train.routing and caps.model == like_train.model      # initialisation too
    assert caps.model != config.ModelConfig(name="tiny")
    assert cnn.routing == config.RunConfig().routing
    budgets = json.loads((out / "results.json").read_text())["budgets"]
    assert budgets["capsules"]["routing_overrides"] == sets
    assert "routing.var_floor=5e-4" in (out / "results.md").read_text()


@pytest.mark.parametrize("args, message", [
    (["viewpoint", "--set", "optim.lr=1"], "--set 'optim.lr=1': an experiment takes routing.KEY=VALUE only"),
    (["adversarial", "--set", "routing.var_floor=-1"], "routing: var_floor must be > 0, got -1.0"),
    (["adversarial", "--set", "routing.no_such_field=1"], "no_such_field"),
    (["ablation", "--set", "routing.iterations=2"], "the ablation sets each variant's iterations itself"),
    (["reconstruct", "--pretrained", "mnist", "--set", "routing.var_floor=1e-3"],
     "shipped weights (--pretrained) keep their routing")])
def test_bad_routing_settings_are_one_clear_line(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["experiment", *args, "--fast", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("option, value, message", [
    ("--routing-iterations", "0", "--routing-iterations must be a positive integer, got 0"),
    ("--capsnet-lr", "-1", "--capsnet-lr must be a positive learning rate, got -1.0"),
    ("--capsnet-lr", "nan", "--capsnet-lr must be a positive learning rate, got nan"),
    ("--capsnet-steps", "0", "--capsnet-steps must be a positive number of training steps, got 0")])
def test_bad_capsnet_options_are_one_clear_line(option, value, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(["experiment", "viewpoint", "--fast", option, value, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_ablation_rejects_unknown_groups(capsys):
    assert cli.main(["experiment", "ablation", "--only", "iterations,pose"]) == 2
    assert "unknown ablation group(s) pose" in capsys.readouterr().err


def test_report_gathers_tables_and_figures(tmp_path, capsys):
    a, b = tmp_path / "runs" / "viewpoint", tmp_path / "runs" / "demo"
    plots.line_plot(a / "error.png", {"cnn": ([1, 2], [5.0, 4.0])})
    (a / "results.md").write_text("# Novel viewpoints\n\n| model | error |\n|---|---|\n| CNN | 5.0% |\n\n"
                                  "![error](error.png)\n")
    plots.heatmap(b / "eval" / "confusion.png", np.eye(2), ["a", "b"], ["a", "b"])
    out = tmp_path / "site" / "report.md"
    _run(["report", str(a), str(b), "--out", str(out)], capsys)
    md = out.read_text()
    assert "## viewpoint" in md and "### Novel viewpoints" in md and "| CNN | 5.0% |" in md
    assert "`../runs/viewpoint`" in md                 # where each section comes from, relative to the page
    assert "](../runs/viewpoint/error.png)" in md and "](../runs/demo/eval/confusion.png)" in md
    page = out.with_suffix(".html").read_text()
    assert "<table>" in page and "<th>model</th>" in page
    assert '<img alt="error" src="../runs/viewpoint/error.png">' in page


def test_report_errors(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path / "missing")]) == 1
    assert "is not a directory" in capsys.readouterr().err
    assert cli.main(["report", str(tmp_path)]) == 1
    assert "holds no results.md" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        cli.main(["experiment", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in ("viewpoint", "adversarial", "ablation"))
