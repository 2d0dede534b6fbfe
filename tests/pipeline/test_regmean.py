"""RegMean's closed form against its definition (least squares over every task's inputs)."""

from __future__ import annotations

import pytest
import torch

from knots.methods.regmean import regmean_merge


def _problem(n_tasks=3, n=40, d_in=6, d_out=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d_in, generator=g, dtype=torch.float64) * (i + 1) for i in range(n_tasks)]
    ws = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(n_tasks)]
    return xs, ws


def test_alpha_one_is_the_least_squares_solution():
    xs, ws = _problem()
    merged = regmean_merge(ws, [x.T @ x for x in xs], alpha=1.0, ridge=0.0)
    # solve min_W sum_i ||X_i W^T - X_i W_i^T||^2 directly by stacking
    X = torch.cat(xs)
    Y = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    expected = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-8)


def test_alpha_zero_is_a_diagonal_weighted_average():
    xs, ws = _problem()
    diags = [torch.diagonal(x.T @ x) for x in xs]
    merged = regmean_merge(ws, [x.T @ x for x in xs], alpha=0.0, ridge=0.0)
    expected = sum(w * d for w, d in zip(ws, diags)) / sum(diags)
    torch.testing.assert_close(merged, expected, rtol=1e-8, atol=1e-8)


def test_one_task_or_equal_weights_are_returned_unchanged():
    xs, ws = _problem(n_tasks=1)
    torch.testing.assert_close(regmean_merge(ws, [xs[0].T @ xs[0]], alpha=0.7, ridge=0.0), ws[0])
    xs, ws = _problem(n_tasks=2)
    same = [ws[0], ws[0]]
    torch.testing.assert_close(regmean_merge(same, [x.T @ x for x in xs], alpha=0.5, ridge=0.0), ws[0])


def test_rank_deficient_grams_stay_finite_with_ridge():
    x = torch.randn(2, 6, dtype=torch.float64)  # rank 2 < 6
    merged = regmean_merge([torch.randn(3, 6, dtype=torch.float64)] * 2, [x.T @ x] * 2, alpha=1.0)
    assert torch.isfinite(merged).all()


def test_bad_alpha():
    xs, ws = _problem()
    with pytest.raises(ValueError, match="alpha"):
        regmean_merge(ws, [x.T @ x for x in xs], alpha=1.5)
