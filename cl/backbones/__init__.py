"""Backbones: feature extractors with a ``num_features`` attribute (no classifier; strategies add their own).

Registered: ``mlp``, ``cnn`` (small conv nets for tests and the overhead benchmark), tiny ViT presets
(``vit_p4_w64_d4`` ...), ``resnet18_cifar`` (CIFAR stem, width option) and ``timm`` (any timm model by name:
``backbone=timm backbone.model=vit_base_patch16_224.augreg_in21k backbone.pretrained=true``, or the short form
``backbone=timm:vit_base_patch16_224.augreg_in21k``). ``backbone.checkpoint=PATH`` loads a local state dict.
"""

from __future__ import annotations

from cl.backbones import nets as _nets  # noqa: F401  (registers the built-in backbones)
from cl.backbones.base import BackboneBuilder, build_backbone, load_backbone_checkpoint

__all__ = ["BackboneBuilder", "build_backbone", "load_backbone_checkpoint"]
