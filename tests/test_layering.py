"""The package's layers: lower packages never import higher ones, at module level or inside functions."""

import ast
from pathlib import Path

import pytest

import emcaps

SRC = Path(emcaps.__file__).parent


def imported_emcaps_modules(path: Path) -> set[str]:
    """Every emcaps module a file imports anywhere in it ('from emcaps import x' counts as emcaps.x)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("emcaps")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("emcaps"):
            found |= {f"{node.module}.{a.name}" if node.module == "emcaps" else node.module for a in node.names}
    return found


def package_imports(package: str) -> dict[str, set[str]]:
    return {p.relative_to(SRC).as_posix(): imported_emcaps_modules(p) for p in sorted((SRC / package).rglob("*.py"))}


def allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize("package, may_import", [
    # data loads and preprocesses images: it needs no network, no training and no run config
    ("data", ("emcaps.data", "emcaps.checks", "emcaps.progress", "emcaps.plots")),
    # routing is the mathematics, its kernels and the capsule grid's geometry (emcaps.capsules, a leaf)
    ("routing", ("emcaps.routing", "emcaps.kernels", "emcaps.capsules")),
    # training sits below evaluation, the experiments and the command line
    ("training", ("emcaps.training", "emcaps.config", "emcaps.data", "emcaps.models", "emcaps.routing",
                  "emcaps.losses", "emcaps.predict", "emcaps.progress", "emcaps.kernels", "emcaps.checks")),
])
def test_a_package_imports_only_the_layers_below_it(package, may_import):
    wrong = {f: sorted(m for m in mods if not allowed(m, may_import)) for f, mods in package_imports(package).items()}
    assert not {f: m for f, m in wrong.items() if m}


def test_the_checker_sees_imports_inside_functions(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from emcaps.evaluate import predict\n    from emcaps import plots\n")
    assert imported_emcaps_modules(source) == {"emcaps.evaluate", "emcaps.plots"}
