"""The built-in merge methods. Each is one function; the KnOTS variants reuse the same function on
the aligned blocks (``space='knots'``) instead of the full updates."""

from __future__ import annotations

import torch

from knots.merging.family import Hyperparameters, Stages, merge_family
from knots.merging.registry import register
from knots.merging.vectors import TaskVectors

TA_REF = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
TIES_REF = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"
DARE_REF = "Yu et al., Language Models are Super Mario (DARE), ICML 2024"
KNOTS_REF = "Stoica, Ramesh et al., Model Merging with SVD to Tie the KnOTS, ICLR 2025"
KNOTS_ROW_REF = KNOTS_REF + " (Sec. 5.4 ablation: row-wise concatenation)"


@register("ta", "dense", TA_REF, uses=("scaling", "merge_func"), linear=True)
@register("knots_ta", "knots", KNOTS_REF, uses=("scaling", "merge_func"), linear=True)
def task_arithmetic(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """Task arithmetic: scaling times the sum (or mean) of the task vectors."""
    return merge_family(vectors, hp, Stages(), progress)


@register("ties", "dense", TIES_REF, uses=("scaling", "top_k", "trim_scope", "sign_vote", "merge_func"))
@register("knots_ties", "knots", KNOTS_REF, uses=("scaling", "top_k", "trim_scope", "sign_vote", "merge_func"))
@register("knots_row_ties", "knots_row", KNOTS_ROW_REF, uses=("scaling", "top_k", "trim_scope", "sign_vote", "merge_func"))
def ties(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """TIES: top-K% magnitude trim per task, sign election, disjoint merge, scaling."""
    return merge_family(vectors, hp, Stages(trim=True, elect=True), progress)


@register("dare", "dense", DARE_REF, uses=("scaling", "p", "seed", "merge_func"))
@register("knots_dare", "knots", KNOTS_REF, uses=("scaling", "p", "seed", "merge_func"))
def dare(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """DARE: random drop with rescaling per task, then task arithmetic."""
    return merge_family(vectors, hp, Stages(drop=True), progress)


@register("dare_ties", "dense", DARE_REF, uses=("scaling", "p", "seed", "top_k", "trim_scope", "sign_vote", "merge_func"))
@register("knots_dare_ties", "knots", KNOTS_REF, uses=("scaling", "p", "seed", "top_k", "trim_scope", "sign_vote", "merge_func"))
def dare_ties(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """DARE-TIES: DARE's random drop, then TIES (top-K 100 by default: no magnitude trim)."""
    return merge_family(vectors, hp, Stages(drop=True, trim=True, elect=True), progress)
