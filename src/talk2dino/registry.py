"""Named models and the builder that wires a `Talk2DINO` from three weight sources (house-style §3, §4).

A model is either a registry name (``talk2dino-vitb14-reg``), a model folder
(``local-dir:PATH`` or ``hf-hub:ORG/REPO`` holding ``talk2dino.json`` + ``projection.safetensors``,
as our training writes), or composed from three separate sources (``backbone=``, ``text_encoder=``,
``projection=``), which also override the parts of a named model.

The names themselves (models, backbones, text encoders) are pure data in `talk2dino.catalog`, which
``talk2dino models`` reads without importing torch; they are re-exported here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from talk2dino.catalog import (  # the names are pure data there, readable without torch; re-exported here
    BACKBONES,
    TEXT_ENCODERS,
    list_models,
    registered_config,
    resolve_part,
)
from talk2dino.catalog import describe_models as describe_models
from talk2dino.compat import require, transformers_dtype_kwargs
from talk2dino.config import BackboneConfig, ModelConfig, ProjectionConfig, TextConfig
from talk2dino.errors import WeightsError, error_summary
from talk2dino.fileio import JSON_READ_ERRORS, atomic_write_bytes, json_loads_unique
from talk2dino.models import (
    ClipTextEncoder,
    DinoV1Backbone,
    DinoV2Backbone,
    DinoV3Backbone,
    Projection,
    Talk2DINO,
    VisionBackbone,
)
from talk2dino.models.backbones import LogitsRope
from talk2dino.models.projection import PROJECTION_FILE, projection_dims
from talk2dino.weights import (
    describe_load_error,
    load_state_dict,
    parse_source,
    resolve_file,
    resolve_model_dir,
)

logger = logging.getLogger(__name__)

MODEL_CONFIG_FILE = "talk2dino.json"


def get_model_config(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
    """Resolve a model name or model folder to its `ModelConfig`.

    Raises:
        WeightsError: for an unknown name (listing the known ones) or an unreadable model folder.
    """
    registered = registered_config(name)
    if registered is not None:
        return registered
    if name.startswith(("local-dir:", "hf-hub:")):
        folder = resolve_model_dir(name, what=f"model {name}", cache_dir=cache_dir,
                                   allow_patterns=[MODEL_CONFIG_FILE, PROJECTION_FILE, "*.json"])
        path = folder / MODEL_CONFIG_FILE
        if not path.is_file():
            raise WeightsError(f"model folder {folder} has no {MODEL_CONFIG_FILE}")
        config = read_model_config(path)
        _check_folder_sources(config, path, from_hub=name.startswith("hf-hub:"))
        psi = dataclasses.replace(config.projection, source=f"local-dir:{folder}")
        return dataclasses.replace(config, projection=psi)
    raise WeightsError(
        f"unknown model '{name}'; known: {', '.join(list_models())} (or local-dir:PATH / hf-hub:ORG/REPO, "
        "or compose one from --backbone, --text-encoder and --projection)"
    )


_MAX_CONFIG_BYTES = 1 << 20  # a talk2dino.json is about 2 KB; anything near this is not one


def read_model_config(path: str | os.PathLike[str]) -> ModelConfig:
    """Read and validate a model folder's ``talk2dino.json`` (an untrusted file).

    Raises:
        WeightsError: one line naming the file and the first problem (unreadable, not JSON, a key named
            twice in one object, a wrong type, an unknown key, an out-of-range value such as an
            ``image_std`` outside [1e-3, 10] or a ``context_length`` below 3; see `ModelConfig.from_dict`).
    """
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise WeightsError(f"{path}: {path.stat().st_size} bytes is too large for a model configuration")
        # json_loads_unique: a second "image_std" below the real one must not win silently.
        data = json_loads_unique(path.read_bytes())
        return ModelConfig.from_dict(data)
    except WeightsError:
        raise
    except (ValueError, KeyError, TypeError, OSError, RecursionError) as err:
        # json/UnicodeDecodeError/InvalidInputError are ValueErrors; RecursionError: absurdly nested JSON.
        raise WeightsError(
            f"{path}: invalid model configuration ({error_summary(err)}); fix or re-export the model folder") from err


def _check_folder_sources(config: ModelConfig, path: Path, *, from_hub: bool) -> None:
    """Refuse part sources in a model folder's config that reach outside what the folder may name.

    A hub repository is someone else's: its config may only name hub repositories or our registered
    parts, never files or folders on this machine. A local folder may name absolute ``local-dir:``
    paths (an offline cluster's copies), but no relative path that climbs out with ``..``.

    Raises:
        WeightsError: naming the file, the part and the source.
    """
    for part, source in (("backbone", config.backbone.source), ("text", config.text.source)):
        if source in BACKBONES or source in TEXT_ENCODERS:
            continue
        kind = parse_source(source).kind if source.startswith(("hf-hub:", "local-dir:")) else "file"
        if from_hub and kind != "hf-hub":
            raise WeightsError(f"{path}: a hub model folder may only name hub sources, but its {part} is "
                               f"{source!r}; pass --{part.replace('text', 'text-encoder')} to choose one")
        location = source.split(":", 1)[1] if kind == "local-dir" else source
        if kind != "hf-hub" and not os.path.isabs(location) and ".." in Path(location).parts:
            raise WeightsError(f"{path}: {part} source {source!r} climbs out of the model folder with '..'; "
                               "use an absolute local-dir: path or an hf-hub: source")


def save_model_folder(folder: str | os.PathLike[str], config: ModelConfig, projection: Projection,
                      metadata: dict[str, Any] | None = None) -> Path:
    """Write a model folder (``talk2dino.json`` + ``projection.safetensors``) that `create_model` loads.

    Returns:
        The folder.
    """
    from talk2dino.models.projection import save_projection

    folder = Path(folder)
    save_projection(folder, projection, metadata or {})
    atomic_write_bytes(folder / MODEL_CONFIG_FILE,
                       (json.dumps(config.to_dict(), indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
                       durable=True)
    return folder


def _snapshot_revision(path: Path) -> str | None:
    # huggingface_hub stores snapshots as .../snapshots/<commit>; record that commit.
    return path.name if path.parent.name == "snapshots" else None


# transformers model_type -> backbone family (talk2dino/models/backbones/, one file each). A new family
# is a new file there plus one line here.
BACKBONE_FAMILIES: dict[str, type[VisionBackbone]] = {
    "dinov2": DinoV2Backbone,
    "dinov2_with_registers": DinoV2Backbone,
    "dinov3_vit": DinoV3Backbone,
    "vit": DinoV1Backbone,  # DINO v1 checkpoints are plain transformers ViTs
}


# The first transformers release with each model type's classes: an older one cannot even read the config,
# so the folder's model_type is read from config.json first and refused in one line naming the version.
MIN_TRANSFORMERS: dict[str, str] = {
    "dinov2_with_registers": "4.48.0",
    "dinov3_vit": "4.56.0",
}


def _require_transformers_for(folder: Path) -> None:
    """Refuse, in one line, a backbone folder whose model type the installed transformers does not know.

    Raises:
        Talk2DinoError: the model type needs a newer transformers (the message names both versions).
    """
    try:
        with open(folder / "config.json", encoding="utf-8") as handle:
            model_type = json.load(handle).get("model_type")
    except JSON_READ_ERRORS + (AttributeError,):  # unreadable: AutoConfig reports it with its reason
        return
    if isinstance(model_type, str) and model_type in MIN_TRANSFORMERS:
        require("transformers", MIN_TRANSFORMERS[model_type], f"the '{model_type}' backbone in {folder}")


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Without transformers' "Loading weights" / "Loading checkpoint shards" progress bars (two per model, each
    done in a blink from a local file) unless talk2dino logs at DEBUG (the CLI's -v). Downloads happen before,
    in our resolver, with their own bars. The switches (`transformers.utils.logging` progress-bar functions,
    which also drive huggingface_hub's) exist in transformers 4.48 through 5.x; the previous state is restored.
    """
    try:
        import huggingface_hub.utils as hub_utils
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        yield
        return
    if not hf_logging.is_progress_bar_enabled() or logger.isEnabledFor(logging.DEBUG):
        yield
        return
    hub_disabled = hub_utils.are_progress_bars_disabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()  # also turns huggingface_hub's back on: put its own state back
        if hub_disabled:
            hub_utils.disable_progress_bars()


def _load_backbone(source: str, *, dtype: torch.dtype, cache_dir: str | os.PathLike[str] | None,
                   logits_rope: LogitsRope = "model") -> tuple[VisionBackbone, dict[str, Any]]:
    """Resolve `source`, read its config and load it with the family its ``model_type`` names.

    Args:
        source: ``hf-hub:`` / ``local-dir:`` source of a transformers model folder.
        dtype: backbone weight dtype.
        cache_dir: download cache.
        logits_rope: DINOv3 logits convention (`BackboneConfig.logits_rope`); no effect on other families.

    Raises:
        WeightsError: unreadable folder, an unsupported model type (the message lists the supported
            ones), or missing weights.
    """
    from transformers import AutoConfig

    folder = resolve_model_dir(source, what="backbone", cache_dir=cache_dir)
    _require_transformers_for(folder)
    try:
        hf_config = AutoConfig.from_pretrained(folder)
    except Exception as err:  # transformers raises OSError/ValueError/KeyError for bad folders
        raise WeightsError(f"backbone: {folder} holds no readable config.json ({error_summary(err)})") from err
    family = BACKBONE_FAMILIES.get(hf_config.model_type)
    if family is None:
        raise WeightsError(
            f"backbone: {folder} is a '{hf_config.model_type}' model, not DINOv2, DINOv3 or DINO ViT; "
            f"supported model types: {', '.join(sorted(BACKBONE_FAMILIES))}"
        )
    try:
        with _quiet_loading():
            backbone = family.from_pretrained(folder, dtype=dtype, logits_rope=logits_rope)
    except (pickle.UnpicklingError, EOFError, OSError) as err:
        # A .bin whose pickle holds more than tensors (refused by weights_only), or a torn file.
        raise WeightsError(f"backbone: cannot load the weights in {folder} ({describe_load_error(err)}); "
                           "use a trusted copy, preferably model.safetensors") from err
    meta = {"source": source, "path": str(folder), "revision": _snapshot_revision(folder),
            "model_type": hf_config.model_type, **backbone.settings()}
    logger.info("backbone: %s (%s family, M=%d, d_h=%d, G=%d, patch %d%s)", folder, backbone.family,
                backbone.num_heads, backbone.head_dim, backbone.num_global, backbone.patch_size,
                "".join(f", {k}={v}" for k, v in backbone.settings().items()))
    return backbone, meta


def _load_text(source: str, *, context_length: int, cache_dir: str | os.PathLike[str] | None) -> tuple[
        ClipTextEncoder, dict[str, Any]]:
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    folder = resolve_model_dir(source, what="text encoder", cache_dir=cache_dir)
    try:
        with _quiet_loading():
            loaded: Any = CLIPTextModelWithProjection.from_pretrained(folder, output_loading_info=True,
                                                                      **transformers_dtype_kwargs(torch.float32))
            model, info = loaded
            tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises several types for a wrong folder
        raise WeightsError(f"text encoder: cannot load a CLIP text model and tokenizer from {folder} "
                           f"({describe_load_error(err)})") from err
    if info.get("missing_keys"):
        raise WeightsError(f"text encoder: {folder} lacks weights {sorted(info['missing_keys'])[:8]}")
    positions = getattr(model.config, "max_position_embeddings", None)
    if isinstance(positions, int) and context_length > positions:
        # A longer prompt would not be cut and would index past the position table inside the model.
        raise WeightsError(f"text encoder: {folder} has {positions} token positions, fewer than the model "
                           f"configuration's text.context_length {context_length}; set it to at most {positions}")
    meta = {"source": source, "path": str(folder), "revision": _snapshot_revision(folder)}
    return ClipTextEncoder(model, tokenizer, context_length=context_length), meta


def _load_projection(config: ProjectionConfig, *, out_dim: int, pretrained: bool,
                     cache_dir: str | os.PathLike[str] | None) -> tuple[Projection, dict[str, Any]]:
    projection = Projection(config.in_dim, out_dim)
    if not pretrained or config.source is None:
        logger.info("projection: random initialisation (no pretrained psi)")
        return projection, {"source": None, "sha256": None}
    path, digest = resolve_file(config.source, what="projection", cache_dir=cache_dir, sha256=config.sha256,
                                git_blob_sha1=config.git_blob_sha1)
    state = load_state_dict(path)
    in_dim, file_out = projection_dims(state)
    if (in_dim, file_out) != (config.in_dim, out_dim):
        raise WeightsError(
            f"projection {path} maps {in_dim}-d text to {file_out}-d, but the backbone is {out_dim}-d "
            f"(and the text encoder {config.in_dim}-d): it was trained for another backbone"
        )
    projection.load_checked(state, origin=str(path))
    logger.info("projection: %s sha256=%s", path, digest)
    return projection, {"source": config.source, "path": str(path), "sha256": digest}


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (or a torch dtype) -> torch dtype; None means float32."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype '{dtype}'; use float32, bfloat16 or float16")
    return _DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None or 'auto' -> CUDA when available, else CPU."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device '{device}'") from err
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device '{device}' requested but CUDA is not available")
    return resolved


def create_model(
    name: str | None = "talk2dino-vitb14-reg",
    *,
    pretrained: bool = True,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    backbone: str | None = None,
    text_encoder: str | None = None,
    projection: str | None = None,
) -> Talk2DINO:
    """Build a `Talk2DINO` from a name, a model folder, or three sources.

    Args:
        name: registry name, ``local-dir:``/``hf-hub:`` model folder, or None to compose from the
            three sources alone (then all three are required).
        pretrained: load psi's weights (False: random psi, for tests and training from scratch).
        device: "cpu", "cuda", "cuda:1", ... ; None or "auto" picks CUDA when available.
        dtype: backbone dtype, float32 (default), bfloat16 or float16. Text and psi stay float32
            (method.md P24).
        cache_dir: download cache (default ``$TALK2DINO_CACHE`` or ``~/.cache/talk2dino``).
        backbone, text_encoder, projection: sources overriding the named model's parts.

    Raises:
        WeightsError: a source cannot be resolved, downloaded, verified or strictly loaded.
        ValueError: an unknown device or dtype.
    """
    torch_dtype = parse_dtype(dtype)
    target = resolve_device(device)
    if name is None:
        if not (backbone and text_encoder and projection):
            raise WeightsError("without a model name, give all three of backbone, text_encoder and projection")
        config = ModelConfig(
            name="composed",
            backbone=BackboneConfig(source=resolve_part(backbone, BACKBONES)),
            text=TextConfig(source=resolve_part(text_encoder, TEXT_ENCODERS)),
            projection=ProjectionConfig(source=projection),
        )
    else:
        config = get_model_config(name, cache_dir=cache_dir)
        if backbone:
            config = dataclasses.replace(config, backbone=dataclasses.replace(
                config.backbone, source=resolve_part(backbone, BACKBONES)))
        if text_encoder:
            config = dataclasses.replace(config, text=dataclasses.replace(
                config.text, source=resolve_part(text_encoder, TEXT_ENCODERS)))
        if projection:
            # A user-supplied psi has no pin of ours; its sha256 is still computed and recorded.
            config = dataclasses.replace(config, projection=ProjectionConfig(source=projection,
                                                                            in_dim=config.projection.in_dim))
    for source in (config.backbone.source, config.text.source):
        parse_source(source)  # fail fast on a malformed string, before any download
    dino, dino_meta = _load_backbone(config.backbone.source, dtype=torch_dtype, cache_dir=cache_dir,
                                     logits_rope=config.backbone.logits_rope)
    text, text_meta = _load_text(config.text.source, context_length=config.text.context_length, cache_dir=cache_dir)
    psi, psi_meta = _load_projection(config.projection, out_dim=dino.embed_dim, pretrained=pretrained,
                                     cache_dir=cache_dir)
    weights_info: dict[str, Any] = {"backbone": dino_meta, "text": text_meta, "projection": psi_meta,
                                    "dtype": str(torch_dtype).removeprefix("torch.")}
    # The parts given as sources (all three for a composed model): outputs name them next to the short name.
    overridden = [part for part, given in (("backbone", backbone), ("text", text_encoder), ("projection", projection))
                  if given]
    if overridden:
        weights_info["overridden"] = overridden
    model = Talk2DINO(dino, text, psi, config, weights_info)
    return model.to(target).eval()
