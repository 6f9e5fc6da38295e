"""Talk2DINO: a backbone, a text encoder and psi, composed by constructor injection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from talk2dino.config import ModelConfig
from talk2dino.models.backbones.base import BackboneOutput, VisionBackbone
from talk2dino.models.projection import Projection
from talk2dino.models.text_encoder import ClipTextEncoder

_NORM_EPS = 1e-6  # floor of ||psi(t)|| before normalising, method.md §4.1 step 3


class Talk2DINO(nn.Module):
    """The composed model. Built by `talk2dino.create_model`; holds no inference options."""

    pixel_mean: torch.Tensor  # [1, 3, 1, 1] ImageNet mean, buffer
    pixel_std: torch.Tensor  # [1, 3, 1, 1] ImageNet std, buffer

    def __init__(
        self,
        backbone: VisionBackbone,
        text_encoder: ClipTextEncoder,
        projection: Projection,
        config: ModelConfig,
        weights_info: dict[str, Any] | None = None,
    ) -> None:
        """Args:
            backbone: the vision backbone wrapper (DINOv2, DINOv3 or DINO).
            text_encoder: the CLIP text wrapper.
            projection: psi, with out_dim equal to the backbone width.
            config: the effective model configuration.
            weights_info: resolved sources and hashes, recorded in every output.
        """
        super().__init__()
        if projection.out_dim != backbone.embed_dim:
            raise ValueError(
                f"projection maps to {projection.out_dim}-d but the backbone is {backbone.embed_dim}-d"
            )
        if projection.in_dim != text_encoder.embed_dim:
            raise ValueError(
                f"projection expects {projection.in_dim}-d text but the text encoder gives {text_encoder.embed_dim}-d"
            )
        self.backbone = backbone
        self.text_encoder = text_encoder
        self.projection = projection
        self.config = config
        self.weights_info: dict[str, Any] = dict(weights_info or {})
        mean = torch.tensor(config.backbone.image_mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(config.backbone.image_std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def device(self) -> torch.device:
        """Device of the backbone weights."""
        return self.pixel_mean.device

    @property
    def weights_key(self) -> str:
        """A string identifying the text-side weights (part of the class-embedding cache key)."""
        text = self.weights_info.get("text", {})
        proj = self.weights_info.get("projection", {})
        return f"{text.get('path', '?')}@{text.get('revision', '')}|{proj.get('sha256', id(self.projection))}"

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """ImageNet normalisation.

        Args:
            images: ``[B, 3, H, W]`` float32 RGB in [0, 255].

        Returns:
            ``[B, 3, H, W]`` float32, (x/255 − mean)/std.
        """
        return (images.to(self.device, torch.float32) / 255.0 - self.pixel_mean) / self.pixel_std

    def encode_image(self, pixel_values: torch.Tensor, *, reference: bool = False) -> BackboneOutput:
        """Run the backbone.

        Args:
            pixel_values: ``[B, 3, H, W]`` RGB, ImageNet-normalised (see `normalize`).
            reference: use the plain eager path instead of the fast one.
        """
        return self.backbone.forward_reference(pixel_values) if reference else self.backbone(pixel_values)

    def encode_text(self, prompts: Sequence[str], *, pad_to_context: bool = False) -> torch.Tensor:
        """Returns ``[N, 512]`` float32 raw CLIP embeddings of N prompts (method.md §2.1)."""
        return self.text_encoder.encode(
            list(prompts), batch_size=self.config.text.batch_size, pad_to_context=pad_to_context
        )

    @torch.inference_mode()
    def embed_classes(
        self, names: Sequence[str], templates: Sequence[str] | None = None, *, pad_to_context: bool = False
    ) -> torch.Tensor:
        """Class embeddings T̂ (method.md §4.1): mean of the raw template embeddings, then psi, then L2.

        Args:
            names: N class names, used verbatim.
            templates: prompt templates with one ``{}``; the model's defaults when None.

        Returns:
            ``[N, D]`` float32 unit vectors.
        """
        templates = tuple(templates if templates is not None else self.config.text.templates)
        prompts = [t.format(name) for name in names for t in templates]
        raw = self.encode_text(prompts, pad_to_context=pad_to_context).view(len(names), len(templates), -1)
        # Average the raw embeddings before the nonlinear psi (pitfall P14).
        projected = self.projection(raw.mean(dim=1))
        return projected / projected.norm(dim=-1, keepdim=True).clamp_min(_NORM_EPS)
