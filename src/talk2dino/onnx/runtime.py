"""ONNX Runtime backend: the exported image and text sides behind the usual `Talk2DINO` interfaces.

`talk2dino.onnx.export.export_onnx` writes a folder with three graphs, the tokenizer and a manifest::

    image_encoder.onnx   pixel_values [B, 3, S, S] -> patch_tokens, cls_token, register_tokens, attn_logits
    text_encoder.onnx    input_ids, attention_mask [N, L] -> text_embeddings [N, 512] (raw CLIP, §2.1)
    projection.onnx      text_embeddings [N, 512] -> projected [N, D] (psi, unnormalised, §2.3)
    tokenizer/           the CLIP tokenizer (``save_pretrained``)
    onnx_config.json     model config, weights_info, geometry, opset, versions and the sha256 of every file

`talk2dino.factory.load_onnx_model` turns that folder back into a `Talk2DINO` whose backbone, text encoder
and psi run in onnxruntime, so ``Segmenter(load_onnx_model(folder))`` works unchanged: everything after the three
graphs (template averaging before psi, scoring, cleaning, PAMR, stitching) is the same torch code.

psi is its own graph rather than part of the text graph because it must run *after* the template
average of the raw embeddings (method.md §4.1, pitfall P14); putting it inside the text graph would
average projected embeddings instead.

Nothing here imports onnxruntime at module import time; the classes are light ``nn.Module``
subclasses (no parameters, one empty buffer that follows ``.to(device)``) so `Talk2DINO` can hold,
move and ``eval()`` them like the torch components.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from talk2dino.errors import InvalidInputError, WeightsError
from talk2dino.fileio import file_sha256
from talk2dino.models.backbones.base import BackboneOutput, VisionBackbone
from talk2dino.models.projection import Projection
from talk2dino.models.text_encoder import ClipTextEncoder

logger = logging.getLogger(__name__)

# File layout of an exported folder; the exporter (talk2dino.onnx.export) imports these names.
IMAGE_ENCODER_FILE = "image_encoder.onnx"
TEXT_ENCODER_FILE = "text_encoder.onnx"
PROJECTION_FILE = "projection.onnx"
CONFIG_FILE = "onnx_config.json"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1  # bump when the folder layout or the graph signatures change

# Graph input/output names, in output order.
IMAGE_INPUTS: tuple[str, ...] = ("pixel_values",)
IMAGE_OUTPUTS: tuple[str, ...] = ("patch_tokens", "cls_token", "register_tokens", "attn_logits")
TEXT_INPUTS: tuple[str, ...] = ("input_ids", "attention_mask")
TEXT_OUTPUTS: tuple[str, ...] = ("text_embeddings",)
PROJECTION_INPUTS: tuple[str, ...] = ("text_embeddings",)
PROJECTION_OUTPUTS: tuple[str, ...] = ("projected",)

_INSTALL_HINT = "install the ONNX extra: pip install 'talk2dino[onnx]'"


def require_onnxruntime() -> Any:
    """Import onnxruntime, or raise an `ImportError` saying which extra to install."""
    try:
        import onnxruntime
    except ImportError as err:
        raise ImportError(f"onnxruntime is not installed; {_INSTALL_HINT}") from err
    return onnxruntime


def resolve_providers(device: str | torch.device = "cpu",
                      providers: Sequence[str] | None = None) -> list[str]:
    """onnxruntime execution providers for a torch device name.

    Args:
        device: "cpu" -> CPUExecutionProvider; "cuda" / "cuda:N" -> CUDAExecutionProvider (device N)
            with the CPU provider as fallback for unsupported nodes.
        providers: explicit provider names, used as given (overrides `device`).

    Raises:
        ValueError: CUDA requested but this onnxruntime build has no CUDA provider, or an unknown device.
    """
    ort = require_onnxruntime()
    if providers is not None:
        return list(providers)
    kind = torch.device(device).type
    if kind == "cpu":
        return ["CPUExecutionProvider"]
    if kind == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise ValueError("device 'cuda' needs onnxruntime's CUDAExecutionProvider, which this build lacks; "
                             "install onnxruntime-gpu or use device='cpu'")
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    raise ValueError(f"the ONNX runtime supports device 'cpu' or 'cuda', got {device!r}")


def make_session(path: str | os.PathLike[str], *, providers: Sequence[str], device_id: int = 0,
                 threads: int | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for one graph.

    Args:
        path: the ``.onnx`` file.
        providers: execution provider names, first preferred.
        device_id: CUDA device index for the CUDA provider.
        threads: intra-op threads (None: onnxruntime's default, one per physical core).
    """
    ort = require_onnxruntime()
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = int(threads)
    options.log_severity_level = 3  # errors only: the library does not chatter (house-style §7)
    chosen: list[Any] = [
        ("CUDAExecutionProvider", {"device_id": device_id}) if name == "CUDAExecutionProvider" else name
        for name in providers
    ]
    return ort.InferenceSession(str(path), sess_options=options, providers=chosen)


def _anchor(module: nn.Module) -> None:
    # An empty buffer whose device follows module.to(...): outputs are moved there.
    module.register_buffer("_device_anchor", torch.zeros(0), persistent=False)


def _device(module: nn.Module) -> torch.device:
    anchor = module.get_buffer("_device_anchor")
    return anchor.device


def _numpy(tensor: torch.Tensor, dtype: Any) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().to("cpu").numpy(), dtype=dtype)


def _input_dims(session: Any, name: str) -> list[int | str | None]:
    for node in session.get_inputs():
        if node.name == name:
            return list(node.shape)
    raise WeightsError(f"ONNX graph has no input {name!r}; re-export the folder with this talk2dino version")


class OnnxBackbone(VisionBackbone):
    """The exported image encoder (the fast path of method.md §2.2) run by onnxruntime.

    Same attributes as every `VisionBackbone` (embed_dim, num_heads, head_dim, num_registers,
    num_global, patch_size) plus `image_size`, the one window side the graph accepts. There is no
    plain path in an exported graph, so `forward_reference` is `forward`.

    Attributes:
        session: the ``onnxruntime.InferenceSession``.
        image_size: S, the exported window side in pixels.
        batch_size: the fixed batch size, or None when the graph has a dynamic batch.
    """

    family = "onnx"

    def __init__(self, session: Any, *, image_size: int, embed_dim: int, num_heads: int, num_registers: int,
                 patch_size: int) -> None:
        """Args:
            session: an ``onnxruntime.InferenceSession`` of ``image_encoder.onnx``.
            image_size: S, the window side the graph was exported for.
            embed_dim: D.
            num_heads: M.
            num_registers: R.
            patch_size: pixels per patch side.
        """
        # VisionBackbone.__init__ wraps a transformers model; there is none here, only a session.
        nn.Module.__init__(self)
        _anchor(self)
        self.session = session
        self.image_size = int(image_size)
        self.embed_dim = int(embed_dim)
        self.num_heads = int(num_heads)
        self.head_dim = self.embed_dim // self.num_heads
        self.num_registers = int(num_registers)
        self.num_global = 1 + self.num_registers
        self.patch_size = int(patch_size)
        batch = _input_dims(session, IMAGE_INPUTS[0])[0]
        self.batch_size: int | None = batch if isinstance(batch, int) else None

    def forward(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Run the exported fast path.

        Args:
            pixel_values: ``[B, 3, S, S]`` float32 RGB, ImageNet-normalised (see `Talk2DINO.normalize`),
                S equal to `image_size`.

        Returns:
            `BackboneOutput` on this module's device: patch tokens ``[B, P, D]``, CLS ``[B, D]``,
            registers ``[B, R, D]``, logits ``[B, M, P]`` float32, grid ``(S/patch, S/patch)``.

        Raises:
            InvalidInputError: not ``[B, 3, S, S]`` with the exported S, or a batch size other than the
                exported one when the graph has a fixed batch.
        """
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise InvalidInputError(f"expected pixel values [B, 3, H, W], got {tuple(pixel_values.shape)}")
        batch, _, height, width = (int(s) for s in pixel_values.shape)
        if (height, width) != (self.image_size, self.image_size):
            raise InvalidInputError(
                f"this ONNX image encoder was exported for {self.image_size}x{self.image_size} windows, got "
                f"{height}x{width}; use window={self.image_size} or re-export with image_size={max(height, width)}"
            )
        if self.batch_size is not None and batch != self.batch_size:
            raise InvalidInputError(
                f"this ONNX image encoder was exported with a fixed batch of {self.batch_size}, got {batch}; "
                f"re-export with dynamic_batch=True or use window_batch_size={self.batch_size}"
            )
        outputs = self.session.run(list(IMAGE_OUTPUTS), {IMAGE_INPUTS[0]: _numpy(pixel_values, np.float32)})
        device = _device(self)
        patch, cls, registers, logits = (torch.from_numpy(o).to(device) for o in outputs)
        side = self.image_size // self.patch_size
        return BackboneOutput(patch_tokens=patch, cls_token=cls, register_tokens=registers,
                              attn_logits=logits.float(), grid=(side, side))

    def forward_reference(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Same as `forward`: an exported graph has only the fast path."""
        return self.forward(pixel_values)


class OnnxTextEncoder(ClipTextEncoder):
    """The exported CLIP text tower (method.md §2.1) run by onnxruntime, with the real CLIP tokenizer.

    `tokenize` and `encode` are `ClipTextEncoder`'s; `forward` runs the graph.
    """

    def __init__(self, session: Any, tokenizer: Any, *, context_length: int, embed_dim: int) -> None:
        """Args:
            session: an ``onnxruntime.InferenceSession`` of ``text_encoder.onnx``.
            tokenizer: the CLIP tokenizer saved next to it.
            context_length: maximum tokens per prompt (77 for CLIP); longer prompts are truncated by `tokenize`.
            embed_dim: width of the raw text embedding (512).

        Raises:
            ValueError: the tokenizer defines no end-of-text token.
        """
        # ClipTextEncoder.__init__ wraps a transformers model; there is none here, only a session.
        nn.Module.__init__(self)
        _anchor(self)
        self.session = session
        self.tokenizer = tokenizer
        self.context_length = int(context_length)
        eot = getattr(tokenizer, "eos_token_id", None)
        if eot is None:
            raise ValueError("the CLIP tokenizer defines no end-of-text token")
        self.eot_id = int(eot)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = self.eot_id if pad is None else int(pad)
        self.embed_dim = int(embed_dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed token ids.

        Args:
            input_ids: ``[N, L]`` int64 CLIP token ids, each row holding an end-of-text token, L ≤ context.
            attention_mask: ``[N, L]`` int64, 1 for real tokens.

        Returns:
            ``[N, 512]`` float32 unnormalised text embeddings, on this module's device.

        Raises:
            InvalidInputError: mismatched shapes or more tokens than the context length.
        """
        if input_ids.ndim != 2 or input_ids.shape != attention_mask.shape:
            raise InvalidInputError(f"expected input_ids and attention_mask [N, L], got {tuple(input_ids.shape)} "
                                    f"and {tuple(attention_mask.shape)}")
        if input_ids.shape[1] > self.context_length:
            raise InvalidInputError(f"{input_ids.shape[1]} tokens exceed the context length {self.context_length}")
        device = _device(self)
        if input_ids.shape[0] == 0:
            return torch.zeros(0, self.embed_dim, device=device)
        feeds = {TEXT_INPUTS[0]: _numpy(input_ids, np.int64), TEXT_INPUTS[1]: _numpy(attention_mask, np.int64)}
        (embeddings,) = self.session.run(list(TEXT_OUTPUTS), feeds)
        return torch.from_numpy(embeddings).to(device).float()

    def encode(self, prompts: Sequence[str], *, batch_size: int, pad_to_context: bool = False) -> torch.Tensor:
        """Embed prompts in batches of `batch_size`.

        Returns:
            ``[N, 512]`` float32 unnormalised embeddings, on this module's device.
        """
        if not prompts:
            return torch.zeros(0, self.embed_dim, device=_device(self))
        return super().encode(prompts, batch_size=batch_size, pad_to_context=pad_to_context)


class OnnxProjection(Projection):
    """psi (method.md §2.3) as an exported graph run by onnxruntime."""

    def __init__(self, session: Any, *, in_dim: int, out_dim: int) -> None:
        """Args:
            session: an ``onnxruntime.InferenceSession`` of ``projection.onnx``.
            in_dim: text embedding width (512).
            out_dim: D, the backbone width.
        """
        # Projection.__init__ creates the torch layers; the weights live in the graph instead.
        nn.Module.__init__(self)
        _anchor(self)
        self.session = session
        self.in_dim = int(in_dim)
        self.out_dim = int(out_dim)

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        """Args:
            text_embeddings: ``[N, in_dim]`` raw (template-averaged) CLIP embeddings, any float dtype.

        Returns:
            ``[N, out_dim]`` float32, not normalised, on this module's device.
        """
        device = _device(self)
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.in_dim:
            raise InvalidInputError(f"expected text embeddings [N, {self.in_dim}], got {tuple(text_embeddings.shape)}")
        if text_embeddings.shape[0] == 0:
            return torch.zeros(0, self.out_dim, device=device)
        (projected,) = self.session.run(list(PROJECTION_OUTPUTS),
                                        {PROJECTION_INPUTS[0]: _numpy(text_embeddings, np.float32)})
        return torch.from_numpy(projected).to(device)


def read_onnx_config(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of an exported folder.

    Raises:
        WeightsError: no manifest, or one written by an incompatible format version.
    """
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        raise WeightsError(f"{folder} is not an ONNX export (no {CONFIG_FILE}); create one with talk2dino export-onnx")
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != FORMAT_VERSION:
        raise WeightsError(f"{path}: ONNX export format {manifest.get('format')!r}, this talk2dino reads "
                           f"{FORMAT_VERSION}; re-export the model")
    return manifest


def verify_onnx_folder(folder: str | os.PathLike[str], manifest: dict[str, Any]) -> None:
    """Check the sha256 of every file the manifest lists (house-style §4).

    Raises:
        WeightsError: a listed file is missing or its hash differs, naming every such file.
    """
    root = Path(folder)
    problems = []
    for name, expected in sorted(manifest.get("files", {}).items()):
        path = root / name
        if not path.is_file():
            problems.append(f"{name} missing")
        elif file_sha256(path) != expected:
            problems.append(f"{name} hash mismatch")
    if problems:
        raise WeightsError(f"ONNX export {root} is damaged ({', '.join(problems)}); export it again")
