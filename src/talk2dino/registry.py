"""Named models, their tables and pins (house-style §3): data and model-folder configs, no building.

A model is either a registry name (``talk2dino-vitb14-reg``), a model folder (``local-dir:PATH`` or
``hf-hub:ORG/REPO`` holding ``talk2dino.json`` + ``projection.safetensors``, as our training writes), or composed
from three separate sources. This module resolves a name or folder to its `ModelConfig`
(:func:`get_model_config`), reads and writes model folders, and holds the tables the builder consults
(:data:`BACKBONE_FAMILIES`, :data:`MIN_TRANSFORMERS`). Building is `talk2dino.factory`'s job.

The names themselves (models, backbones, text encoders) are pure data in `talk2dino.catalog`, which
``talk2dino models`` reads without importing torch; they are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from talk2dino.catalog import BACKBONES as BACKBONES
from talk2dino.catalog import TEXT_ENCODERS as TEXT_ENCODERS
from talk2dino.catalog import describe_models as describe_models
from talk2dino.catalog import list_models as list_models
from talk2dino.catalog import registered_config
from talk2dino.catalog import resolve_part as resolve_part
from talk2dino.config import ModelConfig
from talk2dino.errors import WeightsError, error_summary
from talk2dino.fileio import json_loads_unique, write_json
from talk2dino.models import DinoV1Backbone, DinoV2Backbone, DinoV3Backbone, Projection, VisionBackbone
from talk2dino.models.projection import PROJECTION_FILE
from talk2dino.weights import parse_source, resolve_model_dir

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
    write_json(folder / MODEL_CONFIG_FILE, config.to_dict(), durable=True)
    return folder


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
