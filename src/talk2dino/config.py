"""Typed configuration of every component (house-style §3).

Each method constant has exactly one home: a field default below, with the method.md section
that defines it. The CLI, the registry and the API only override these defaults.
"""

from __future__ import annotations

import dataclasses
import math
import string
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union, get_args, get_origin

from talk2dino.errors import InvalidInputError

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)  # method.md §2.2
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)  # method.md §2.2

# The 7 prompts of the reference's `sub_imagenet_template` set, verbatim and in order (method.md §4.1).
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "itap of a {}.",
    "a bad photo of a {}.",
    "a origami {}.",
    "a photo of the large {}.",
    "a {} in a video game.",
    "art of the {}.",
    "a photo of the small {}.",
)

Profile = Literal["2025", "2024"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen visual backbone: DINOv2 (method.md §2.2), DINOv3 (§2.4) or DINO v1."""

    source: str  # weight source: hf-hub:ORG/REPO[@REV] or local-dir:PATH of a transformers DINOv2/DINOv3/ViT model
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, §2.2
    image_std: tuple[float, float, float] = IMAGENET_STD  # input normalisation, §2.2
    logits_rope: Literal["model", "none"] = "model"  # DINOv3 logits with RoPE ("none": reference's, P20), §2.4


@dataclass(frozen=True)
class TextConfig:
    """The frozen CLIP ViT-B/16 text tower (method.md §2.1)."""

    source: str  # weight source of a transformers CLIPTextModelWithProjection + tokenizer
    context_length: int = 77  # CLIP context; longer prompts are truncated with a warning, §2.1
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # prompt templates averaged before psi, §4.1
    batch_size: int = 256  # prompts per text forward; no effect beyond fp32 rounding, §4.1 item 5


@dataclass(frozen=True)
class ProjectionConfig:
    """The learned tanh MLP psi: R^512 -> R^D (method.md §2.3)."""

    source: str | None  # a .pth / .safetensors file, a local-dir: model folder, or a URL; None = random init
    sha256: str | None = None  # pinned hash of the file (method.md §7, pitfall P6)
    git_blob_sha1: str | None = None  # pin used until a sha256 is recorded (method.md §7)
    in_dim: int = 512  # CLIP text embedding width, §2.1


@dataclass(frozen=True)
class InferenceConfig:
    """The benchmark inference protocol (method.md §4), the default for every entry point."""

    short_side: int = 448  # resized shorter side, §4.3 step 2
    max_long_side: int = 2048  # cap on the resized longer side, §4.3 step 2
    window: int = 448  # sliding-window crop, §4.3 step 3
    stride: int = 224  # sliding-window stride, §4.3 step 3
    background: bool = False  # prepend the constant threshold channel as class 0, §4.6
    bg_threshold: float = 0.55  # theta, ViT-B value; ViT-L models override it to 0.54, §4.6
    bg_clean: bool | None = None  # background cleaning, §4.5; None = on exactly when `background` is on
    clean_lambda: float = 0.2  # lambda of background cleaning, §4.5 step 5
    clean_head_embedding: Literal["logits", "softmax"] = "logits"  # "softmax" = the 2024 formula, §4.5
    pamr: bool = True  # PAMR refinement, §4.7 (the paper's best rows use it)
    pamr_iterations: int = 10  # §4.7
    pamr_dilations: tuple[int, ...] = (1, 2, 4, 8, 12, 24)  # §4.7
    # Windows per backbone forward: trades memory for speed. Label maps are identical for any value; scores
    # may differ by ~1e-7, because CPU matrix products round differently for different row counts
    # (tests/test_determinism.py).
    window_batch_size: int = 8

    @property
    def effective_bg_clean(self) -> bool:
        """Whether background cleaning runs: the explicit setting, else follow `background`."""
        return self.background if self.bg_clean is None else self.bg_clean

    def validate(self) -> None:
        """Raise ValueError naming the first impossible value."""
        checks: list[tuple[bool, str]] = [
            (self.short_side > 0, f"short_side must be positive, got {self.short_side}"),
            (self.max_long_side >= self.short_side, f"max_long_side must be >= short_side, got {self.max_long_side}"),
            (self.window > 0, f"window must be positive, got {self.window}"),
            (0 < self.stride <= self.window, f"stride must be in (0, window], got {self.stride}"),
            (0.0 < self.bg_threshold < 1.0, f"bg_threshold must be in (0, 1), got {self.bg_threshold}"),
            (self.clean_lambda >= 0.0, f"clean_lambda must be >= 0, got {self.clean_lambda}"),
            (self.pamr_iterations >= 0, f"pamr_iterations must be >= 0, got {self.pamr_iterations}"),
            (all(d > 0 for d in self.pamr_dilations) and len(self.pamr_dilations) > 0,
             f"pamr_dilations must be positive integers, got {self.pamr_dilations}"),
            (self.window_batch_size > 0, f"window_batch_size must be positive, got {self.window_batch_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting, exactly: `from_dict` gives this config back.

        ``bg_clean=None`` stays None ("follow `background`"); `effective_dict` is for records.
        """
        return _to_json(self)

    def effective_dict(self) -> dict[str, Any]:
        """`to_dict` with cleaning resolved to what runs: for result records, never for saving."""
        return {**self.to_dict(), "bg_clean": self.effective_bg_clean}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InferenceConfig:
        """Inverse of `to_dict`; missing keys take their defaults, unknown keys are errors."""
        if not isinstance(d, dict):
            raise InvalidInputError(f"InferenceConfig must be a mapping, got {type(d).__name__}")
        return cls(**check_fields(cls, d))


@dataclass(frozen=True)
class ModelConfig:
    """A complete Talk2DINO model: the three weight sources plus its inference defaults."""

    name: str  # registry name, or a description of a composed model
    backbone: BackboneConfig
    text: TextConfig
    projection: ProjectionConfig
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    profile: Profile = "2025"  # result-table profile the weights belong to, method.md §6

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting, nested configs included (tuples become lists); exact:
        `from_dict` gives this config back, ``inference.bg_clean=None`` included."""
        return _to_json(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`; unknown keys are errors, not warnings (house-style §3)."""
        def build(kind: type, values: Any) -> Any:
            if not isinstance(values, dict):
                raise InvalidInputError(f"{kind.__name__} must be a mapping, got {type(values).__name__}")
            return kind(**check_fields(kind, values))

        if not isinstance(d, dict):
            raise InvalidInputError(f"a model configuration must be a mapping, got {type(d).__name__}")
        top = dict(d)
        unknown = set(top) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown ModelConfig keys: {sorted(map(str, unknown))[:10]}")
        missing = [k for k in ("name", "backbone", "text", "projection") if k not in top]
        if missing:
            raise InvalidInputError(f"model configuration lacks {missing}")
        # Every field, found by `dataclasses.fields`: a field added later is read back too. Absent
        # optional fields (older files) take their defaults. Files written before issue 13 hold
        # `inference.bg_clean` resolved (false for "follow background"); they cannot be told apart from
        # a deliberate false and load as they are.
        hints = typing.get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in top:
                continue
            kind = hints[f.name]
            if isinstance(kind, type) and dataclasses.is_dataclass(kind):
                values[f.name] = build(kind, top[f.name])
            else:
                values.update(check_fields(cls, {f.name: top[f.name]}))
        config = cls(**values)
        _check_file_limits(config)
        return config


TargetStrategy = Literal["max", "avg", "cls", "cls-weighted"]


@dataclass(frozen=True)
class ExtractConfig:
    """Feature extraction from COCO Captions (method.md §3.1–3.3)."""

    coco_root: str  # folder with train2014/, val2014/ and annotations/captions_<split>2014.json
    split: Literal["train", "val"] = "train"  # COCO Captions 2014 split
    out: str = "features"  # output folder: shards + manifest.json
    backbone: str = "dinov2-vitb14-reg"  # backbone name (registry.BACKBONES) or a DINOv2 source (hf-hub:/local-dir:)
    text_encoder: str = "clip-vitb16"  # text encoder name (registry.TEXT_ENCODERS) or a CLIP source
    logits_rope: Literal["model", "none"] | None = None  # DINOv3 logits with/without RoPE; None: the model's
    image_size: int = 448  # shorter side (bicubic) then centre crop
    shard_size: int = 1024  # images per shard file
    batch_size: int = 32  # images per backbone forward
    text_batch_size: int = 256  # captions per text forward
    num_workers: int = 2  # image decoding workers
    device: str | None = None  # auto: CUDA when available
    dtype: DType = "float32"  # backbone dtype; features are stored as float16 either way
    cache_dir: str | None = None  # weight download cache
    limit: int | None = None  # only the first N images (quick looks, tests)


@dataclass(frozen=True)
class TrainConfig:
    """Training psi with the max-head InfoNCE recipe (method.md §3.4–3.6)."""

    features: str  # folder written by `talk2dino extract` (train split)
    out: str  # run folder; becomes a loadable model folder (must be new or empty: never a released file)
    val_features: str | None = None  # folder of the val split for recall@K logging
    target_strategy: TargetStrategy = "max"  # image embedding: max over heads (the method) or an ablation
    epochs: int = 100  # passes over the training captions
    max_steps: int | None = None  # stop after this many optimiser steps in all (a quick run); None: every epoch
    batch_size: int = 128  # captions per step; the last partial batch is kept
    lr: float = 1e-4  # Adam learning rate, constant
    betas: tuple[float, float] = (0.9, 0.999)  # Adam betas
    eps: float = 1e-8  # Adam epsilon
    weight_decay: float = 0.0  # Adam weight decay (the recipe uses none)
    temperature: float = 0.07  # InfoNCE temperature tau, fixed (never trained)
    loss_divide_by_batch_squared: bool = True  # divide the loss by B^2 as the reference code does
    seed: int = 123  # Python, NumPy and torch seeds
    device: str | None = None  # auto: CUDA when available
    on_device: bool | None = None  # keep all features on the device (None: when they fit)
    eval_every: int = 1  # epochs between validation recall@K evaluations
    recall_ks: tuple[int, ...] = (1, 5, 10)  # text->image recall@K on the val split
    val_max_images: int | None = 5000  # val loss + recall@K over the first N val images (COCO 5k size); None = all


@dataclass(frozen=True)
class EvalConfig:
    """Benchmark evaluation (method.md §5). Model defaults (θ, dtype) come from the registry entry."""

    dataset: str | None = None  # one benchmark (voc20, voc21, context59, ..., ade20k) or `folder`
    root: str | None = None  # that dataset's folder (e.g. /data/VOCdevkit/VOC2012); default: data_root/<standard place>
    data_root: str | None = None  # folder holding every dataset in the mmsegmentation layout
    suite: Literal["all", "background", "no-background"] | None = None  # several benchmarks in the paper's order
    classes_file: str | None = None  # class names, one per line, for the `folder` dataset
    folder_background: bool = False  # `folder` dataset: class 0 is background (threshold channel)
    model: str = "talk2dino-vitb14-reg"  # registry name or model folder
    backbone: str | None = None  # override of the model's backbone source
    text_encoder: str | None = None  # override of the model's text-encoder source
    projection: str | None = None  # override of the model's psi
    device: str | None = None  # auto: CUDA when available
    dtype: DType = "float32"  # backbone dtype, recorded in the results
    cache_dir: str | None = None  # weight download cache
    pamr: bool = False  # the "+ PAMR" rows of the paper's table
    bg_clean: bool | None = None  # background cleaning; None: the benchmark's published setting
    bg_threshold: tuple[float, ...] = ()  # background thresholds to sweep; empty: the model's
    bg_clean_lambda: tuple[float, ...] = ()  # background-cleaning weights (lambda) to sweep; empty: 0.2
    short_side: tuple[int, ...] = ()  # resized shorter sides to sweep; empty: 448
    window: tuple[int, ...] = ()  # window sizes to sweep; empty: 448
    stride: tuple[int, ...] = ()  # strides to sweep; empty: 224
    limit: int | None = None  # only the first N images of each split (a quick look)
    out: str = "results"  # results folder: JSON records, Markdown tables, resume caches
    save_predictions: bool = False  # write palette PNG predictions next to the records
    skip_bad: bool = False  # skip unreadable or inconsistent samples and list them, instead of failing


# Upper bounds for settings read from files (model folders may come from anyone): far above any real
# value, low enough that a hostile file cannot make us allocate terabytes (e.g. psi with in_dim 1e9).
_FILE_LIMITS: dict[str, int] = {
    "context_length": 4096, "batch_size": 1 << 16, "in_dim": 1 << 16, "short_side": 1 << 14,
    "max_long_side": 1 << 16, "window": 1 << 14, "stride": 1 << 14, "pamr_iterations": 10_000,
    "window_batch_size": 1 << 12,
}
_MAX_STR = 4096

# Input normalisation read from a model file: std divides every pixel, so 0 gives inf/NaN (every pixel one
# label), a negative value inverts the image and 1e-30 saturates it; real models use ~0.2-0.5 (ImageNet,
# CLIP) or 1.0 (no scaling). [1e-3, 10] keeps every real value and refuses those. Means are in pixel units
# of [0, 1] images (ImageNet 0.485, 0.456, 0.406); [-10, 10] is far outside any real one.
_STD_RANGE: tuple[float, float] = (1e-3, 10.0)
_MEAN_RANGE: tuple[float, float] = (-10.0, 10.0)
# A CLIP prompt is start token + words + end token: a context of 1 or 2 holds no word (every prompt embeds
# the same), so 3 is the least that encodes anything.
MIN_CONTEXT_LENGTH = 3


def check_template(template: str) -> str:
    """`template` if it is literal text plus exactly one bare ``{}``; else a one-line InvalidInputError.

    Parsed with `string.Formatter` (as `str.format` reads it): named or numbered fields (``{x}``, ``{0}``),
    format specs (``{:>9}``), conversions (``{!r}``) and unbalanced braces are refused, so that
    ``template.format(label)`` can neither raise nor allocate more than the label's length.
    """
    shown = _short(template) if isinstance(template, str) else type(template).__name__
    if not isinstance(template, str):
        raise InvalidInputError(f"template must be a string, got {shown}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise InvalidInputError(f"template {shown} is not a valid format string ({err})") from None
    if len(fields) != 1 or fields[0] != ("", "", None):
        raise InvalidInputError(f"template {shown} must be literal text with exactly one '{{}}' (bare: no "
                                "names, indexes, format specs or conversions; write '{{' for a literal brace)")
    return template


def _check_file_limits(config: ModelConfig) -> None:
    """Range checks of a `ModelConfig` read from a file (types are already checked)."""
    for template in config.text.templates:
        check_template(template)
    for name, values, (low, high) in (("image_std", config.backbone.image_std, _STD_RANGE),
                                      ("image_mean", config.backbone.image_mean, _MEAN_RANGE)):
        if not all(math.isfinite(v) and low <= v <= high for v in values):
            raise InvalidInputError(f"BackboneConfig.{name} must be 3 finite values in [{low:g}, {high:g}], got "
                                    f"{_short(list(values))}")
    if config.text.context_length < MIN_CONTEXT_LENGTH:
        raise InvalidInputError(f"TextConfig.context_length must be >= {MIN_CONTEXT_LENGTH} (start and end tokens "
                                f"plus one word; CLIP uses 77), got {config.text.context_length}")
    for part in (config.text, config.projection, config.inference):
        for name, limit in _FILE_LIMITS.items():
            value = getattr(part, name, None)
            if isinstance(value, int) and not 0 < value <= limit and not (name == "pamr_iterations" and value == 0):
                raise InvalidInputError(f"{type(part).__name__}.{name} must be in [1, {limit}], got {value}")
    if any(d > 1024 for d in config.inference.pamr_dilations) or len(config.inference.pamr_dilations) > 64:
        raise InvalidInputError(f"InferenceConfig.pamr_dilations out of range: {config.inference.pamr_dilations[:8]}")
    pins = ((config.projection.sha256, 64, "sha256"), (config.projection.git_blob_sha1, 40, "git_blob_sha1"))
    for pin, length, name in pins:
        if pin is not None and (len(pin) != length or any(c not in "0123456789abcdefABCDEF" for c in pin)):
            raise InvalidInputError(f"ProjectionConfig.{name} must be {length} hex digits, got {_short(pin)}")
    try:
        config.inference.validate()
    except ValueError as err:
        raise InvalidInputError(f"InferenceConfig: {err}") from err


@dataclass(frozen=True)
class _Range:
    """Allowed values of a numeric run setting: ``low <= v <= high`` (strict where `open_low`/`open_high`)."""

    low: float
    high: float
    open_low: bool = False
    open_high: bool = False

    def holds(self, value: float) -> bool:
        # Written so that NaN fails every comparison and is refused.
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __str__(self) -> str:
        def show(bound: float) -> str:
            return str(bound) if isinstance(bound, int) else f"{bound:g}"

        return f"{'(' if self.open_low else '['}{show(self.low)}, {show(self.high)}{')' if self.open_high else ']'}"


# Ranges of the numeric run settings (recipes and flags alike; `check_ranges`). Each is far wider than any
# real run and refuses what only a typo or a hostile recipe gives: `epochs: 100000000` (a run that never
# ends; the method trains 100), a 10**12 batch, a zero, negative, NaN or infinite rate. Lower bounds of
# positive settings repeat the runners' own checks, so that a recipe fails at once, naming the setting.
_RUN_LIMITS: dict[type, dict[str, _Range]] = {
    TrainConfig: {
        "epochs": _Range(1, 100_000), "max_steps": _Range(1, 10**9), "batch_size": _Range(1, 1 << 16),
        "lr": _Range(0, 10, open_low=True), "eps": _Range(0, 1, open_low=True), "weight_decay": _Range(0, 10),
        "temperature": _Range(1e-4, 100), "seed": _Range(0, 2**63 - 1), "eval_every": _Range(1, 100_000),
        "recall_ks": _Range(1, 1 << 20), "val_max_images": _Range(1, 10**9), "betas": _Range(0, 1, open_high=True),
    },
    ExtractConfig: {
        "image_size": _Range(1, 1 << 13), "shard_size": _Range(1, 1 << 20), "batch_size": _Range(1, 1 << 14),
        "text_batch_size": _Range(1, 1 << 16), "num_workers": _Range(0, 256), "limit": _Range(1, 10**9),
    },
    EvalConfig: {
        "bg_threshold": _Range(0, 1, open_low=True, open_high=True), "bg_clean_lambda": _Range(0, 100),
        "short_side": _Range(1, 1 << 14), "window": _Range(1, 1 << 14), "stride": _Range(1, 1 << 14),
        "limit": _Range(1, 10**9),
    },
}


def check_ranges(cls: type, values: dict[str, Any]) -> None:
    """Refuse a numeric run setting outside its documented range (`_RUN_LIMITS`); tuple fields are checked
    item by item, None (unset) passes. Types are checked before (`check_fields`, argparse).

    Raises:
        InvalidInputError: one line naming the setting, its flag, the range and the value.
    """
    for name, allowed in _RUN_LIMITS.get(cls, {}).items():
        value = values.get(name)
        items = value if isinstance(value, tuple) else (value,)
        for item in items:
            if isinstance(item, (int, float)) and not isinstance(item, bool) and not allowed.holds(item):
                flag = "--" + name.replace("_", "-")
                raise InvalidInputError(f"{cls.__name__}.{name} ({flag}) must be in {allowed}, got {_short(item)}")


def _to_json(value: Any) -> Any:
    """`value` as JSON-native data: dataclasses become dicts of all their fields, tuples become lists;
    nothing is resolved or dropped (None stays None)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list)):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _describe(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _check_value(value: Any, tp: Any, where: str, *, numbers_from_text: bool) -> Any:
    """`value` converted to field type `tp` (lists -> tuples, ints -> floats), or InvalidInputError."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(tp):
            return None
        errors = []
        for arg in get_args(tp):
            if arg is type(None):
                continue
            try:
                return _check_value(value, arg, where, numbers_from_text=numbers_from_text)
            except InvalidInputError as err:
                errors.append(err)
        raise errors[0] if len(errors) == 1 else InvalidInputError(
            f"{where}: expected {_describe(tp)}, got {_short(value)}")
    if origin is Literal:
        # bool is an int in Python: True must not pass for a Literal[1], nor 1 for "1".
        if any(value == choice and type(value) is type(choice) for choice in get_args(tp)):
            return value
        raise InvalidInputError(f"{where}: expected one of {list(get_args(tp))}, got {_short(value)}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise InvalidInputError(f"{where}: expected a list, got {_short(value)}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            if len(value) > 1024:
                raise InvalidInputError(f"{where}: list too long ({len(value)} items)")
            return tuple(_check_value(v, args[0], f"{where}[{i}]", numbers_from_text=numbers_from_text)
                         for i, v in enumerate(value))
        if len(value) != len(args):
            raise InvalidInputError(f"{where}: expected {len(args)} values, got {len(value)}")
        return tuple(_check_value(v, a, f"{where}[{i}]", numbers_from_text=numbers_from_text)
                     for i, (v, a) in enumerate(zip(value, args, strict=True)))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if abs(value) >= 1 << 63:  # no real setting is this large, and torch/numpy would overflow on it
                raise InvalidInputError(f"{where}: number too large: {_short(value)}")
            return value
    elif tp is float:
        if numbers_from_text and isinstance(value, str):
            # YAML 1.1 reads "1e-4" (no dot) as a string; recipes may write floats that way.
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 1 << 53:
                raise InvalidInputError(f"{where}: number too large: {_short(value)}")
            if not math.isfinite(value):
                raise InvalidInputError(f"{where}: expected a finite number, got {value}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            if len(value) > _MAX_STR or "\0" in value:
                raise InvalidInputError(f"{where}: string too long or holding a NUL character")
            return value
    else:
        raise InvalidInputError(f"{where}: unsupported field type {_describe(tp)}")
    raise InvalidInputError(f"{where}: expected {_describe(tp)}, got {_short(value)}")


def _short(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = "<unprintable>"
    text = " ".join(text.split())
    return (text[:77] + "...") if len(text) > 80 else text


def check_fields(cls: type, values: dict[str, Any], *, numbers_from_text: bool = False) -> dict[str, Any]:
    """Type-check `values` against the fields of dataclass `cls`; returns them converted.

    Unknown keys are errors. Lists become tuples for tuple fields and ints become floats for float
    fields; ``numbers_from_text`` also reads strings such as ``"1e-4"`` as floats (YAML 1.1 quirk).

    Raises:
        InvalidInputError: naming the first unknown key or the first value of a wrong type.
    """
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in values if k not in names]
    if unknown:
        raise InvalidInputError(f"unknown {cls.__name__} keys: {sorted(map(str, unknown))[:10]}; "
                                f"known: {sorted(names)}")
    return {k: _check_value(v, hints[k], f"{cls.__name__}.{k}", numbers_from_text=numbers_from_text)
            for k, v in values.items()}
