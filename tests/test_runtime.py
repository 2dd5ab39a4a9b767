"""How routing runs per device (emcaps.routing.runtime): the settings chosen for a CPU and for CUDA, with a
stand-in device and free-memory figure, and the fallback from a failing torch.compile."""

import logging

import pytest
import torch

from emcaps import config
from emcaps.models import create_model
from emcaps.routing import RoutingConfig, Runtime, runtime
from emcaps.routing.fused import em_routing_fused

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
GB = 2**30


def test_cpu_settings_are_the_cache_sized_ones():
    s = Runtime().on(CPU)
    assert (s.backend, s.chunk_mb, s.native_chunk_mb, s.recompute) == ("auto", 12.0, 12.0, True)


def test_cuda_settings_take_whole_batches_from_free_memory_and_store_the_backward():
    s = Runtime().on(CUDA, free_bytes=100 * GB)
    assert s.chunk_mb == 25 * 1024 and not s.recompute and s.recompute_if_chunked
    assert s.backend == "compile" and s.compile_fallback
    assert s.native_chunk_mb == s.chunk_mb / 4           # the triton path's assignments: a quarter of the budget
    # The paper network's ConvCaps1 votes (~31 MB an image) at batch 256 route in one piece.
    assert s.images_per_chunk(256, 31 * 2**20) == 256
    # Little free memory: chunks, and (recompute 'auto') the chunks are recomputed in the backward pass.
    small = Runtime().on(CUDA, free_bytes=1 * GB)
    assert small.images_per_chunk(256, 31 * 2**20) < 256


def test_cuda_budget_comes_from_the_layers_own_gpu(monkeypatch):
    """A model on cuda:1 (the current device still cuda:0, busy with someone else's job) sizes its chunks from
    cuda:1's free memory, and each GPU keeps its own settings."""
    free = {0: 1 * GB, 1: 100 * GB}
    asked = []

    def mem_get_info(device=None):
        index = 0 if device is None else torch.device(device).index
        asked.append(device)
        return free[index], 141 * GB

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    runtime._settings.cache_clear()
    try:
        on_1 = Runtime().on(torch.device("cuda", 1))
        on_0 = Runtime().on(torch.device("cuda", 0))
    finally:
        runtime._settings.cache_clear()
    assert on_1.chunk_mb == 25 * 1024 and on_0.chunk_mb == 256
    assert asked == [torch.device("cuda", 1), torch.device("cuda", 0)]


def test_what_a_user_sets_wins_on_every_device():
    rt = Runtime(backend="torch", chunk=4, chunk_mb=64, recompute="yes")
    for settings in (rt.on(CPU), rt.on(CUDA, free_bytes=100 * GB)):
        assert (settings.backend, settings.chunk, settings.chunk_mb, settings.recompute) == ("torch", 4, 64, True)
        assert not settings.compile_fallback
    assert Runtime(recompute="no").on(CPU).recompute is False


def test_runtime_is_not_part_of_the_maths_and_old_configs_move_it():
    """A saved config's routing section once held the runtime fields: they load into [runtime], and the CPU
    values every config then saved are dropped so that the device chooses."""
    old = config.from_dict({"routing": {"chunk": 0, "chunk_mb": 12.0, "native_chunk_mb": 12.0,
                                        "recompute": True, "backend": "auto", "iterations": 2}})
    assert old.routing == RoutingConfig(iterations=2) and old.runtime == Runtime()
    moved = config.from_dict({"routing": {"recompute": False, "backend": "torch", "chunk_mb": 1e6}})
    assert moved.runtime == Runtime(backend="torch", recompute="no", chunk_mb=1e6)
    assert config.load(None, ["routing.backend=native"]).runtime.backend == "native"
    assert not hasattr(RoutingConfig(), "chunk_mb")
    with pytest.raises(config.ConfigError, match="runtime.recompute|recompute must be one of"):
        config.load(None, ["runtime.recompute=sometimes"])


def test_a_model_trained_with_one_runtime_runs_with_another():
    torch.manual_seed(0)
    model = create_model("tiny", runtime=Runtime(backend="torch", chunk=1, recompute="yes"))
    x = torch.randn(3, 1, 32, 32)
    a = model(x)
    b = model.set_runtime(Runtime(backend="auto")).forward(x)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_a_failing_compile_falls_back_once_with_one_line(monkeypatch, caplog):
    from emcaps.routing import fused

    def broken(*args, **kwargs):
        raise RuntimeError("no C compiler here\nmore detail")

    monkeypatch.setattr(fused, "_compiled", broken)
    monkeypatch.setattr(runtime, "_COMPILE_FAILED", [])
    votes = torch.randn(2, 3, 5, 16)
    act, bu, ba = torch.rand(2, 5), torch.zeros(3), torch.zeros(3)
    chosen = Runtime().on(CUDA, free_bytes=GB)            # 'auto' chose compile: falls back
    with caplog.at_level(logging.WARNING, logger="emcaps"):
        pose, a = em_routing_fused(votes, act, bu, ba, RoutingConfig(), settings=chosen)
        em_routing_fused(votes, act, bu, ba, RoutingConfig(), settings=chosen)
    expected = em_routing_fused(votes, act, bu, ba, RoutingConfig())
    torch.testing.assert_close(a, expected[1])
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "torch.compile failed for the routing (RuntimeError: no C compiler here)" in lines[0]
    assert runtime.compile_failed() and Runtime().on(CUDA, free_bytes=GB).backend == "torch"
    asked = Runtime(backend="compile").on(CPU)             # asked for by name: the error is the user's to see
    with pytest.raises(RuntimeError, match="no C compiler"):
        em_routing_fused(votes, act, bu, ba, RoutingConfig(), settings=asked)
    runtime._settings.cache_clear()
