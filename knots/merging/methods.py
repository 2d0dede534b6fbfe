"""The built-in merge methods. Each is one function; the KnOTS and Core Space variants reuse the same
function on the aligned blocks (``space='knots'``) or on the cores (``space='core'``) instead of the full
updates."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from knots.merging import spectral
from knots.merging.family import Hyperparameters, Stages, merge_family
from knots.merging.registry import register
from knots.merging.vectors import TaskVectors

TA_REF = "Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023"
TIES_REF = "Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023"
DARE_REF = "Yu et al., Language Models are Super Mario (DARE), ICML 2024"
KNOTS_REF = "Stoica, Ramesh et al., Model Merging with SVD to Tie the KnOTS, ICLR 2025"
KNOTS_ROW_REF = KNOTS_REF + " (Sec. 5.4 ablation: row-wise concatenation)"
ISO_REF = (
    "Marczak et al., No Task Left Behind: Isotropic Model Merging with Common and Task-Specific Subspaces, "
    "ICML 2025 (danielm1405/iso-merging, src/utils/iso.py: {})"
)
TSV_REF = (
    "Gargiulo et al., Task Singular Vectors: Reducing Task Interference in Model Merging, CVPR 2025 "
    "(AntoAndGar/task_singular_vectors, src/utils/TSVM_utils.py: compute_and_sum_svd_mem_reduction)"
)
CORE_REF = (
    "Panariello et al., Accurate and Efficient Low-Rank Model Merging in Core Space, NeurIPS 2025 "
    "(apanariello4/core-space-merging, task_merger.py: MatrixPerLayerMerger, {})"
)
FAMILY_OPTIONS = ("trim_scope", "sign_vote", "merge_func")


@register("ta", "dense", TA_REF, uses=("scaling", "merge_func"), linear=True)
@register("knots_ta", "knots", KNOTS_REF, uses=("scaling", "merge_func"), linear=True)
@register("core_ta", "core", CORE_REF.format("merge_method='tv'"), uses=("scaling", "merge_func"), linear=True)
def task_arithmetic(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """Task arithmetic: scaling times the sum (or mean) of the task vectors."""
    return merge_family(vectors, hp, Stages(), progress)


@register("ties", "dense", TIES_REF, uses=("scaling", "top_k", *FAMILY_OPTIONS))
@register("knots_ties", "knots", KNOTS_REF, uses=("scaling", "top_k", *FAMILY_OPTIONS))
@register("knots_row_ties", "knots_row", KNOTS_ROW_REF, uses=("scaling", "top_k", *FAMILY_OPTIONS))
@register("core_ties", "core", CORE_REF.format("merge_method='ties', per-layer top-K (_process_ties)"), uses=("scaling", "top_k", *FAMILY_OPTIONS))
def ties(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """TIES: top-K% magnitude trim per task, sign election, disjoint merge, scaling."""
    return merge_family(vectors, hp, Stages(trim=True, elect=True), progress)


@register("dare", "dense", DARE_REF, uses=("scaling", "p", "seed", "merge_func"))
@register("knots_dare", "knots", KNOTS_REF, uses=("scaling", "p", "seed", "merge_func"))
def dare(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """DARE: random drop with rescaling per task, then task arithmetic."""
    return merge_family(vectors, hp, Stages(drop=True), progress)


@register("dare_ties", "dense", DARE_REF, uses=("scaling", "p", "seed", "top_k", *FAMILY_OPTIONS))
@register("knots_dare_ties", "knots", KNOTS_REF, uses=("scaling", "p", "seed", "top_k", *FAMILY_OPTIONS))
@register("core_dare_ties", "core", CORE_REF.format("merge_method='dare-ties': get_dare_delta_w, then _process_ties"), uses=("scaling", "p", "seed", "top_k", *FAMILY_OPTIONS))
def dare_ties(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """DARE-TIES: DARE's random drop, then TIES (top-K 100 by default: no magnitude trim)."""
    return merge_family(vectors, hp, Stages(drop=True, trim=True, elect=True), progress)


ModuleMerge = Callable[[torch.Tensor, str, float], torch.Tensor]


def per_module(vectors: TaskVectors, merge: ModuleMerge, hp: Hyperparameters, progress: bool, label: str) -> dict[str, torch.Tensor]:
    """Apply ``merge(stack, module, tolerance)`` to every module's task stack in float64, with the zero
    threshold for its singular values; scale by ``hp.scaling``."""
    merged = {}
    for module in tqdm(vectors.modules, desc=label, unit="module", disable=not progress, leave=False):
        stack = vectors.stack(module)
        work = stack.to(torch.float64)
        merged[module] = hp.scaling * merge(work, module, spectral.rank_tolerance(work, stack.dtype)).to(stack.dtype)
    return merged


@register("iso_c", "subspace", ISO_REF.format("iso_c"))
@register("core_iso_c", "core", CORE_REF.format("merge_method='tv' with isotropize=True (isotropize_matrix)"))
def iso_c(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """Iso-C: the sum of the task updates with a flat spectrum (every singular value their mean), scaled."""
    return per_module(vectors, lambda stack, module, tolerance: spectral.iso_c(stack, tolerance), hp, progress, "Iso-C")


@register("iso_cts", "subspace", ISO_REF.format("iso_cts"), uses=("scaling", "common_space_fraction"))
def iso_cts(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """Iso-CTS: the sum's top directions plus each task's own, orthogonalized, with a flat spectrum, scaled.

    The directions shared out are the dimension of the tasks' joint space, ``min(out, in, sum of
    ranks)``: the authors' ``min(out, in)`` for full-rank updates. On LoRA updates ``min(out, in)``
    would put every direction of the sum (rank at most the sum of ranks) in the common space for any
    fraction above ``sum of ranks / min(out, in)``, which is Iso-C.
    """

    def merge(stack: torch.Tensor, module: str, tolerance: float) -> torch.Tensor:
        d = vectors.joint_rank(module)
        return spectral.iso_cts(stack, d, hp.common_space_fraction, tolerance, vectors.task_factors(module))

    return per_module(vectors, merge, hp, progress, "Iso-CTS")


@register("tsv_m", "subspace", TSV_REF)
def tsv_m(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """TSV-M: each task's top 1/n singular vectors, decorrelated by orthogonal polar factors, scaled.

    Each task keeps ``int(min(out, in) / n)`` components, as on the dense update, or fewer where its
    rank is lower.
    """

    def merge(stack: torch.Tensor, module: str, tolerance: float) -> torch.Tensor:
        per_task = spectral.tsv_per_task(min(vectors.shape(module)), stack.shape[0])
        return spectral.tsv(stack, per_task, tolerance, vectors.task_factors(module))

    return per_module(vectors, merge, hp, progress, "TSV-M")


@register("core_tsv", "core", CORE_REF.format("merge_method='tsv' (get_tsv_delta_w)"))
def core_tsv(vectors: TaskVectors, hp: Hyperparameters, progress: bool = False) -> dict[str, torch.Tensor]:
    """TSV-M on the Core Space cores: each task keeps 1/n of the core's rank, scaled."""

    def merge(stack: torch.Tensor, module: str, tolerance: float) -> torch.Tensor:
        per_task = spectral.tsv_per_task(min(stack.shape[1:]), stack.shape[0])
        return spectral.tsv(stack, per_task, tolerance, vectors.task_factors(module))

    return per_module(vectors, merge, hp, progress, "Core TSV")
