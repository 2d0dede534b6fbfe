"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

For a linear layer ``y = W x`` with per-task weights ``W_i`` and input Gram matrices
``G_i = X_i^T X_i``, the merged weight minimizing ``sum_i ||X_i W^T - X_i W_i^T||^2`` is
``W^T = (sum_i G_i)^{-1} sum_i G_i W_i^T``. ``alpha`` scales the off-diagonal entries of every
``G_i`` (``alpha = 1`` is the exact solution; smaller values pull it toward a weighted average).
The Gram matrices come from ``num_examples`` training inputs per task, through each finetuned model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.errors import ConfigError
from knots.methods import register_method
from knots.methods.base import MergedModel, MergeInputs
from knots.models.apply import applied, lora_updates
from knots.models.base import Backbone, to_device

REFERENCE = "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023"


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
            backbone.encoder(to_device(batch, backbone.device))
    finally:
        for h in handles:
            h.remove()
    return {k: v.cpu() for k, v in grams.items()}


def check(params: dict[str, Any]) -> None:
    alpha, num_examples = params.get("alpha", 0.0), params.get("num_examples", 1)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ConfigError(f"regmean.alpha must be a number, got {alpha!r}")
    if isinstance(num_examples, bool) or not isinstance(num_examples, int):
        raise ConfigError(f"regmean.num_examples must be an integer, got {num_examples!r}")
    if "alpha" in params and not 0.0 <= params["alpha"] <= 1.0:
        raise ConfigError(f"regmean alpha must be in [0, 1], got {params['alpha']}")
    if "num_examples" in params and params["num_examples"] < 1:
        raise ConfigError(f"regmean num_examples must be >= 1, got {params['num_examples']}")


def task_grams(inputs: MergeInputs, num_examples: int) -> list[dict[str, torch.Tensor]]:
    """Each finetuned model's Gram matrices over its own task's first ``num_examples`` training inputs."""
    modules = sorted(inputs.adapters[0].adapter.modules)
    grams = []
    for task, adapter in zip(inputs.tasks, inputs.adapters):
        rows = [x for x, _ in task.train[:num_examples]]
        with applied(inputs.backbone.encoder, lora_updates(adapter.adapter)):
            grams.append(input_grams(inputs.backbone, modules, rows, inputs.batch_size,
                                     f"regmean grams {task.name}" if inputs.progress else None))
    return grams


@register_method("regmean", reference=REFERENCE, uses=("alpha", "num_examples"), check=check)
def regmean(inputs: MergeInputs, alpha: float, num_examples: int) -> MergedModel:
    """RegMean: per linear layer, the least-squares merge of the finetuned weights on their tasks' inputs."""
    modules = sorted(inputs.adapters[0].adapter.modules)
    grams = inputs.cached(("regmean_grams", num_examples), lambda: task_grams(inputs, num_examples))
    params = dict(inputs.backbone.encoder.named_parameters())
    base = inputs.cached("base_weights", lambda: {f"{m}.weight": params[f"{m}.weight"].detach().clone() for m in modules})
    deltas = inputs.cached("finetuned_deltas", lambda: [a.adapter.delta_state_dict() for a in inputs.adapters])
    out = {}
    for m in modules:
        key = f"{m}.weight"
        weights = [base[key] + d[key] for d in deltas]
        out[key] = regmean_merge(weights, [g[m] for g in grams], alpha) - base[key]
    return MergedModel(out)
