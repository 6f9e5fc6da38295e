"""The one backbone interface: `VisionBackbone` -> `BackboneOutput` (method.md §2.2, house-style §2).

Every family (one small file each in this package) wraps a frozen transformers vision model and returns
the same typed output from one pass: final-norm patch tokens, CLS, registers and the last block's
CLS->patch attention logits. Head count, head width, global-token count and patch size are read from
the loaded model's configuration, never from constants (pitfall P2).

Each family has two paths:

- ``forward``, the fast path: the family runs the model's blocks itself with fused SDPA, reading the
  block's own submodules (projections, norms, MLP), so it never depends on, reads or changes the
  model's attention setting; only the CLS row of the last block's q·kᵀ is formed.
- ``forward_reference``, the plain path: the model's own forward with eager attention, the logits
  recomputed in full from the last block's input. Tests hold the two equal within 1e-5 (method.md §2.2).

The small tensor helpers at the bottom are shared by the families.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from talk2dino.compat import transformers_dtype_kwargs
from talk2dino.config import IMAGENET_MEAN, IMAGENET_STD
from talk2dino.errors import WeightsError
from talk2dino.models.backbones.layouts import attention_projections

LogitsRope = Literal["model", "none"]  # see DinoV3Backbone and BackboneConfig.logits_rope (method.md §2.4)


@dataclass
class BackboneOutput:
    """Everything the method reads from one backbone pass (house-style §2).

    Attributes:
        patch_tokens: ``[B, P, D]`` final-LayerNorm patch tokens, row-major over the ``grid``.
        cls_token: ``[B, D]`` final-LayerNorm CLS token.
        register_tokens: ``[B, R, D]`` final-LayerNorm register tokens (R may be 0).
        attn_logits: ``[B, M, P]`` float32 last-block CLS->patch logits q·k/sqrt(d_h), registers and
            CLS excluded from the keys, no softmax (method.md §2.2).
        grid: ``(h, w)`` patch grid, h·w = P.
    """

    patch_tokens: torch.Tensor
    cls_token: torch.Tensor
    register_tokens: torch.Tensor
    attn_logits: torch.Tensor
    grid: tuple[int, int]

    def to(self, device: torch.device | str) -> BackboneOutput:
        """Move every tensor to `device`."""
        return BackboneOutput(
            self.patch_tokens.to(device), self.cls_token.to(device), self.register_tokens.to(device),
            self.attn_logits.to(device), self.grid,
        )


class VisionBackbone(nn.Module):
    """Base class of every backbone family: a frozen transformers model exposing `BackboneOutput`.

    A family sets `family` and the preprocessing defaults, and implements `from_pretrained`,
    `_encode` (fast path) and `_encode_reference` (plain path). Everything else — input checks, the
    token split, the switch to eager attention for the plain path — lives here.

    Attributes:
        embed_dim: D, the token width.
        num_heads: M, attention heads of the last block.
        head_dim: d_h; M·d_h = D for every supported family.
        num_registers: R, register tokens after CLS (0 for models without registers).
        num_global: G = 1 + R, tokens before the patch tokens.
        patch_size: pixels per patch side.
    """

    family: ClassVar[str] = ""  # short family name, for messages
    image_mean: ClassVar[tuple[float, float, float]] = IMAGENET_MEAN  # the family's input normalisation
    image_std: ClassVar[tuple[float, float, float]] = IMAGENET_STD  # the family's input normalisation

    model: Any  # a transformers model; its submodules are read by name, so typed loosely

    def __init__(self, model: Any, *, num_heads: int, head_dim: int, num_registers: int, patch_size: Any) -> None:
        """Args:
            model: the transformers model, put in eval mode with gradients off.
            num_heads: M, from the model's configuration.
            head_dim: d_h, from the model's configuration.
            num_registers: R, from the model's configuration.
            patch_size: the configuration's patch size, an int or a square ``(p, p)`` pair.
        """
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.embed_dim: int = int(model.config.hidden_size)
        self.num_heads: int = int(num_heads)
        self.head_dim: int = int(head_dim)
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(
                f"{self.num_heads} heads of {self.head_dim} dims do not make the hidden size {self.embed_dim}"
            )
        self.num_registers: int = int(num_registers or 0)
        self.num_global: int = 1 + self.num_registers
        if not isinstance(patch_size, int):
            side, other = (int(p) for p in patch_size)
            if side != other:
                raise ValueError(f"non-square patches {tuple(patch_size)} are not supported")
            patch_size = side
        self.patch_size: int = int(patch_size)
        self._reference_lock = threading.Lock()
        self._compiled_encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def compile_fast_path(self, *, mode: str | None = None, backend: str = "inductor",
                          dynamic: bool | None = None) -> None:
        """Run the fast path through ``torch.compile`` from now on (the plain path is never compiled).

        The first call per input shape pays the compilation (tens of seconds on a CPU, cached by torch on
        disk); later calls reuse it. Windows have one fixed size, so a run sees one shape per batch size.

        Args:
            mode: ``torch.compile`` mode (None, "reduce-overhead", "max-autotune", ...).
            backend: ``torch.compile`` backend; "inductor" generates fused kernels (Triton on GPU, C++ on
                CPU, which needs a C++ compiler); "aot_eager" traces without generating code (tests).
            dynamic: ``torch.compile``'s dynamic-shape setting (None: specialise, then generalise the
                batch size when it changes).
        """
        self._compiled_encode = torch.compile(self._encode, mode=mode, backend=backend, dynamic=dynamic)

    @classmethod
    def from_pretrained(cls, folder: Path, *, dtype: torch.dtype, logits_rope: LogitsRope = "model") -> VisionBackbone:
        """Load the family's transformers model from a ``save_pretrained`` folder.

        Args:
            folder: the model folder (config.json + weights).
            dtype: weight dtype.
            logits_rope: how the CLS->patch logits treat rotary position embeddings; only families
                with RoPE read it (for the others both settings give the same logits).

        Raises:
            WeightsError: weights missing from the folder.
        """
        raise NotImplementedError

    def settings(self) -> dict[str, Any]:
        """Options that change the outputs, recorded in the model's weights_info (pitfall P10).

        Empty for families without options, so their records (and evaluation keys) stay as before.
        """
        return {}

    # -- the two paths -------------------------------------------------------------------------------

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fast path. Returns ``(final-norm tokens [B, G + P, D], logits [B, M, P] float32)``."""
        raise NotImplementedError

    def _encode_reference(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Plain path, called with the model switched to eager attention; same returns as `_encode`."""
        raise NotImplementedError

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Fast path: every block with fused SDPA; only the last block's CLS row of q·kᵀ is formed.

        It never reads or changes the model's attention setting, so it is safe to call while another
        thread runs `forward_reference` on the same model.

        Args:
            pixel_values: ``[B, 3, H, W]`` RGB, normalised with `image_mean`/`image_std` (ImageNet for
                every current family), H and W multiples of the patch size.

        Returns:
            `BackboneOutput` with P = (H/patch)·(W/patch).

        Raises:
            ValueError: a tensor that is not ``[B, 3, H, W]`` or sides off the patch grid.
        """
        grid = self._check_input(pixel_values)
        encode = self._compiled_encode if self._compiled_encode is not None else self._encode
        tokens, logits = encode(self._cast(pixel_values))
        return self._split(tokens, logits, grid)

    @torch.inference_mode()
    def forward_reference(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Plain path: the model's own forward with eager attention, logits recomputed in full.

        Args:
            pixel_values: as in `forward`.

        Returns:
            `BackboneOutput`, equal to `forward` up to float rounding (about 1e-5).
        """
        grid = self._check_input(pixel_values)
        x = self._cast(pixel_values)
        # The model's attention setting is shared state; the lock keeps two reference calls from
        # interleaving their switch and restore (the fast path does not read the setting at all).
        with self._reference_lock:
            if not hasattr(self.model, "set_attn_implementation"):
                # transformers < 4.56 fixes the attention class when the model is built; its SDPA forward is
                # the same computation, equal to eager up to float rounding.
                return self._split(*self._encode_reference(x), grid)
            previous = self.model.config._attn_implementation
            self.model.set_attn_implementation("eager")
            try:
                tokens, logits = self._encode_reference(x)
            finally:
                self.model.set_attn_implementation(previous)
        return self._split(tokens, logits, grid)

    # -- shared plumbing -----------------------------------------------------------------------------

    def _cast(self, pixel_values: torch.Tensor) -> torch.Tensor:
        param = next(self.model.parameters())
        return pixel_values.to(device=param.device, dtype=param.dtype)

    def _check_input(self, pixel_values: torch.Tensor) -> tuple[int, int]:
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"expected pixel values [B, 3, H, W], got {tuple(pixel_values.shape)}")
        h, w = pixel_values.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}")
        return h // self.patch_size, w // self.patch_size

    def _split(self, tokens: torch.Tensor, logits: torch.Tensor, grid: tuple[int, int]) -> BackboneOutput:
        g = self.num_global
        return BackboneOutput(
            patch_tokens=tokens[:, g:],
            cls_token=tokens[:, 0],
            register_tokens=tokens[:, 1:g],
            attn_logits=logits.float(),
            grid=grid,
        )

    def _norm(self, norm: Any, hidden: torch.Tensor, *, final: bool = False) -> torch.Tensor:
        """Apply a LayerNorm module to the residual stream and return it in the weight dtype.

        With float32 weights this is ``norm(hidden)``. With bf16/fp16 weights the residual stream stays
        float32 (see `_residual`), so the normalisation runs in float32 with float32 copies of its affine
        parameters and only its output is rounded to the weight dtype for the next matmul: the
        mixed-precision recipe (autocast's), which keeps the low-precision label maps near fp32's.
        The `final` norm's output is not rounded: the tokens leave the backbone in float32.
        """
        if hidden.dtype == norm.weight.dtype:
            return norm(hidden)
        bias = None if norm.bias is None else norm.bias.float()
        out = F.layer_norm(hidden, norm.normalized_shape, norm.weight.float(), bias, norm.eps)
        return out if final else out.to(norm.weight.dtype)

    @staticmethod
    def _residual(hidden: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        """``hidden + branch`` in `hidden`'s dtype (float32 stream, low-precision branch outputs)."""
        return hidden + branch.to(hidden.dtype)

    def _stream(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The residual stream's starting point: float32 whatever the weight dtype (see `_norm`)."""
        return embeddings.float()

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, M·d_h]`` -> ``[B, M, T, d_h]``."""
        b, t, _ = x.shape
        return x.view(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def _qkv(self, attention: Any, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v ``[B, M, T, d_h]`` from a transformers attention module's projections (with bias), in
        whichever layout the installed transformers uses (`layouts.attention_projections`)."""
        q_proj, k_proj, v_proj = attention_projections(attention)
        return self._heads(q_proj(normed)), self._heads(k_proj(normed)), self._heads(v_proj(normed))

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Fused attention over all tokens, scaled by 1/sqrt(d_h). Returns ``[B, T, M·d_h]``."""
        b, _, t, _ = q.shape
        context = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return context.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)

    def _cls_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """CLS->patch logits from full q, k ``[B, M, T, d_h]``.

        Returns:
            ``[B, M, P]`` float32 ⟨q_CLS, k_p⟩/sqrt(d_h) over the patch keys only (method.md §2.2).
        """
        # Only the CLS query row against the patch keys: [B, M, 1, dh] x [B, M, dh, P].
        row = q[:, :, :1].float() @ k[:, :, self.num_global:].float().transpose(-1, -2)
        return row.squeeze(2) * self.head_dim**-0.5

    def _full_cls_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The plain-path recomputation: the full T×T score matrix, then its CLS row over patches."""
        full = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5  # [B, M, T, T]
        return full[:, :, 0, self.num_global:]


def load_transformers_model(model_class: Any, folder: Path, *, dtype: torch.dtype, what: str,
                            **kwargs: Any) -> Any:
    """``model_class.from_pretrained`` with SDPA attention, raising when weights are missing.

    Args:
        model_class: a transformers model class (its checkpoint conversions are keyed by class name).
        folder: the ``save_pretrained`` folder.
        dtype: weight dtype.
        what: the family, for messages.
        kwargs: constructor arguments of `model_class` (e.g. ``add_pooling_layer=False``).

    Raises:
        WeightsError: the folder lacks some of the model's weights.
    """
    model, info = model_class.from_pretrained(folder, attn_implementation="sdpa", output_loading_info=True,
                                              **transformers_dtype_kwargs(dtype), **kwargs)
    if info.get("missing_keys"):
        raise WeightsError(f"backbone: {folder} lacks {what} weights {sorted(info['missing_keys'])[:8]}")
    return model


def rotate_patches(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, num_global: int) -> torch.Tensor:
    """Rotary position embedding on the patch tokens only, prefix tokens unchanged (method.md §2.4).

    The half-split rotation ``x·cos + rotate_half(x)·sin`` with ``rotate_half([a, b]) = [-b, a]``, as
    the transformers DINOv3 attention applies it after the q/k projections.

    Args:
        x: ``[B, M, G + P, d_h]`` queries or keys.
        cos, sin: ``[P, d_h]`` rotation tables in x's dtype.
        num_global: G, the prefix tokens (CLS and registers) left unrotated.

    Returns:
        ``[B, M, G + P, d_h]``.
    """
    prefix, patches = x[:, :, :num_global], x[:, :, num_global:]
    half = patches.shape[-1] // 2
    rotated = torch.cat((-patches[..., half:], patches[..., :half]), dim=-1)
    return torch.cat((prefix, patches * cos + rotated * sin), dim=-2)
