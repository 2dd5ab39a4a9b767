"""Building and loading the native kernels: the cache, a broken compiler, and switching them off."""

import os

import pytest

import emcaps.kernels as kernels

needs_compiler = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler")


@needs_compiler
def test_build_caches_the_library(tmp_path):
    path = kernels.build(tmp_path)
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert kernels.build(tmp_path) == path and path.stat().st_mtime_ns == stamp     # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]                      # no temporary left over
    assert kernels.Library(path).path == path


def test_broken_compiler_gives_a_clear_error(tmp_path):
    fake = tmp_path / "fake-c++"
    fake.write_text("#!/bin/sh\necho 'fatal error: simulated compiler failure' >&2\nexit 1\n")
    fake.chmod(0o755)
    with pytest.raises(kernels.KernelBuildError, match="(?s)failed to build em_kernels.cpp.*simulated"):
        kernels.build(tmp_path / "out", cxx=str(fake))
    assert not any((tmp_path / "out").iterdir())                                    # nothing half-written


def test_no_compiler_and_switched_off(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("CXX", raising=False)
    assert kernels.compiler() is None
    with pytest.raises(kernels.KernelBuildError, match="no C\\+\\+ compiler found"):
        kernels.build(tmp_path)
    kernels.library.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="routing with PyTorch ops instead"):
            assert kernels.library() is None
        kernels.library.cache_clear()
        monkeypatch.setenv("EMCAPS_NATIVE", "0")
        assert kernels.library() is None
    finally:
        kernels.library.cache_clear()


def test_kernel_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("EMCAPS_KERNEL_DIR", str(tmp_path / "k"))
    assert kernels.kernel_dir() == tmp_path / "k"
    monkeypatch.delenv("EMCAPS_KERNEL_DIR")
    monkeypatch.setenv("EMCAPS_DATA_DIR", str(tmp_path / "d"))
    assert kernels.kernel_dir() == tmp_path / "d" / "kernels"
    assert os.fspath(kernels.SOURCE).endswith("em_kernels.cpp") and kernels.SOURCE.exists()
