"""RegMean (Jin et al., ICLR 2023): merge linear layers by the closed-form least-squares solution.

For a linear layer ``y = W x`` with per-task weights ``W_i`` and input Gram matrices
``G_i = X_i^T X_i``, the merged weight minimizing ``sum_i ||X_i W^T - X_i W_i^T||^2`` is
``W^T = (sum_i G_i)^{-1} sum_i G_i W_i^T``. ``alpha`` scales the off-diagonal entries of every
``G_i`` (``alpha = 1`` is the exact solution; smaller values pull it toward a weighted average).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.models.base import Backbone


def regmean_merge(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float, ridge: float = 1e-6) -> torch.Tensor:
    """Merged ``(out, in)`` weight from per-task weights ``(out, in)`` and input Grams ``(in, in)``.

    ``ridge`` (relative to the mean diagonal) keeps the solve well-posed when a Gram is rank-deficient.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if len(weights) != len(grams) or not weights:
        raise ValueError("need one Gram matrix per weight, at least one of each")
    lhs = torch.zeros_like(grams[0], dtype=torch.float64)
    rhs = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64)
    for w, g in zip(weights, grams):
        g = g.to(torch.float64)
        g = alpha * g + (1.0 - alpha) * torch.diag_embed(torch.diagonal(g))
        lhs += g
        rhs += g @ w.to(torch.float64).T
    eye = torch.eye(lhs.shape[0], dtype=torch.float64)
    lhs += ridge * torch.diagonal(lhs).mean().clamp_min(1e-12) * eye
    return torch.linalg.solve(lhs, rhs).T.to(weights[0].dtype)


@torch.no_grad()
def input_grams(backbone: Backbone, modules: Sequence[str], inputs: Sequence, batch_size: int, desc: str | None = None) -> dict[str, torch.Tensor]:
    """Gram matrices ``X^T X`` of the inputs of ``modules`` (paths in the encoder) over ``inputs``,
    counting real tokens only, for the encoder in its current state."""
    named = dict(backbone.encoder.named_modules())
    grams: dict[str, torch.Tensor] = {}
    mask_box: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            x = args[0].detach().to(torch.float64)
            x = x.reshape(-1, x.shape[-1])
            mask = mask_box[0]
            if mask is not None and mask.numel() == x.shape[0]:
                x = x[mask.reshape(-1).bool()]
            g = x.T @ x
            grams[name] = grams[name] + g if name in grams else g

        return fn

    handles = [named[m].register_forward_hook(hook(m)) for m in modules]
    try:
        backbone.encoder.eval()
        starts = range(0, len(inputs), batch_size)
        for i in tqdm(starts, desc=desc, disable=desc is None, leave=False):
            batch = backbone.collate(list(inputs[i : i + batch_size]))
            mask_box[0] = backbone.token_mask(batch)
            batch = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            backbone.encoder(batch)
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in grams.items()}
