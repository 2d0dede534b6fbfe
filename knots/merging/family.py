"""One parameterised implementation of the task-arithmetic family: TA, TIES, DARE, DARE-TIES.

Every member is ``scaling * combine(elect(trim(drop(x_i))))`` with stages switched on or off; the same
code runs on full updates (the baselines) and on KnOTS-aligned blocks. Trimming is per task over the
whole-model vector by default (``trim_scope='model'``), as in the TIES reference, and is computed in
streaming passes so that no module's dense update is held longer than needed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from tqdm.auto import tqdm

from knots.errors import ConfigError
from knots.merging import functions as F
from knots.merging.vectors import TaskVectors

TrimScope = Literal["model", "module"]


@dataclass(frozen=True)
class Hyperparameters:
    """Merge hyperparameters, with explicit units.

    scaling: lambda, one coefficient for all tasks. top_k: percent of entries kept per task by the
    magnitude trim, in (0, 100]. p: DARE drop probability, in [0, 1). seed: DARE's random seed.
    common_space_fraction: Iso-CTS's share of the merged rank given to the sum's top directions, in
    [0, 1] (the rest goes to the tasks' own directions).
    """

    scaling: float = 1.0
    top_k: float = 100.0
    p: float = 0.0
    seed: int = 0
    trim_scope: TrimScope = "model"
    sign_vote: F.SignVote = "mass"
    merge_func: F.MergeFunc = "mean"
    common_space_fraction: float = 0.8

    def __post_init__(self) -> None:
        if not (isinstance(self.scaling, (int, float)) and self.scaling == self.scaling and abs(self.scaling) != float("inf")):
            raise ConfigError(f"method.scaling must be a finite number, got {self.scaling!r}")
        if not 0 < self.top_k <= 100:
            raise ConfigError(f"method.top_k is a percent in (0, 100], got {self.top_k}")
        if not 0 <= self.p < 1:
            raise ConfigError(f"method.p (DARE drop rate) must be in [0, 1), got {self.p}")
        if not 0 <= self.common_space_fraction <= 1:
            raise ConfigError(f"method.common_space_fraction (Iso-CTS) must be in [0, 1], got {self.common_space_fraction}")
        choices = {"trim_scope": ("model", "module"), "sign_vote": ("mass", "count"), "merge_func": ("mean", "sum")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"method.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class Stages:
    """Which stages of the family a method runs."""

    drop: bool = False
    trim: bool = False
    elect: bool = False


def dropped_stack(vectors: TaskVectors, module: str, hp: Hyperparameters, stages: Stages) -> torch.Tensor:
    """The module's task stack after DARE (seeded per task and module, so passes agree)."""
    stack = vectors.stack(module)
    if not (stages.drop and hp.p > 0):
        return stack
    return torch.stack([F.dare(task, hp.p, F.seeded_generator(hp.seed, index, module)) for index, task in enumerate(stack)])


def model_thresholds(vectors: TaskVectors, hp: Hyperparameters, stages: Stages) -> torch.Tensor:
    """Per-task magnitude thresholds of a top-K trim over the whole-model vector."""
    numel = sum(vectors.task_numel(module) for module in vectors.modules)
    ranks = [F.kth_smallest_rank(numel, hp.top_k)] * len(vectors.tasks)

    def chunks():
        for module in vectors.modules:
            yield dropped_stack(vectors, module, hp, stages).abs()

    return F.streaming_kth_smallest(chunks, ranks, total=numel)


def merge_module(stack: torch.Tensor, hp: Hyperparameters, stages: Stages, thresholds: torch.Tensor | None, fallback_sign: torch.Tensor | None = None) -> tuple[torch.Tensor, float, bool]:
    """Merge one module's (dropped) task stack.

    Returns the merged tensor, the sum of the elected signs, and whether some entry's vote tied
    while holding non-zero values (such entries take ``fallback_sign``).
    """
    if stages.trim and hp.top_k < 100:
        if thresholds is None:
            thresholds = torch.stack([F.magnitude_threshold(task, hp.top_k) for task in stack])
        stack = F.trim(stack, thresholds)
    if not stages.elect:
        return hp.scaling * F.combine(stack, hp.merge_func), 0.0, False
    sign = F.elect_sign(stack, hp.sign_vote)
    tied = sign == 0
    if fallback_sign is not None:
        sign = torch.where(tied, fallback_sign.to(sign.dtype), sign)
    total, count = F.agreeing_sum_and_count(stack, sign)
    # A tied entry holding values has negatives among them (its values cancel), so count > 0 there.
    has_ties = fallback_sign is None and bool((tied & (count > 0)).any())
    return hp.scaling * F.finish_disjoint(total, count, hp.merge_func), float(sign.sum()), has_ties


def merge_family(vectors: TaskVectors, hp: Hyperparameters, stages: Stages, progress: bool = False) -> dict[str, torch.Tensor]:
    """Merge every module; returns the merged tensor per module, in the vectors' space.

    Entries whose sign vote ties take the sign held by most elected entries (TIES's majority rule),
    counted over the trim scope: the whole model or the module.
    """
    thresholds = None
    if stages.trim and hp.top_k < 100 and hp.trim_scope == "model":
        thresholds = model_thresholds(vectors, hp, stages)
    merged: dict[str, torch.Tensor] = {}
    tied: list[str] = []
    sign_total = 0.0
    for module in tqdm(vectors.modules, desc="merge", unit="module", disable=not progress, leave=False):
        stack = dropped_stack(vectors, module, hp, stages)
        merged[module], sign_sum, has_ties = merge_module(stack, hp, stages, thresholds)
        sign_total += sign_sum
        if not has_ties:
            continue
        if hp.trim_scope == "module":
            fallback = torch.sign(torch.tensor(sign_sum))
            if fallback != 0:
                merged[module], _, _ = merge_module(stack, hp, stages, None, fallback)
        else:
            tied.append(module)
    if tied:
        fallback = torch.sign(torch.tensor(sign_total))
        if fallback != 0:
            for module in tied:
                merged[module], _, _ = merge_module(dropped_stack(vectors, module, hp, stages), hp, stages, thresholds, fallback)
    return merged
