"""Backbone families behind one interface (`VisionBackbone` -> `BackboneOutput`).

One small file per family. A new family (e.g. SigLIP-2 or RADIO) is a new file here that subclasses
`VisionBackbone`, plus one line in ``talk2dino.registry.BACKBONE_FAMILIES`` mapping its transformers
``model_type`` to the class.
"""

from talk2dino.models.backbones.base import BackboneOutput, LogitsRope, VisionBackbone
from talk2dino.models.backbones.dinov1 import DinoV1Backbone
from talk2dino.models.backbones.dinov2 import DinoV2Backbone
from talk2dino.models.backbones.dinov3 import DinoV3Backbone

__all__ = ["BackboneOutput", "DinoV1Backbone", "DinoV2Backbone", "DinoV3Backbone", "LogitsRope", "VisionBackbone"]
