"""The Core Space of a module's LoRA updates (Panariello et al., "Accurate and Efficient Low-Rank Model
Merging in Core Space", NeurIPS 2025).

Every task's update lies in the span of the stacked ``B``'s (columns) and of the stacked ``A``'s (rows).
With ``U_ref`` the left singular vectors of ``[s_1 B_1 .. s_n B_n]`` (``O x Tr``) and ``V_ref`` the right
singular vectors of ``[A_1; ..; A_n]`` (``Tr x I``), each task's core ``M_t = U_ref^T dW_t V_ref^T`` is a
small ``(k_o x k_i)`` matrix (``k_o = min(O, Tr)``, ``k_i = min(I, Tr)``) and ``dW_t = U_ref M_t V_ref``
exactly. Merges act on the cores and the result is rebuilt with the same two bases, so it is exactly
low-rank (rank at most ``min(k_o, k_i)``).

This follows ``MatrixPerLayerMerger.get_core_matrices`` in ``task_merger.py`` of
apanariello4/core-space-merging: the bases are singular vectors (not any orthonormal basis), because
entry-wise merges (TIES, DARE) depend on the coordinates. Their signs are fixed as in the KnOTS
alignment (:func:`~knots.merging.alignment.canonical_signs`; for ``V_ref``, per row), so that both paths
give the same cores.

The factored path never forms a task's ``dW``: a thin QR of the stacked ``B`` (``O x Tr``) and of the
stacked ``A^T`` (``I x Tr``) reduce the two SVDs to ``(Tr x Tr)`` ones, and
``M_t = (U_ref^T s_t B_t)(A_t V_ref^T)``. The dense path is the authors' computation: SVDs of the stacks
and ``M_t`` projected from the dense ``dW_t``.
"""

from __future__ import annotations

import torch

from knots.merging.alignment import ModuleAlignment, SvdPath, canonical_signs
from knots.merging.taskset import TaskSet


def stacked_factors(taskset: TaskSet, module: str, dtype: torch.dtype) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    """The tasks that adapt ``module``, with their scaled ``B``'s side by side and their ``A``'s stacked."""
    present = [index for index, lora in enumerate(taskset.factors[module]) if lora is not None]
    loras = [taskset.factors[module][index] for index in present]
    B = torch.cat([lora.scaled_B(dtype) for lora in loras], dim=1)
    A = torch.cat([lora.A.to(dtype) for lora in loras], dim=0)
    return present, B, A


def left_singular_vectors(matrix: torch.Tensor, path: SvdPath) -> tuple[torch.Tensor, torch.Tensor]:
    """``(U, S)`` of a tall-or-wide ``matrix``; factored: a thin QR, then the SVD of its small ``R``."""
    if path == "dense":
        U, S, _ = torch.linalg.svd(matrix, full_matrices=False)
        return U, S
    if path != "factored":
        raise ValueError(f"unknown SVD path {path!r}; expected 'factored' or 'dense'")
    q, r = torch.linalg.qr(matrix)
    u, S, _ = torch.linalg.svd(r, full_matrices=False)
    return q @ u, S


def core_module(taskset: TaskSet, module: str, path: SvdPath = "factored", dtype: torch.dtype = torch.float64) -> ModuleAlignment:
    """The Core Space of one module: ``U`` = ``U_ref``, ``V`` = ``V_ref`` (rows), ``blocks`` = the cores.

    ``singular_values`` holds those of the stacked ``B``. A task that does not adapt the module has a
    zero core.
    """
    present, B, A = stacked_factors(taskset, module, dtype)
    U, singular = left_singular_vectors(B, path)
    V_columns, _ = left_singular_vectors(A.T, path)
    U = U * canonical_signs(U)
    V = (V_columns * canonical_signs(V_columns)).T.contiguous()
    cores = torch.zeros((taskset.n_tasks, U.shape[1], V.shape[0]), dtype=dtype)
    for index in present:
        lora = taskset.factors[module][index]
        if path == "dense":
            cores[index] = U.T @ lora.delta(dtype) @ V.T
        else:
            cores[index] = (U.T @ lora.scaled_B(dtype)) @ (lora.A.to(dtype) @ V.T)
    return ModuleAlignment(U=U, blocks=cores, singular_values=singular, V=V)
