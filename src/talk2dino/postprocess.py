"""From backbone features to label maps (method.md §4.4–4.8), for `talk2dino.predictor.Segmenter`.

Two implementations of the same arithmetic:

- :func:`segment_streaming`: one image, its windows upsampled, refined and added to the canvas one at a time,
  which bounds memory to one window's maps. The CPU default, and (with ``reference``) the plain reference path.
- :func:`segment_batch`: a batch of images as batched tensors on the model's device (issue 16): the scores and
  cleaning of all windows in one call (image by image on CPU, where GEMM rounding depends on the batch),
  upsampling and PAMR of all windows of one size at once, stitching with one gather-add-scatter per window slot
  (`talk2dino.ops.sliding.stitch_batch`), the full-resolution resize, softmax and argmax of images of one size at
  once. Nothing waits for the device until the labels, in a compact dtype, are copied to the host at the end (one
  wait per call); ``stitched`` and ``scores`` stay on the device until first read. Per-stage timings only with
  ``profile`` (CUDA events, read after that one wait). On CPU it gives the labels and stitched maps of
  :func:`segment_streaming` bit for bit (tests/test_batched_postprocess.py).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from talk2dino.config import InferenceConfig
from talk2dino.ops.cleaning import clean_background
from talk2dino.ops.pamr import pamr as pamr_fast
from talk2dino.ops.pamr import pamr_reference
from talk2dino.ops.similarity import sigmoid_cosine
from talk2dino.ops.sliding import device_index, softmax_argmax, stitch, stitch_batch, window_order
from talk2dino.prepare import ImageFeatures, resize_scores
from talk2dino.results import SegmentationResult

__all__ = ["BATCH_ELEMENTS", "PredictionSetup", "StageClock", "segment_batch", "segment_streaming",
           "window_scores"]

# Float32 elements of window maps (windows × channels × window pixels) handled together by `segment_batch`, and of
# full-resolution maps resized together: 1 GiB each, so a batch's peak device memory stays a few GiB whatever its
# size (PAMR's temporaries come on top); a larger batch is processed in chunks of whole images.
BATCH_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class PredictionSetup:
    """What one prediction needs besides the image features (made by `Segmenter` for each call).

    Attributes:
        text: ``[N, D]`` unit class embeddings, float32, on the model's device.
        names: the C result channels, ``"background"`` first when the background channel is on.
        background_index: 0 with the background channel, else None.
        config: the call's effective settings.
        model_info: `talk2dino.results.describe_model` of the model.
    """

    text: Tensor
    names: tuple[str, ...]
    background_index: int | None
    config: InferenceConfig
    model_info: dict[str, Any]


class StageClock:
    """Seconds per stage: ``perf_counter`` on CPU, CUDA events on CUDA (no waiting until `seconds`), or nothing.

    `lap` closes the stage that ran since the previous lap (or the clock's creation) and adds its time to that
    stage's total. On CUDA each lap only records an event in the stream; `seconds` waits for the last one.
    """

    def __init__(self, device: torch.device, enabled: bool) -> None:
        self.enabled = enabled
        self._cuda = enabled and device.type == "cuda"
        self._totals: dict[str, float] = {}
        self._events: list[tuple[str, Any]] = []
        self._clock = time.perf_counter()
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._start.record()

    def lap(self, stage: str) -> None:
        """End `stage` now (its time is added to the stage's total)."""
        if not self.enabled:
            return
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append((stage, event))
            return
        now = time.perf_counter()
        self._totals[stage] = self._totals.get(stage, 0.0) + now - self._clock
        self._clock = now

    def seconds(self) -> dict[str, float]:
        """Seconds per stage, in the order the stages first ran (empty when disabled)."""
        if self._cuda and self._events:
            self._events[-1][1].synchronize()
            previous = self._start
            for stage, event in self._events:
                self._totals[stage] = self._totals.get(stage, 0.0) + previous.elapsed_time(event) / 1000
                previous = event
            self._events = []
            self._start = previous
        return dict(self._totals)


def window_scores(patch_tokens: Tensor, attn_logits: Tensor, text: Tensor, cfg: InferenceConfig) -> Tensor:
    """``[n, N, P]`` float32 window scores: sigmoid cosine (method.md §4.4 step 5), then background cleaning
    (§4.5) when `cfg` asks for it.

    Args:
        patch_tokens: ``[n, P, D]`` patch tokens of n windows; attn_logits: their ``[n, M, P]`` CLS attention logits.
        text: ``[N, D]`` unit class embeddings.
        cfg: the call's settings (``effective_bg_clean``, ``clean_lambda``, ``clean_head_embedding``).
    """
    scores = sigmoid_cosine(patch_tokens, text)
    if cfg.effective_bg_clean:
        scores = clean_background(scores, patch_tokens, attn_logits, text, lam=cfg.clean_lambda,
                                  head_embedding=cfg.clean_head_embedding)
    return scores


def segment_streaming(features: ImageFeatures, setup: PredictionSetup, *,
                      reference: bool = False) -> SegmentationResult:
    """Segment one image window by window (method.md §4.4–4.8); per-stage timings always (free on CPU).

    Args:
        features: the image's cached features (`Segmenter.set_image` / `embed_images`).
        setup: vocabulary and settings of the call.
        reference: the plain path: every stage on all windows at once, PAMR materialising every shift
            (`pamr_reference`), labels through the full softmax.
    """
    cfg, text, out = setup.config, setup.text, features.output
    clock = StageClock(out.patch_tokens.device, True)
    n_windows, num_classes = out.patch_tokens.shape[0], text.shape[0]
    wh, ww = features.guides.shape[-2:]
    scores = window_scores(out.patch_tokens, out.attn_logits, text, cfg)
    clock.lap("scores")
    grid = scores.view(n_windows, num_classes, *out.grid)
    if reference:
        scores = F.interpolate(grid, size=(wh, ww), mode="bilinear", align_corners=True)
        clock.lap("upsample")
        if cfg.pamr:
            scores = pamr_reference(features.guides, scores, iterations=cfg.pamr_iterations,
                                    dilations=cfg.pamr_dilations)
            clock.lap("pamr")
        if cfg.background:
            bg = torch.full((n_windows, 1, wh, ww), cfg.bg_threshold, dtype=scores.dtype, device=scores.device)
            scores = torch.cat([bg, scores], dim=1)
        stitched = stitch(scores, features.boxes, *features.resized_size)
    else:
        # One window at a time (upsample, PAMR, add into the canvas), the background channel added by `stitch`
        # itself: the same arithmetic per element as above, without materialising the [n, C, wh, ww] maps of
        # all windows or concatenating them.
        def refined_windows() -> Iterator[Tensor]:
            for i in range(n_windows):
                block = F.interpolate(grid[i : i + 1], size=(wh, ww), mode="bilinear", align_corners=True)
                clock.lap("upsample")
                if cfg.pamr:
                    block = pamr_fast(features.guides[i : i + 1], block, iterations=cfg.pamr_iterations,
                                      dilations=cfg.pamr_dilations)
                    clock.lap("pamr")
                yield block[0]
                clock.lap("stitch")  # the canvas accumulation of this window, done by `stitch` in between

        stitched = stitch(refined_windows(), features.boxes, *features.resized_size,
                          prepend=cfg.bg_threshold if cfg.background else None)
    clock.lap("stitch")
    final = resize_scores(stitched, features.original_size)
    scores_out: Tensor | Callable[[], Tensor]
    if final.device.type == "cpu" and not reference:
        # Same labels as the softmax + argmax below (ties to the lowest index after the fp32 softmax), computed
        # without the softmax over the full-resolution maps (method.md §4.8).
        labels = softmax_argmax(final)
        # The full-resolution scores are not kept: `result.scores` recomputes them on first access from
        # `stitched` with the same resize (bit for bit), so callers that only want labels never hold them.
        del final
        scores_out = functools.partial(resize_scores, stitched, features.original_size)
    else:
        # The softmax turns 1-ulp differences into exact ties that argmax resolves to the lowest index, as the
        # reference does (method.md §4.8 step 4).
        labels = torch.softmax(final, dim=0).argmax(dim=0)
        scores_out = final.cpu()
    clock.lap("resize_argmax")
    labels = labels.cpu()
    return SegmentationResult(labels=labels, scores=scores_out, class_names=list(setup.names),
                              background_index=setup.background_index, config=cfg, timings=clock.seconds(),
                              stitched=stitched.cpu(), model_info=setup.model_info)


@torch.inference_mode()
def segment_batch(features: Sequence[ImageFeatures], setup: PredictionSetup, *,
                  profile: bool = False) -> list[SegmentationResult]:
    """Segment several images with batched tensors on their device (see the module docstring).

    Images whose windows have the same size (and patch grid) share every tensor; a batch whose window maps
    exceed `BATCH_ELEMENTS` is processed in chunks of whole images. The labels reach the host as uint8 (up to
    256 channels) or int16 (up to 32,768) and are returned as int64, the `SegmentationResult.labels` contract.

    Args:
        features: the images' cached features, all on one device.
        setup: vocabulary and settings of the call.
        profile: per-stage seconds in each result's ``timings`` (its share of the batch by windows, like
            `ImageFeatures.embed_seconds`); otherwise ``timings`` is empty and nothing is timed.

    Returns:
        One result per image, in order. On CPU labels and stitched maps equal `segment_streaming`'s bit for bit.
    """
    if not features:
        return []
    device = features[0].output.patch_tokens.device
    clock = StageClock(device, profile)
    groups: dict[tuple[int, ...], list[int]] = {}  # windows of different sizes cannot share tensors
    for index, item in enumerate(features):
        groups.setdefault((*item.guides.shape[-2:], *item.output.grid), []).append(index)
    done: dict[int, tuple[Tensor, Tensor]] = {}  # image -> (stitched on the device, labels on their way)
    for indices in groups.values():
        for chunk in _chunks(indices, features, len(setup.names)):
            for index, answer in zip(chunk, _segment_chunk([features[i] for i in chunk], setup, clock), strict=True):
                done[index] = answer
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()  # the one wait: the labels' copies to the host
    stages = clock.seconds()
    windows = sum(len(item.boxes) for item in features)
    results = []
    for index, item in enumerate(features):
        stitched, labels = done[index]
        share = len(item.boxes) / windows
        on_host = device.type == "cpu"
        results.append(SegmentationResult(
            labels=labels.long(),
            scores=functools.partial(_resize_to_host, stitched, item.original_size),
            class_names=list(setup.names), background_index=setup.background_index, config=setup.config,
            timings={stage: seconds * share for stage, seconds in stages.items()},
            stitched=stitched if on_host else functools.partial(Tensor.cpu, stitched),
            model_info=setup.model_info))
    return results


def _chunks(indices: list[int], features: Sequence[ImageFeatures], channels: int) -> Iterator[list[int]]:
    """`indices` in runs of whole images whose window maps hold at most `BATCH_ELEMENTS` values (one at least)."""
    chunk: list[int] = []
    elements = 0
    for index in indices:
        item = features[index]
        size = len(item.boxes) * channels * int(item.guides.shape[-2]) * int(item.guides.shape[-1])
        if chunk and elements + size > BATCH_ELEMENTS:
            yield chunk
            chunk, elements = [], 0
        chunk.append(index)
        elements += size
    if chunk:
        yield chunk


def _segment_chunk(items: list[ImageFeatures], setup: PredictionSetup,
                   clock: StageClock) -> list[tuple[Tensor, Tensor]]:
    """(stitched ``[C, H', W']`` on the device, labels ``[h, w]``) per image of `items`, whose windows share a
    size; on CUDA the labels are pinned host tensors still being copied (read them after synchronising)."""
    cfg, text = setup.config, setup.text
    device = items[0].output.patch_tokens.device
    counts = [len(item.boxes) for item in items]
    first = [sum(counts[:i]) for i in range(len(items))]
    order = [first[image] + k for image, k in window_order(counts)]  # slot-major position -> image-major window
    if _like_streaming(device):
        # A CPU GEMM rounds a row according to where the blocking puts it (edge micro-kernels accumulate in
        # another order), so the windows of a larger batch could differ in the last bit: image by image, the
        # scores are those of `segment_streaming` exactly.
        scores = torch.cat([window_scores(item.output.patch_tokens, item.output.attn_logits, text, cfg)
                            for item in items])
    else:  # every window of the chunk at once
        scores = window_scores(torch.cat([item.output.patch_tokens for item in items]),
                               torch.cat([item.output.attn_logits for item in items]), text, cfg)
    grid = scores.view(len(order), text.shape[0], *items[0].output.grid)
    guides = torch.cat([item.guides for item in items]) if cfg.pamr else None
    if order != sorted(order):
        # Slot-major windows (see `window_order`): permuted here, on the small patch grids, so that each slot
        # of the stitching is a contiguous range of the upsampled maps.
        permutation = device_index([order], device)[0]
        grid = grid.index_select(0, permutation)
        guides = None if guides is None else guides.index_select(0, permutation)
    clock.lap("scores")
    blocks = F.interpolate(grid, size=tuple(items[0].guides.shape[-2:]), mode="bilinear", align_corners=True)
    clock.lap("upsample")
    if guides is not None:
        blocks = pamr_fast(guides, blocks, iterations=cfg.pamr_iterations, dilations=cfg.pamr_dilations)
        clock.lap("pamr")
    canvas = stitch_batch(blocks, [item.boxes for item in items], [item.resized_size for item in items],
                          prepend=cfg.bg_threshold if cfg.background else None)
    del blocks
    clock.lap("stitch")
    answers: dict[int, tuple[Tensor, Tensor]] = {}
    by_size: dict[tuple[tuple[int, int], tuple[int, int]], list[int]] = {}
    for image, item in enumerate(items):
        by_size.setdefault((item.resized_size, item.original_size), []).append(image)
    channels = canvas.shape[1]
    for ((height, width), size), members in by_size.items():
        step = max(1, BATCH_ELEMENTS // (channels * size[0] * size[1]))
        for start in range(0, len(members), step):
            part = members[start : start + step]
            # Contiguous [k, C, H', W'] maps: the layout of `segment_streaming`'s canvas, so that the resize below
            # (and the lazy `scores`) are the same arithmetic.
            stitched = torch.stack([canvas[image, :, :height, :width] for image in part]).contiguous()
            for image, maps, labels in zip(part, stitched, _labels(stitched, size), strict=True):
                answers[image] = (maps, labels)
    clock.lap("resize_argmax")
    return [answers[image] for image in range(len(items))]


def _labels(stitched: Tensor, size: tuple[int, int]) -> list[Tensor]:
    """Labels of ``[k, C, H', W']`` stitched maps at the original `size` (method.md §4.8 steps 3–4), one per map.

    On CPU `softmax_argmax` (the labels of `segment_streaming`); elsewhere the softmax and argmax of all maps at
    once, narrowed to uint8/int16 on the device and copied into page-locked host memory without waiting.
    """
    final = F.interpolate(stitched, size=size, mode="bilinear", align_corners=False)
    if _like_streaming(final.device):
        return [softmax_argmax(maps) for maps in final]
    labels = torch.softmax(final, dim=1).argmax(dim=1)
    channels = final.shape[1]
    compact = torch.uint8 if channels <= 256 else torch.int16 if channels <= 1 << 15 else torch.int64
    labels = labels.to(compact)
    if final.device.type != "cuda":
        return list(labels.cpu())
    host = torch.empty(labels.shape, dtype=compact, pin_memory=True)
    host.copy_(labels, non_blocking=True)
    return list(host)


def _like_streaming(device: torch.device) -> bool:
    """Whether `segment_batch` repeats `segment_streaming`'s arithmetic exactly (on CPU: the scores image by image,
    the labels by `softmax_argmax`); elsewhere those run batched too. Tests turn it off to run the device branches
    on CPU."""
    return device.type == "cpu"


def _resize_to_host(stitched: Tensor, size: tuple[int, int]) -> Tensor:
    """`resize_scores` of one image's stitched maps, on the host (the lazy `SegmentationResult.scores`)."""
    return resize_scores(stitched, size).cpu()
