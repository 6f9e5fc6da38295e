"""DINOv2 wrapper: patch tokens and last-block CLS->patch attention logits from one pass (method.md §2.2).

Works with transformers' ``Dinov2Model`` (G = 1 global token) and ``Dinov2WithRegistersModel``
(G = 1 + R), any size (ViT-S/B/L/g: M and d_h come from the loaded config, pitfall P2) and any input
whose sides are multiples of the patch size (position embeddings are interpolated by the model).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


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


class DinoV2Backbone(nn.Module):
    """A frozen transformers DINOv2 model exposing `BackboneOutput`.

    The fast path (`forward`) runs every block with fused SDPA attention and computes only the CLS row
    of the last block's q·kᵀ itself. `forward_reference` is the plain path: eager attention with
    attention outputs and hidden states, logits recomputed from the last block's input.
    """

    model: Any  # a transformers DINOv2 module; its submodules are read by name, so typed loosely

    def __init__(self, model: Any) -> None:
        """Args:
            model: a transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel``.
        """
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        config = model.config
        self.embed_dim: int = int(config.hidden_size)
        self.num_heads: int = int(config.num_attention_heads)
        self.head_dim: int = self.embed_dim // self.num_heads
        if self.head_dim * self.num_heads != self.embed_dim:
            raise ValueError(f"hidden size {self.embed_dim} is not divisible by {self.num_heads} heads")
        self.num_registers: int = int(getattr(config, "num_register_tokens", 0) or 0)
        self.num_global: int = 1 + self.num_registers
        patch = config.patch_size
        self.patch_size: int = int(patch if isinstance(patch, int) else patch[0])
        self._reference_lock = threading.Lock()

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

    def _block(self, layer: Any, hidden: torch.Tensor, *, cls_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One transformer block with fused SDPA attention, independent of the model's attention setting.

        Returns:
            ``(hidden [B, T, D], CLS->patch logits [B, M, P] float32 or None)``.
        """
        attn = layer.attention
        b, t, _ = hidden.shape
        normed = layer.norm1(hidden)
        q = attn.q_proj(normed).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(normed).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        scale = self.head_dim**-0.5
        context = F.scaled_dot_product_attention(q, k, v, scale=scale)
        logits = None
        if cls_logits:
            # Only the CLS query row against the patch keys: [B, M, 1, dh] x [B, M, dh, P].
            logits = (q[:, :, :1].float() @ k[:, :, self.num_global:].float().transpose(-1, -2)).squeeze(2) * scale
        context = context.transpose(1, 2).reshape(b, t, self.embed_dim)
        hidden = layer.drop_path(layer.layer_scale1(attn.o_proj(context))) + hidden
        hidden = layer.drop_path(layer.layer_scale2(layer.mlp(layer.norm2(hidden)))) + hidden
        return hidden, logits

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Fast path: every block with fused SDPA; only the last block's CLS row of q·kᵀ is formed.

        It never reads or changes the model's attention setting, so it is safe to call while another
        thread runs `forward_reference` on the same model.

        Args:
            pixel_values: ``[B, 3, H, W]`` RGB, ImageNet-normalised, H and W multiples of the patch size.

        Returns:
            `BackboneOutput` with P = (H/patch)·(W/patch).
        """
        grid = self._check_input(pixel_values)
        param = next(self.model.parameters())
        hidden = self.model.embeddings(pixel_values.to(device=param.device, dtype=param.dtype))
        layers = self.model.encoder.layer
        for layer in layers[:-1]:
            hidden, _ = self._block(layer, hidden, cls_logits=False)
        hidden, logits = self._block(layers[-1], hidden, cls_logits=True)
        assert logits is not None
        return self._split(self.model.layernorm(hidden), logits, grid)

    @torch.inference_mode()
    def forward_reference(self, pixel_values: torch.Tensor) -> BackboneOutput:
        """Plain path: the model's own forward with eager attention, logits recomputed in full.

        Args:
            pixel_values: as in `forward`.

        Returns:
            `BackboneOutput`, equal to `forward` up to float rounding (about 1e-5).
        """
        grid = self._check_input(pixel_values)
        param = next(self.model.parameters())
        # The model's attention setting is shared state; the lock keeps two reference calls from
        # interleaving their switch and restore (the fast path does not read the setting at all).
        with self._reference_lock:
            previous = self.model.config._attn_implementation
            self.model.set_attn_implementation("eager")
            try:
                out = self.model(
                    pixel_values.to(device=param.device, dtype=param.dtype), output_hidden_states=True,
                    output_attentions=True,
                )
            finally:
                self.model.set_attn_implementation(previous)
        last = self.model.encoder.layer[-1]
        normed = last.norm1(out.hidden_states[-2])
        b, t, _ = normed.shape
        q = last.attention.q_proj(normed).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = last.attention.k_proj(normed).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        full = (q.float() @ k.float().transpose(-1, -2)) * self.head_dim**-0.5  # [B, M, T, T]
        return self._split(out.last_hidden_state, full[:, :, 0, self.num_global:], grid)
