"""`Segmenter`: embed an image once, answer many vocabularies (house-style §5, method.md §4).

The pipeline per image (method.md §4.3–4.8): resize the uint8 image with OpenCV, cut the window
grid, run the backbone on all windows as one batch, then per window sigmoid(cos) → cleaning →
bilinear upsampling (align_corners=True) → PAMR → background channel, stitch by averaging, resize
to the original size (align_corners=False), softmax over channels and argmax.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from talk2dino.config import InferenceConfig, check_template
from talk2dino.data.images import as_rgb_image, resize_uint8, to_rgb_uint8
from talk2dino.errors import InvalidInputError
from talk2dino.models import BackboneOutput, Talk2DINO
from talk2dino.ops.cleaning import clean_background
from talk2dino.ops.pamr import pamr as pamr_fast
from talk2dino.ops.pamr import pamr_reference
from talk2dino.ops.similarity import sigmoid_cosine
from talk2dino.ops.sliding import resized_size, softmax_argmax, stitch, window_grid

logger = logging.getLogger(__name__)

BACKGROUND_NAME = "background"
MAX_LABEL_CHARS = 1000
"""Longest accepted label, in characters (CLIP keeps 77 tokens, far fewer characters than this)."""
# Unicode categories refused in labels: controls (NUL, tab, CR, LF, ...) and line/paragraph separators.
_BAD_LABEL_CATEGORIES = frozenset({"Cc", "Zl", "Zp"})
ImageLike = Any  # path, PIL image, HxWx3 uint8 numpy array, [3, H, W] or [H, W, 3] tensor; see data.images.as_rgb_image
_TEXT_CACHE_SIZE = 64


class _LazyScores:
    """Descriptor of `SegmentationResult.scores`: a tensor, or a zero-argument function computing it once.

    The predictor stores a function (the final resize of ``stitched``), so that a caller who never reads
    ``scores`` never allocates the full-resolution ``[C, H, W]`` maps; the first read computes and keeps them.
    Assigning a tensor stores it as is.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self._slot = f"_{name}_value"

    def __get__(self, obj: Any, objtype: type | None = None) -> torch.Tensor:
        if obj is None:
            # No class-level default: dataclasses then treat `scores` as a required field.
            raise AttributeError("scores")
        value = obj.__dict__[self._slot]
        if callable(value):
            value = value()
            obj.__dict__[self._slot] = value
        return value

    def __set__(self, obj: Any, value: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        obj.__dict__[self._slot] = value


@dataclass(init=False)
class SegmentationResult:
    """The answer for one image.

    Attributes:
        labels: ``[H, W]`` int64 label map at the original image size. With a background channel,
            0 is background and n + 1 is ``class_names[n + 1]``; otherwise n is ``class_names[n]``.
        scores: ``[C, H, W]`` float32 stitched per-channel scores resized to the image, before the
            softmax (sigmoid units; channel ``background_index`` is the constant threshold). On CPU they
            are computed from ``stitched`` on first access (the same resize, bit for bit) and then kept;
            a tensor or a zero-argument function returning one may be passed.
        class_names: C names, ``"background"`` first when a background channel is used.
        background_index: 0 with a background channel, else None.
        config: the effective inference settings.
        timings: seconds per stage of this prediction.
        stitched: ``[C, H', W']`` float32 window average at the resized (processing) size, before the
            final resize (method.md §4.8 step 1).
        model_info: ``{"name", "profile", "weights"}`` of the model that made it (set by `Segmenter`;
            None for a result built by hand). Written into :meth:`save`'s JSON.

    Helpers: :meth:`shares` (pixels per class), :meth:`summary` (the CLI's JSON fields), :meth:`overlay`
    (class colours over the image, a PIL image) and :meth:`save` (the CLI's files).
    """

    labels: torch.Tensor
    class_names: list[str]
    background_index: int | None
    config: InferenceConfig
    timings: dict[str, float] = field(default_factory=dict)
    stitched: torch.Tensor | None = None
    model_info: dict[str, Any] | None = None
    # Last among the fields only so that its descriptor may stand where a default would; the constructor
    # below keeps the original argument order (labels, scores, class_names, ...).
    scores: _LazyScores = _LazyScores()

    def __init__(self, labels: torch.Tensor, scores: torch.Tensor | Callable[[], torch.Tensor],
                 class_names: list[str], background_index: int | None, config: InferenceConfig,
                 timings: dict[str, float] | None = None, stitched: torch.Tensor | None = None,
                 model_info: dict[str, Any] | None = None) -> None:
        self.labels = labels
        self.scores = scores
        self.class_names = class_names
        self.background_index = background_index
        self.config = config
        self.timings = {} if timings is None else timings
        self.stitched = stitched
        self.model_info = model_info

    def shares(self) -> list[dict[str, Any]]:
        """Per channel: index, name, pixel count and share of the image (shares sum to 1)."""
        counts = torch.bincount(self.labels.flatten(), minlength=len(self.class_names)).tolist()
        total = max(int(self.labels.numel()), 1)
        return [
            {"index": i, "name": n, "pixels": int(c), "share": round(c / total, 6)}
            for i, (n, c) in enumerate(zip(self.class_names, counts, strict=True))
        ]

    def summary(self) -> dict[str, Any]:
        """JSON-ready description, the fields of the CLI's ``<stem>.json`` after ``image`` and ``files``:
        size, labels with pixel shares, background index, effective settings, model and timings."""
        return {
            "size": list(self.labels.shape),
            "labels": self.shares(),
            "background_index": self.background_index,
            "settings": self.config.effective_dict(),
            "model": self.model_info,
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }

    def overlay(self, image: ImageLike, *, alpha: float | None = None) -> Image.Image:
        """The class colours blended over `image`, as the CLI's ``<stem>_overlay.png`` (`outputs.overlay`).

        Args:
            image: the segmented image, in any form `Segmenter.set_image` accepts (a path included); it
                must have the size of ``labels``.
            alpha: weight of the class colour in [0, 1] (None: `outputs.DEFAULT_OVERLAY_ALPHA`, the CLI's 0.5).
                Background pixels keep the image's colour.

        Returns:
            An RGB PIL image of the image's size.

        Raises:
            InvalidInputError: an unreadable image, a size other than the labels', alpha outside [0, 1].
        """
        from talk2dino import outputs

        blended = outputs.overlay(as_rgb_image(image), self.labels.numpy(), len(self.class_names),
                                  alpha=outputs.DEFAULT_OVERLAY_ALPHA if alpha is None else alpha,
                                  background_index=self.background_index)
        return Image.fromarray(blended)

    def save(self, directory: str | os.PathLike[str], *, stem: str | None = None, image: ImageLike | None = None,
             alpha: float | None = None, scores: bool = False, heatmaps: bool = False) -> dict[str, Path]:
        """Write the files ``talk2dino segment`` writes for one image, with the CLI's own writer.

        Files in `directory` (created if missing), exactly as the CLI names and writes them:
        ``<stem>_labels.png`` (palette PNG whose pixel values are class indices) and the CLI's other per-image
        pictures, ``<stem>_overlay.png`` when `image` is given, ``<stem>_scores.npz`` with `scores`,
        ``<stem>_heatmaps.png`` with `heatmaps`, and ``<stem>.json``: ``image`` (the path when `image` is one,
        else ``""``), ``files`` (kind -> file name), then :meth:`summary`.

        Args:
            directory: output folder.
            stem: file name stem; None: the stem of `image` when it is a path, else ``"segmentation"``.
            image: the segmented image (any `Segmenter.set_image` form), for the overlay; None: no overlay.
            alpha: overlay colour weight in [0, 1] (None: the CLI's default, 0.5).
            scores: also write the ``[C, H, W]`` scores as float16 ``.npz`` (the CLI's ``--save-scores``).
            heatmaps: also write the per-class score maps picture (the CLI's ``--save-heatmaps``).

        Returns:
            The written paths by kind (``labels``, ``overlay``, ``scores``, ... as listed in the JSON's
            ``files``), plus ``json``.

        Raises:
            InvalidInputError: a stem that is empty or holds a path separator, a bad `image` or `alpha`;
                both are checked before any file is written.
        """
        import json

        from talk2dino import outputs

        path = image if isinstance(image, (str, os.PathLike)) else None
        if stem is None:
            stem = Path(path).stem if path is not None else "segmentation"
        if not stem or stem in (".", "..") or any(sep in stem for sep in ("/", "\\", os.sep)):
            raise InvalidInputError(f"stem {stem!r} must be a plain file name stem, without a folder")
        if alpha is not None and not 0.0 <= alpha <= 1.0:
            raise InvalidInputError(f"overlay alpha must be in [0, 1]; got {alpha}")
        rgb = None if image is None else as_rgb_image(image)
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        # The CLI's own writer: the same files, by construction.
        outputs.write_result_files(out, stem, path, rgb, self, self.summary(),
                       save_scores=scores, overlay=rgb is not None,
                       alpha=outputs.DEFAULT_OVERLAY_ALPHA if alpha is None else alpha, save_heatmaps=heatmaps)
        json_path = out / f"{stem}.json"
        files = json.loads(json_path.read_text(encoding="utf-8"))["files"]
        return {**{kind: out / name for kind, name in files.items()}, "json": json_path}


@dataclass
class ImageFeatures:
    """What `Segmenter.set_image` caches: geometry, PAMR guides and backbone outputs of every window.

    Attributes:
        original_size: ``(h, w)`` of the input image.
        resized_size: ``(H, W)`` after the resize rule (method.md §4.3 step 2).
        boxes: ``(y1, y2, x1, x2)`` per window, in resized pixels, row-major.
        guides: ``[n, 3, wh, ww]`` float32 RGB in [0, 255], the windows before normalisation (PAMR guide).
        output: the backbone output of the n windows (``attn_logits [n, M, P]`` etc.).
    """

    original_size: tuple[int, int]
    resized_size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    guides: torch.Tensor
    output: BackboneOutput

    def dense_features(self) -> torch.Tensor:
        """``[n, h, w, D]`` raw patch tokens per window, for users who want text-aligned maps."""
        n, _, d = self.output.patch_tokens.shape
        return self.output.patch_tokens.reshape(n, *self.output.grid, d)

    @torch.inference_mode()
    def attention_maps(self) -> torch.Tensor:
        """Per-head CLS->patch attention of the last block over the resized image, for pictures.

        Per window: softmax of ``output.attn_logits`` over its P patches (CLS and registers left out, so
        each map sums to 1 over the window), reshaped to the patch grid, upsampled bilinearly to the
        window (``align_corners=True``, as the scores, method.md §4.4) and averaged over overlapping
        windows with the same stitching as the scores (method.md §4.8 step 1).

        Returns:
            ``[M, H', W']`` float32 on CPU, at the resized (processing) size ``resized_size``;
            probabilities in [0, 1], not renormalised after stitching.
        """
        logits = self.output.attn_logits.float()  # [n, M, P]
        n_windows, heads, _ = logits.shape
        maps = torch.softmax(logits, dim=-1).view(n_windows, heads, *self.output.grid)
        maps = F.interpolate(maps, size=tuple(self.guides.shape[-2:]), mode="bilinear", align_corners=True)
        return stitch(maps, self.boxes, *self.resized_size).cpu()


@dataclass
class PreparedImage:
    """An image decoded, resized and cut into windows: the host-side half of `Segmenter.embed_images`.

    Made by :func:`prepare_image` (a plain function of the image and the settings, so DataLoader workers
    can make these in other processes while the device runs the backbone); `pin_memory` lets a CUDA
    DataLoader page-lock the windows for an asynchronous copy.

    Attributes:
        rgb: ``[H, W, 3]`` uint8 RGB, the image as given (outputs are written at this size).
        resized_size: ``(H', W')`` processing size (method.md §4.3).
        boxes: window boxes ``(y1, y2, x1, x2)`` on the resized image.
        guides: ``[n, 3, wh, ww]`` float32 RGB in [0, 255], the windows (backbone input and PAMR guide).
    """

    rgb: np.ndarray
    resized_size: tuple[int, int]
    boxes: list[tuple[int, int, int, int]]
    guides: torch.Tensor

    def pin_memory(self) -> PreparedImage:
        """The same image with its windows in page-locked memory (called by DataLoader ``pin_memory``)."""
        return dataclasses.replace(self, guides=self.guides.pin_memory())


def prepare_image(image: ImageLike, config: InferenceConfig) -> PreparedImage:
    """Convert, resize (uint8, OpenCV; method.md §4.3) and cut the window grid of one image.

    Args:
        image: a PIL image, ``[H, W, 3]``/``[H, W]`` array or ``[3, H, W]`` tensor (see `to_rgb_uint8`).
        config: supplies ``short_side``, ``max_long_side``, ``window`` and ``stride``.

    Raises:
        InvalidInputError: an image that cannot be converted (naming the problem).
    """
    rgb = to_rgb_uint8(image)
    h, w = rgb.shape[:2]
    rh, rw = resized_size(h, w, short_side=config.short_side, max_long_side=config.max_long_side)
    resized = resize_uint8(rgb, rh, rw)
    boxes = window_grid(rh, rw, window=config.window, stride=config.stride)
    # Cast to float only after the uint8 resize (method.md §4.3 step 2).
    full = torch.from_numpy(resized).permute(2, 0, 1).to(torch.float32)
    guides = torch.stack([full[:, y1:y2, x1:x2] for y1, y2, x1, x2 in boxes])
    return PreparedImage(rgb=rgb, resized_size=(rh, rw), boxes=boxes, guides=guides)


def _resize_scores(stitched: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[C, H', W']`` stitched scores -> ``[C, h, w]`` at the original size: bilinear, align_corners=False
    (method.md §4.8 step 3)."""
    return F.interpolate(stitched[None], size=size, mode="bilinear", align_corners=False)[0]


def _chunk_reporter(progress: Callable[[int, int], None], owners: list[int]) -> Callable[[int], None]:
    """``count`` windows done -> ``progress(image, windows)`` per image they belong to (`owners`: window -> image)."""
    position = 0

    def report(count: int) -> None:
        nonlocal position
        done = owners[position:position + count]
        position += count
        for image in dict.fromkeys(done):
            progress(image, done.count(image))

    return report


class Segmenter:
    """Stateful predictor caching class embeddings and the current image's window features.

    Example:
        >>> seg = Segmenter.from_pretrained("talk2dino-vitb14-reg")
        >>> seg.set_classes(["cat", "sofa", "window"], background=True)
        >>> seg.set_image(pil_image)
        >>> result = seg.predict()
    """

    def __init__(self, model: Talk2DINO, config: InferenceConfig | None = None, *, reference: bool = False) -> None:
        """Args:
            model: a built `Talk2DINO`.
            config: inference settings; the model's registry defaults when None.
            reference: use the plain reference path everywhere (eager attention, one window per
                backbone call, prompts padded to the full context, PAMR materialising every
                neighbour shift). For tests and benchmarks; results equal the fast path.
        """
        self.model = model
        self.config = config if config is not None else model.config.inference
        self.config.validate()
        self.reference = reference
        self._check_window(self.config)
        self._text_cache: OrderedDict[tuple[Any, ...], torch.Tensor] = OrderedDict()
        self._classes: list[str] | None = None
        self._class_embeddings: torch.Tensor | None = None
        self._features: ImageFeatures | None = None

    @classmethod
    def from_pretrained(cls, name: str | None = "talk2dino-vitb14-reg", *, pretrained: bool = True,
                        device: str | torch.device | None = None, dtype: str | torch.dtype | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, backbone: str | None = None,
                        text_encoder: str | None = None, projection: str | None = None,
                        **overrides: Any) -> Segmenter:
        """Build the model with `create_model` and a segmenter with its inference defaults.

        Args:
            name, pretrained, device, dtype, cache_dir, backbone, text_encoder, projection: passed to
                `talk2dino.create_model` as they are: a registry name or ``local-dir:``/``hf-hub:`` folder,
                and sources replacing the model's parts (``name=None`` composes a model from all three).
            overrides: `InferenceConfig` fields replacing the model's defaults, e.g. ``pamr=False``;
                names are checked before any weights load.

        Raises:
            TypeError: an override that is not an `InferenceConfig` field.
            WeightsError, ValueError: as `create_model`.
        """
        from talk2dino.registry import create_model

        known = {f.name for f in dataclasses.fields(InferenceConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"from_pretrained got unknown inference setting(s) {', '.join(unknown)}; "
                            f"expected create_model arguments or InferenceConfig fields ({', '.join(sorted(known))})")
        model = create_model(name, pretrained=pretrained, device=device, dtype=dtype, cache_dir=cache_dir,
                             backbone=backbone, text_encoder=text_encoder, projection=projection)
        return cls(model, dataclasses.replace(model.config.inference, **overrides))

    def _check_window(self, config: InferenceConfig) -> None:
        patch = self.model.backbone.patch_size
        if config.window % patch:
            raise ValueError(f"window {config.window} is not a multiple of the backbone patch size {patch}")

    # ------------------------------------------------------------------ text side
    @staticmethod
    def check_labels(names: Sequence[str], *, background: bool) -> list[str]:
        """Validate a vocabulary; names are kept verbatim (method.md §4.2, P25).

        Raises:
            InvalidInputError: empty vocabulary, a non-string, empty or whitespace-only label, a label longer
                than :data:`MAX_LABEL_CHARS` or holding a control character or line break (NUL, tab, CR, LF,
                U+2028 ...), text that is not text (a lone surrogate, U+FFFD) or CLIP's special token text, a
                duplicate, two labels the text encoder cannot tell apart (the same after Unicode NFC, whitespace
                collapsing and lower-casing: `talk2dino.labels.canonical_label`), or 'background' while the
                background channel is on. The message is one line and quotes the label (escaped and shortened).
        """
        import unicodedata

        from talk2dino.errors import one_line
        from talk2dino.labels import canonical_label, label_text_problem

        if isinstance(names, str):
            raise InvalidInputError("labels must be a list of strings, not one string; split it first")
        names = list(names)
        if not names:
            raise InvalidInputError("no labels given")
        seen: set[str] = set()
        same: dict[str, int] = {}  # canonical form -> 1-based index of its first label
        for index, name in enumerate(names, start=1):
            if not isinstance(name, str):
                raise InvalidInputError(f"label {index} ({one_line(repr(name))}) is not a string")
            shown = one_line(repr(name))
            # Format characters (zero-width space, byte-order mark ...) are invisible: a label of only those
            # and whitespace names nothing.
            if all(ch.isspace() or unicodedata.category(ch) == "Cf" for ch in name):
                raise InvalidInputError(f"label {index} {shown} is empty or only whitespace")
            if len(name) > MAX_LABEL_CHARS:
                # The text encoder keeps 77 tokens anyway; a huge label only costs tokenizer time and memory.
                raise InvalidInputError(
                    f"label {index} {shown} is {len(name):,} characters long; the limit is {MAX_LABEL_CHARS:,}"
                )
            # A control character or line break in a label is a parsing mistake upstream (a binary file, a
            # missed split), never a class name; refuse it instead of embedding garbage.
            bad = next((ch for ch in name if unicodedata.category(ch) in _BAD_LABEL_CATEGORIES), None)
            if bad is not None:
                raise InvalidInputError(
                    f"label {index} {shown} contains the control character U+{ord(bad):04X}; remove it"
                )
            problem = label_text_problem(name)
            if problem is not None:
                raise InvalidInputError(f"label {index} {shown} {problem}")
            if name in seen:
                raise InvalidInputError(f"duplicate label {shown} (label {index})")
            canonical = canonical_label(name)
            if background and canonical == BACKGROUND_NAME:
                raise InvalidInputError(
                    "label 'background' clashes with the background channel; remove it or turn background off"
                )
            if canonical in same:
                # The CLIP tokenizer normalises exactly this away: both labels get bit-identical embeddings and
                # the later one could never win a pixel (issue 14).
                first = same[canonical]
                # Labels that differ only in Unicode normalisation (NFC/NFD) print alike: show their code points.
                alike = unicodedata.normalize("NFC", names[first - 1]) == unicodedata.normalize("NFC", name)
                quote = ascii if alike else repr
                raise InvalidInputError(
                    f"labels {first} {one_line(quote(names[first - 1]), 60)} and {index} "
                    f"{one_line(quote(name), 60)} are the same label to the text encoder (it ignores case, "
                    "repeated spaces and Unicode normalisation); keep one of them")
            seen.add(name)
            same[canonical] = index
        return names

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

        self._refuse_same_tokens(names, templates)
        with collect_truncations() as cut:
            embeddings = self.model.embed_classes(names, templates, pad_to_context=self.reference)
        self._report_truncated(names, templates, cut)
        self._text_cache[key] = embeddings
        while len(self._text_cache) > _TEXT_CACHE_SIZE:
            self._text_cache.popitem(last=False)
        return embeddings

    def _refuse_same_tokens(self, names: Sequence[str], templates: Sequence[str]) -> None:
        """Refuse two labels whose prompts are the same tokens in every template, up to the end-of-text token.

        Their embeddings would be bit-identical and the later label could never win a pixel (issue 14).
        `check_labels` already refuses what the tokenizer's normaliser merges (case, whitespace, NFC); this is
        the exact test behind it: punctuation splitting (``cat.`` and ``cat .``), and labels that only differ
        after the context's last token (the prompt is cut there).

        Raises:
            InvalidInputError: one line naming both labels.
        """
        encoder = self.model.text_encoder
        if len(names) < 2 or not callable(getattr(encoder, "tokenize", None)):
            return
        from talk2dino.errors import one_line
        from talk2dino.models.text_encoder import collect_truncations

        prompts = [t.format(name) for name in names for t in templates]
        with collect_truncations():  # cut prompts are reported once, by the embedding that follows
            ids, mask = encoder.tokenize(prompts)
        eot = getattr(encoder, "eot_id", None)
        context = getattr(encoder, "context_length", None)
        rows = [row[:int(n)] for row, n in zip(ids.tolist(), mask.sum(dim=1).tolist(), strict=True)]
        if eot is not None:
            # CLIP pools the first end-of-text token under causal attention: whatever follows it is never seen.
            rows = [row[:row.index(eot) + 1] if eot in row else row for row in rows]
        first_of: dict[tuple[tuple[int, ...], ...], int] = {}
        count = len(templates)
        for index in range(len(names)):
            key = tuple(tuple(row) for row in rows[index * count:(index + 1) * count])
            first = first_of.setdefault(key, index)
            if first != index:
                cut = context is not None and any(len(row) >= context for row in key)
                why = (f"their prompts are cut at the {context}-token context" if cut
                       else "the tokenizer splits their punctuation and spacing the same way")
                raise InvalidInputError(
                    f"labels {first + 1} {one_line(repr(names[first]), 60)} and {index + 1} "
                    f"{one_line(repr(names[index]), 60)} are the same tokens to the text encoder ({why}), so they "
                    "would get identical embeddings; keep one of them or make them differ earlier")

    def _report_truncated(self, names: Sequence[str], templates: Sequence[str], cut: list[tuple[str, int]]) -> None:
        """One warning line per label whose prompts were cut to the text encoder's context (not one per prompt)."""
        if not cut:
            return
        from talk2dino.errors import one_line

        label_of = {t.format(name): (index, name) for index, name in enumerate(names, start=1) for t in templates}
        by_label: dict[tuple[int, str], list[int]] = {}
        for prompt, tokens in cut:
            by_label.setdefault(label_of.get(prompt, (0, prompt)), []).append(tokens)
        context = getattr(self.model.text_encoder, "context_length", 77)
        for (index, name), lengths in by_label.items():
            shown = one_line(repr(name), 60)
            what = f"label {index} {shown}" if index else f"prompt {shown}"
            logger.warning("%s is too long for the text encoder: %d of %d prompts have up to %d tokens and were "
                           "cut to %d (the end of the label is ignored)", what, len(lengths), len(templates),
                           max(lengths), context)

    def set_classes(self, names: Sequence[str], *, background: bool | None = None, threshold: float | None = None,
                    templates: Sequence[str] | None = None) -> None:
        """Set the vocabulary (and optionally the background channel and threshold).

        Args:
            names: class names, used verbatim.
            background: add the constant threshold channel as class 0 (None keeps the current setting).
            threshold: background threshold θ (None keeps the current setting).
            templates: prompt templates (None: the model's 7 templates).
        """
        changes: dict[str, Any] = {}
        if background is not None:
            changes["background"] = background
        if threshold is not None:
            changes["bg_threshold"] = threshold
        if changes:
            config = dataclasses.replace(self.config, **changes)
            config.validate()
            self.config = config
        names = self.check_labels(names, background=self.config.background)
        self._class_embeddings = self.class_embeddings(names, templates)
        self._classes = names

    # ------------------------------------------------------------------ image side
    def prepare(self, image: ImageLike | PreparedImage) -> PreparedImage:
        """`prepare_image` with this segmenter's settings (a `PreparedImage` is returned as is).

        `image` may be any form `talk2dino.data.images.as_rgb_image` accepts: a file path (decoded as the CLI
        decodes it), a PIL image, an RGB uint8 ``H×W×3`` numpy array, or a ``[3, H, W]`` / ``[H, W, 3]``
        tensor (uint8, or float in [0, 1]; a leading dimension of 3 means channel-first).
        """
        if isinstance(image, PreparedImage):
            return image
        return prepare_image(as_rgb_image(image), self.config)

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

    def embed_images(self, images: Sequence[ImageLike | PreparedImage], *,
                     progress: Callable[[int, int], None] | None = None) -> list[ImageFeatures]:
        """Embed several images, batching the windows of all of them through the backbone.

        Args:
            images: images in any form `to_rgb_uint8` accepts, or `PreparedImage`s made with the same
                settings (e.g. by DataLoader workers).
            progress: called as ``progress(image_index, windows)`` after each backbone chunk (of
                ``window_batch_size`` windows), once per image whose windows the chunk held, with how many
                of that image's windows it finished; an image's calls add up to its window count. For
                progress bars: the backbone runs all windows of the batch in one call.

        Returns:
            One `ImageFeatures` per image, in order.
        """
        prepared = [self.prepare(image) for image in images]
        if not prepared:
            return []
        # Windows of different images can be batched only when they have the same size.
        by_size: dict[tuple[int, int], list[int]] = {}
        for idx, item in enumerate(prepared):
            by_size.setdefault((int(item.guides.shape[-2]), int(item.guides.shape[-1])), []).append(idx)
        outputs: dict[int, BackboneOutput] = {}
        for indices in by_size.values():
            stacked = torch.cat([prepared[i].guides for i in indices])
            on_chunk = None if progress is None else _chunk_reporter(
                progress, [i for i in indices for _ in range(prepared[i].guides.shape[0])])
            out = self._run_backbone(self._backbone_inputs(stacked), on_chunk)
            start = 0
            for i in indices:
                n = prepared[i].guides.shape[0]
                sl = slice(start, start + n)
                outputs[i] = BackboneOutput(out.patch_tokens[sl], out.cls_token[sl], out.register_tokens[sl],
                                            out.attn_logits[sl], out.grid)
                start += n
        return [
            ImageFeatures(original_size=item.rgb.shape[:2], resized_size=item.resized_size, boxes=item.boxes,
                          guides=item.guides.to(self.model.device, non_blocking=True), output=outputs[i])
            for i, item in enumerate(prepared)
        ]

    def set_image(self, image: ImageLike) -> ImageFeatures:
        """Embed one image (resize, windows, backbone) and cache the result for `predict`.

        Args:
            image: a path (``str`` / ``os.PathLike``, decoded with EXIF orientation as the CLI does), a PIL
                image, an RGB uint8 ``H×W×3`` numpy array, or an RGB tensor ``[3, H, W]`` or ``[H, W, 3]``:
                uint8 in [0, 255], or floating point with every value in [0, 1] (the dtype decides). A tensor
                whose first dimension is 3 is channel-first, so a ``3×3×3`` one is ``[3, H, W]``.
                See `talk2dino.data.images.as_rgb_image`.

        Raises:
            InvalidInputError: one line naming what is wrong with the image.
        """
        self._features = self.embed_images([image])[0]
        return self._features

    def reset_image(self) -> None:
        """Free the cached image features."""
        self._features = None

    # ------------------------------------------------------------------ prediction
    def _options(self, overrides: dict[str, Any]) -> InferenceConfig:
        changes = {k: v for k, v in overrides.items() if v is not None}
        if not changes:
            return self.config
        config = dataclasses.replace(self.config, **changes)
        config.validate()
        return config

    @torch.inference_mode()
    def predict_features(self, features: ImageFeatures, *, pamr: bool | None = None, clean: bool | None = None,
                         background: bool | None = None, threshold: float | None = None) -> SegmentationResult:
        """Segment from cached image features with the current vocabulary.

        Args:
            features: from `set_image` or `embed_images`.
            pamr, clean, background, threshold: per-call overrides of the inference settings.
        """
        if self._classes is None or self._class_embeddings is None:
            raise InvalidInputError("no labels set; call set_classes first")
        cfg = self._options({"pamr": pamr, "bg_clean": clean, "background": background, "bg_threshold": threshold})
        if cfg.background and any(n.strip().lower() == BACKGROUND_NAME for n in self._classes):
            raise InvalidInputError("label 'background' clashes with the background channel")
        timings: dict[str, float] = {}
        clock = time.perf_counter()

        def lap(stage: str) -> None:
            nonlocal clock
            if self.model.device.type == "cuda":
                torch.cuda.synchronize(self.model.device)
            now = time.perf_counter()
            timings[stage] = timings.get(stage, 0.0) + now - clock
            clock = now

        out = features.output
        text = self._class_embeddings
        n_windows, num_classes = out.patch_tokens.shape[0], text.shape[0]
        wh, ww = features.guides.shape[-2:]
        scores = sigmoid_cosine(out.patch_tokens, text)  # [n, N, P], method.md §4.4 step 5
        if cfg.effective_bg_clean:
            scores = clean_background(scores, out.patch_tokens, out.attn_logits, text, lam=cfg.clean_lambda,
                                      head_embedding=cfg.clean_head_embedding)
        lap("scores")
        grid = scores.view(n_windows, num_classes, *out.grid)
        names = list(self._classes)
        background_index = None
        if cfg.background:
            names = [BACKGROUND_NAME, *names]
            background_index = 0
        if self.reference:
            # The plain path: every stage on all windows at once, PAMR materialising every shift.
            scores = F.interpolate(grid, size=(wh, ww), mode="bilinear", align_corners=True)
            lap("upsample")
            if cfg.pamr:
                scores = pamr_reference(features.guides, scores, iterations=cfg.pamr_iterations,
                                        dilations=cfg.pamr_dilations)
                lap("pamr")
            if cfg.background:
                bg = torch.full((n_windows, 1, wh, ww), cfg.bg_threshold, dtype=scores.dtype, device=scores.device)
                scores = torch.cat([bg, scores], dim=1)
            stitched = stitch(scores, features.boxes, *features.resized_size)
        else:
            # One window at a time (upsample, PAMR, add into the canvas), the background channel added
            # by `stitch` itself: the same arithmetic per element as above, without materialising the
            # [n, C, wh, ww] maps of all windows or concatenating them.
            def refined_windows() -> Iterator[torch.Tensor]:
                for i in range(n_windows):
                    block = F.interpolate(grid[i : i + 1], size=(wh, ww), mode="bilinear", align_corners=True)
                    lap("upsample")
                    if cfg.pamr:
                        block = pamr_fast(features.guides[i : i + 1], block, iterations=cfg.pamr_iterations,
                                          dilations=cfg.pamr_dilations)
                        lap("pamr")
                    yield block[0]
                    lap("stitch")  # the canvas accumulation of this window, done by `stitch` in between

            stitched = stitch(refined_windows(), features.boxes, *features.resized_size,
                              prepend=cfg.bg_threshold if cfg.background else None)
        lap("stitch")
        final = _resize_scores(stitched, features.original_size)
        scores_out: torch.Tensor | Callable[[], torch.Tensor]
        if final.device.type == "cpu" and not self.reference:
            # Same labels as the softmax + argmax below (ties to the lowest index after the fp32
            # softmax), computed without the softmax over the full-resolution maps (method.md §4.8).
            labels = softmax_argmax(final)
            # The full-resolution scores are not kept: `result.scores` recomputes them on first access
            # from `stitched` with the same resize (bit for bit), so callers that only want labels
            # never hold the [C, H, W] maps.
            del final
            scores_out = functools.partial(_resize_scores, stitched, features.original_size)
        else:
            # The softmax turns 1-ulp differences into exact ties that argmax resolves to the lowest
            # index, as the reference does (method.md §4.8 step 4).
            labels = torch.softmax(final, dim=0).argmax(dim=0)
            scores_out = final.cpu()
        lap("resize_argmax")
        return SegmentationResult(labels=labels.cpu(), scores=scores_out, class_names=names,
                                  background_index=background_index, config=cfg, timings=timings,
                                  stitched=stitched.cpu(), model_info=self._model_info())

    def predict(self, *, pamr: bool | None = None, clean: bool | None = None, background: bool | None = None,
                threshold: float | None = None) -> SegmentationResult:
        """Segment the image of the last `set_image` with the vocabulary of the last `set_classes`."""
        if self._features is None:
            raise InvalidInputError("no image set; call set_image first")
        return self.predict_features(self._features, pamr=pamr, clean=clean, background=background,
                                     threshold=threshold)

    def predict_batch(self, images: Sequence[ImageLike], **options: Any) -> list[SegmentationResult]:
        """Throughput path: windows of all `images` share backbone batches; one result per image.

        `images` is a list (or other sequence) of images in any form `set_image` accepts, paths included; a
        4-D ``[N, ...]`` array or tensor is a batch of its N images. Does not touch the `set_image` cache.
        Options as in `predict_features`.

        Raises:
            InvalidInputError: `images` is one image rather than a sequence of them, or an image is bad.
        """
        if isinstance(images, (str, bytes, os.PathLike, Image.Image)) or (
                isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim != 4):
            raise InvalidInputError("predict_batch takes a sequence of images (a list, or a 4-D batch); "
                                    "for one image use set_image and predict, or pass [image]")
        return [self.predict_features(f, **options) for f in self.embed_images(images)]

    def _model_info(self) -> dict[str, Any]:
        info = {"name": self.model.config.name, "profile": self.model.config.profile,
                "weights": self.model.weights_info}
        overridden = self.model.weights_info.get("overridden")
        if overridden:
            # `name` stays short ("composed", or the registry name whose parts were replaced); this says which
            # parts the model is made of.
            cfg = self.model.config
            parts = {"backbone": cfg.backbone.source, "text": cfg.text.source, "projection": cfg.projection.source}
            described = ", ".join(f"{part}={parts[part]}" for part in parts if part in overridden)
            info["description"] = (f"composed: {described}" if cfg.name == "composed"
                                   else f"{cfg.name} with {described}")
            info["parts"] = {part: {"source": source, "overridden": part in overridden}
                             for part, source in parts.items()}
        return info

    def summary(self, result: SegmentationResult) -> dict[str, Any]:
        """JSON-ready description: labels with pixel shares, effective settings, model and weights
        (`SegmentationResult.summary`, with this segmenter's model)."""
        return {**result.summary(), "model": self._model_info()}
