"""Task-vector spaces that merges act on, module by module.

A space yields, per module, a task stack ``(n_tasks, ...)``, and turns a merged tensor back into the
module's update ``dW`` (``(out, in)``, ``nn.Linear`` layout). The KnOTS space also gives exact low-rank
factors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from knots.merging.alignment import Ingredients
from knots.merging.taskset import TaskSet


class TaskVectors(Protocol):
    """What a merge needs: the task stack of every module and the way back to ``dW``."""

    tasks: list[str]
    modules: list[str]

    def stack(self, module: str) -> torch.Tensor: ...

    def task_numel(self, module: str) -> int: ...

    def to_delta(self, module: str, merged: torch.Tensor) -> torch.Tensor: ...


@dataclass
class FullUpdates:
    """The paper's baselines: task vectors are the full updates ``dW_i``."""

    taskset: TaskSet
    dtype: torch.dtype = torch.float32

    @property
    def tasks(self) -> list[str]:
        return self.taskset.tasks

    @property
    def modules(self) -> list[str]:
        return self.taskset.modules

    def stack(self, module: str) -> torch.Tensor:
        return self.taskset.deltas(module, self.dtype)

    def task_numel(self, module: str) -> int:
        out_features, in_features = self.taskset.shapes[module]
        return out_features * in_features

    def to_delta(self, module: str, merged: torch.Tensor) -> torch.Tensor:
        return merged


@dataclass
class AlignedBlocks:
    """KnOTS: task vectors are the aligned blocks ``S V_i^T``; ``dW = U @ merged`` (transposed for rows)."""

    ingredients: Ingredients

    @property
    def tasks(self) -> list[str]:
        return self.ingredients.tasks

    @property
    def modules(self) -> list[str]:
        return list(self.ingredients.modules)

    def stack(self, module: str) -> torch.Tensor:
        return self.ingredients.modules[module].blocks

    def task_numel(self, module: str) -> int:
        return self.ingredients.modules[module].blocks[0].numel()

    def to_lora(self, module: str, merged: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, A)`` with ``B @ A == dW`` and rank = the kept components."""
        U = self.ingredients.modules[module].U.to(merged.dtype)
        if self.ingredients.orientation == "column":
            return U, merged
        return merged.T, U.T

    def to_delta(self, module: str, merged: torch.Tensor) -> torch.Tensor:
        B, A = self.to_lora(module, merged)
        return B @ A
