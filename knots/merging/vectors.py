"""Task-vector spaces that merges act on, module by module.

A space yields, per module, a task stack ``(n_tasks, ...)``, and turns a merged tensor back into the
module's update ``dW`` (``(out, in)``, ``nn.Linear`` layout). The KnOTS and Core Space spaces also give
exact low-rank factors.
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

    def shape(self, module: str) -> tuple[int, int]: ...

    def joint_rank(self, module: str) -> int: ...

    def task_factors(self, module: str, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]] | None: ...


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

    def shape(self, module: str) -> tuple[int, int]:
        return self.taskset.shapes[module]

    def joint_rank(self, module: str) -> int:
        """The dimension of the space the tasks' updates share: ``min(out, in, sum of ranks)``."""
        return min(*self.taskset.shapes[module], sum(self.taskset.ranks(module)))

    def task_factors(self, module: str, dtype: torch.dtype = torch.float64) -> None:
        """None: the dense path takes every SVD of the full matrices, as the reference does."""
        return None


@dataclass
class AlignedBlocks:
    """KnOTS: task vectors are the aligned blocks ``S V_i^T``; ``dW = U @ merged`` (transposed for rows).

    Core Space: task vectors are the cores ``M_i``; ``dW = U_ref @ merged @ V_ref``.
    """

    ingredients: Ingredients
    taskset: TaskSet | None = None

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
        """``(B, A)`` with ``B @ A == dW`` and rank = the kept components (Core Space: the smaller side)."""
        alignment = self.ingredients.modules[module]
        U = alignment.U.to(merged.dtype)
        if alignment.V is not None:
            V = alignment.V.to(merged.dtype)
            return (U, merged @ V) if U.shape[1] <= V.shape[0] else (U @ merged, V)
        if self.ingredients.orientation == "column":
            return U, merged
        return merged.T, U.T

    def to_delta(self, module: str, merged: torch.Tensor) -> torch.Tensor:
        B, A = self.to_lora(module, merged)
        return B @ A

    def shape(self, module: str) -> tuple[int, int]:
        return self.ingredients.shapes[module]

    def joint_rank(self, module: str) -> int:
        """Core Space: the smaller side of the cores, ``min(out, in, sum of ranks)``."""
        alignment = self.ingredients.modules[module]
        return min(alignment.blocks.shape[1:])

    def task_factors(self, module: str, dtype: torch.dtype = torch.float64) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Core Space, with the task set known: every task's core as factors
        ``(U_ref^T s B, A V_ref^T)`` of its LoRA rank (empty for a task without the module)."""
        alignment = self.ingredients.modules[module]
        if alignment.V is None or self.taskset is None:
            return None
        U, V = alignment.U.to(dtype), alignment.V.to(dtype)
        factors = []
        for lora in self.taskset.factors[module]:
            if lora is None:
                factors.append((U.new_zeros(U.shape[1], 0), V.new_zeros(0, V.shape[0])))
            else:
                factors.append((U.T @ lora.scaled_B(dtype), lora.A.to(dtype) @ V.T))
        return factors


@dataclass
class DenseUpdates(FullUpdates):
    """The dense reference path of the spectral full-update methods (Iso-C, Iso-CTS, TSV-M).

    The full updates in the computation dtype, one module at a time; nothing is precomputed, so
    ``ingredients`` is empty.
    """

    @property
    def ingredients(self) -> Ingredients:
        return Ingredients(tasks=list(self.tasks), orientation="core", modules={}, shapes=dict(self.taskset.shapes))
