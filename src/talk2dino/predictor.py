"""`Segmenter`: embed an image once, answer many vocabularies (house-style §5, method.md §4).

The pipeline per image (method.md §4.3–4.8): resize the uint8 image with OpenCV, cut the window
grid, run the backbone on all windows as one batch, then per window sigmoid(cos) → cleaning →
bilinear upsampling (align_corners=True) → PAMR → background channel, stitch by averaging, resize
to the original size (align_corners=False), softmax over channels and argmax: `talk2dino.postprocess`, one
window at a time on CPU, all windows of a batch as batched tensors on a GPU (`Segmenter.predict_features_batch`).

Around it: `talk2dino.prepare` (images made ready, cached features), `talk2dino.vocabulary` (label checks, once),
`talk2dino.results` (the typed answer). ``background``, ``bg_threshold``, ``bg_clean``, ``pamr``: per `predict` call.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, Literal, overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from talk2dino.config import DEFAULT_MODEL, InferenceConfig, check_template
from talk2dino.data.image_memory import MemoryBudget, default_image_memory
from talk2dino.data.images import ImageTooLargeError, as_rgb_image
from talk2dino.errors import InvalidInputError, one_line
from talk2dino.labels import BACKGROUND_NAME
from talk2dino.models import BackboneOutput, Talk2DINO
from talk2dino.postprocess import PredictionSetup, segment_batch, segment_streaming
from talk2dino.prepare import ImageFeatures, ImageLike, PreparedImage, chunk_reporter, prepare_image
from talk2dino.results import SegmentationResult, describe_model
from talk2dino.vocabulary import CheckedLabels, check_labels, refuse_same_tokens, report_truncated

logger = logging.getLogger(__name__)

_TEXT_CACHE_SIZE = 64
# Deprecated keyword of predict / predict_features / predict_batch -> its InferenceConfig name.
_RENAMED_OPTIONS = {"threshold": "bg_threshold", "clean": "bg_clean"}
Progress = Callable[[int, int], None]
"""``progress(image_index, windows_done)``, called by `Segmenter.embed_images` after each backbone chunk."""


def _renamed(old: str, value: Any, new_value: Any, stacklevel: int = 3) -> Any:
    """`new_value`, or the deprecated spelling's `value` with a DeprecationWarning; TypeError if both are given."""
    if value is None:
        return new_value
    new = _RENAMED_OPTIONS[old]
    if new_value is not None:
        raise TypeError(f"give {new}= only ({old}= is its deprecated spelling)")
    warnings.warn(f"{old}= is deprecated; use {new}=", DeprecationWarning, stacklevel=stacklevel)
    return value


class Segmenter:
    """Stateful predictor caching class embeddings and the current image's window features.

    Example:
        >>> seg = Segmenter.from_pretrained("talk2dino-vitb14-reg")
        >>> seg.set_classes(["cat", "sofa", "window"])
        >>> seg.set_image(pil_image)
        >>> result = seg.predict(background=True)
    """

    def __init__(self, model: Talk2DINO, config: InferenceConfig | None = None, *, reference: bool = False,
                 max_image_memory: int | None | Literal["auto"] = "auto") -> None:
        """Args:
            model: a built `Talk2DINO`.
            config: inference settings; the model's registry defaults when None.
            reference: use the plain reference path everywhere (eager attention, one window per
                backbone call, prompts padded to the full context, PAMR materialising every
                neighbour shift). For tests and benchmarks; results equal the fast path.
            max_image_memory: bytes segmenting one image may need, as ``talk2dino segment
                --max-image-memory``: a path or PIL image whose estimate (from its header) is above it is refused
                before it is decoded, and `predict` / `predict_batch` refuse an image whose score maps for that
                call's labels would exceed it. ``"auto"``: the CLI's default (half the machine's or container's
                memory, `talk2dino.data.image_memory.default_image_memory`); None: no limit.

        Raises:
            InvalidInputError: `max_image_memory` not a positive number of bytes, None or ``"auto"``.
        """
        self.model = model
        self.max_image_memory = default_image_memory() if max_image_memory == "auto" else max_image_memory
        self.config = config if config is not None else model.config.inference
        self.config.validate()
        self.reference = reference
        self._check_window(self.config)
        self._text_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._classes: CheckedLabels | None = None
        self._class_embeddings: torch.Tensor | None = None
        self._features: ImageFeatures | None = None

    @property
    def max_image_memory(self) -> int | None:
        """Bytes segmenting one image may need (None: no limit); see the constructor."""
        return self._max_image_memory

    @max_image_memory.setter
    def max_image_memory(self, value: int | None) -> None:
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidInputError(f"max_image_memory must be a positive number of bytes, None (no limit) or "
                                    f"'auto', got {value!r}")
        self._max_image_memory = value

    @classmethod
    def from_pretrained(cls, name: str | None = DEFAULT_MODEL, *, pretrained: bool = True,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, backbone: str | None = None,
                        text_encoder: str | None = None, projection: str | None = None,
                        max_image_memory: int | None | Literal["auto"] = "auto", **overrides: Any) -> Segmenter:
        """Build the model with `create_model` and a segmenter with its inference defaults.

        Args:
            name, pretrained, device, dtype, cache_dir, backbone, text_encoder, projection: passed to
                `talk2dino.create_model` as they are: a registry name or ``local-dir:``/``hf-hub:`` folder,
                and sources replacing the model's parts (``name=None`` composes a model from all three).
            max_image_memory: the memory guard, as in the constructor.
            overrides: `InferenceConfig` fields replacing the model's defaults, e.g. ``pamr=False``;
                names are checked before any weights load.

        Raises:
            TypeError: an override that is not an `InferenceConfig` field.
            WeightsError, ValueError: as `create_model`.
        """
        from talk2dino.factory import create_model

        known = {f.name for f in dataclasses.fields(InferenceConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"from_pretrained got unknown inference setting(s) {', '.join(unknown)}; "
                            f"expected create_model arguments or InferenceConfig fields ({', '.join(sorted(known))})")
        model = create_model(name, pretrained=pretrained, device=device, dtype=dtype, cache_dir=cache_dir,
                             backbone=backbone, text_encoder=text_encoder, projection=projection)
        return cls(model, dataclasses.replace(model.config.inference, **overrides), max_image_memory=max_image_memory)

    def _check_window(self, config: InferenceConfig) -> None:
        if config.window % (patch := self.model.backbone.patch_size):
            raise ValueError(f"window {config.window} is not a multiple of the backbone patch size {patch}")

    # ------------------------------------------------------------------ text side
    @staticmethod
    def check_labels(names: Sequence[str], *, background: bool = False) -> CheckedLabels:
        """Validate a vocabulary once (`talk2dino.vocabulary.check_labels`); names are kept verbatim.

        The result may be given to `set_classes`, which then does not check it again.

        Raises:
            InvalidInputError: one line naming the first bad label (see `talk2dino.vocabulary.check_labels`), or
                a label named 'background' while `background` is on.
        """
        return check_labels(names, background=background)

    def class_embeddings(self, names: Sequence[str], templates: Sequence[str] | None = None) -> torch.Tensor:
        """Unit class embeddings ``[N, D]`` float32, cached per (names, templates, text weights)."""
        templates = tuple(templates if templates is not None else self.model.config.text.templates)
        if not templates:
            # An empty set would average zero prompts (a NaN embedding deep inside torch); found by the HTTP corpus.
            raise InvalidInputError(
                "templates must list at least one prompt template with one '{}', e.g. 'a photo of a {}.'")
        for t in templates:
            check_template(t)  # one bare '{}' and literal text: no named, indexed or formatted fields
        key = (tuple(names), templates, self.model.weights_key, self.reference)
        cached = self._text_cache.get(key)
        if cached is not None:
            self._text_cache.move_to_end(key)
            return cached
        from talk2dino.models.text_encoder import collect_truncations

        refuse_same_tokens(self.model.text_encoder, names, templates)
        with collect_truncations() as cut:
            embeddings = self.model.embed_classes(names, templates, pad_to_context=self.reference)
        report_truncated(names, templates, cut,
                         context_length=getattr(self.model.text_encoder, "context_length", 77))
        self._text_cache[key] = embeddings
        while len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings

    def set_classes(self, names: Sequence[str], templates: Sequence[str] | None = None, *,
                    background: bool | None = None, threshold: float | None = None) -> None:
        """Set the vocabulary: the labels and their prompt templates. Nothing else.

        Args:
            names: class names, used verbatim (a `CheckedLabels` from `check_labels` is not checked again).
            templates: prompt templates (None: the model's 7 templates).
            background, threshold: deprecated (a DeprecationWarning): they change this segmenter's default
                ``background`` / ``bg_threshold`` for later calls. Pass ``background=`` / ``bg_threshold=`` to
                `predict` instead.

        Raises:
            InvalidInputError: a bad label or template (one line naming it).
        """
        changes: dict[str, Any] = {}
        if background is not None:
            changes["background"] = background
        if threshold is not None:
            changes["bg_threshold"] = threshold
        if changes:
            warnings.warn("set_classes(background=, threshold=) is deprecated and changes the segmenter's defaults; "
                          "pass background= / bg_threshold= to predict, predict_features or predict_batch",
                          DeprecationWarning, stacklevel=2)
            config = dataclasses.replace(self.config, **changes)
            config.validate()
            self.config = config
        # With the deprecated background=True a label named 'background' is refused now, as before; otherwise
        # when a call turns the background channel on.
        checked = check_labels(names, background=bool(background))
        self._class_embeddings = self.class_embeddings(checked, templates)
        self._classes = checked

    # ------------------------------------------------------------------ image side
    def _memory_budget(self, background: bool | None) -> MemoryBudget | None:
        """`max_image_memory` as a header check for an image segmented with the current labels (one before
        `set_classes`) plus the background channel when `background` (None: the config's) asks for it; no
        overlay or saved scores (the API writes no files). None without a limit."""
        if self.max_image_memory is None:
            return None
        labels = len(self._classes) if self._classes is not None else 1
        channels = labels + int(self.config.background if background is None else background)
        return MemoryBudget(self.max_image_memory, max(1, channels), self.config, overlay=False,
                            flag="max_image_memory")

    def _check_memory(self, features: Sequence[ImageFeatures], names: Sequence[str], background: bool | None) -> None:
        """Refuse, before any score map is allocated, an image whose segmentation with this call's labels would
        need over `max_image_memory` (`names`: how each image is called in the message)."""
        if self._classes is None:
            return  # `_setup` says that no labels are set
        budget = self._memory_budget(background)
        if budget is None:
            return
        for item, name in zip(features, names, strict=True):
            height, width = item.original_size
            try:
                budget(int(width), int(height))
            except ImageTooLargeError as err:
                raise ImageTooLargeError(f"{name}: {err}") from None

    def prepare(self, image: ImageLike | PreparedImage) -> PreparedImage:
        """`prepare_image` with this segmenter's settings (a `PreparedImage` is returned as is).

        `image` may be any form `talk2dino.data.images.as_rgb_image` accepts: a file path (decoded as the CLI
        decodes it), a PIL image, an RGB uint8 ``H×W×3`` numpy array, or a ``[3, H, W]`` / ``[H, W, 3]``
        tensor (uint8, or float in [0, 1]; a leading dimension of 3 means channel-first).

        A path or PIL image is first held to `max_image_memory` from its header (size and mode), before any
        pixel is decoded, with the current vocabulary's score channels (one before `set_classes`).

        Raises:
            ImageTooLargeError: (an `InvalidInputError`) the image would need over `max_image_memory`; one line
                naming the file, its size in pixels, the estimate and the limit.
            InvalidInputError: an image that cannot be read or converted.
        """
        if isinstance(image, PreparedImage):
            return image
        return prepare_image(as_rgb_image(image, check_header=self._memory_budget(None)), self.config)

    def _backbone_inputs(self, guides: torch.Tensor) -> torch.Tensor:
        """``[n, 3, wh, ww]`` 0–255 windows -> ``[n, 3, window, window]`` normalised backbone input."""
        size = self.config.window
        # non_blocking: from pinned memory (the CLI's CUDA loader) the copy overlaps host work.
        x = guides.to(self.model.device, non_blocking=True)
        if x.shape[-2:] != (size, size):
            # Windows smaller than the crop only occur for tiny or extreme-aspect images; the
            # reference stretches them without keeping the aspect ratio (pitfall P23).
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
        return self.model.normalize(x)

    def _run_backbone(self, windows: torch.Tensor,
                      progress: Callable[[int], None] | None = None) -> BackboneOutput:
        """Backbone over ``[n, 3, S, S]`` windows in chunks of `window_batch_size` (1 on the reference path);
        `progress` is called with the number of windows of each chunk once it is done."""
        step = 1 if self.reference else self.config.window_batch_size
        outs = []
        for i in range(0, windows.shape[0], step):
            outs.append(self.model.encode_image(windows[i:i + step], reference=self.reference))
            if progress is not None:
                if self.model.device.type == "cuda":
                    torch.cuda.synchronize(self.model.device)  # done, not merely queued
                progress(int(outs[-1].patch_tokens.shape[0]))
        if len(outs) == 1:
            return outs[0]
        return BackboneOutput(
            patch_tokens=torch.cat([o.patch_tokens for o in outs]),
            cls_token=torch.cat([o.cls_token for o in outs]),
            register_tokens=torch.cat([o.register_tokens for o in outs]),
            attn_logits=torch.cat([o.attn_logits for o in outs]),
            grid=outs[0].grid,
        )

    def _embed_prepared(self, prepared: list[PreparedImage], progress: Progress | None) -> list[ImageFeatures]:
        """Backbone over the windows of all `prepared` images, batched by window size (one call per size)."""
        if not prepared:
            return []
        started = time.perf_counter()
        # Windows of different images can be batched only when they have the same size.
        by_size: dict[tuple[int, int], list[int]] = {}
        for idx, item in enumerate(prepared):
            by_size.setdefault((int(item.guides.shape[-2]), int(item.guides.shape[-1])), []).append(idx)
        outputs: dict[int, BackboneOutput] = {}
        for indices in by_size.values():
            stacked = torch.cat([prepared[i].guides for i in indices])
            on_chunk = None if progress is None else chunk_reporter(
                progress, [i for i in indices for _ in range(prepared[i].guides.shape[0])])
            out = self._run_backbone(self._backbone_inputs(stacked), on_chunk)
            start = 0
            for i in indices:
                n = prepared[i].guides.shape[0]
                sl = slice(start, start + n)
                outputs[i] = BackboneOutput(out.patch_tokens[sl], out.cls_token[sl], out.register_tokens[sl],
                                            out.attn_logits[sl], out.grid)
                start += n
        seconds = time.perf_counter() - started
        windows = sum(int(item.guides.shape[0]) for item in prepared)
        return [
            ImageFeatures(original_size=item.rgb.shape[:2], resized_size=item.resized_size, boxes=item.boxes,
                          guides=item.guides.to(self.model.device, non_blocking=True), output=outputs[i],
                          embed_seconds=seconds * int(item.guides.shape[0]) / windows)
            for i, item in enumerate(prepared)
        ]

    @overload
    def embed_images(self, images: Sequence[ImageLike | PreparedImage], *, progress: Progress | None = None,
                     isolate_failures: Literal[False] = False) -> list[ImageFeatures]: ...
    @overload
    def embed_images(self, images: Sequence[ImageLike | PreparedImage], *, progress: Progress | None = None,
                     isolate_failures: Literal[True]) -> list[ImageFeatures | InvalidInputError]: ...

    def embed_images(self, images: Sequence[ImageLike | PreparedImage], *, progress: Progress | None = None,
                     isolate_failures: bool = False) -> list[ImageFeatures] | list[ImageFeatures | InvalidInputError]:
        """Embed several images, batching the windows of all of them through the backbone.

        Args:
            images: images in any form `to_rgb_uint8` accepts, or `PreparedImage`s made with the same
                settings (e.g. by DataLoader workers).
            progress: called as ``progress(image_index, windows)`` after each backbone chunk (of
                ``window_batch_size`` windows), once per image whose windows the chunk held, with how many
                of that image's windows it finished; an image's calls add up to its window count (more when a
                failed batch is retried image by image). For progress bars: the backbone runs all windows of
                the batch in one call.
            isolate_failures: on an `InvalidInputError` (a bad image), embed the images one by one and return
                that error in place of the features of each image that has one, instead of raising: one bad
                image does not cost the others. The CLI, the server and evaluation use this.

        Returns:
            One `ImageFeatures` per image, in order (with `isolate_failures`, an `InvalidInputError` in place
            of each image that could not be embedded).

        Raises:
            InvalidInputError: an image that cannot be converted (without `isolate_failures`).
        """
        if not isolate_failures:
            return self._embed_prepared([self.prepare(image) for image in images], progress)
        try:
            return list(self._embed_prepared([self.prepare(image) for image in images], progress))
        except InvalidInputError as err:  # one image's fault: find which, keep the others
            logger.debug("batch embedding failed (%s); retrying the %d images one by one", err, len(images))
        results: list[ImageFeatures | InvalidInputError] = []
        for index, image in enumerate(images):
            on_windows = None if progress is None else functools.partial(
                lambda _image, count, index: progress(index, count), index=index)
            try:
                results.append(self._embed_prepared([self.prepare(image)], on_windows)[0])
            except InvalidInputError as one:
                results.append(one)
        return results

    def set_image(self, image: ImageLike) -> ImageFeatures:
        """Embed one image (resize, windows, backbone) and cache the result for `predict`.

        Args:
            image: a path (``str`` / ``os.PathLike``, decoded with EXIF orientation as the CLI does), a PIL
                image, an RGB uint8 ``H×W×3`` numpy array, or an RGB tensor ``[3, H, W]`` or ``[H, W, 3]``:
                uint8 in [0, 255], or floating point with every value in [0, 1] (the dtype decides). A tensor
                whose first dimension is 3 is channel-first, so a ``3×3×3`` one is ``[3, H, W]``.
                See `talk2dino.data.images.as_rgb_image`.

        A path (or a PIL image from ``Image.open``) is refused from its header, before decoding, when
        segmenting it would need over `max_image_memory` (see `prepare`).

        Raises:
            ImageTooLargeError: (an `InvalidInputError`) over `max_image_memory`: naming the file, its size, the
                estimate and the limit.
            InvalidInputError: one line naming what is wrong with the image.
        """
        self._features = self.embed_images([image])[0]
        return self._features

    def reset_image(self) -> None:
        """Free the cached image features."""
        self._features = None

    # ------------------------------------------------------------------ prediction
    def options(self, *, background: bool | None = None, bg_threshold: float | None = None,
                bg_clean: bool | None = None, pamr: bool | None = None) -> InferenceConfig:
        """The effective settings of one call: this segmenter's config with the given options replaced.

        Raises:
            ValueError: an option out of range (e.g. a threshold outside [0, 1]).
        """
        given: dict[str, Any] = {"background": background, "bg_threshold": bg_threshold, "bg_clean": bg_clean,
                                 "pamr": pamr}
        changes = {key: value for key, value in given.items() if value is not None}
        if not changes:
            return self.config
        config = dataclasses.replace(self.config, **changes)
        config.validate()
        return config

    def _setup(self, background: bool | None, bg_threshold: float | None, bg_clean: bool | None,
               pamr: bool | None) -> PredictionSetup:
        """The vocabulary and effective settings of one prediction call, checked."""
        classes, embeddings = self._classes, self._class_embeddings
        if classes is None or embeddings is None:
            raise InvalidInputError("no labels set; call set_classes first")
        cfg = self.options(background=background, bg_threshold=bg_threshold, bg_clean=bg_clean, pamr=pamr)
        classes.check_background(cfg.background)
        names = (BACKGROUND_NAME, *classes) if cfg.background else tuple(classes)
        return PredictionSetup(text=embeddings, names=names, background_index=0 if cfg.background else None,
                               config=cfg, model_info=describe_model(self.model))

    @torch.inference_mode()
    def predict_features(self, features: ImageFeatures, *, background: bool | None = None,
                         bg_threshold: float | None = None, bg_clean: bool | None = None, pamr: bool | None = None,
                         threshold: float | None = None, clean: bool | None = None,
                         profile: bool = False) -> SegmentationResult:
        """Segment from cached image features with the current vocabulary.

        Args:
            features: from `set_image` or `embed_images`.
            background: prepend the constant threshold channel as class 0 (method.md §4.6).
            bg_threshold: the background threshold θ.
            bg_clean: background cleaning (method.md §4.5); None follows `background`.
            pamr: PAMR refinement (method.md §4.7).
            threshold, clean: deprecated spellings of `bg_threshold` and `bg_clean` (a DeprecationWarning).
            profile: per-stage ``timings`` on a GPU (`predict_features_batch`); on CPU they are always recorded.

        Every option left None takes the segmenter's `config` value. Nothing is kept between calls. On CPU the
        windows are processed one at a time (`talk2dino.postprocess.segment_streaming`); on other devices as
        `predict_features_batch` does, without waiting for the device until the labels are copied.

        Raises:
            InvalidInputError: no vocabulary set, or a label named 'background' with the background channel on.
            ValueError: an option out of range.
        """
        # stacklevel 4: past the inference_mode wrapper, to the caller.
        setup = self._setup(background, _renamed("threshold", threshold, bg_threshold, 4),
                            _renamed("clean", clean, bg_clean, 4), pamr)
        if self.reference or features.guides.device.type == "cpu":
            return segment_streaming(features, setup, reference=self.reference)
        return segment_batch([features], setup, profile=profile)[0]

    @torch.inference_mode()
    def predict_features_batch(self, features: Sequence[ImageFeatures], *, background: bool | None = None,
                               bg_threshold: float | None = None, bg_clean: bool | None = None,
                               pamr: bool | None = None, profile: bool = False,
                               batched: bool | None = None) -> list[SegmentationResult]:
        """Segment several images from their cached features: one result per image, in order.

        With the batched path (`talk2dino.postprocess.segment_batch`) all windows of all images go through
        scores, cleaning, upsampling, PAMR and stitching as batched tensors on the device, the full-resolution
        resize and argmax run on images of one size at once, and only the labels come back to the host (the
        ``scores`` and ``stitched`` maps on first read). Its labels and stitched maps equal `predict_features`'
        bit for bit on CPU.

        Args:
            features: from `embed_images` (all on the model's device).
            background, bg_threshold, bg_clean, pamr: as in `predict_features`, for every image.
            profile: per-stage ``timings`` (each image's share of the batch's seconds by windows; CUDA events on
                a GPU); without it the batched path leaves ``timings`` empty and never waits for the device.
            batched: the batched path; None: on any device but the CPU, where the windows are streamed one at a
                time as by `predict_features` (which bounds memory to one window's maps and is as fast there).
                The reference path (``reference=True``) always streams.

        Raises:
            InvalidInputError, ValueError: as `predict_features`.
        """
        setup = self._setup(background, bg_threshold, bg_clean, pamr)
        if batched is None:
            batched = bool(features) and features[0].guides.device.type != "cpu"
        if batched and not self.reference:
            return segment_batch(features, setup, profile=profile)
        return [segment_streaming(item, setup, reference=self.reference) for item in features]

    def predict(self, *, background: bool | None = None, bg_threshold: float | None = None,
                bg_clean: bool | None = None, pamr: bool | None = None, threshold: float | None = None,
                clean: bool | None = None) -> SegmentationResult:
        """Segment the image of the last `set_image` with the vocabulary of the last `set_classes`.

        Options as in `predict_features`.

        Raises:
            ImageTooLargeError: (an `InvalidInputError`) this call's score maps (labels, plus the background
                channel) for the image's size would need over `max_image_memory`.
        """
        if self._features is None:
            raise InvalidInputError("no image set; call set_image first")
        self._check_memory([self._features], ["the image of set_image"], background)
        return self.predict_features(self._features, background=background, pamr=pamr,
                                     bg_threshold=_renamed("threshold", threshold, bg_threshold),
                                     bg_clean=_renamed("clean", clean, bg_clean))

    def predict_batch(self, images: Sequence[ImageLike], *, background: bool | None = None,
                      bg_threshold: float | None = None, bg_clean: bool | None = None, pamr: bool | None = None,
                      threshold: float | None = None, clean: bool | None = None,
                      profile: bool = False) -> list[SegmentationResult]:
        """Throughput path: windows of all `images` share backbone batches and `predict_features_batch`.

        `images` is a list (or other sequence) of images in any form `set_image` accepts, paths included; a
        4-D ``[N, ...]`` array or tensor is a batch of its N images. Does not touch the `set_image` cache.
        Options as in `predict_features_batch`; one result per image.

        Raises:
            ImageTooLargeError: (an `InvalidInputError`) an image over `max_image_memory`, from its header for
                paths and PIL images, and with this call's labels for every image.
            InvalidInputError: `images` is one image rather than a sequence of them, or an image is bad.
        """
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim != 4):
            raise InvalidInputError("predict_batch takes a sequence of images (a list, or a 4-D batch); "
                                    "for one image use set_image and predict, or pass [image]")
        bg_threshold = _renamed("threshold", threshold, bg_threshold)
        bg_clean = _renamed("clean", clean, bg_clean)
        features = self.embed_images(images)
        self._check_memory(features, [one_line(image) if isinstance(image, (str, os.PathLike)) else f"image {index}"
                                      for index, image in enumerate(images)], background)
        return self.predict_features_batch(features, background=background,
                                           bg_threshold=bg_threshold, bg_clean=bg_clean, pamr=pamr, profile=profile)

    def summary(self, result: SegmentationResult) -> dict[str, Any]:
        """JSON-ready description: labels with pixel shares, effective settings, model and weights
        (`SegmentationResult.summary`, with this segmenter's model)."""
        return {**result.summary(), "model": describe_model(self.model)}
