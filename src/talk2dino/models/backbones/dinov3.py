"""DINOv3 ViT (method.md §2.4): transformers ``DINOv3ViTModel``, rotary position embeddings.

ViT-S/B/L/H+ at patch 16 with 4 registers (G = 5); M, d_h, R and the patch size come from the loaded
config (pitfall P2). Position is a rotary embedding computed from the patch grid, so any input whose
sides are multiples of 16 works without interpolation. Input normalisation is ImageNet's, as for DINOv2.

**Attention logits and RoPE (pitfall P20).** The model rotates the queries and keys of the patch
tokens after the q/k projections (CLS and registers are not rotated). With ``logits_rope="model"``
(default) the CLS->patch logits are computed from the rotated q and k, i.e. they are the model's own
pre-softmax attention scores. The reference implementation reads q and k from the qkv projection,
before the rotation; ``logits_rope="none"`` reproduces that, and is what the authors' DINOv3 ψ was
trained on (their registry entries set it). The query is CLS, which is never rotated, so the two
settings differ only through the keys. The network itself always runs with RoPE either way; only the
returned logits change.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from talk2dino.compat import require
from talk2dino.models.backbones.base import LogitsRope, VisionBackbone, load_transformers_model, rotate_patches
from talk2dino.models.backbones.dinov2 import layerscale_block
from talk2dino.models.backbones.layouts import block_list

LOGITS_ROPE_CHOICES: tuple[LogitsRope, ...] = ("model", "none")


class DinoV3Backbone(VisionBackbone):
    """A frozen transformers DINOv3 ViT exposing `BackboneOutput`.

    The fast path runs every block itself with fused SDPA and the model's rotary tables (the blocks
    have DINOv2's layout plus RoPE); `forward_reference` runs the model's own eager forward and
    recomputes the logits from the last block's input.
    """

    family = "dinov3"

    def __init__(self, model: Any, *, logits_rope: LogitsRope = "model") -> None:
        """Args:
            model: a transformers ``DINOv3ViTModel``.
            logits_rope: ``"model"`` — logits from the rotated q, k (the true attention scores);
                ``"none"`` — from the projections before RoPE (the reference's behaviour, method.md §2.4).

        Raises:
            ValueError: an unknown `logits_rope`.
        """
        if logits_rope not in LOGITS_ROPE_CHOICES:
            raise ValueError(f"logits_rope must be one of {LOGITS_ROPE_CHOICES}, got {logits_rope!r}")
        config = model.config
        heads = int(config.num_attention_heads)
        super().__init__(model, num_heads=heads, head_dim=int(config.hidden_size) // heads,
                         num_registers=int(config.num_register_tokens or 0), patch_size=config.patch_size)
        self.logits_rope: LogitsRope = logits_rope

    @classmethod
    def from_pretrained(cls, folder: Path, *, dtype: torch.dtype, logits_rope: LogitsRope = "model") -> DinoV3Backbone:
        """Load a ``DINOv3ViTModel`` folder (the hub's ``facebook/dinov3-vit*-pretrain-*`` repositories).

        Raises:
            Talk2DinoError: transformers older than 4.56, the first release with DINOv3.
        """
        require("transformers", "4.56.0", "DINOv3 backbones")
        from transformers import DINOv3ViTModel

        return cls(load_transformers_model(DINOv3ViTModel, folder, dtype=dtype, what="DINOv3"),
                   logits_rope=logits_rope)

    def settings(self) -> dict[str, Any]:
        """The logits convention, recorded with every result (pitfall P10)."""
        return {**super().settings(), "logits_rope": self.logits_rope}

    def _rope(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The model's own tables: [P, d_h] cos and sin in the weight dtype, as its forward computes them
        # (it casts the pixels to the weight dtype first; `_cast` already did).
        cos, sin = self.model.rope_embeddings(pixel_values)
        return cos, sin

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._stream(self.model.embeddings(pixel_values))
        rope = self._rope(pixel_values)
        layers = block_list(self.model)
        for layer in layers[:-1]:
            hidden, _ = layerscale_block(self, layer, hidden, cls_logits=False, rope=rope)
        hidden, logits = layerscale_block(self, layers[-1], hidden, cls_logits=True, rope=rope,
                                          logits_rope=self.logits_rope == "model")
        assert logits is not None
        return self._norm(self.model.norm, hidden, final=True), logits

    def _encode_reference(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values, output_hidden_states=True)
        last = block_list(self.model)[-1]
        # hidden_states = (embeddings, block 1 output, ..., block L output): [-2] is the last block's input.
        q, k, _ = self._qkv(last.attention, last.norm1(out.hidden_states[-2]))
        if self.logits_rope == "model":
            cos, sin = self._rope(pixel_values)
            q = rotate_patches(q, cos, sin, self.num_global)
            k = rotate_patches(k, cos, sin, self.num_global)
        return out.last_hidden_state, self._full_cls_logits(q, k)
