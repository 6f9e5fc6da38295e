"""The native CPU PAMR kernel (src/talk2dino/ops/pamr_native.c): equal to the reference within float rounding,
independent of threads and batching, and a clean fallback to the torch path wherever it cannot be built."""

from __future__ import annotations

import functools
import logging
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import native_kernel_or_skip

import talk2dino.ops.pamr_native as native_module
from talk2dino.ops.pamr import pamr, pamr_reference

DILATIONS = (1, 2, 4, 8, 12, 24)


def _inputs(batch: int, classes: int, height: int, width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, height, width, generator=generator) * 255
    masks = torch.rand(batch, classes, height, width, generator=generator)
    return image, masks


@pytest.fixture
def kernel() -> object:
    return native_kernel_or_skip()


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """A process state in which the kernel was never looked up, with its own build cache; restored after."""
    monkeypatch.setattr(native_module, "_STATE", {})
    monkeypatch.setenv("TALK2DINO_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(native_module.ENV, raising=False)
    yield tmp_path / "cache" / "kernels"


@pytest.fixture
def threads() -> Iterator[None]:
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize(
    ("classes", "height", "width", "dilations", "iterations"),
    [
        (5, 37, 53, DILATIONS, 10),  # odd sizes, several blocks of the kernel's row length
        (3, 7, 5, DILATIONS, 10),  # smaller than the largest dilation: every read is clamped
        (2, 1, 1, (1,), 3),  # one pixel
        (21, 64, 80, DILATIONS, 2),  # VOC's 21 channels: 3 full groups of 6 and a partial one
        (1, 9, 31, (1, 2), 4),
        (17, 50, 3, (3, 7), 5),  # a dilation order other than the default, a 3-pixel-wide strip
        (7, 33, 97, (24, 1), 1),
    ],
)
def test_native_equals_reference(kernel: object, classes: int, height: int, width: int, dilations: tuple[int, ...],
                                 iterations: int) -> None:
    image, masks = _inputs(2, classes, height, width, seed=classes + height)
    native = pamr(image, masks, iterations=iterations, dilations=dilations, native=True)
    reference = pamr_reference(image, masks, iterations=iterations, dilations=dilations)
    assert native.shape == masks.shape and native.dtype == torch.float32 and native.is_contiguous()
    torch.testing.assert_close(native, reference, atol=1e-5, rtol=0)
    torch.testing.assert_close(native, pamr(image, masks, iterations=iterations, dilations=dilations, native=False),
                               atol=1e-5, rtol=0)


def test_native_is_independent_of_threads_and_batching(kernel: object, threads: None) -> None:
    """Rows split the affinities and classes split the propagation across threads; neither changes any value's
    arithmetic, so every thread count, and per-sample calls, give the same bits."""
    image, masks = _inputs(2, 13, 45, 70, seed=3)
    torch.set_num_threads(1)
    expected = pamr(image, masks, iterations=10, dilations=DILATIONS, native=True)
    for count in (2, 3, 5, 16):
        torch.set_num_threads(count)
        assert torch.equal(pamr(image, masks, iterations=10, dilations=DILATIONS, native=True), expected), count
    for b in range(2):
        single = pamr(image[b : b + 1], masks[b : b + 1], iterations=10, dilations=DILATIONS, native=True)
        assert torch.equal(single, expected[b : b + 1])
    chunks = [pamr(image, masks[:, c : c + 5], iterations=10, dilations=DILATIONS, native=True) for c in (0, 5, 10)]
    assert torch.equal(torch.cat(chunks, dim=1), expected)


def test_portable_build_gives_the_same_bits(fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The build without -march=native (SSE2 or NEON vectors of 4 floats, where the machine's build may use 8)
    computes every value with the same operations in the same order: the results are identical."""
    if native_module._compiler() is None:
        native_kernel_or_skip()
    image, masks = _inputs(1, 9, 41, 75, seed=4)
    machine = pamr(image, masks, iterations=10, dilations=DILATIONS, native=True)
    machine_kernel = native_module.native_pamr()
    monkeypatch.setattr(native_module, "_STATE", {})
    monkeypatch.setattr(native_module, "_NATIVE_FLAGS", ())
    portable = pamr(image, masks, iterations=10, dilations=DILATIONS, native=True)
    portable_kernel = native_module.native_pamr()
    assert machine_kernel is not None and portable_kernel is not None
    assert portable_kernel.path != machine_kernel.path  # the flags are part of the cache key
    assert torch.equal(portable, machine)


def test_native_sharp_edges_stay_finite_and_close(kernel: object) -> None:
    """A hard black/white edge on a flat image drives most weights below float32's normal range: they are stored
    as 0 (no subnormal arithmetic), and the result still matches the reference."""
    image = torch.zeros(1, 3, 40, 48)
    image[..., :, 24:] = 255.0
    image[..., 20:, :] = 255.0 - image[..., 20:, :]
    _, masks = _inputs(1, 4, 40, 48, seed=5)
    native = pamr(image, masks, iterations=10, dilations=DILATIONS, native=True)
    assert torch.isfinite(native).all()
    torch.testing.assert_close(native, pamr_reference(image, masks, iterations=10, dilations=DILATIONS),
                               atol=1e-5, rtol=0)


def test_default_dispatch(kernel: object) -> None:
    """CPU tensors use the kernel by default; inputs that need a gradient keep the differentiable torch path."""
    image, masks = _inputs(1, 3, 20, 30, seed=7)
    default = pamr(image, masks, iterations=3, dilations=DILATIONS)
    assert torch.equal(default, pamr(image, masks, iterations=3, dilations=DILATIONS, native=True))
    assert not torch.equal(default, pamr(image, masks, iterations=3, dilations=DILATIONS, native=False))
    differentiable = pamr(image, masks.clone().requires_grad_(), iterations=3, dilations=DILATIONS)
    assert differentiable.requires_grad
    many = tuple(range(1, 130))  # 1,032 offsets: more than the kernel's tables hold, so the torch path runs
    small_image, small_masks = _inputs(1, 2, 9, 11, seed=10)
    expected = pamr_reference(small_image, small_masks, iterations=1, dilations=many)
    torch.testing.assert_close(pamr(small_image, small_masks, iterations=1, dilations=many), expected, atol=1e-5,
                               rtol=0)
    with pytest.raises(ValueError, match="at most 128 dilations; got 129"):
        pamr(small_image, small_masks, iterations=1, dilations=many, native=True)
    with pytest.raises(ValueError, match="serves CPU tensors"):
        pamr(image.to("meta"), masks.to("meta"), iterations=1, dilations=(1,), native=True)


def test_environment_switch(kernel: object, monkeypatch: pytest.MonkeyPatch) -> None:
    image, masks = _inputs(1, 3, 20, 30, seed=8)
    monkeypatch.setenv(native_module.ENV, "0")
    assert native_module.native_pamr() is None
    assert torch.equal(pamr(image, masks, iterations=2, dilations=DILATIONS),
                       pamr(image, masks, iterations=2, dilations=DILATIONS, native=False))
    assert native_module.native_pamr_status() == "torch (native kernel off)"
    # An explicit native=True wins over the environment.
    monkeypatch.setenv(native_module.ENV, "1")
    expected = pamr(image, masks, iterations=2, dilations=DILATIONS)
    monkeypatch.setenv(native_module.ENV, "off")
    assert torch.equal(pamr(image, masks, iterations=2, dilations=DILATIONS, native=True), expected)
    monkeypatch.setenv(native_module.ENV, "sometimes")
    with pytest.raises(ValueError, match="TALK2DINO_PAMR_NATIVE must be auto, 0/off or 1/on; got 'sometimes'"):
        native_module.native_pamr()


def test_builds_once_into_the_cache_and_reuses_it(fresh_state: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    if native_module._compiler() is None:
        native_kernel_or_skip()
    with caplog.at_level(logging.INFO, logger="talk2dino.ops.pamr_native"):
        first = native_module.native_pamr()
    assert first is not None and first.path.parent == fresh_state
    assert [p.name for p in fresh_state.iterdir()] == [first.path.name]  # no build folder left behind
    assert "built the native CPU kernel" in caplog.text
    built_at = first.path.stat().st_mtime_ns
    compiles: list[list[str]] = []
    real_run = subprocess.run

    def counting_run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        if "-o" in args:
            compiles.append(args)
        return real_run(args, **kwargs)  # type: ignore[call-overload, no-any-return]

    monkeypatch.setattr(native_module.subprocess, "run", counting_run)
    monkeypatch.setattr(native_module, "_STATE", {})  # a new process, as far as the module knows
    second = native_module.native_pamr()
    assert second is not None and second.path == first.path and not compiles
    assert first.path.stat().st_mtime_ns == built_at
    assert native_module.native_pamr_status() == f"native ({first.path.name})"


def _fake_compiler(folder: Path, body: str) -> str:
    script = folder / "fake-cc"
    script.write_text(f"#!/bin/sh\n{body}\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return str(script)


def test_no_compiler_falls_back_to_torch(fresh_state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                         caplog: pytest.LogCaptureFixture) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delenv("CC", raising=False)
    image, masks = _inputs(1, 2, 12, 14, seed=9)
    with caplog.at_level(logging.INFO, logger="talk2dino.ops.pamr_native"):
        result = pamr(image, masks, iterations=2, dilations=DILATIONS)
    assert torch.equal(result, pamr(image, masks, iterations=2, dilations=DILATIONS, native=False))
    assert caplog.text.count("native CPU kernel is unavailable (no C compiler found") == 1  # logged once
    assert native_module.native_pamr_status().startswith("torch (no C compiler found")
    with pytest.raises(RuntimeError, match="the native PAMR kernel is unavailable: no C compiler found"):
        pamr(image, masks, iterations=2, dilations=DILATIONS, native=True)
    monkeypatch.setenv(native_module.ENV, "1")
    with pytest.raises(RuntimeError, match="no C compiler found"):
        pamr(image, masks, iterations=2, dilations=DILATIONS)


def test_failing_compiler_is_reported(fresh_state: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    compiler = _fake_compiler(tmp_path, 'echo "fake-cc: fatal error: no such thing" >&2; exit 1')
    monkeypatch.setenv("CC", compiler)
    assert native_module.native_pamr() is None
    assert "could not build the native PAMR kernel: fake-cc: fatal error: no such thing" in \
        native_module.native_pamr_status()
    assert not list(fresh_state.glob("*.so")) and not list(fresh_state.glob(".build-*"))


def test_wrong_interface_version_is_refused(fresh_state: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if native_module._compiler() is None:
        native_kernel_or_skip()
    monkeypatch.setattr(native_module, "_ABI", 99)
    assert native_module.native_pamr() is None
    assert "answers another interface version than 99" in native_module.native_pamr_status()


def test_unwritable_cache_builds_in_a_temporary_folder(fresh_state: Path, monkeypatch: pytest.MonkeyPatch,
                                                       tmp_path: Path) -> None:
    if native_module._compiler() is None:
        native_kernel_or_skip()
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("TALK2DINO_CACHE", str(blocker))
    loaded = native_module.native_pamr()
    assert loaded is not None and not loaded.path.is_relative_to(blocker)


def test_run_parallel_bounds_the_workers_and_runs_every_call() -> None:
    """More calls than workers: every call runs once, never more than `workers` at a time; an error is raised
    only after the other calls have finished."""
    lock, running, peak, done = threading.Lock(), [0], [0], []

    def call(index: int) -> None:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        with lock:
            running[0] -= 1
            done.append(index)

    native_module.run_parallel([functools.partial(call, i) for i in range(9)], 2)
    assert sorted(done) == list(range(9))
    assert peak[0] <= 2

    def broken() -> None:
        raise ValueError("call 0 failed")

    done.clear()
    with pytest.raises(ValueError, match="call 0 failed"):
        native_module.run_parallel([broken, *[functools.partial(call, i) for i in range(1, 5)]], 2)
    assert sorted(done) == [1, 2, 3, 4]


def test_the_pool_survives_fork(kernel: object) -> None:
    """A child forked after the kernel's thread pool started (a DataLoader worker, a pre-forking server) gets a
    new pool instead of queueing work for threads that exist only in the parent. (torch's own OpenMP threads do
    not survive a fork either, so the child here runs the pool with plain Python calls.)"""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    script = (
        "import os, sys, threading, time\n"
        "from talk2dino.ops.pamr_native import run_parallel\n"
        "seen = []\n"
        "# Every worker of the pool started (each waits for the others), then idle, as in a long-running process.\n"
        "everyone = threading.Barrier(os.cpu_count() or 1)\n"
        "run_parallel([everyone.wait] * (os.cpu_count() or 1), os.cpu_count() or 1)\n"
        "run_parallel([lambda: seen.append(1), lambda: seen.append(2)], 2)\n"
        "time.sleep(0.5)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    run_parallel([lambda: seen.append(3), lambda: seen.append(4)], 2)\n"
        "    os._exit(0 if sorted(seen) == [1, 2, 3, 4] else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "sys.exit(os.waitstatus_to_exitcode(status))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
