"""DINOv2, with or without registers (method.md §2.2): transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel``.

Any size (ViT-S/B/L/g, MLP or SwiGLU feed-forward); M, d_h and R come from the loaded config (pitfall
P2), and any input whose sides are multiples of the patch size works (the model interpolates its
position embeddings; pitfall P17 for parity runs). G = 1 without registers, 1 + R with them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from talk2dino.models.backbones.base import LogitsRope, VisionBackbone, load_transformers_model, rotate_patches
from talk2dino.models.backbones.layouts import attention_output, block_list


def layerscale_block(backbone: VisionBackbone, layer: Any, hidden: torch.Tensor, *, cls_logits: bool,
                     rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                     logits_rope: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One pre-norm block with layer scale (the DINOv2 / DINOv3 layout) and fused SDPA attention.

    Reads the transformers layer's own ``norm1``, attention projections (either layout, see `layouts`),
    ``layer_scale1``, ``norm2``, ``mlp`` and ``layer_scale2`` (and ``drop_path``, the identity in eval mode), so it is
    independent of the model's attention setting.

    Args:
        backbone: supplies M, d_h and G.
        layer: a ``Dinov2Layer`` / ``Dinov2WithRegistersLayer`` / ``DINOv3ViTLayer``.
        hidden: ``[B, G + P, D]`` the block's input.
        cls_logits: also return the CLS->patch logits of this block.
        rope: ``(cos, sin)`` ``[P, d_h]`` rotary tables applied to the patch queries and keys before
            attention (DINOv3), or None.
        logits_rope: take the logits from the rotated q, k (True) or from the projections before the
            rotation (False, the reference's DINOv3 behaviour, method.md §2.4). Without `rope` both agree.

    Returns:
        ``(hidden [B, G + P, D], CLS->patch logits [B, M, P] float32 or None)``.
    """
    attention = layer.attention
    q, k, v = backbone._qkv(attention, backbone._norm(layer.norm1, hidden))
    plain_q, plain_k = q, k
    if rope is not None:
        cos, sin = rope
        q = rotate_patches(q, cos, sin, backbone.num_global)
        k = rotate_patches(k, cos, sin, backbone.num_global)
    context = backbone._sdpa(q, k, v)
    logits = None
    if cls_logits:
        logits = backbone._cls_logits(q, k) if logits_rope else backbone._cls_logits(plain_q, plain_k)
    hidden = backbone._residual(hidden, layer.drop_path(layer.layer_scale1(attention_output(attention, context))))
    branch = layer.drop_path(layer.layer_scale2(layer.mlp(backbone._norm(layer.norm2, hidden))))
    hidden = backbone._residual(hidden, branch)
    return hidden, logits


class DinoV2Backbone(VisionBackbone):
    """A frozen transformers DINOv2 model exposing `BackboneOutput`.

    The fast path (`forward`) runs every block with fused SDPA and computes only the CLS row of the
    last block's q·kᵀ itself. `forward_reference` is the plain path: eager attention with hidden
    states, logits recomputed from the last block's input.
    """

    family = "dinov2"

    def __init__(self, model: Any) -> None:
        """Args:
            model: a transformers ``Dinov2Model`` or ``Dinov2WithRegistersModel``.
        """
        config = model.config
        heads = int(config.num_attention_heads)
        super().__init__(model, num_heads=heads, head_dim=int(config.hidden_size) // heads,
                         num_registers=int(getattr(config, "num_register_tokens", 0) or 0),
                         patch_size=config.patch_size)

    @classmethod
    def from_pretrained(cls, folder: Path, *, dtype: torch.dtype, logits_rope: LogitsRope = "model") -> DinoV2Backbone:
        """Load with ``AutoModel`` (either DINOv2 class); `logits_rope` has no effect (no RoPE)."""
        from transformers import AutoModel

        return cls(load_transformers_model(AutoModel, folder, dtype=dtype, what="DINOv2"))

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._stream(self.model.embeddings(pixel_values))
        layers = block_list(self.model)
        for layer in layers[:-1]:
            hidden, _ = layerscale_block(self, layer, hidden, cls_logits=False)
        hidden, logits = layerscale_block(self, layers[-1], hidden, cls_logits=True)
        assert logits is not None
        return self._norm(self.model.layernorm, hidden, final=True), logits

    def _encode_reference(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values, output_hidden_states=True)
        last = block_list(self.model)[-1]
        # hidden_states = (embeddings, block 1 output, ..., block L output): [-2] is the last block's input.
        q, k, _ = self._qkv(last.attention, last.norm1(out.hidden_states[-2]))
        return out.last_hidden_state, self._full_cls_logits(q, k)
