"""Heads: per-task linear maps on backbone features.

Two kinds, one formula (:func:`head_logits`, the only place logits are computed):

- **zero-shot** heads are built once by the frozen pretrained model from class names and templates
  (CLIP's protocol): the features are L2-normalized and ``logits = scale * cos`` with ``scale = 100``;
- **trained** heads are ``nn.Linear`` maps trained together with the LoRA and saved with the adapter as
  a PEFT ``modules_to_save`` module, in PEFT's own format; their features are used as they are.

A merged model is the merged backbone plus each task's own head. Classes a task does not have (a
two-class task in a shared three-way label space) are masked with ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from knots.data.tasks import JointLabelSpace, TaskData

#: Zero-shot logits are ``ZERO_SHOT_SCALE * cos(features, class embedding)``, as in CLIP.
ZERO_SHOT_SCALE = 100.0


def head_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                scale: float = 1.0, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(scale * features) @ weight.T + bias``, with masked-out classes at ``-inf``."""
    logits = (scale * features) @ weight.T
    if bias is not None:
        logits = logits + bias
    if mask is not None:
        logits = logits.masked_fill(~mask.to(logits.device), float("-inf"))
    return logits


@dataclass(frozen=True)
class Head:
    """One task's head: ``weight`` ``(C, D)``, optional ``bias`` ``(C,)``, ``scale``, class ``mask`` ``(C,)``."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    mask: torch.Tensor | None = None

    @property
    def num_classes(self) -> int:
        return self.weight.shape[0]

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits of head inputs (see :meth:`HeadSet.prepare`) ``(N, D)`` -> ``(N, C)``."""
        w = self.weight.to(features.device, features.dtype)
        b = None if self.bias is None else self.bias.to(features.device, features.dtype)
        return head_logits(features, w, b, self.scale, self.mask)

    def to(self, device: torch.device | str) -> Head:
        move = (lambda t: None if t is None else t.to(device))
        return Head(move(self.weight), move(self.bias), self.scale, move(self.mask))


def class_mask(task: TaskData) -> torch.Tensor | None:
    """The task's valid classes as a bool tensor, or None when all are valid."""
    return None if task.class_mask is None else torch.tensor(task.class_mask, dtype=torch.bool)


@dataclass
class HeadSet:
    """The heads of a task set: one per task and, for zero-shot heads, one over the joint label space.

    ``normalize``: whether head inputs are L2-normalized features (zero-shot) or raw features (trained).
    ``joint`` is None where the joint task does not apply (trained heads have no shared label space).
    """

    kind: str
    per_task: dict[str, Head]
    normalize: bool
    joint: Head | None = None
    space: JointLabelSpace | None = None

    def prepare(self, features: torch.Tensor) -> torch.Tensor:
        """Backbone features -> head inputs (applied once, when features are computed)."""
        return nn.functional.normalize(features, dim=-1) if self.normalize else features

    @classmethod
    def zero_shot(cls, embeddings: Mapping[str, torch.Tensor], tasks: Sequence[TaskData]) -> HeadSet:
        """Zero-shot heads from each task's normalized class embeddings; the joint head gives a label
        shared by several tasks the normalized mean of their class embeddings."""
        per_task = {t.name: Head(embeddings[t.name], scale=ZERO_SHOT_SCALE, mask=class_mask(t)) for t in tasks}
        space = JointLabelSpace.from_tasks(tasks)
        joint = torch.stack([
            nn.functional.normalize(torch.stack([embeddings[t][c] for t, c in members]).mean(0), dim=0)
            for members in space.members
        ])
        return cls(kind="zero_shot", per_task=per_task, normalize=True, joint=Head(joint, scale=ZERO_SHOT_SCALE), space=space)

    @classmethod
    def trained(cls, heads: Mapping[str, Head], tasks: Sequence[TaskData]) -> HeadSet:
        """Trained heads, one per task (from each task's adapter); no joint head."""
        return cls(kind="trained", per_task={t.name: heads[t.name] for t in tasks}, normalize=False)


def init_head_module(in_features: int, num_classes: int, seed: int, bias: bool) -> nn.Linear:
    """A fresh ``nn.Linear`` head with ``nn.Linear``'s default initialization from its own seeded
    generator, so every task starts from the same head (and the global RNG is untouched)."""
    module = nn.Linear(in_features, num_classes, bias=bias)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        nn.init.kaiming_uniform_(module.weight, a=math.sqrt(5), generator=generator)
        if bias:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
    return module


def head_from_module(module: nn.Linear, mask: torch.Tensor | None = None) -> Head:
    """A :class:`Head` holding a copy of a trained ``nn.Linear``'s parameters (on the CPU, float32)."""
    weight = module.weight.detach().float().cpu().clone()
    bias = None if module.bias is None else module.bias.detach().float().cpu().clone()
    return Head(weight, bias, 1.0, mask)
