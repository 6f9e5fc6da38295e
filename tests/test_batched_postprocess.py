"""The batched post-processing (`Segmenter.predict_features_batch`, issue 16) against the per-image path.

On CPU the batched path is run explicitly (``batched=True``; the CPU default streams one window at a time) and
compared image by image with `Segmenter.predict_features`: labels and stitched maps exactly equal (bit for bit),
scores within 1e-6 (absolute), for images of mixed sizes (1, 2, 3 and more windows, a pixel under 3 windows, a
second window size), with and without background, cleaning and PAMR; an empty batch; one image; chunked batches.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from conftest import gradient_image

import talk2dino.postprocess as postprocess
from talk2dino import InferenceConfig, Segmenter
from talk2dino.ops.sliding import stitch, stitch_batch, window_grid, window_order
from talk2dino.results import SegmentationResult

SCORE_TOL = 1e-6  # absolute, on the full-resolution scores (they are in fact equal bit for bit on CPU)

# (height, width) -> windows with the config below (short side 28, window 28, stride 14):
# 40x40 -> 28x28: 1; 40x60 -> 28x42: 2; 60x40 -> 42x28: 2 (portrait); 40x71 -> 28x50: 3 (the last one clamped,
# so pixels 22-27 lie under 3 windows); 30x90 -> 28x84: 5; 5x300 -> 7x400: 28 windows of 7x28 (a second window size).
SIZES = [(40, 60), (40, 40), (40, 71), (60, 40), (30, 90), (5, 300), (40, 60)]
WINDOWS = [2, 1, 3, 2, 5, 28, 2]


def _image(h: int, w: int, seed: int) -> np.ndarray:
    return gradient_image(h, w, seed, noise=25)


@pytest.fixture()
def segmenter(tiny_model) -> Segmenter:
    seg = Segmenter(tiny_model, InferenceConfig(short_side=28, max_long_side=400, window=28, stride=14,
                                                pamr_iterations=3))
    seg.set_classes(["cat", "dog", "sky", "road"])
    return seg


@pytest.fixture()
def features(segmenter: Segmenter):
    embedded = segmenter.embed_images([_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)])
    assert [len(f.boxes) for f in embedded] == WINDOWS
    return embedded


def _assert_same(batched: SegmentationResult, single: SegmentationResult) -> None:
    assert batched.labels.dtype == single.labels.dtype == torch.int64
    assert torch.equal(batched.labels, single.labels)
    assert batched.stitched is not None and single.stitched is not None
    assert torch.equal(batched.stitched, single.stitched)
    torch.testing.assert_close(batched.scores, single.scores, atol=SCORE_TOL, rtol=0)
    assert batched.class_names == single.class_names and batched.background_index == single.background_index
    assert batched.config == single.config and batched.model_info == single.model_info


@pytest.mark.parametrize(("background", "bg_clean", "pamr"), [
    (True, True, True), (False, False, True), (True, False, False), (False, True, False), (True, True, False),
])
def test_batched_path_equals_per_image_path(segmenter: Segmenter, features, background: bool, bg_clean: bool,
                                            pamr: bool) -> None:
    options = {"background": background, "bg_clean": bg_clean, "pamr": pamr}
    batch = segmenter.predict_features_batch(features, batched=True, **options)
    assert len(batch) == len(features)
    for item, got in zip(features, batch, strict=True):
        single = segmenter.predict_features(item, **options)
        assert got.labels.shape == item.original_size
        _assert_same(got, single)
        assert got.labels.equal(got.scores.softmax(0).argmax(0))


def test_empty_batch_and_one_image(segmenter: Segmenter, features) -> None:
    assert segmenter.predict_features_batch([], batched=True) == []
    assert segmenter.predict_features_batch([]) == []
    assert segmenter.predict_batch([]) == []
    for item in (features[1], features[4]):  # one window, five windows
        (got,) = segmenter.predict_features_batch([item], batched=True, background=True)
        _assert_same(got, segmenter.predict_features(item, background=True))


def test_chunked_batches_give_the_same_results(segmenter: Segmenter, features, monkeypatch) -> None:
    whole = segmenter.predict_features_batch(features, batched=True, background=True)
    # Room for about two windows' maps: chunks of one or two images, and a final resize of one image at a time.
    monkeypatch.setattr(postprocess, "BATCH_ELEMENTS", 2 * 5 * 28 * 28)
    chunked = segmenter.predict_features_batch(features, batched=True, background=True)
    for got, expected in zip(chunked, whole, strict=True):
        _assert_same(got, expected)


def test_cpu_default_streams_and_timings_are_opt_in(segmenter: Segmenter, features, monkeypatch) -> None:
    batched = segmenter.predict_features_batch(features[:3], batched=True)
    assert all(result.timings == {} for result in batched)  # nothing timed without profile
    profiled = segmenter.predict_features_batch(features[:3], batched=True, profile=True)
    stages = {"scores", "upsample", "pamr", "stitch", "resize_argmax"}
    assert all(set(result.timings) == stages for result in profiled)
    assert all(seconds >= 0 for result in profiled for seconds in result.timings.values())

    def refuse(*args, **kwargs):
        raise AssertionError("the batched path ran on CPU by default")

    monkeypatch.setattr("talk2dino.predictor.segment_batch", refuse)
    streamed = segmenter.predict_features_batch(features[:3])  # CPU: one window at a time, as predict_features
    assert all(set(result.timings) == stages for result in streamed)
    for got, expected in zip(streamed, batched, strict=True):
        _assert_same(got, expected)
    from_images = segmenter.predict_batch([_image(h, w, seed) for seed, (h, w) in enumerate(SIZES[:3])])
    for got, expected in zip(from_images, batched, strict=True):
        # Embedded again, in other backbone batches than the fixture's: CPU GEMMs may round the last bit
        # differently by batch size (torch 2.6 does, docs/reliability.md §5: <= 2e-7), so the maps are compared
        # within 1e-6 and the labels exactly.
        assert torch.equal(got.labels, expected.labels)
        assert got.stitched is not None and expected.stitched is not None
        torch.testing.assert_close(got.stitched, expected.stitched, rtol=0, atol=1e-6)


@pytest.mark.parametrize("names", [["cat", "dog", "sky", "road"], [f"thing {i}" for i in range(300)]])
def test_device_branches_run_on_cpu(segmenter: Segmenter, features, monkeypatch, names: list[str]) -> None:
    """The branches a GPU takes (scores of all windows in one call, softmax + argmax of all maps at once, labels
    narrowed to uint8, or int16 above 256 channels), run on CPU: the batched GEMMs may round the last bit
    differently, so scores within 1e-6 and labels equal except float near-ties (none in practice here)."""
    segmenter.set_classes(names)
    monkeypatch.setattr(postprocess, "_like_streaming", lambda device: False)
    narrowed: list[torch.dtype] = []
    original = torch.Tensor.long

    def spy(tensor: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        narrowed.append(tensor.dtype)
        return original(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "long", spy)
    batch = segmenter.predict_features_batch(features, batched=True, background=True)
    monkeypatch.undo()
    assert narrowed == [torch.uint8 if len(names) < 256 else torch.int16] * len(features)
    for item, got in zip(features, batch, strict=True):
        single = segmenter.predict_features(item, background=True)
        assert got.labels.dtype == torch.int64
        assert (got.labels == single.labels).float().mean().item() >= 0.999
        assert got.stitched is not None and single.stitched is not None
        torch.testing.assert_close(got.stitched, single.stitched, atol=SCORE_TOL, rtol=0)
        torch.testing.assert_close(got.scores, single.scores, atol=SCORE_TOL, rtol=0)


def test_reference_segmenter_always_streams(tiny_model, features) -> None:
    config = InferenceConfig(short_side=28, max_long_side=400, window=28, stride=14, pamr_iterations=3)
    reference = Segmenter(tiny_model, config, reference=True)
    reference.set_classes(["cat", "dog", "sky", "road"])
    batch = reference.predict_features_batch(features[:2], batched=True, background=True)
    for item, got in zip(features[:2], batch, strict=True):
        _assert_same(got, reference.predict_features(item, background=True))


def test_options_are_checked_once_per_batch(segmenter: Segmenter, features) -> None:
    from talk2dino.errors import InvalidInputError

    with pytest.raises(ValueError, match="bg_threshold"):
        segmenter.predict_features_batch(features, bg_threshold=2.0, batched=True)
    fresh = Segmenter(segmenter.model, segmenter.config)
    with pytest.raises(InvalidInputError, match="no labels set"):
        fresh.predict_features_batch(features, batched=True)


# ------------------------------------------------------------------------------------------------ ops level
def test_window_order_is_slot_major() -> None:
    assert window_order([2, 1, 3]) == [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (2, 2)]
    assert window_order([]) == []


@pytest.mark.parametrize("prepend", [None, 0.55])
def test_stitch_batch_equals_stitch_bit_for_bit(prepend: float | None) -> None:
    generator = torch.Generator().manual_seed(0)
    sizes = [(28, 42), (28, 28), (56, 84), (28, 50), (42, 70)]
    boxes = [window_grid(h, w, window=28, stride=14) for h, w in sizes]
    blocks = [torch.rand(len(b), 3, 28, 28, generator=generator) for b in boxes]
    ordered = torch.stack([blocks[image][k] for image, k in window_order([len(b) for b in boxes])])
    # Channels-last blocks, as PAMR returns them: the layout does not change the sums.
    for source in (ordered, ordered.contiguous(memory_format=torch.channels_last)):
        out = stitch_batch(source, boxes, sizes, prepend=prepend)
        assert out.shape == (5, 3 + (prepend is not None), 56, 84)
        for image, (h, w) in enumerate(sizes):
            assert torch.equal(out[image, :, :h, :w], stitch(blocks[image], boxes[image], h, w, prepend=prepend))
            assert not out[image, :, h:].any() and not out[image, :, :, w:].any()  # zero padding


def test_stitch_batch_refuses_bad_geometry() -> None:
    boxes = [window_grid(28, 42, window=28, stride=14)]
    with pytest.raises(ValueError, match="blocks"):
        stitch_batch(torch.zeros(3, 2, 28, 28), boxes, [(28, 42)])
    with pytest.raises(ValueError, match="inside its"):
        stitch_batch(torch.zeros(2, 2, 28, 28), boxes, [(28, 40)])


# ------------------------------------------------------------------------------------------------ results
def test_result_fields_may_be_computed_on_first_read() -> None:
    calls = {"scores": 0, "stitched": 0}
    maps = torch.rand(2, 4, 5)

    def later(name: str, value: torch.Tensor):
        def compute() -> torch.Tensor:
            calls[name] += 1
            return value

        return compute

    result = SegmentationResult(torch.zeros(4, 5, dtype=torch.int64), later("scores", maps), ["a", "b"], None,
                                InferenceConfig(), stitched=later("stitched", maps))
    assert calls == {"scores": 0, "stitched": 0}
    assert result.stitched is maps and result.stitched is maps and result.scores is maps
    assert calls == {"scores": 1, "stitched": 1}
    assert SegmentationResult(result.labels, maps, ["a", "b"], None, InferenceConfig()).stitched is None
    copy = dataclasses.replace(result, class_names=["x", "y"])
    assert copy.stitched is maps and copy.class_names == ["x", "y"]


# ------------------------------------------------------------------------------------------------ GPU
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_batched_path_on_cuda_matches_cpu(tiny_sources) -> None:
    """fp32 with TF32 off: the CUDA labels equal the CPU's except float near-ties (≥ 99.9 % of pixels); more
    than 256 channels go through the int16 labels."""
    from talk2dino import create_model

    torch.backends.cuda.matmul.allow_tf32 = False
    config = InferenceConfig(short_side=28, max_long_side=400, window=28, stride=14, pamr_iterations=3)
    images = [_image(h, w, seed) for seed, (h, w) in enumerate(SIZES)]
    for names in (["cat", "dog", "sky", "road"], [f"thing {i}" for i in range(300)]):
        results = {}
        for device in ("cpu", "cuda"):
            seg = Segmenter(create_model(None, device=device, **tiny_sources), config)
            seg.set_classes(names)
            results[device] = seg.predict_batch(images, background=True, profile=device == "cuda")
        for cpu, cuda in zip(results["cpu"], results["cuda"], strict=True):
            assert cuda.labels.device.type == "cpu" and cuda.labels.dtype == torch.int64
            assert (cpu.labels == cuda.labels).float().mean().item() >= 0.999
            torch.testing.assert_close(cuda.scores, cpu.scores, atol=1e-4, rtol=0)
            assert cuda.stitched is not None and cuda.stitched.device.type == "cpu"
            assert set(cuda.timings) == {"scores", "upsample", "pamr", "stitch", "resize_argmax"}
