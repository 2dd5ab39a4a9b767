"""`emcaps demo --quick` end to end: renders a tiny SynthNORB, trains both models, writes the report."""

import json

from emcaps import cli, demo


def test_demo_quick_writes_the_report(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EMCAPS_DATA_DIR", str(tmp_path / "cache"))     # render into a fresh cache
    out = tmp_path / "report"
    assert cli.main(["demo", "--quick", "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    assert "| capsules |" in table and "| CNN |" in table
    for name in ("report.md", "results.json", "data.png", "test-error.png", "train-error.png",
                 "confusion-capsules.png", "confusion-cnn.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())["results"]
    assert set(results) == {"capsules", "cnn"}
    for r in results.values():
        assert r["params"] > 0 and 0 <= r["test_error"] <= 1 and r["epochs"]
    assert "![test error](test-error.png)" in (out / "report.md").read_text()


def test_demo_configs_are_valid():
    for quick in (False, True):
        configs = demo.demo_configs(quick)
        assert configs["capsules"].model.name == ("tiny" if quick else "small")
        assert configs["cnn"].model.name == "cnn"


def test_demo_overrides_reach_the_capsule_run_only():
    from emcaps.demo import demo_configs

    configs = demo_configs(capsules=["routing.var_floor=5e-4", "routing.class_var_floor=0",
                                     "routing.class_floor_start=0"])
    capsules = configs["capsules"].routing
    assert capsules.var_floor == 5e-4 and capsules.parameterisation == "emcaps-0.1"
    assert configs["cnn"].routing.var_floor == demo_configs()["cnn"].routing.var_floor
