"""Independent dense implementations of Iso-C, Iso-CTS, TSV-M and the Core Space merges, in NumPy.

Written from the papers' definitions on dense ``(out, in)`` updates, without the engine's code: plain
SVDs of the dense matrices, components with zero singular values left out (see
``knots.merging.spectral``).
"""

from __future__ import annotations

import numpy as np

ZERO = 1e-9  # relative to the largest singular value of the matrix at hand or of the tasks


def svd(matrix: np.ndarray, scale: float, limit: int | None = None):
    u, s, vt = np.linalg.svd(matrix, full_matrices=False)
    keep = int(np.sum(s > ZERO * scale))
    keep = keep if limit is None else min(keep, limit)
    return u[:, :keep], s[:keep], vt[:keep]


def orthogonal_factor(matrix: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    return u @ vt


def task_scale(updates: list[np.ndarray]) -> float:
    return max(np.linalg.norm(update, 2) for update in updates)


def iso_c(updates: list[np.ndarray], scaling: float) -> np.ndarray:
    u, s, vt = svd(sum(updates), task_scale(updates))
    return scaling * s.mean() * u @ vt


def iso_cts(updates: list[np.ndarray], d: int, fraction: float, scaling: float) -> np.ndarray:
    n = len(updates)
    common = int(d * fraction)
    specific = round((d - common) / n) * n
    if specific > d:  # the authors' code fails here; one direction per task fewer
        specific -= n
    common = d - specific
    per_task = specific // n
    scale = task_scale(updates)
    uc, sc, vtc = svd(sum(updates), scale, common)
    parts = []
    for update in updates:
        residual = (np.eye(update.shape[0]) - uc @ uc.T) @ update
        parts.append(svd(residual, scale, per_task))
    parts.append((uc, sc, vtc))
    U = np.concatenate([p[0] for p in parts], axis=1)
    S = np.concatenate([p[1] for p in parts])
    Vt = np.concatenate([p[2] for p in parts], axis=0)
    return scaling * S.mean() * orthogonal_factor(U) @ orthogonal_factor(Vt)


def tsv_m(updates: list[np.ndarray], per_task: int, scaling: float) -> np.ndarray:
    scale = task_scale(updates)
    parts = [svd(update, scale, per_task) for update in updates]
    U = np.concatenate([p[0] for p in parts], axis=1)
    S = np.concatenate([p[1] for p in parts])
    Vt = np.concatenate([p[2] for p in parts], axis=0)
    return scaling * orthogonal_factor(U) @ np.diag(S) @ orthogonal_factor(Vt)


def positive_largest(columns: np.ndarray) -> np.ndarray:
    """Flip each column so that its largest-magnitude entry (the first, on near-ties) is positive."""
    out = columns.copy()
    for j in range(columns.shape[1]):
        magnitudes = np.abs(columns[:, j])
        first = int(np.argmax(magnitudes >= magnitudes.max() * (1 - 1e-6)))
        if columns[first, j] < 0:
            out[:, j] = -columns[:, j]
    return out


def core_basis(Bs: list[np.ndarray], As: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """``U_ref`` (left singular vectors of the stacked B) and ``V_ref`` (right singular vectors of the
    stacked A, as rows), signs fixed."""
    U = np.linalg.svd(np.concatenate(Bs, axis=1), full_matrices=False)[0]
    V = np.linalg.svd(np.concatenate(As, axis=0), full_matrices=False)[2]
    return positive_largest(U), positive_largest(V.T).T


def ties(stacks: list[np.ndarray], top_k: float, scaling: float) -> list[np.ndarray]:
    """TIES over one flat vector per task made of every stack (mass vote, disjoint mean)."""
    flat = np.concatenate([s.reshape(s.shape[0], -1) for s in stacks], axis=1)
    n, d = flat.shape
    if top_k < 100:
        kth = np.sort(np.abs(flat), axis=1)[:, d - int(d * (top_k / 100)) - 1][:, None]
        flat = flat * (np.abs(flat) >= kth)
    sign = np.sign(flat.sum(0))
    sign[sign == 0] = np.sign(sign.sum())
    agree = np.where(sign > 0, flat > 0, flat < 0)
    merged = scaling * (flat * agree).sum(0) / np.maximum(agree.sum(0), 1)
    out, offset = [], 0
    for s in stacks:
        size = s[0].size
        out.append(merged[offset:offset + size].reshape(s.shape[1:]))
        offset += size
    return out
