"""Spectral merges of one module's task matrices: Iso-C, Iso-CTS and TSV-M.

- Iso-C and Iso-CTS: Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and
  Task-Specific Subspaces", ICML 2025; danielm1405/iso-merging, ``src/utils/iso.py`` (``iso_c``,
  ``iso_cts``).
- TSV-M: Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR
  2025; AntoAndGar/task_singular_vectors, ``src/utils/TSVM_utils.py``
  (``compute_and_sum_svd_mem_reduction``).

Each function takes a task stack ``(n, a, b)`` and returns the merged ``(a, b)`` matrix, before the
method's scaling. The stack is either the dense updates or their exact cores in orthonormal bases
(``dW_t = U C_t V``): every step (SVDs, projections, orthogonal polar factors) commutes with such a change
of basis, so merging the cores and rebuilding gives the merge of the dense updates. Where each task is
also given as factors ``C_t = L_t R_t`` (rank ``r``), its SVDs go through two thin QRs and an
``(r x r)`` SVD (:func:`factored_svd`) instead of an SVD of the whole ``(a x b)`` matrix.

The authors' code runs on full-rank weight updates. On LoRA updates, whose rank is far below the
matrix size, their SVDs also return singular vectors with zero singular values: an arbitrary completion
of the basis that still enters their orthogonalized factors and isotropic spectra. Here only components
with non-zero singular values (above :func:`rank_tolerance`) take part, which makes every merge
well-defined and exactly low-rank; on full-rank inputs nothing is dropped and the results are the
authors' (tested side by side).
"""

from __future__ import annotations

from typing import Sequence

import torch

Factors = Sequence[tuple[torch.Tensor, torch.Tensor]]

#: Singular values at or below this fraction of the largest task's Frobenius norm count as zero (or
#: below 64 rounding errors of the dtype the task matrices were stored in, if that is larger).
RANK_RTOL = 1e-10


def rank_tolerance(stack: torch.Tensor, stored: torch.dtype | None = None) -> float:
    """The zero threshold for singular values of a module's task matrices (or sums of them)."""
    if stack.numel() == 0:
        return 0.0
    relative = max(RANK_RTOL, 64 * torch.finfo(stored or stack.dtype).eps)
    return relative * float(stack.flatten(1).norm(dim=1).max())


def polar(matrix: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor ``U V^T`` of ``matrix = U S V^T`` (thin SVD)."""
    u, _, vt = torch.linalg.svd(matrix, full_matrices=False)
    return u @ vt


def factored_svd(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact thin SVD of ``left @ right`` (``(a x r) @ (r x b)``) through thin QRs of both factors."""
    q_left, r_left = torch.linalg.qr(left)
    q_right, r_right = torch.linalg.qr(right.T)
    u, s, vt = torch.linalg.svd(r_left @ r_right.T, full_matrices=False)
    return q_left @ u, s, vt @ q_right.T


def nonzero_svd(
    matrix: torch.Tensor, tolerance: float, limit: int | None = None, factors: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD's leading components (at most ``limit``) whose singular values exceed ``tolerance``;
    through ``factors`` (``matrix = left @ right``) where given."""
    u, s, vt = factored_svd(*factors) if factors is not None else torch.linalg.svd(matrix, full_matrices=False)
    keep = int((s > tolerance).sum())
    if limit is not None:
        keep = min(keep, limit)
    return u[:, :keep], s[:keep], vt[:keep]


def iso_c(stack: torch.Tensor, tolerance: float) -> torch.Tensor:
    """Iso-C: the sum of the task matrices with its singular values replaced by their mean.

    ``sum_t W_t = U S V^T`` -> ``mean(S) U V^T`` over the non-zero singular values (``iso.py``,
    ``iso_c``: ``U diag(S.mean()) V``).
    """
    u, s, vt = nonzero_svd(stack.sum(dim=0), tolerance)
    if s.numel() == 0:
        return torch.zeros(stack.shape[1:], dtype=stack.dtype)
    return s.mean() * (u @ vt)


def common_space_split(d: int, n_tasks: int, fraction: float) -> tuple[int, int]:
    """``(common, per_task)``: the sizes of Iso-CTS's common subspace and of each task's subspace.

    As ``iso.py`` computes them: ``int(d * fraction)`` common directions, then the task-specific
    remainder rounded (Python's ``round``) to a multiple of the number of tasks, the common size taking
    the difference, so that ``common + n_tasks * per_task == d``. Where the rounding would exceed ``d``
    (fractions near 0), one direction per task fewer is taken.
    """
    common = int(d * fraction)
    task_total = round((d - common) / n_tasks) * n_tasks
    if task_total > d:
        task_total -= n_tasks
    common = d - task_total
    return common, int((d - common) / n_tasks)


def concat_triplets(triplets: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVDs side by side: the left vectors as columns, the singular values, the right vectors as rows."""
    lefts, values, rights = zip(*triplets)
    return torch.cat(lefts, dim=1), torch.cat(values), torch.cat(rights, dim=0)


def iso_cts(stack: torch.Tensor, d: int, fraction: float, tolerance: float, factors: Factors | None = None) -> torch.Tensor:
    """Iso-CTS: the sum's top directions plus each task's own, orthogonalized, with an isotropic spectrum.

    ``iso.py``, ``iso_cts``: the top ``common`` singular triplets of the sum; each task's update with the
    common left directions projected out, and its top ``per_task`` triplets; the stacked left and right
    vectors replaced by their orthogonal polar factors; every singular value replaced by the mean of
    all kept ones. ``d`` is the number of directions shared out (the authors' ``min(O, I)``; see
    :func:`knots.merging.methods.iso_cts`).
    """
    common, per_task = common_space_split(d, stack.shape[0], fraction)
    u_common, s_common, vt_common = nonzero_svd(stack.sum(dim=0), tolerance, common)
    triplets = []
    for index, task in enumerate(stack):
        if factors is None:
            triplets.append(nonzero_svd(task - u_common @ (u_common.T @ task), tolerance, per_task))
        else:
            left, right = factors[index]
            triplets.append(nonzero_svd(task, tolerance, per_task, (left - u_common @ (u_common.T @ left), right)))
    lefts, singular, rights = concat_triplets([*triplets, (u_common, s_common, vt_common)])
    if singular.numel() == 0:
        return torch.zeros(stack.shape[1:], dtype=stack.dtype)
    return singular.mean() * (polar(lefts) @ polar(rights))


def tsv_per_task(d: int, n_tasks: int) -> int:
    """Singular components TSV-M keeps per task: ``int(d * (1 / n))``, as ``TSVM_utils.py`` computes it."""
    return int(d * (1 / n_tasks))


def tsv(stack: torch.Tensor, per_task: int, tolerance: float, factors: Factors | None = None) -> torch.Tensor:
    """TSV-M: every task's top singular triplets, decorrelated through orthogonal polar factors.

    ``TSVM_utils.py``, ``compute_and_sum_svd_mem_reduction``: the first ``per_task`` triplets of every
    task, concatenated (``U_cat``, ``S_cat``, ``V_cat``); the result is
    ``polar(U_cat) diag(S_cat) polar(V_cat^T)^T``.
    """
    lefts, singular, rights = concat_triplets([nonzero_svd(task, tolerance, per_task, None if factors is None else factors[index])
                                               for index, task in enumerate(stack)])
    if singular.numel() == 0:
        return torch.zeros(stack.shape[1:], dtype=stack.dtype)
    return (polar(lefts) * singular) @ polar(rights)
