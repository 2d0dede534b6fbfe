"""Backbones: the models whose encoders are finetuned with LoRA and merged."""

from __future__ import annotations

from typing import Any

from knots.errors import ConfigError
from knots.models.base import Backbone, to_device


def build_backbone(cfg: Any) -> Backbone:
    """Instantiate the backbone of a ``ModelConfig`` (``backbone._target_``, its other keys, ``name``)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        backbone = instantiate(cfg.backbone, name=cfg.name, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        message = str(cause or error).splitlines()[0]
        raise ConfigError(f"model {cfg.name}: cannot build the backbone ({message})") from None
    if not isinstance(backbone, Backbone):
        raise ConfigError(f"model {cfg.name}: {cfg.backbone['_target_']} is not a knots Backbone")
    return backbone


__all__ = ["Backbone", "build_backbone", "to_device"]
