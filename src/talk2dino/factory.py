"""Build models: `create_model` and the public part loaders it wires together (house-style §2, §4, §5).

`create_model` resolves a registry name or model folder to its `ModelConfig` (`talk2dino.registry`), then
loads the three parts and hands them to `Talk2DINO` (constructor injection):

- :func:`load_backbone`: a transformers DINO folder -> the `VisionBackbone` family its ``model_type`` names;
- :func:`load_text_encoder`: a CLIP folder -> `ClipTextEncoder` (model and tokenizer);
- :func:`load_projection`: psi, strictly loaded and hash-checked (random when not pretrained);
- :func:`load_onnx_model`: a folder written by ``talk2dino export-onnx`` -> a `Talk2DINO` whose three parts run
  in onnxruntime (`talk2dino.onnx.runtime`).

Feature extraction uses the part loaders directly (it needs a backbone and a text encoder, never psi).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from talk2dino.catalog import BACKBONES, TEXT_ENCODERS, resolve_part
from talk2dino.compat import require, transformers_dtype_kwargs
from talk2dino.config import DEFAULT_MODEL, BackboneConfig, ModelConfig, ProjectionConfig, TextConfig
from talk2dino.errors import WeightsError, error_summary
from talk2dino.fileio import JSON_READ_ERRORS
from talk2dino.models import ClipTextEncoder, Projection, Talk2DINO, VisionBackbone
from talk2dino.models.backbones import LogitsRope
from talk2dino.models.projection import projection_dims
from talk2dino.registry import BACKBONE_FAMILIES, MIN_TRANSFORMERS, get_model_config
from talk2dino.weights import describe_load_error, load_state_dict, parse_source, resolve_file, resolve_model_dir

logger = logging.getLogger(__name__)


def _snapshot_revision(path: Path) -> str | None:
    # huggingface_hub stores snapshots as .../snapshots/<commit>; record that commit.
    return path.name if path.parent.name == "snapshots" else None


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


def load_backbone(source: str, *, dtype: torch.dtype = torch.float32,
                  cache_dir: str | os.PathLike[str] | None = None,
                  logits_rope: LogitsRope = "model") -> tuple[VisionBackbone, dict[str, Any]]:
    """Resolve `source`, read its config and load it with the family its ``model_type`` names.

    Args:
        source: ``hf-hub:`` / ``local-dir:`` source of a transformers model folder.
        dtype: backbone weight dtype.
        cache_dir: download cache.
        logits_rope: DINOv3 logits convention (`BackboneConfig.logits_rope`); no effect on other families.

    Returns:
        The backbone, and its ``weights_info`` entry (source, path, revision, model type, settings).

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


def load_text_encoder(source: str, *, context_length: int = 77, cache_dir: str | os.PathLike[str] | None = None
                      ) -> tuple[ClipTextEncoder, dict[str, Any]]:
    """Resolve `source` and load a CLIP text model with its tokenizer (float32, method.md P24).

    Args:
        source: ``hf-hub:`` / ``local-dir:`` source of a transformers CLIP folder (model and tokenizer).
        context_length: tokens per prompt (`TextConfig.context_length`); at most the model's position table.
        cache_dir: download cache.

    Returns:
        The encoder, and its ``weights_info`` entry (source, path, snapshot revision).

    Raises:
        WeightsError: unreadable folder, missing weights, or a context longer than the position table.
    """
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


def load_projection(config: ProjectionConfig, *, out_dim: int, pretrained: bool = True,
                    cache_dir: str | os.PathLike[str] | None = None) -> tuple[Projection, dict[str, Any]]:
    """psi for a backbone of width `out_dim`: resolved, hash-checked and strictly loaded (house-style §4).

    Args:
        config: the projection's source, pins and text width.
        out_dim: backbone width D that psi maps to.
        pretrained: load the weights (False, or no source: random initialisation).
        cache_dir: download cache.

    Returns:
        psi, and its ``weights_info`` entry (source, path, sha256).

    Raises:
        WeightsError: unresolvable source, hash mismatch, a file for another backbone width, bad keys or shapes.
    """
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
    name: str | None = DEFAULT_MODEL,
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
    dino, dino_meta = load_backbone(config.backbone.source, dtype=torch_dtype, cache_dir=cache_dir,
                                    logits_rope=config.backbone.logits_rope)
    text, text_meta = load_text_encoder(config.text.source, context_length=config.text.context_length,
                                        cache_dir=cache_dir)
    psi, psi_meta = load_projection(config.projection, out_dim=dino.embed_dim, pretrained=pretrained,
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


def load_onnx_model(folder: str | os.PathLike[str], *, device: str | torch.device = "cpu",
                    providers: Sequence[str] | None = None, threads: int | None = None,
                    verify: bool = True) -> Talk2DINO:
    """Build a `Talk2DINO` whose backbone, text encoder and psi run in onnxruntime.

    The model's inference defaults get ``window`` = the exported image size (and a stride no larger),
    since the image graph accepts only that window, and, for a graph with a fixed batch, that batch
    as ``window_batch_size``; everything else is the exported model's config.

    Args:
        folder: a folder written by `talk2dino.onnx.export.export_onnx` (``talk2dino export-onnx``).
        device: "cpu" (CPUExecutionProvider) or "cuda[:N]" (CUDAExecutionProvider; outputs on that device).
        providers: explicit onnxruntime provider names, overriding the choice from `device`.
        threads: intra-op threads per session (None: onnxruntime's default).
        verify: check every file's sha256 against the manifest first.

    Returns:
        A `Talk2DINO` in eval mode on `device`; ``weights_info["runtime"]`` records the runtime,
        its providers and the file hashes.

    Raises:
        WeightsError: not an export folder, a file missing or damaged.
        ImportError: onnxruntime is not installed.
        ValueError: CUDA requested without a CUDA-enabled onnxruntime.
    """
    from transformers import AutoTokenizer

    from talk2dino.onnx.runtime import (
        IMAGE_ENCODER_FILE,
        PROJECTION_FILE,
        TEXT_ENCODER_FILE,
        TOKENIZER_DIR,
        OnnxBackbone,
        OnnxProjection,
        OnnxTextEncoder,
        make_session,
        read_onnx_config,
        require_onnxruntime,
        resolve_providers,
        verify_onnx_folder,
    )

    ort = require_onnxruntime()
    root = Path(folder)
    manifest = read_onnx_config(root)
    if verify:
        verify_onnx_folder(root, manifest)
    chosen = resolve_providers(device, providers)
    target = torch.device(device)
    device_id = target.index or 0

    def session(name: str) -> Any:
        return make_session(root / name, providers=chosen, device_id=device_id, threads=threads)

    image, text, psi = manifest["image"], manifest["text"], manifest["projection"]
    backbone = OnnxBackbone(session(IMAGE_ENCODER_FILE), image_size=image["image_size"],
                            embed_dim=image["embed_dim"], num_heads=image["num_heads"],
                            num_registers=image["num_registers"], patch_size=image["patch_size"])
    tokenizer = AutoTokenizer.from_pretrained(root / TOKENIZER_DIR)
    text_encoder = OnnxTextEncoder(session(TEXT_ENCODER_FILE), tokenizer, context_length=text["context_length"],
                                   embed_dim=text["embed_dim"])
    if text_encoder.eot_id != text["eot_id"]:
        raise WeightsError(f"{root / TOKENIZER_DIR}: end-of-text id {text_encoder.eot_id}, the export used "
                           f"{text['eot_id']}; export the folder again")
    projection = OnnxProjection(session(PROJECTION_FILE), in_dim=psi["in_dim"], out_dim=psi["out_dim"])

    config = ModelConfig.from_dict(manifest["model_config"])
    size = backbone.image_size
    inference = config.inference
    if inference.window != size:
        logger.info("ONNX export %s: window %d (the exported image size) instead of %d", root, size, inference.window)
        inference = dataclasses.replace(inference, window=size, stride=min(inference.stride, size))
    if backbone.batch_size is not None and inference.window_batch_size != backbone.batch_size:
        inference = dataclasses.replace(inference, window_batch_size=backbone.batch_size)
    config = dataclasses.replace(config, inference=inference)
    weights_info = dict(manifest.get("weights_info", {}))
    weights_info["runtime"] = {
        "name": "onnxruntime",
        "version": ort.__version__,
        "providers": list(backbone.session.get_providers()),
        "folder": str(root.resolve()),
        "image_size": size,
        "opset": manifest.get("opset"),
        "files": dict(manifest.get("files", {})),
    }
    logger.info("ONNX model %s: window %d, providers %s", root, size, weights_info["runtime"]["providers"])
    model = Talk2DINO(backbone, text_encoder, projection, config, weights_info)
    return model.to(target).eval()
