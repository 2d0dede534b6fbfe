"""Backbones: the models whose encoders are finetuned with LoRA and merged."""

from __future__ import annotations

from typing import Any

from knots.errors import ConfigError
from knots.models.base import LOGIT_SCALE, Backbone, encode, logits


def build_backbone(cfg: Any) -> Backbone:
    """Construct the backbone named by a ``ModelConfig`` (``backbone: module:Class``)."""
    cls = cfg.backbone_class
    try:
        return cls(path=cfg.path, name=cfg.name, lora_target_modules=list(cfg.lora.target_modules), **cfg.options)
    except TypeError as e:
        raise ConfigError(f"model {cfg.name}: bad options ({e})") from None


__all__ = ["LOGIT_SCALE", "Backbone", "build_backbone", "encode", "logits"]
