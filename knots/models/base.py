"""The backbone interface: what the pipeline needs from any model, text or vision.

A backbone pairs an *encoder* (the module that LoRA adapters are trained on and merged into)
with a frozen *class-head builder*, following CLIP's zero-shot protocol: an input is classified
by the cosine similarity between its encoder features and one embedding per class name, built
from label descriptions and prompt templates by the frozen pretrained model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

#: Logits are ``LOGIT_SCALE * cos(features, class_embedding)``, as in CLIP.
LOGIT_SCALE = 100.0


class Backbone(ABC):
    """A pretrained model seen by the pipeline.

    Attributes:
        name: short identifier (used in cache keys and reports).
        encoder: the module that PEFT wraps and that merged updates are added to;
            ``encoder(batch)`` returns ``(B, feature_dim)`` features (not normalized).
            Module paths inside it are the keys of adapters and merged updates.
        lora_target_modules: PEFT ``target_modules`` naming the attention q, k, v and
            output projections inside ``encoder``.
        feature_dim: size of the encoder features and the class embeddings.
        logit_scale: multiplier of the cosine similarities (never applied twice).
    """

    name: str
    encoder: nn.Module
    lora_target_modules: list[str]
    feature_dim: int
    logit_scale: float = LOGIT_SCALE

    @abstractmethod
    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn raw inputs (``str`` for text, ``PIL.Image`` for vision) into one encoder batch."""

    @abstractmethod
    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """Return L2-normalized ``(C, feature_dim)`` class embeddings from the FROZEN pretrained model.

        For each class: format every template with the class name (``template.format(name)``),
        embed, L2-normalize each, average, L2-normalize. Must not depend on any adapter: the
        pipeline calls it before an adapter is trained or applied.
        """

    def token_mask(self, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        """``(B, L)`` mask of the real (non-padding) positions of a batch, or None if all are real.

        Used to compute RegMean's Gram matrices from real tokens only.
        """
        return None

    def sort_key(self, item: Any) -> float:
        """A key that groups inputs of similar cost into one batch (e.g. text length); 0 by default."""
        return 0.0

    @property
    def device(self) -> torch.device:
        """The device the encoder lives on."""
        return next(self.encoder.parameters()).device


def encode(backbone: Backbone, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Run the encoder on one collated batch and L2-normalize the features."""
    device = backbone.device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return nn.functional.normalize(backbone.encoder(batch), dim=-1)


def logits(features: torch.Tensor, heads: torch.Tensor, scale: float = LOGIT_SCALE) -> torch.Tensor:
    """``scale * cos``: normalized features ``(B, D)`` against normalized class heads ``(C, D)``."""
    return scale * features @ heads.T
