"""Model components. Nothing here imports training, evaluation, CLI or server code."""

from talk2dino.models.backbones import (
    BackboneOutput,
    DinoV1Backbone,
    DinoV2Backbone,
    DinoV3Backbone,
    VisionBackbone,
)
from talk2dino.models.model import Talk2DINO
from talk2dino.models.projection import Projection
from talk2dino.models.text_encoder import ClipTextEncoder

__all__ = [
    "BackboneOutput",
    "ClipTextEncoder",
    "DinoV1Backbone",
    "DinoV2Backbone",
    "DinoV3Backbone",
    "Projection",
    "Talk2DINO",
    "VisionBackbone",
]
