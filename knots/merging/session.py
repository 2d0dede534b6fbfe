"""A merge session: adapters loaded once, the KnOTS alignment computed once, any number of merges.

>>> session = MergeSession([load_adapter(p) for p in paths])
>>> for top_k in (10, 20, 30):
...     delta = session.merge("knots_ties", scaling=0.6, top_k=top_k).delta_state_dict()
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from knots.lora import LoraAdapter, parameter_layout
from knots.merging.alignment import Ingredients, Orientation, SvdPath, align
from knots.merging.family import Hyperparameters
from knots.merging.registry import MergeMethod, get_method
from knots.merging.taskset import TaskSet
from knots.merging.vectors import AlignedBlocks, DenseUpdates, FullUpdates, TaskVectors

#: The decomposition each method space merges in; ``subspace`` methods (spectral merges of the full
#: updates) run on the Core Space cores on the factored path, since they commute with its bases.
ORIENTATION: dict[str, Orientation] = {"knots": "column", "knots_row": "row", "core": "core", "subspace": "core"}


@dataclass
class MergeResult:
    """The merged update of every module, in the space the method merged in."""

    method: MergeMethod
    hyperparameters: Hyperparameters
    taskset: TaskSet
    vectors: TaskVectors
    merged: dict[str, torch.Tensor]
    seconds: float = 0.0

    @property
    def modules(self) -> list[str]:
        return list(self.merged)

    @property
    def exact_low_rank(self) -> bool:
        """Whether :meth:`lora` gives exact factors: every merge in the KnOTS, Core Space or subspace
        spaces, and linear merges (TA)."""
        return self.method.space != "dense" or self.method.linear

    def delta(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The merged ``dW`` in the base parameter's layout (transposed for ``fan_in_fan_out``)."""
        delta = self.vectors.to_delta(module, self.merged[module]).to(dtype)
        return parameter_layout(delta, self.taskset.fan_in_fan_out(module)).contiguous()

    def deltas(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """``(parameter name, dW)`` per module, computed one at a time."""
        for module in self.merged:
            yield f"{module}.weight", self.delta(module, dtype)

    def delta_state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """``{"<module>.weight": dW}``: add it to the base model's state dict."""
        return dict(self.deltas(dtype))

    def lora(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact factors ``(B, A)`` of the merged ``dW = B @ A`` (``nn.Linear`` layout)."""
        if isinstance(self.vectors, AlignedBlocks):
            return self.vectors.to_lora(module, self.merged[module])
        if self.method.linear:
            return concatenated_factors(self.taskset, module, self.hyperparameters)
        if self.method.space == "dense":
            raise ValueError(f"{self.method.name} merges are not exactly low-rank; use an SVD-truncated export")
        return numerical_rank_factors(self.vectors.to_delta(module, self.merged[module]))


def numerical_rank_factors(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact factors of a dense update that is low-rank (the dense reference path of a spectral merge):
    its SVD, keeping the singular values above the spectral merges' zero threshold."""
    from knots.merging.spectral import RANK_RTOL

    u, s, vt = torch.linalg.svd(delta.to(torch.float64), full_matrices=False)
    keep = max(int((s > RANK_RTOL * float(s[:1].sum())).sum()), 1)
    return u[:, :keep] * s[:keep], vt[:keep]


def concatenated_factors(taskset: TaskSet, module: str, hp: Hyperparameters) -> tuple[torch.Tensor, torch.Tensor]:
    """Task arithmetic as one LoRA: ``B = c [s_1 B_1 .. s_n B_n]``, ``A = [A_1; ..; A_n]``."""
    coefficient = hp.scaling / (taskset.n_tasks if hp.merge_func == "mean" else 1)
    present = [lora for lora in taskset.factors[module] if lora is not None]
    B = torch.cat([lora.scaled_B(torch.float32) for lora in present], dim=1) * coefficient
    A = torch.cat([lora.A.to(torch.float32) for lora in present], dim=0)
    return B, A


@dataclass
class MergeSession:
    """Adapters stacked once; alignments cached per orientation; timings recorded."""

    adapters: list[LoraAdapter]
    svd_path: SvdPath = "factored"
    compute_dtype: torch.dtype = torch.float64
    storage_dtype: torch.dtype = torch.float32
    dense_dtype: torch.dtype = torch.float32
    progress: bool = False
    taskset: TaskSet = field(init=False)
    timings: dict[str, float] = field(default_factory=dict)
    _ingredients: dict[str, Ingredients] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.taskset = TaskSet.from_adapters(self.adapters)

    @property
    def tasks(self) -> list[str]:
        return self.taskset.tasks

    def set_ingredients(self, ingredients: Ingredients) -> None:
        """Reuse an alignment computed earlier (e.g. loaded from disk) for these adapters."""
        if ingredients.tasks != self.tasks or set(ingredients.modules) != set(self.taskset.modules):
            from knots.errors import AdapterError

            raise AdapterError("the saved alignment was computed for other adapters (tasks or modules differ)")
        self._ingredients[ingredients.orientation] = ingredients

    def ingredients(self, orientation: Orientation = "column") -> Ingredients:
        """The KnOTS alignment (or, for ``core``, the Core Space), computed on first use and reused by
        every later merge."""
        if orientation not in self._ingredients:
            start = time.perf_counter()
            self._ingredients[orientation] = align(
                self.taskset, orientation, self.svd_path, self.compute_dtype, self.storage_dtype, progress=self.progress
            )
            self.timings[f"align_{orientation}"] = time.perf_counter() - start
        return self._ingredients[orientation]

    def vectors(self, space: str) -> TaskVectors:
        if space == "dense":
            return FullUpdates(self.taskset, self.dense_dtype)
        if space == "subspace" and self.svd_path == "dense":
            return DenseUpdates(self.taskset, self.compute_dtype)
        return AlignedBlocks(self.ingredients(ORIENTATION[space]), self.taskset)

    def merge(self, method: str, **hyperparameters: Any) -> MergeResult:
        """Merge with a registered method; unspecified hyperparameters take their defaults."""
        spec = get_method(method)
        hp = Hyperparameters(**hyperparameters)
        vectors = self.vectors(spec.space)
        start = time.perf_counter()
        merged = spec.function(vectors, hp, self.progress)
        seconds = time.perf_counter() - start
        self.timings["merge"] = self.timings.get("merge", 0.0) + seconds
        return MergeResult(spec, hp, self.taskset, vectors, merged, seconds)
