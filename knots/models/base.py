"""The backbone interface: what the pipeline needs from any model, text or vision.

A backbone is an *encoder* (the module LoRA adapters are trained on and merged into) that maps a
collated batch to features, plus what it takes to feed it: collation, batching hints and, for
zero-shot heads, class embeddings from the frozen pretrained model. Heads live in ``knots.heads``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from knots.errors import ConfigError


class Backbone(ABC):
    """A pretrained model seen by the pipeline.

    Attributes:
        name: short identifier (used in cache keys and reports).
        encoder: the module that PEFT wraps and that merged updates are added to;
            ``encoder(batch)`` returns ``(B, feature_dim)`` features (raw: heads decide on normalization).
            Module paths inside it are the keys of adapters and merged updates.
        feature_dim: size of the encoder features.
    """

    name: str
    encoder: nn.Module
    feature_dim: int

    @abstractmethod
    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        """Turn raw inputs (``str``, a ``(premise, hypothesis)`` pair, ``PIL.Image``, ...) into one batch."""

    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        """L2-normalized ``(C, feature_dim)`` class embeddings from the FROZEN pretrained model.

        For each class: format every template with the class name (``template.format(name)``),
        embed, L2-normalize each, average, L2-normalize. Must not depend on any adapter. Needed for
        zero-shot heads only; backbones that cannot embed class names raise a ``ConfigError``.
        """
        raise ConfigError(f"model {self.name} cannot build zero-shot heads; use model.head.kind=trained")

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


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A batch with its tensors on ``device`` (non-blocking from pinned memory)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
