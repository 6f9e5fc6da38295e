"""PAMR under CPU contention (issue 13): the affinities' many small ops run on one thread, and nothing leaks.

These are about the torch formulation, so the native kernel is switched off here; its threads (one parallel
region per phase, no per-op barriers) are tested in tests/test_pamr_native.py."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from talk2dino.ops import pamr as pamr_module
from talk2dino.ops.pamr import pamr, pamr_reference

DILATIONS = (1, 2, 4, 8, 12, 24)


@pytest.fixture(autouse=True)
def torch_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALK2DINO_PAMR_NATIVE", "0")


@pytest.fixture
def two_threads() -> Iterator[None]:
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _inputs(height: int = 29, width: int = 31) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(13)
    image = torch.rand(1, 3, height, width, generator=generator) * 255
    masks = torch.rand(1, 4, height, width, generator=generator)
    return image, masks


def test_pamr_affinities_run_single_threaded_and_restore(two_threads, monkeypatch) -> None:
    seen: dict[str, set[int]] = {}
    original_sub, original_softmax = torch.sub, pamr_module._softmax_
    original_bag = torch.nn.functional.embedding_bag

    def spy_sub(*args, **kwargs):  # the small element-wise ops of the affinities
        seen.setdefault("element-wise", set()).add(torch.get_num_threads())
        return original_sub(*args, **kwargs)

    def spy_softmax(*args, **kwargs):  # keeps the caller's count: its chunking decides the last bits
        seen.setdefault("softmax", set()).add(torch.get_num_threads())
        return original_softmax(*args, **kwargs)

    def spy_bag(*args, **kwargs):
        seen.setdefault("propagation", set()).add(torch.get_num_threads())
        return original_bag(*args, **kwargs)

    monkeypatch.setattr(pamr_module.torch, "sub", spy_sub)
    monkeypatch.setattr(pamr_module, "_softmax_", spy_softmax)
    monkeypatch.setattr(pamr_module.F, "embedding_bag", spy_bag)
    image, masks = _inputs()
    result = pamr(image, masks, iterations=3, dilations=DILATIONS)
    assert seen == {"element-wise": {1}, "softmax": {2}, "propagation": {2}}  # few big steps keep all threads
    assert torch.get_num_threads() == 2
    torch.testing.assert_close(result, pamr_reference(image, masks, iterations=3, dilations=DILATIONS),
                               atol=1e-5, rtol=0)


def test_pamr_serial_affinities_are_bit_identical_to_threaded(two_threads, monkeypatch) -> None:
    image, masks = _inputs(448, 448)  # large enough for every element-wise op to be a parallel region
    odd_image, odd_masks = _inputs(17, 50)  # a softmax extent that 2 threads chunk unevenly
    odd_serial = pamr(odd_image, odd_masks, iterations=2, dilations=DILATIONS)
    serial = pamr(image, masks, iterations=2, dilations=DILATIONS)
    monkeypatch.setattr(pamr_module, "_SERIAL_AFFINITY_PIXELS", 0)  # the pre-issue-13 behaviour
    threaded = pamr(image, masks, iterations=2, dilations=DILATIONS)
    assert torch.equal(serial, threaded)
    assert torch.equal(odd_serial, pamr(odd_image, odd_masks, iterations=2, dilations=DILATIONS))


def test_pamr_restores_threads_after_an_error(two_threads, monkeypatch) -> None:
    def boom(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(pamr_module, "_pixel_affinities", boom)
    image, masks = _inputs()
    with pytest.raises(RuntimeError, match="boom"):
        pamr(image, masks, iterations=1, dilations=(1,))
    assert torch.get_num_threads() == 2


def test_pamr_large_windows_keep_all_threads(two_threads, monkeypatch) -> None:
    seen: set[int] = set()
    original = torch.sub

    def spy_sub(*args, **kwargs):
        seen.add(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(pamr_module, "_SERIAL_AFFINITY_PIXELS", 100)
    monkeypatch.setattr(pamr_module.torch, "sub", spy_sub)
    image, masks = _inputs()  # 29·31 pixels > 100
    pamr(image, masks, iterations=1, dilations=(1,))
    assert seen == {2}


def test_pamr_on_a_worker_thread_leaves_other_threads_alone(two_threads, monkeypatch) -> None:
    """The server predicts on a worker thread: its temporary single-thread setting is that thread's own
    (OpenMP backend: a per-thread ICV), so a thread running meanwhile keeps its count."""
    inside, release = threading.Event(), threading.Event()
    original = pamr_module._pixel_affinities

    def slow_affinities(*args, **kwargs):
        inside.set()
        release.wait(30)
        return original(*args, **kwargs)

    monkeypatch.setattr(pamr_module, "_pixel_affinities", slow_affinities)
    image, masks = _inputs()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            pamr(image, masks, iterations=1, dilations=(1,))
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        assert inside.wait(30)
        main_threads_during = torch.get_num_threads()
    finally:
        release.set()
        thread.join(30)
    assert not errors
    if "OpenMP" in torch.__config__.parallel_info().split("ATen parallel backend:")[-1]:
        assert main_threads_during == 2
    assert torch.get_num_threads() == 2
