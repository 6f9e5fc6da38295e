"""ONNX export of a `Talk2DINO`: image encoder, text encoder and psi as three graphs (issue 6 item 7).

The folder layout and graph signatures are documented in `talk2dino.onnx.runtime`;
`talk2dino.factory.load_onnx_model` loads the folder back behind the same `Segmenter`.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript), the default of
current torch. It handles the pieces this model needs without custom code: fused SDPA (decomposed to
MatMul/Softmax), the antialiased bicubic resize of DINOv2's position embeddings (folded to a
constant for the fixed window side S), and CLIP's causal + padding mask with a dynamic prompt count
and token length. The legacy TorchScript exporter (``dynamo=False``) is deprecated and cannot export
that antialiased resize (``aten::_upsample_bicubic2d_aa``), so it is not used.

What is exported is the backbone's *fast* path (`VisionBackbone.forward`), the one `Segmenter`
uses; psi is a separate graph because it runs after the template average (method.md §4.1, P14).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from talk2dino.errors import Talk2DinoError
from talk2dino.fileio import file_sha256, write_json
from talk2dino.models.backbones.base import VisionBackbone
from talk2dino.models.model import Talk2DINO
from talk2dino.models.projection import Projection
from talk2dino.models.text_encoder import ClipTextEncoder
from talk2dino.onnx.runtime import (
    CONFIG_FILE,
    FORMAT_VERSION,
    IMAGE_ENCODER_FILE,
    IMAGE_INPUTS,
    IMAGE_OUTPUTS,
    PROJECTION_FILE,
    PROJECTION_INPUTS,
    PROJECTION_OUTPUTS,
    TEXT_ENCODER_FILE,
    TEXT_INPUTS,
    TEXT_OUTPUTS,
    TOKENIZER_DIR,
    OnnxBackbone,
    make_session,
)

logger = logging.getLogger(__name__)

VERIFY_RTOL = 1e-4  # ONNX vs PyTorch: max |onnx − torch| / max |torch| per output (issue 6 item 7)
# Protobuf caps one file at 2 GiB; above this many parameter bytes the weights go to a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000
# The largest window batch an exported image encoder accepts. A bounded range: torch 2.6's exporter turns an
# unbounded batch into a guard (batch != 2**63 - 1) that it then reports as a violated constraint.
MAX_EXPORT_BATCH = 4096
# Example prompts of different lengths, so the traced token length is not specialised.
_EXAMPLE_PROMPTS = ("a photo of a cat.", "itap of a large red car in a video game.")
_VERIFY_PROMPTS = ("a bad photo of a dog.", "art of the sofa.", "a origami aeroplane.")


class OnnxExportError(Talk2DinoError):
    """The export failed, or the exported graphs do not reproduce PyTorch's outputs."""


class _ImageGraph(nn.Module):
    """The backbone's fast path with the `BackboneOutput` fields as a tuple (graph outputs)."""

    def __init__(self, backbone: VisionBackbone) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.backbone(pixel_values)
        return out.patch_tokens, out.cls_token, out.register_tokens, out.attn_logits


class _TextGraph(nn.Module):
    """`ClipTextEncoder.forward`: token ids -> raw 512-d embeddings at the first end-of-text token."""

    def __init__(self, text_encoder: ClipTextEncoder) -> None:
        super().__init__()
        self.text_encoder = text_encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.text_encoder(input_ids, attention_mask)


class _ProjectionGraph(nn.Module):
    """psi on float32 inputs: ``[N, 512]`` -> ``[N, D]`` unnormalised."""

    def __init__(self, projection: Projection) -> None:
        super().__init__()
        self.projection = projection

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        return self.projection(text_embeddings)


def _require_exporter() -> Any:
    try:
        import onnx
        import onnxscript  # noqa: F401  (torch.onnx's dynamo exporter needs it)
    except ImportError as err:
        raise ImportError("ONNX export needs onnx and onnxscript; install the ONNX extra: "
                          "pip install 'talk2dino[onnx]'") from err
    return onnx


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Silence the exporter's known, harmless chatter during one export (house-style §7).

    torch's exporter logs one warning per optional torchvision op it cannot register, and torch /
    onnxscript emit deprecation and axis-renaming warnings that concern their own internals. The
    logger level is restored afterwards; no handler is added.
    """
    # onnx_ir and onnxscript log every optimisation pass at INFO (hundreds of lines per export, issue 13.10).
    levels = {"torch.onnx._internal.exporter._registration": logging.ERROR, "onnx_ir": logging.WARNING,
              "onnxscript": logging.WARNING}
    loggers = {name: logging.getLogger(name) for name in levels}
    previous = {name: logger_.level for name, logger_ in loggers.items()}
    for name, logger_ in loggers.items():
        logger_.setLevel(levels[name])
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*treespec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*", category=UserWarning)
            yield
    finally:
        for name, logger_ in loggers.items():
            logger_.setLevel(previous[name])


def _parameter_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _export_graph(module: nn.Module, args: tuple[torch.Tensor, ...], path: Path, *, input_names: tuple[str, ...],
                  output_names: tuple[str, ...], dynamic_shapes: tuple[dict[int, Any], ...] | None,
                  opset: int | None) -> None:
    start = time.perf_counter()
    external = _parameter_bytes(module) > _EXTERNAL_DATA_BYTES
    try:
        with _quiet_exporter():
            torch.onnx.export(module.eval(), args, str(path), dynamo=True, input_names=list(input_names),
                              output_names=list(output_names), dynamic_shapes=dynamic_shapes, opset_version=opset,
                              external_data=external, verbose=False)
    except Exception as err:  # the exporter raises many types; report which graph failed
        raise OnnxExportError(f"exporting {path.name} failed: {type(err).__name__}: {err}") from err
    logger.info("wrote %s (%.1f MB) in %.1f s", path, path.stat().st_size / 1e6, time.perf_counter() - start)


def _relative_error(onnx_out: Any, torch_out: torch.Tensor) -> float:
    """max |onnx − torch| / max |torch| over one output (0 for an empty or all-zero output)."""
    reference = torch_out.detach().float().cpu()
    if reference.numel() == 0:
        return 0.0
    diff = (torch.as_tensor(onnx_out).float() - reference).abs().max().item()
    scale = reference.abs().max().item()
    return float(diff / scale) if scale > 0 else float(diff)


def _verify(model: Talk2DINO, folder: Path, *, image_size: int, batch: int) -> dict[str, dict[str, float]]:
    """Run the three graphs on fresh inputs with onnxruntime (CPU) and compare with PyTorch.

    Returns:
        ``{graph: {output: relative error}}``.

    Raises:
        OnnxExportError: an output's relative error exceeds `VERIFY_RTOL`.
    """
    device = model.device
    generator = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, image_size, image_size, generator=generator)
    ids, mask = model.text_encoder.tokenize(_VERIFY_PROMPTS)
    raw = torch.randn(len(_VERIFY_PROMPTS), model.projection.in_dim, generator=generator)
    with torch.inference_mode():
        out = model.backbone(pixels.to(device))
        text = model.text_encoder(ids, mask)
        projected = model.projection(raw.to(device))

    def run(name: str, feeds: dict[str, Any], outputs: tuple[str, ...]) -> list[Any]:
        session = make_session(folder / name, providers=["CPUExecutionProvider"])
        return list(session.run(list(outputs), feeds))

    image_onnx = run(IMAGE_ENCODER_FILE, {IMAGE_INPUTS[0]: pixels.numpy()}, IMAGE_OUTPUTS)
    text_onnx = run(TEXT_ENCODER_FILE, {TEXT_INPUTS[0]: ids.numpy(), TEXT_INPUTS[1]: mask.numpy()}, TEXT_OUTPUTS)
    psi_onnx = run(PROJECTION_FILE, {PROJECTION_INPUTS[0]: raw.numpy()}, PROJECTION_OUTPUTS)
    torch_image = (out.patch_tokens, out.cls_token, out.register_tokens, out.attn_logits)
    image_errors = {n: _relative_error(o, t) for n, o, t in zip(IMAGE_OUTPUTS, image_onnx, torch_image, strict=True)}
    report = {
        "image_encoder": image_errors,
        "text_encoder": {TEXT_OUTPUTS[0]: _relative_error(text_onnx[0], text)},
        "projection": {PROJECTION_OUTPUTS[0]: _relative_error(psi_onnx[0], projected)},
    }
    bad = [f"{g}.{n}: {e:.2e}" for g, errs in report.items() for n, e in errs.items() if e > VERIFY_RTOL]
    if bad:
        raise OnnxExportError(f"ONNX outputs differ from PyTorch by more than {VERIFY_RTOL:g} relative "
                              f"({', '.join(bad)}); the exporter or opset may not support this model")
    logger.info("ONNX vs PyTorch max relative error: %s",
                {g: max(errs.values(), default=0.0) for g, errs in report.items()})
    return report


def _opset(onnx: Any, path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return next(int(entry.version) for entry in proto.opset_import if entry.domain in ("", "ai.onnx"))


def _written_files(folder: Path) -> dict[str, str]:
    """sha256 of every file the export wrote: the graphs (and external weight files) and the tokenizer."""
    names = [IMAGE_ENCODER_FILE, TEXT_ENCODER_FILE, PROJECTION_FILE]
    paths = [folder / n for n in names]
    paths += [p for n in names for p in sorted(folder.glob(f"{n}.data")) if p.is_file()]
    paths += sorted(p for p in (folder / TOKENIZER_DIR).rglob("*") if p.is_file())
    return {p.relative_to(folder).as_posix(): file_sha256(p) for p in paths}


def export_onnx(model: Talk2DINO, out_dir: str | os.PathLike[str], *, image_size: int | None = None,
                opset: int | None = None, dynamic_batch: bool = True, verify: bool = True) -> dict[str, Path]:
    """Export the image side, the text side and psi of `model` to ONNX, with a manifest and the tokenizer.

    Graphs (see `talk2dino.onnx.runtime` for the folder layout):

    - ``image_encoder.onnx``: ``pixel_values [B, 3, S, S]`` float32 RGB, ImageNet-normalised ->
      ``patch_tokens [B, P, D]``, ``cls_token [B, D]``, ``register_tokens [B, R, D]`` (final LayerNorm)
      and ``attn_logits [B, M, P]`` float32 last-block CLS->patch logits (method.md §2.2), P = (S/patch)².
      S is fixed per file; B is dynamic when `dynamic_batch`, else 1.
    - ``text_encoder.onnx``: ``input_ids [N, L]`` int64, ``attention_mask [N, L]`` int64 (N and L
      dynamic, L ≤ the context length) -> ``text_embeddings [N, 512]`` float32 raw CLIP (method.md §2.1).
    - ``projection.onnx``: ``text_embeddings [N, 512]`` float32 -> ``projected [N, D]`` float32,
      psi unnormalised (method.md §2.3); applied after the template average (§4.1, P14).

    Args:
        model: a float32 `Talk2DINO` (any device; the graphs are device-independent).
        out_dir: the folder to write (created; existing files of the same names are replaced).
        image_size: S, the window side the image graph accepts, a multiple of the patch size; None: the
            model's inference window (``model.config.inference.window``, 448 by default, method.md §4.3).
        opset: ONNX opset (None: the exporter's default, recorded in the manifest).
        dynamic_batch: a dynamic batch dimension in the image graph (else batch 1 only).
        verify: run every graph with onnxruntime on fresh inputs and require max |onnx − torch| /
            max |torch| ≤ 1e-4 per output; the errors are recorded in the manifest.

    Returns:
        Paths by role: ``image_encoder``, ``text_encoder``, ``projection``, ``config`` and ``tokenizer``.

    Raises:
        ValueError: `image_size` off the patch grid, a non-float32 backbone, or an already exported model.
        OnnxExportError: the exporter failed, or verification found a difference.
        ImportError: onnx / onnxscript (or onnxruntime for `verify`) missing.
    """
    import talk2dino

    onnx = _require_exporter()
    backbone, text_encoder, projection = model.backbone, model.text_encoder, model.projection
    if isinstance(backbone, OnnxBackbone):
        raise ValueError("this model already runs from ONNX graphs; export the PyTorch model instead")
    patch = backbone.patch_size
    if image_size is None:
        image_size = model.config.inference.window
    if image_size <= 0 or image_size % patch:
        raise ValueError(f"image_size {image_size} is not a positive multiple of the patch size {patch}")
    dtypes = {p.dtype for p in backbone.parameters()}
    if dtypes != {torch.float32}:
        raise ValueError(f"ONNX export needs a float32 backbone, got {sorted(map(str, dtypes))}; "
                         "build the model with dtype='float32'")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    # A folder with a manifest is a complete export; drop an old one until the new export is done.
    (folder / CONFIG_FILE).unlink(missing_ok=True)
    device = model.device
    model.eval()
    started = time.perf_counter()
    logger.info("exporting %s to ONNX in %s (window %d, dynamic batch %s)", model.config.name, folder, image_size,
                dynamic_batch)

    # Batch 2 for a dynamic batch: torch.export specialises a dimension traced at size 1.
    example_batch = 2 if dynamic_batch else 1
    pixels = torch.randn(example_batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    image_shapes = ({0: torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)},) if dynamic_batch else None
    _export_graph(_ImageGraph(backbone), (pixels.to(device),), folder / IMAGE_ENCODER_FILE,
                  input_names=IMAGE_INPUTS, output_names=IMAGE_OUTPUTS, dynamic_shapes=image_shapes, opset=opset)

    ids, mask = text_encoder.tokenize(_EXAMPLE_PROMPTS)
    prompts = torch.export.Dim("num_prompts", min=1)
    tokens = torch.export.Dim("tokens", min=1, max=text_encoder.context_length)
    _export_graph(_TextGraph(text_encoder), (ids.to(device), mask.to(device)), folder / TEXT_ENCODER_FILE,
                  input_names=TEXT_INPUTS, output_names=TEXT_OUTPUTS,
                  dynamic_shapes=({0: prompts, 1: tokens}, {0: prompts, 1: tokens}), opset=opset)

    raw = torch.randn(len(_EXAMPLE_PROMPTS), projection.in_dim, generator=torch.Generator().manual_seed(0))
    _export_graph(_ProjectionGraph(projection), (raw.to(device),), folder / PROJECTION_FILE,
                  input_names=PROJECTION_INPUTS, output_names=PROJECTION_OUTPUTS,
                  dynamic_shapes=({0: torch.export.Dim("num_texts", min=1)},), opset=opset)

    text_encoder.tokenizer.save_pretrained(folder / TOKENIZER_DIR)
    # Verify at a batch size other than the traced one when the batch is dynamic.
    verify_batch = example_batch + 1 if dynamic_batch else 1
    verification = _verify(model, folder, image_size=image_size, batch=verify_batch) if verify else None

    grid = image_size // patch
    manifest: dict[str, Any] = {
        "format": FORMAT_VERSION,
        "talk2dino_version": talk2dino.__version__,
        "torch_version": torch.__version__,
        "onnx_version": onnx.__version__,
        "exporter": "torch.onnx.export(dynamo=True)",
        "opset": _opset(onnx, folder / IMAGE_ENCODER_FILE),
        "image": {
            "image_size": image_size,
            "patch_size": patch,
            "grid": [grid, grid],
            "num_patches": grid * grid,
            "embed_dim": backbone.embed_dim,
            "num_heads": backbone.num_heads,
            "head_dim": backbone.head_dim,
            "num_registers": backbone.num_registers,
            "num_global": backbone.num_global,
            "family": backbone.family,
            "settings": backbone.settings(),
            "dynamic_batch": dynamic_batch,
            "image_mean": list(model.config.backbone.image_mean),
            "image_std": list(model.config.backbone.image_std),
        },
        "text": {
            "context_length": text_encoder.context_length,
            "embed_dim": text_encoder.embed_dim,
            "eot_id": text_encoder.eot_id,
            "pad_id": text_encoder.pad_id,
        },
        "projection": {"in_dim": projection.in_dim, "out_dim": projection.out_dim},
        "model_config": model.config.to_dict(),
        "weights_info": model.weights_info,
        "verification": verification,
        "files": _written_files(folder),
    }
    config_path = folder / CONFIG_FILE
    # The manifest goes last and atomically: a folder with a manifest is a complete export.
    write_json(config_path, manifest, durable=True)
    logger.info("ONNX export complete in %.1f s: %s", time.perf_counter() - started, folder)
    return {
        "image_encoder": folder / IMAGE_ENCODER_FILE,
        "text_encoder": folder / TEXT_ENCODER_FILE,
        "projection": folder / PROJECTION_FILE,
        "config": config_path,
        "tokenizer": folder / TOKENIZER_DIR,
    }

