"""Named models and the builder that wires a `Talk2DINO` from three weight sources (house-style §3, §4).

A model is either a registry name (``talk2dino-vitb14-reg``), a model folder
(``local-dir:PATH`` or ``hf-hub:ORG/REPO`` holding ``talk2dino.json`` + ``projection.safetensors``,
as our training writes), or composed from three separate sources (``backbone=``, ``text_encoder=``,
``projection=``), which also override the parts of a named model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from talk2dino.config import BackboneConfig, InferenceConfig, ModelConfig, ProjectionConfig, TextConfig
from talk2dino.errors import WeightsError, error_summary
from talk2dino.fileio import atomic_write_bytes
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

# The authors' psi files, pinned to commits of the reference repository (method.md §7,
# ../reference/README.md). They carry no licence, so we download them, never bundle them.
_PSI_URL = "https://raw.githubusercontent.com/lorebianchi98/Talk2DINO/{commit}/weights/{file}"
_CURRENT = "4918c2df1d00c644ecc7f34de070694af1a8bc69"
_SUPERSEDED = "d35413640f70d3e2beb686b1f2b36c13b1d78335"
_CLIP_B16 = "hf-hub:openai/clip-vit-base-patch16"  # CLIP ViT-B/16 text for every backbone, method.md §2.1


# Named frozen parts, so that `--backbone dinov2-vitl14-reg` or `--text-encoder clip-vitb16` works
# wherever a source string is accepted.
BACKBONES: dict[str, str] = {
    # DINOv2 ViT-S/B/L/g at patch 14, without and with 4 registers (method.md §2.2): one command per
    # variant answers the registers question.
    **{
        f"dinov2-vit{size}14{reg}": f"hf-hub:facebook/dinov2-{'with-registers-' if reg else ''}{name}"
        for size, name in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
        for reg in ("", "-reg")
    },
    # DINO v1 ViT-S/B at patch 8 and 16, no registers: the paper's "DINO instead of DINOv2" ablation.
    **{f"dino-vit{size}{patch}": f"hf-hub:facebook/dino-vit{size}{patch}" for size in ("s", "b") for patch in (8, 16)},
    # DINOv3 ViT-S/B/L/H+ at patch 16 with 4 registers (method.md §2.4). These hub repositories are
    # gated: accept Meta's licence on the model page and log in (`huggingface-cli login`) before the
    # first download.
    **{f"dinov3-{arch}": f"hf-hub:facebook/dinov3-{arch}-pretrain-lvd1689m"
       for arch in ("vits16", "vitb16", "vitl16", "vith16plus")},
}
TEXT_ENCODERS: dict[str, str] = {"clip-vitb16": _CLIP_B16}


def resolve_part(source: str, table: dict[str, str]) -> str:
    """A part name from `table` -> its source string; anything else is returned unchanged."""
    return table.get(source, source)


@dataclass(frozen=True)
class RegistryEntry:
    """A named model: configuration with pinned sources, and a one-line description."""

    config: ModelConfig
    description: str
    aliases: tuple[str, ...] = ()


def _entry(name: str, backbone: str, psi: ProjectionConfig, description: str, *, aliases: tuple[str, ...] = (),
           inference: InferenceConfig | None = None, profile: str = "2025",
           logits_rope: LogitsRope = "model") -> RegistryEntry:
    config = ModelConfig(
        name=name,
        backbone=BackboneConfig(source=backbone, logits_rope=logits_rope),
        text=TextConfig(source=_CLIP_B16),
        projection=psi,
        inference=inference or InferenceConfig(),
        profile=profile,  # type: ignore[arg-type]
    )
    return RegistryEntry(config, description, aliases)


_ENTRIES: tuple[RegistryEntry, ...] = (
    _entry(
        "talk2dino-vitb14-reg",
        "hf-hub:facebook/dinov2-with-registers-base",
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="vitb_mlp_infonce.pth"),
            sha256="5f6efcc520f22916ecf3dfdfb01d6f57e701c1c2e1feda71a80d89e3cd752f0f",
        ),
        "DINOv2 ViT-B/14 with registers + CLIP B/16 text, current psi (2025 results)",
        aliases=("talk2dino-vitb14-reg.2025", "talk2dino-vitb14reg.2025"),
    ),
    _entry(
        "talk2dino-vitl14-reg",
        "hf-hub:facebook/dinov2-with-registers-large",
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="vitl_mlp_infonce.pth"),
            git_blob_sha1="21a0038cc793403648264fe9c90a29c9533770a3",
        ),
        "DINOv2 ViT-L/14 with registers + CLIP B/16 text (2025 results, theta 0.54)",
        aliases=("talk2dino-vitl14-reg.2025", "talk2dino-vitl14reg.2025"),
        inference=InferenceConfig(bg_threshold=0.54),  # method.md §4.6: ViT-L threshold
    ),
    _entry(
        "talk2dino-vitb14-reg.2024",
        "hf-hub:facebook/dinov2-with-registers-base",
        ProjectionConfig(
            source=_PSI_URL.format(commit=_SUPERSEDED, file="vitb_mlp_infonce.pth"),
            sha256="5db3e85d8745a621cddfcb5c76641f47a0514852a2da64138d5c893864c9bc81",
        ),
        "superseded ViT-B psi of 2024-11-21 with the 2024 cleaning formula (legacy profile, best effort)",
        aliases=("talk2dino-vitb14reg.2024",),
        inference=InferenceConfig(clean_head_embedding="softmax"),
        profile="2024",
    ),
    # The authors' DINOv3 psi (method.md §2.4, §7; no published results). The reference computed the
    # training targets' CLS->patch logits from the qkv projection, before RoPE, so these entries use
    # logits_rope="none" to feed psi what it was trained on (pitfall P20). For a psi trained with this
    # package on the true logits, use --backbone dinov3-vitb16 (logits_rope "model", the default) or
    # the model folder the training writes, which records its own setting.
    _entry(
        "talk2dinov3-vitb16",
        BACKBONES["dinov3-vitb16"],
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="dinov3_vitb_mlp_infonce.pth"),
            sha256="6fc5ce7a05d8f1c829c174d87b861da05399cf0bfe50de3711ac940115d85fcc",
        ),
        "DINOv3 ViT-B/16 (4 registers) + CLIP B/16 text, authors' DINOv3 psi; RoPE-free logits as trained; "
        "the DINOv3 hub repo is gated (accept its licence, log in)",
        logits_rope="none",
    ),
    _entry(
        "talk2dinov3-vitl16",
        BACKBONES["dinov3-vitl16"],
        ProjectionConfig(
            source=_PSI_URL.format(commit=_CURRENT, file="dinov3_vitl_mlp_infonce.pth"),
            git_blob_sha1="51dfe9926175877b5deecaba07c398e46e9d61fe",
        ),
        "DINOv3 ViT-L/16 (4 registers) + CLIP B/16 text, authors' DINOv3 psi; RoPE-free logits as trained; "
        "the DINOv3 hub repo is gated (accept its licence, log in)",
        logits_rope="none",
    ),
)


def _lookup() -> dict[str, RegistryEntry]:
    table: dict[str, RegistryEntry] = {}
    for entry in _ENTRIES:
        for key in (entry.config.name, *entry.aliases):
            table[key] = entry
    return table


def list_models() -> list[str]:
    """Names of the registered models (aliases not included)."""
    return [e.config.name for e in _ENTRIES]


def describe_models() -> dict[str, str]:
    """Registered model name -> one-line description."""
    return {e.config.name: e.description for e in _ENTRIES}


def get_model_config(name: str, *, cache_dir: str | os.PathLike[str] | None = None) -> ModelConfig:
    """Resolve a model name or model folder to its `ModelConfig`.

    Raises:
        WeightsError: for an unknown name (listing the known ones) or an unreadable model folder.
    """
    table = _lookup()
    if name in table:
        return table[name].config
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
        WeightsError: one line naming the file and the first problem (unreadable, not JSON, a wrong
            type, an unknown key, an out-of-range value).
    """
    path = Path(path)
    try:
        if path.stat().st_size > _MAX_CONFIG_BYTES:
            raise WeightsError(f"{path}: {path.stat().st_size} bytes is too large for a model configuration")
        data = json.loads(path.read_bytes().decode("utf-8"))
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
        loaded: Any = CLIPTextModelWithProjection.from_pretrained(folder, dtype=torch.float32,
                                                                  output_loading_info=True)
        model, info = loaded
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as err:  # transformers raises several types for a wrong folder
        raise WeightsError(f"text encoder: cannot load a CLIP text model and tokenizer from {folder} "
                           f"({describe_load_error(err)})") from err
    if info.get("missing_keys"):
        raise WeightsError(f"text encoder: {folder} lacks weights {sorted(info['missing_keys'])[:8]}")
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
    weights_info = {"backbone": dino_meta, "text": text_meta, "projection": psi_meta,
                    "dtype": str(torch_dtype).removeprefix("torch.")}
    model = Talk2DINO(dino, text, psi, config, weights_info)
    return model.to(target).eval()
