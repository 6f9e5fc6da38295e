"""DINO (v1) ViT: transformers ``ViTModel`` without pooler, for the paper's "DINO instead of DINOv2" ablation.

The hub's ``facebook/dino-vits8``, ``-vits16``, ``-vitb8`` and ``-vitb16`` are plain ViTs: pre-norm
blocks without layer scale, no registers (G = 1), learned absolute position embeddings and a
final LayerNorm (``model.layernorm``). M, d_h and the patch size come from the loaded config (pitfall P2).

Inputs other than the trained 224×224 need interpolated position embeddings: we always ask for them
(``interpolate_pos_encoding=True``). transformers interpolates bicubically to the target grid size;
the original DINO code used a scale factor with a 0.1 offset, so features can differ slightly from
the torch.hub model's at other sizes (pitfall P17). Any transformers ``ViTModel`` checkpoint loads
through this family, since the architecture is the same.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from talk2dino.models.backbones.base import LogitsRope, VisionBackbone, load_transformers_model
from talk2dino.models.backbones.layouts import attention_output, block_list, vit_attention_dropout, vit_mlp


class DinoV1Backbone(VisionBackbone):
    """A frozen transformers ``ViTModel`` (DINO v1 weights) exposing `BackboneOutput`.

    The fast path runs every block itself with fused SDPA; `forward_reference` runs the model's own
    eager forward and recomputes the logits from the last block's input.
    """

    family = "dino"

    def __init__(self, model: Any) -> None:
        """Args:
            model: a transformers ``ViTModel``, preferably built with ``add_pooling_layer=False``.
        """
        config = model.config
        heads = int(config.num_attention_heads)
        super().__init__(model, num_heads=heads,
                         head_dim=int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads),
                         num_registers=0, patch_size=config.patch_size)

    @classmethod
    def from_pretrained(cls, folder: Path, *, dtype: torch.dtype, logits_rope: LogitsRope = "model") -> DinoV1Backbone:
        """Load a ``ViTModel`` folder without its pooler; `logits_rope` has no effect (no RoPE)."""
        from transformers import ViTModel

        # ViTModel by name: transformers keys its conversion of old checkpoints (encoder.layer.*) by class.
        model = load_transformers_model(ViTModel, folder, dtype=dtype, what="ViT", add_pooling_layer=False)
        return cls(model)

    def _block(self, layer: Any, hidden: torch.Tensor, *, cls_logits: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One ``ViTLayer`` with fused SDPA: pre-norm attention and MLP, no layer scale.

        Returns:
            ``(hidden [B, 1 + P, D], CLS->patch logits [B, M, P] float32 or None)``.
        """
        attention = layer.attention
        q, k, v = self._qkv(attention, self._norm(layer.layernorm_before, hidden))
        context = self._sdpa(q, k, v)
        logits = self._cls_logits(q, k) if cls_logits else None
        hidden = self._residual(hidden, vit_attention_dropout(layer, attention_output(attention, context)))
        hidden = self._residual(hidden, vit_mlp(layer, self._norm(layer.layernorm_after, hidden)))
        return hidden, logits

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self._stream(self.model.embeddings(pixel_values, interpolate_pos_encoding=True))
        layers = block_list(self.model)
        for layer in layers[:-1]:
            hidden, _ = self._block(layer, hidden, cls_logits=False)
        hidden, logits = self._block(layers[-1], hidden, cls_logits=True)
        assert logits is not None
        return self._norm(self.model.layernorm, hidden, final=True), logits

    def _encode_reference(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(pixel_values, interpolate_pos_encoding=True, output_hidden_states=True)
        last = block_list(self.model)[-1]
        # hidden_states = (embeddings, block 1 output, ..., block L output): [-2] is the last block's input.
        q, k, _ = self._qkv(last.attention, last.layernorm_before(out.hidden_states[-2]))
        return out.last_hidden_state, self._full_cls_logits(q, k)
