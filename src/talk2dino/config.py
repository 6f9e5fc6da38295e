"""Typed configuration of every component (house-style §3).

Each method constant has exactly one home: a field default below, with the method.md section
that defines it. The CLI, the registry and the API only override these defaults.

A field is the only declaration of its setting (issue 15): the command-line flags of ``talk2dino train``,
``extract``, ``eval``, ``segment`` and ``serve`` are generated from these fields, recipes and JSON files are
read into them, and what the type cannot say is the field's metadata (`talk2dino.settings.meta`): the flag's
help (with the method.md section, which ``--help`` leaves out), a flag spelled otherwise, a range. Every config
has ``validate()``; the CLI and the library entry points call it.
"""

from __future__ import annotations

import dataclasses
import math
import string
import typing
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from talk2dino.errors import InvalidInputError
from talk2dino.settings import Range, check_fields, check_ranges, field_values, meta, short_repr, to_json

DEFAULT_MODEL = "talk2dino-vitb14-reg"
"""The model every entry point loads when none is named (a registry name, `talk2dino.catalog`). It lives here,
not in the catalog, because the catalog is built from these dataclasses and `EvalConfig.model` defaults to it."""

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


# Upper bounds for settings read from files (model folders may come from anyone): far above any real value, low
# enough that a hostile file cannot make us allocate terabytes (e.g. psi with in_dim 1e9). `ModelConfig.validate`.
_FILE_LIMITS: dict[str, int] = {
    "context_length": 4096, "batch_size": 1 << 16, "in_dim": 1 << 16, "short_side": 1 << 14,
    "max_long_side": 1 << 16, "window": 1 << 14, "stride": 1 << 14, "pamr_iterations": 10_000,
    "window_batch_size": 1 << 12,
}

# Input normalisation read from a model file: std divides every pixel, so 0 gives inf/NaN (every pixel one
# label), a negative value inverts the image and 1e-30 saturates it; real models use ~0.2-0.5 (ImageNet,
# CLIP) or 1.0 (no scaling). [1e-3, 10] keeps every real value and refuses those. Means are in pixel units
# of [0, 1] images (ImageNet 0.485, 0.456, 0.406); [-10, 10] is far outside any real one.
_STD_RANGE: tuple[float, float] = (1e-3, 10.0)
_MEAN_RANGE: tuple[float, float] = (-10.0, 10.0)
# A CLIP prompt is start token + words + end token: a context of 1 or 2 holds no word (every prompt embeds
# the same), so 3 is the least that encodes anything.
MIN_CONTEXT_LENGTH = 3


def _check_file_limits(part: Any) -> None:
    """`part`'s integer settings named in `_FILE_LIMITS` must lie in [1, limit] (``pamr_iterations`` may be 0)."""
    for name, limit in _FILE_LIMITS.items():
        value = getattr(part, name, None)
        if isinstance(value, int) and not 0 < value <= limit and not (name == "pamr_iterations" and value == 0):
            raise InvalidInputError(f"{type(part).__name__}.{name} must be in [1, {limit}], got {value}")


@dataclass(frozen=True)
class BackboneConfig:
    """The frozen visual backbone: DINOv2 (method.md §2.2), DINOv3 (§2.4) or DINO v1."""

    source: str  # weight source: hf-hub:ORG/REPO[@REV] or local-dir:PATH of a transformers DINOv2/DINOv3/ViT model
    image_mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation, §2.2
    image_std: tuple[float, float, float] = IMAGENET_STD  # input normalisation, §2.2
    logits_rope: Literal["model", "none"] = "model"  # DINOv3 logits with RoPE ("none": reference's, P20), §2.4

    def validate(self) -> None:
        """Refuse a normalisation that gives garbage (a zero, negative or huge std, an absurd mean).

        Raises:
            InvalidInputError: one line naming the field, its range and the values.
        """
        for name, values, (low, high) in (("image_std", self.image_std, _STD_RANGE),
                                          ("image_mean", self.image_mean, _MEAN_RANGE)):
            if not all(math.isfinite(v) and low <= v <= high for v in values):
                raise InvalidInputError(f"BackboneConfig.{name} must be 3 finite values in [{low:g}, {high:g}], "
                                        f"got {short_repr(list(values))}")


@dataclass(frozen=True)
class TextConfig:
    """The frozen CLIP ViT-B/16 text tower (method.md §2.1)."""

    source: str  # weight source of a transformers CLIPTextModelWithProjection + tokenizer
    context_length: int = 77  # CLIP context; longer prompts are truncated with a warning, §2.1
    templates: tuple[str, ...] = DEFAULT_TEMPLATES  # prompt templates averaged before psi, §4.1
    batch_size: int = 256  # prompts per text forward; no effect beyond fp32 rounding, §4.1 item 5

    def validate(self) -> None:
        """Refuse templates that are not one bare ``{}``, a context too short to hold a word, and sizes beyond
        `_FILE_LIMITS`.

        Raises:
            InvalidInputError: one line naming the field and the value.
        """
        for template in self.templates:
            check_template(template)
        if self.context_length < MIN_CONTEXT_LENGTH:
            raise InvalidInputError(f"TextConfig.context_length must be >= {MIN_CONTEXT_LENGTH} (start and end "
                                    f"tokens plus one word; CLIP uses 77), got {self.context_length}")
        _check_file_limits(self)


@dataclass(frozen=True)
class ProjectionConfig:
    """The learned tanh MLP psi: R^512 -> R^D (method.md §2.3)."""

    source: str | None  # a .pth / .safetensors file, a local-dir: model folder, or a URL; None = random init
    sha256: str | None = None  # pinned hash of the file (method.md §7, pitfall P6)
    git_blob_sha1: str | None = None  # pin used until a sha256 is recorded (method.md §7)
    in_dim: int = 512  # CLIP text embedding width, §2.1

    def validate(self) -> None:
        """Refuse an input width beyond `_FILE_LIMITS` and pins that are not hex digits of the right length.

        Raises:
            InvalidInputError: one line naming the field and the value.
        """
        _check_file_limits(self)
        for pin, length, name in ((self.sha256, 64, "sha256"), (self.git_blob_sha1, 40, "git_blob_sha1")):
            if pin is not None and (len(pin) != length or any(c not in "0123456789abcdefABCDEF" for c in pin)):
                raise InvalidInputError(f"ProjectionConfig.{name} must be {length} hex digits, got {short_repr(pin)}")


@dataclass(frozen=True)
class InferenceConfig:
    """The benchmark inference protocol (method.md §4), the default for every entry point.

    The "Inference" flags of ``talk2dino segment`` and ``serve`` are generated from these fields (their help is
    the field's ``help`` metadata); every entry point overrides these defaults, none restates them.
    """

    short_side: int = field(default=448, metadata=meta(help="resized shorter side, §4.3 step 2"))
    max_long_side: int = field(default=2048, metadata=meta(help="cap on the resized longer side, §4.3 step 2"))
    window: int = field(default=448, metadata=meta(help="sliding-window crop, §4.3 step 3"))
    stride: int = field(default=224, metadata=meta(help="sliding-window stride, §4.3 step 3"))
    background: bool = field(default=False, metadata=meta(
        help="add a background class: pixels whose every label scores below the threshold, §4.6"))
    bg_threshold: float = field(default=0.55, metadata=meta(
        help="background threshold theta (0.55 ViT-B; ViT-L models use 0.54), §4.6"))
    bg_clean: bool | None = field(default=None, metadata=meta(
        help="background cleaning with the CLS attention heads (default: on with --background)"))
    clean_lambda: float = field(default=0.2, metadata=meta(help="lambda of background cleaning, §4.5 step 5"))
    clean_head_embedding: Literal["logits", "softmax"] = field(default="logits", metadata=meta(
        help='"softmax" = the 2024 formula, §4.5'))
    pamr: bool = field(default=True, metadata=meta(help="PAMR mask refinement, §4.7 (the paper's best rows use it)"))
    pamr_iterations: int = field(default=10, metadata=meta(help="PAMR iterations, §4.7"))
    pamr_dilations: tuple[int, ...] = field(default=(1, 2, 4, 8, 12, 24), metadata=meta(help="PAMR dilations, §4.7"))
    # Trades memory for speed. Label maps are identical for any value; scores may differ by ~1e-7, because CPU
    # matrix products round differently for different row counts (tests/test_determinism.py).
    window_batch_size: int = field(default=8, metadata=meta(help="windows per backbone forward"))

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
        return dict(to_json(self))

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

    def validate(self) -> None:
        """Every part's ``validate()``, and the inference settings held to `_FILE_LIMITS` (a model folder may
        come from anyone): what `from_dict` runs on every configuration read from a file.

        Raises:
            InvalidInputError: one line naming the part, the field and the value.
        """
        self.backbone.validate()
        self.text.validate()
        self.projection.validate()
        _check_file_limits(self.inference)
        if any(d > 1024 for d in self.inference.pamr_dilations) or len(self.inference.pamr_dilations) > 64:
            raise InvalidInputError(f"InferenceConfig.pamr_dilations out of range: "
                                    f"{self.inference.pamr_dilations[:8]}")
        try:
            self.inference.validate()
        except ValueError as err:
            raise InvalidInputError(f"InferenceConfig: {err}") from err

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every setting, nested configs included (tuples become lists); exact:
        `from_dict` gives this config back, ``inference.bg_clean=None`` included."""
        return dict(to_json(self))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Inverse of `to_dict`, validated; unknown keys are errors, not warnings (house-style §3)."""
        if not isinstance(d, dict):
            raise InvalidInputError(f"a model configuration must be a mapping, got {type(d).__name__}")
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise InvalidInputError(f"unknown ModelConfig keys: {sorted(map(str, unknown))[:10]}")
        missing = [k for k in ("name", "backbone", "text", "projection") if k not in d]
        if missing:
            raise InvalidInputError(f"model configuration lacks {missing}")
        for name in ("backbone", "text", "projection", "inference"):
            if name in d and not isinstance(d[name], dict):
                kind = typing.get_type_hints(cls)[name]
                raise InvalidInputError(f"{kind.__name__} must be a mapping, got {type(d[name]).__name__}")
        # Every field, nested configs included (`check_fields`): a field added later is read back too. Absent
        # optional fields (older files) take their defaults. Files written before issue 13 hold
        # `inference.bg_clean` resolved (false for "follow background"); they cannot be told apart from a
        # deliberate false and load as they are.
        config = cls(**check_fields(cls, d))
        config.validate()
        return config


TargetStrategy = Literal["max", "avg", "cls", "cls-weighted"]
_COUNT = Range(1, 10**9)  # a number of images or steps: far above any real run


@dataclass(frozen=True)
class ExtractConfig:
    """Feature extraction from COCO Captions (method.md §3.1–3.3).

    Every field is a flag of ``talk2dino extract`` (``--batch-size``) and a recipe key; numeric fields carry the
    range `validate` holds them to.
    """

    coco_root: str = field(metadata=meta(
        help="folder with train2014/, val2014/ and annotations/captions_<split>2014.json"))
    split: Literal["train", "val"] = field(default="train", metadata=meta(help="COCO Captions 2014 split"))
    out: str = field(default="features", metadata=meta(help="output folder: shards + manifest.json"))
    backbone: str = field(default="dinov2-vitb14-reg", metadata=meta(
        help="backbone name (registry.BACKBONES) or a DINOv2 source (hf-hub:/local-dir:)"))
    text_encoder: str = field(default="clip-vitb16", metadata=meta(
        help="text encoder name (registry.TEXT_ENCODERS) or a CLIP source"))
    logits_rope: Literal["model", "none"] | None = field(default=None, metadata=meta(
        help="DINOv3 logits with/without RoPE; None: the model's"))
    image_size: int = field(default=448, metadata=meta(help="shorter side then centre crop", range=Range(1, 1 << 13)))
    shard_size: int = field(default=1024, metadata=meta(help="images per shard file", range=Range(1, 1 << 20)))
    batch_size: int = field(default=32, metadata=meta(help="images per backbone forward", range=Range(1, 1 << 14)))
    text_batch_size: int = field(default=256, metadata=meta(help="captions per text forward", range=Range(1, 1 << 16)))
    num_workers: int = field(default=2, metadata=meta(help="image decoding workers", range=Range(0, 256)))
    device: str | None = field(default=None, metadata=meta(help="auto: CUDA when available"))
    dtype: DType = field(default="float32", metadata=meta(
        help="backbone dtype; features are stored as float16 either way"))
    cache_dir: str | None = field(default=None, metadata=meta(help="weight download cache"))
    limit: int | None = field(default=None, metadata=meta(help="only the first N images (quick looks)", range=_COUNT))

    def validate(self) -> None:
        """Refuse a numeric setting outside its range (one line naming the setting and its flag)."""
        check_ranges(type(self), field_values(self))


@dataclass(frozen=True)
class TrainConfig:
    """Training psi with the max-head InfoNCE recipe (method.md §3.4–3.6).

    Every field is a flag of ``talk2dino train`` (``--lr``) and a recipe key. The ranges refuse what only a typo
    or a hostile recipe gives (``epochs: 100000000``, a 10**12 batch, a zero or NaN rate), each far wider than any
    real run; lower bounds of positive settings repeat the trainer's own checks, so a recipe fails at once.
    """

    features: str = field(metadata=meta(help="folder written by `talk2dino extract` (train split)"))
    out: str = field(metadata=meta(
        help="run folder; becomes a loadable model folder (must be new or empty: never a released file)"))
    val_features: str | None = field(default=None, metadata=meta(help="folder of the val split for recall@K logging"))
    target_strategy: TargetStrategy = field(default="max", metadata=meta(
        help="image embedding: max over heads (the method) or an ablation"))
    epochs: int = field(default=100, metadata=meta(help="passes over the training captions", range=Range(1, 100_000)))
    max_steps: int | None = field(default=None, metadata=meta(
        help="stop after N steps; None: all epochs", range=_COUNT))
    batch_size: int = field(default=128, metadata=meta(help="captions per step (last kept)", range=Range(1, 1 << 16)))
    lr: float = field(default=1e-4, metadata=meta(
        help="Adam learning rate, constant", range=Range(0, 10, open_low=True)))
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata=meta(
        help="Adam", range=Range(0, 1, open_high=True)))
    eps: float = field(default=1e-8, metadata=meta(help="Adam epsilon", range=Range(0, 1, open_low=True)))
    weight_decay: float = field(default=0.0, metadata=meta(help="Adam weight decay (recipe: none)", range=Range(0, 10)))
    temperature: float = field(default=0.07, metadata=meta(
        help="InfoNCE tau, fixed (not trained)", range=Range(1e-4, 100)))
    loss_divide_by_batch_squared: bool = field(default=True, metadata=meta(
        help="divide the loss by B^2 as the reference code does"))
    seed: int = field(default=123, metadata=meta(help="Python, NumPy and torch seeds", range=Range(0, 2**63 - 1)))
    device: str | None = field(default=None, metadata=meta(help="auto: CUDA when available"))
    on_device: bool | None = field(default=None, metadata=meta(
        help="keep all features on the device (None: when they fit)"))
    eval_every: int = field(default=1, metadata=meta(
        help="epochs between recall@K evaluations", range=Range(1, 100_000)))
    recall_ks: tuple[int, ...] = field(default=(1, 5, 10), metadata=meta(
        help="text->image R@K", range=Range(1, 1 << 20)))
    val_max_images: int | None = field(default=5000, metadata=meta(
        help="val on N images (5k); None: all", range=_COUNT))

    def validate(self) -> None:
        """Refuse a numeric setting outside its range (one line naming the setting and its flag)."""
        check_ranges(type(self), field_values(self))


EVAL_INFERENCE = InferenceConfig(pamr=False)
"""`EvalConfig.inference`'s default: PAMR off, the paper's main rows (method.md §5.1; ``--pamr`` gives its
"+ PAMR" rows), unlike every other entry point. ``bg_clean=None`` here means each benchmark's published setting."""

_PROTOCOL_FIELDS = ("background", "bg_clean", "pamr")  # set by `EvalConfig.protocol_changes` itself
_SIDE = Range(1, 1 << 14)  # a side in pixels


@dataclass(frozen=True)
class EvalConfig:
    """Benchmark evaluation (method.md §5). Model defaults (θ, dtype) come from the registry entry.

    Inference settings: each benchmark runs with the model's own `InferenceConfig` (its registry entry or model
    folder: θ, the cleaning formula), changed by `protocol_changes`: ``background`` from the benchmark;
    ``inference.pamr`` (off by default, `EVAL_INFERENCE`); ``inference.bg_clean``, or the benchmark's published
    setting when None; every other field of `inference` that the user set (`inference_overrides`) or that
    differs from `InferenceConfig`'s default; then, run by run, the swept values (``bg_threshold``,
    ``clean_lambda``, ``short_side``, ``window``, ``stride``).

    `inference_overrides` is what tells "θ 0.55, given" from "θ not given" (`inference` holds a value for every
    field either way): without it a recipe's ``inference: {bg_threshold: 0.55}`` on a ViT-L model (θ 0.54) would
    be dropped as "the default". ``talk2dino eval`` fills it from the recipe's ``inference`` keys and the
    inference flags given; in Python, `with_inference` sets a value and lists it. Files written before it existed
    (a results.json ``config``) load with it empty, and so mean what they meant then.

    Renamed (issue 15): the flat ``pamr`` and ``bg_clean`` are ``inference.pamr`` / ``inference.bg_clean``, and
    ``bg_clean_lambda`` is ``clean_lambda`` (the `InferenceConfig` name). Recipes and `from_dict` still read the
    old keys, with a deprecation warning (`DEPRECATED_KEYS`); the old attributes read with one too.
    """

    dataset: str | None = field(default=None, metadata=meta(
        help="one benchmark (voc20, voc21, context59, ..., ade20k) or `folder`"))
    root: str | None = field(default=None, metadata=meta(
        help="that dataset's folder (e.g. /data/VOCdevkit/VOC2012); default: data_root/<standard place>"))
    data_root: str | None = field(default=None, metadata=meta(
        help="folder holding every dataset in the mmsegmentation layout"))
    suite: Literal["all", "background", "no-background"] | None = field(default=None, metadata=meta(
        help="several benchmarks in the paper's order"))
    classes_file: str | None = field(default=None, metadata=meta(
        help="class names, one per line, for the `folder` dataset"))
    folder_background: bool = field(default=False, metadata=meta(
        help="`folder` dataset: class 0 is background (threshold channel)"))
    model: str = field(default=DEFAULT_MODEL, metadata=meta(help="registry name or model folder"))
    backbone: str | None = field(default=None, metadata=meta(help="override of the model's backbone source"))
    text_encoder: str | None = field(default=None, metadata=meta(help="override of the model's text-encoder source"))
    projection: str | None = field(default=None, metadata=meta(help="override of the model's psi"))
    device: str | None = field(default=None, metadata=meta(help="auto: CUDA when available"))
    dtype: DType = field(default="float32", metadata=meta(help="backbone dtype, recorded in the results"))
    cache_dir: str | None = field(default=None, metadata=meta(help="weight download cache"))
    inference: InferenceConfig = field(default_factory=lambda: EVAL_INFERENCE)  # settings on the model's; see above
    inference_overrides: tuple[str, ...] = field(default=(), metadata=meta(
        help="the `inference` fields the user set (recipe or flag): applied over the model's defaults even when "
             "equal to InferenceConfig's"))
    # The sweeps: every combination of the listed values is one run; an empty list keeps the model's value.
    bg_threshold: tuple[float, ...] = field(default=(), metadata=meta(
        help="background thresholds to sweep; empty: the model's", range=Range(0, 1, open_low=True, open_high=True)))
    clean_lambda: tuple[float, ...] = field(default=(), metadata=meta(
        help="background-cleaning weights (lambda) to sweep; empty: the model's", range=Range(0, 100),
        aliases=("--bg-clean-lambda",)))
    short_side: tuple[int, ...] = field(default=(), metadata=meta(
        help="short sides to sweep; empty: model's", range=_SIDE))
    window: tuple[int, ...] = field(default=(), metadata=meta(
        help="window sizes to sweep; empty: the model's", range=_SIDE))
    stride: tuple[int, ...] = field(default=(), metadata=meta(help="strides to sweep; empty: the model's", range=_SIDE))
    limit: int | None = field(default=None, metadata=meta(help="only the first N images of each split", range=_COUNT))
    out: str = field(default="results", metadata=meta(
        help="results folder: JSON records, Markdown tables, resume caches"))
    save_predictions: bool = field(default=False, metadata=meta(
        help="write palette PNG predictions next to the records"))
    skip_bad: bool = field(default=False, metadata=meta(
        help="skip unreadable or inconsistent samples and list them, instead of failing"))

    DEPRECATED_KEYS: ClassVar[dict[str, str]] = {
        "pamr": "inference.pamr", "bg_clean": "inference.bg_clean", "bg_clean_lambda": "clean_lambda"}
    """Old recipe keys -> their new (dotted) place; read with a deprecation warning."""

    def __post_init__(self) -> None:
        # One spelling per set of names (sorted, each once): equal configs compare equal, and the record reads the
        # same whatever order the names were given in. `validate` checks the names.
        names = self.inference_overrides
        object.__setattr__(self, "inference_overrides", tuple(sorted(set((names,) if isinstance(names, str)
                                                                          else names))))

    def validate(self) -> None:
        """Refuse a swept or numeric setting outside its range, impossible inference settings, and an
        `inference_overrides` name that is not an `InferenceConfig` field.

        Raises:
            InvalidInputError: one line naming the setting and its flag.
        """
        check_ranges(type(self), field_values(self))
        known = {f.name for f in dataclasses.fields(InferenceConfig)}
        unknown = [name for name in self.inference_overrides if name not in known]
        if unknown:
            raise InvalidInputError(f"EvalConfig.inference_overrides: {short_repr(unknown)} not InferenceConfig "
                                    f"fields; known: {sorted(known)}")
        try:
            self.inference.validate()
        except ValueError as err:
            raise InvalidInputError(f"EvalConfig.inference: {err}") from err

    def protocol_changes(self, *, background: bool, bg_clean: bool) -> dict[str, Any]:
        """The `InferenceConfig` changes this evaluation makes to a model's defaults on one benchmark, before the
        swept values (method.md §5.1; the rule is in the class docstring).

        Args:
            background: whether the benchmark has a background class (its channel 0).
            bg_clean: the benchmark's published background-cleaning setting.
        """
        library = InferenceConfig()
        given = set(self.inference_overrides)
        changes = {name: value for name, value in field_values(self.inference).items()
                   if name not in _PROTOCOL_FIELDS and (name in given or value != getattr(library, name))}
        changes.update(background=background, pamr=self.inference.pamr,
                       bg_clean=bg_clean if self.inference.bg_clean is None else self.inference.bg_clean)
        return changes

    def with_inference(self, **changes: Any) -> EvalConfig:
        """A copy with `changes` made to `inference` and their names added to `inference_overrides`, so they
        apply over the model's defaults whatever their values (``with_inference(bg_threshold=0.55)``)."""
        return dataclasses.replace(self, inference=dataclasses.replace(self.inference, **changes),
                                   inference_overrides=(*self.inference_overrides, *changes))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EvalConfig:
        """An `EvalConfig` from a mapping (a JSON record's ``config``): unknown keys are errors, old keys
        (`DEPRECATED_KEYS`) are read with a `DeprecationWarning`, nested ``inference`` takes a mapping.

        The keys of ``inference`` are not taken for overrides (a record lists every field): only
        ``inference_overrides`` says which were given; a file without it (older records) gives none."""
        values = upgrade_keys(cls, d, warn=lambda message: warnings.warn(message, DeprecationWarning, stacklevel=3))
        config = cls(**check_fields(cls, values))
        config.validate()
        return config

    @property
    def pamr(self) -> bool:
        """Deprecated: ``inference.pamr``."""
        warnings.warn("EvalConfig.pamr is deprecated; read EvalConfig.inference.pamr", DeprecationWarning,
                      stacklevel=2)
        return self.inference.pamr

    @property
    def bg_clean(self) -> bool | None:
        """Deprecated: ``inference.bg_clean``."""
        warnings.warn("EvalConfig.bg_clean is deprecated; read EvalConfig.inference.bg_clean", DeprecationWarning,
                      stacklevel=2)
        return self.inference.bg_clean

    @property
    def bg_clean_lambda(self) -> tuple[float, ...]:
        """Deprecated: ``clean_lambda``."""
        warnings.warn("EvalConfig.bg_clean_lambda is deprecated; read EvalConfig.clean_lambda", DeprecationWarning,
                      stacklevel=2)
        return self.clean_lambda


def upgrade_keys(cls: type, values: Mapping[str, Any], *, warn: Callable[[str], None]) -> dict[str, Any]:
    """`values` with the old keys of `cls` (its ``DEPRECATED_KEYS``, old -> dotted new) moved to their new place,
    calling `warn` once per old key; a nested new place (``inference.pamr``) goes into that mapping.

    Raises:
        InvalidInputError: an old key given together with its new one (which is meant is unclear).
    """
    renamed: dict[str, str] = getattr(cls, "DEPRECATED_KEYS", {})
    out = dict(values)
    for old, new in renamed.items():
        if old not in out:
            continue
        value = out.pop(old)
        warn(f"{cls.__name__} key '{old}' is deprecated; write '{new}' instead")
        head, _, tail = new.partition(".")
        if not tail:
            if new in out:
                raise InvalidInputError(f"{cls.__name__}: '{old}' and '{new}' both given; keep '{new}'")
            out[new] = value
            continue
        nested = out.get(head, {})
        if not isinstance(nested, Mapping):
            raise InvalidInputError(f"{cls.__name__}.{head}: expected a mapping, got {short_repr(nested)}")
        if tail in nested:
            raise InvalidInputError(f"{cls.__name__}: '{old}' and '{new}' both given; keep '{new}'")
        out[head] = {**nested, tail: value}
    return out


def check_template(template: str) -> str:
    """`template` if it is literal text plus exactly one bare ``{}``; else a one-line InvalidInputError.

    Parsed with `string.Formatter` (as `str.format` reads it): named or numbered fields (``{x}``, ``{0}``),
    format specs (``{:>9}``), conversions (``{!r}``) and unbalanced braces are refused, so that
    ``template.format(label)`` can neither raise nor allocate more than the label's length.
    """
    shown = short_repr(template) if isinstance(template, str) else type(template).__name__
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
