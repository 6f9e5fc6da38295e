"""Backbone wrappers (method.md §2.2, §2.4). Kept as an import path; the families live in `backbones/`."""

from talk2dino.models.backbones import (
    BackboneOutput,
    DinoV1Backbone,
    DinoV2Backbone,
    DinoV3Backbone,
    LogitsRope,
    VisionBackbone,
)

__all__ = ["BackboneOutput", "DinoV1Backbone", "DinoV2Backbone", "DinoV3Backbone", "LogitsRope", "VisionBackbone"]
