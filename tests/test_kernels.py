"""Building and loading the native kernels: the cache, a broken compiler, and switching them off."""

import ctypes
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest
import torch

from emcaps import kernels

needs_compiler = pytest.mark.skipif(kernels.compiler() is None, reason="no C++ compiler")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One fresh build for the module (a compile takes a while)."""
    return kernels.build(tmp_path_factory.mktemp("kernels"))


@needs_compiler
def test_build_caches_the_library(built):
    path, directory = built, built.parent
    assert path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert kernels.build(directory) == path and path.stat().st_mtime_ns == stamp    # reused, not rebuilt
    assert [p.name for p in directory.iterdir()] == [path.name]                     # no temporary left over
    assert kernels.Library(path).path == path


def test_broken_compiler_gives_a_clear_error(tmp_path):
    fake = tmp_path / "fake-c++"
    fake.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -dM ] && exit 0; done\n'   # lists no macros, then
                    "echo 'fatal error: simulated compiler failure' >&2\nexit 1\n")       # fails to compile
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
    monkeypatch.delenv("EMCAPS_DATA_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert kernels.kernel_dir() == tmp_path / "x" / "emcaps" / "kernels"


def test_routing_and_kernels_do_not_import_the_data_code():
    code = ("import sys, emcaps.kernels, emcaps.routing; emcaps.kernels.kernel_dir(); "
            "print([m for m in sys.modules if m.startswith('emcaps.data')])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert done.stdout.strip() == "[]"
    assert os.fspath(kernels.SOURCE).endswith("em_kernels.cpp") and kernels.SOURCE.exists()


@needs_compiler
def test_a_build_for_another_cpu_is_not_loaded(tmp_path, monkeypatch, built):
    """A home directory shared with an AVX-512 machine: its cache entry must not be the one we load."""
    cxx = kernels.compiler()
    flags = kernels._flags(cxx)
    shutil.copy(built, tmp_path / built.name)                  # our own entry, as a previous run left it
    here = kernels.isa_key(cxx, flags)
    monkeypatch.setattr(kernels, "isa_key", lambda cxx, flags: here + "\n#define __AVX512F__ 1")
    theirs = kernels.cache_path(tmp_path, cxx, flags)
    theirs.write_bytes(b"a library built for the other CPU")
    monkeypatch.undo()
    ours = kernels.build(tmp_path)
    assert ours != theirs and ours == kernels.cache_path(tmp_path, cxx, flags) == tmp_path / built.name
    assert kernels.Library(ours).path == ours


@needs_compiler
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86 instruction-set names")
def test_isa_key_tells_instruction_sets_apart():
    cxx = kernels.compiler()
    base, avx2 = kernels.isa_key(cxx, ("-march=x86-64",)), kernels.isa_key(cxx, ("-march=haswell",))
    assert "__AVX2__" not in base and "#define __AVX2__ 1" in avx2
    assert kernels.isa_key(cxx, ("-march=x86-64",)) == base                       # and it is stable


@needs_compiler
def test_each_flag_is_probed_on_its_own(tmp_path, monkeypatch):
    """A compiler that refuses one optional flag still gets the others."""
    real = kernels.compiler()
    fake = tmp_path / "picky-c++"
    fake.write_text(f'#!/bin/sh\nfor a in "$@"; do [ "$a" = "{kernels.NATIVE_FLAGS[-1]}" ] && exit 1; done\n'
                    f'exec {real} "$@"\n')
    fake.chmod(0o755)
    flags = kernels._flags(str(fake))
    assert kernels.NATIVE_FLAGS[-1] not in flags and set(kernels.NATIVE_FLAGS[:-1]) <= set(flags)


def test_signatures_match_the_cpp_source():
    """SIGNATURES (the ctypes argtypes) against the exported prototypes of em_kernels.cpp."""
    source = kernels.SOURCE.read_text()
    found = {}
    for name, params in re.findall(r"EMCAPS_EXPORT void emcaps_(\w+)_##suffix\(([^)]*)\)", source):
        params = params.replace("\\", " ")
        codes = ["P" if "*" in p else "i" if "i64" in p else "d" if "double" in p else "?" for p in params.split(",")]
        found[name] = "".join(codes)
    assert found == kernels.SIGNATURES


@needs_compiler
def test_every_kernel_has_argtypes_and_a_wrong_call_raises(built):
    lib = kernels.Library(built)
    for name, signature in kernels.SIGNATURES.items():
        for suffix in ("f32", "f64"):
            fn = getattr(lib._lib, f"emcaps_{name}_{suffix}")
            assert len(fn.argtypes) == len(signature) and fn.restype is None
    with pytest.raises(TypeError, match="estep_assign takes 12 arguments besides"):
        lib.call("estep_assign", torch.float32, [None] * 8, 1, range_at=8)
    fn = lib._lib.emcaps_estep_assign_f32
    with pytest.raises(ctypes.ArgumentError):                                    # a double where an int64 goes
        fn(*[None] * 6, 1.5, *[0] * 6, 0.5, None, None)


def _backward_call(m=6, j=5, i=18, seed=0):
    """Arguments of one mstep_backward call on random inputs, with (slots, I, J, 16) transform gradients."""
    g = torch.Generator().manual_seed(seed)
    P, W = torch.randn(m, i, 16, generator=g), 0.3 * torch.randn(i, j, 16, generator=g)
    W_t = W.view(i, j, 4, 4).transpose(-1, -2).reshape(i, j, 16).contiguous()
    a, r = torch.rand(m, i, generator=g), torch.rand(m, j, i, generator=g)
    mean, s = torch.randn(m, j, 16, generator=g), torch.rand(m, j, generator=g) + 0.5
    inv_var = torch.rand(m, j, 16, generator=g) + 0.5
    g_mean, g_var, g_s = (torch.randn(m, j, 16, generator=g), torch.randn(m, j, 16, generator=g),
                          torch.randn(m, j, generator=g))
    g_maha = torch.randn(m, j, i, generator=g)
    outputs = torch.zeros(m, i, 16), torch.zeros(2, i, j, 16), torch.empty(m, j, i), torch.zeros(m, i)
    args = [P, W, None, W_t, r, r.stride(0), r.stride(1), a, mean, s, g_mean, g_var, g_s, inv_var, g_maha, mean,
            m, j, i, 1e-8, outputs[0], kernels.PerThread(outputs[1]), outputs[2], outputs[3]]
    return args, outputs


@needs_compiler
def test_openmp_build_shares_torchs_runtime_and_splits_like_the_pool(tmp_path, monkeypatch, built):
    """With -fopenmp the kernels run on PyTorch's own OpenMP threads: the process keeps one libgomp, and the
    results (per-thread slots included) are those of the thread-pool build, which splits the work in Python."""
    monkeypatch.setenv("EMCAPS_OPENMP", "0")
    assert "-fopenmp" not in kernels._flags(kernels.compiler())
    pool = kernels.Library(kernels.build(tmp_path))
    monkeypatch.delenv("EMCAPS_OPENMP")
    if not kernels.torch_openmp():
        pytest.skip("PyTorch's threads here are not GNU OpenMP's")
    assert "-fopenmp" in kernels._flags(kernels.compiler())
    omp = kernels.Library(built)
    assert omp.openmp and not pool.openmp
    assert len(kernels.openmp_runtimes()) == 1                   # torch's libgomp, not a second runtime
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        results = []
        for lib in (pool, omp):
            args, outputs = _backward_call()
            lib.call("mstep_backward", torch.float32, args, 6, range_at=19)
            results.append(outputs)
    finally:
        torch.set_num_threads(before)
    for x, y in zip(*results):                   # float32 rounding: -fopenmp may change how GCC vectorises
        torch.testing.assert_close(x, y)
    g_W = results[1][1]
    assert (g_W[0] != 0).any() and (g_W[1] != 0).any()         # each thread wrote its own slot


@needs_compiler
def test_an_openmp_build_that_brings_its_own_runtime_splits_work_in_python(monkeypatch, built):
    """Where loading the library maps a second libgomp (PyTorch's has another soname), the kernels must not
    start that runtime's threads beside PyTorch's: the pool splits the work instead."""
    seen = iter([{"/torch/lib/libgomp-1234.so.1"}, {"/torch/lib/libgomp-1234.so.1", "/usr/lib/libgomp.so.1"}])
    monkeypatch.setattr(kernels, "openmp_runtimes", lambda: next(seen))
    lib = kernels.Library(built)
    assert not lib.openmp
    args, outputs = _backward_call()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        lib.call("mstep_backward", torch.float32, args, 6, range_at=19)
    finally:
        torch.set_num_threads(before)
    assert (outputs[1][0] != 0).any() and (outputs[1][1] != 0).any()   # two ranges, a slot each
