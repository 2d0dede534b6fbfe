"""Fisher merging (Matena & Raffel, NeurIPS 2022; KnOTS paper App. E, Table A1): diagonal Fisher
information of each finetuned model and the Fisher-weighted average of the targeted weights.

**Fisher.** The diagonal of the Fisher information of the model's predictive distribution, estimated
on N training inputs of the task (Matena & Raffel, eq. 4)::

    F = 1/N sum_n E_{y ~ p(y | x_n)} [ (d/dW log p(y | x_n))^2 ]

``kind="true"`` takes the expectation over classes exactly (one backward pass per class), as Matena
& Raffel do for classification; ``"sampled"`` draws one ``y`` per input from ``p(y | x)`` (an
unbiased estimate at one backward pass); ``"empirical"`` uses the true label instead (the "empirical
Fisher"). Gradients are per example: for a linear layer ``y = W x`` applied to the tokens ``x_t`` of
one input, ``d/dW = sum_t g_t x_t^T``, squared entry-wise, then averaged over inputs.
FusionBench's ``fisher_merging`` (tanganke/fusion_bench, ``method/fisher_merging/fisher_merging.py``,
after MergeLM) instead squares the gradient of ``sum_{n,y} sqrt(p_y) log p_y`` over a whole batch, which
adds cross terms between the inputs and the classes of a batch; it is not reproduced here.

**Merge.** Per entry, with a floor ``eps`` against zero Fisher (1e-6, as in Matena & Raffel's code and
FusionBench's ``minimal_fisher_weight``) and optional per-model coefficients ``c_i``::

    W = W_0 + scaling * sum_i c_i (F_i + eps) dW_i / sum_i c_i (F_i + eps)

which is the Fisher-weighted average of the finetuned weights ``W_i = W_0 + dW_i`` when ``scaling``
is 1 (the weights of every entry sum to one). ``normalize=True`` sets ``c_i = 1 / ||F_i||`` over all
merged tensors, FusionBench's ``normalize_fisher_weight`` (its extra common factor cancels).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import nn

FisherKind = Literal["true", "sampled", "empirical"]
FISHER_FLOOR = 1e-6


def fisher_targets(
    logits: torch.Tensor,
    kind: FisherKind = "true",
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(targets, weights)`` pairs, one backward pass each: ``F`` sums ``weight * (grad log p(target))^2``.

    ``"true"``: every class ``c`` with weight ``p(c | x)`` (classes with zero probability everywhere,
    e.g. masked with ``-inf`` logits, are skipped); ``"sampled"``: one ``y ~ p(y | x)`` with weight 1;
    ``"empirical"``: the labels with weight 1.
    """
    probabilities = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    batch = logits.shape[0]
    if kind == "true":
        return [
            (torch.full((batch,), c, dtype=torch.long, device=logits.device), probabilities[:, c])
            for c in range(logits.shape[-1])
            if probabilities[:, c].max() > 0
        ]
    ones = torch.ones(batch, dtype=torch.float64, device=logits.device)
    if kind == "sampled":
        return [(torch.multinomial(probabilities.cpu(), 1, generator=generator).squeeze(1).to(logits.device), ones)]
    if kind == "empirical":
        if labels is None:
            raise ValueError("the empirical Fisher needs the labels")
        return [(labels.to(logits.device).long(), ones)]
    raise ValueError(f"unknown Fisher kind {kind!r}; expected 'true', 'sampled' or 'empirical'")


def log_likelihood_objective(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``sum_n sqrt(w_n) log p(targets_n | x_n)``: its per-example gradients, squared, are ``w_n (grad log p)^2``.

    Entries with zero weight contribute nothing (also when their log-probability is ``-inf``).
    """
    log_p = torch.log_softmax(logits, dim=-1).gather(1, targets[:, None]).squeeze(1)
    keep = weights > 0
    root = weights.sqrt().to(log_p.dtype)
    return torch.where(keep, root * torch.where(keep, log_p, torch.zeros_like(log_p)), torch.zeros_like(log_p)).sum()


def linear_squared_grads(inputs: torch.Tensor, grad_outputs: torch.Tensor, chunk: int = 16) -> torch.Tensor:
    """``sum_n (G_n^T X_n)^2`` for a linear layer: per-example weight gradients, squared, summed over the batch.

    ``inputs``: ``(B, I)`` or ``(B, T, I)``; ``grad_outputs``: ``(B, O)`` or ``(B, T, O)`` (the gradient
    of the objective w.r.t. the layer's output). Returns ``(O, I)`` in float64. One row per example
    needs no per-example matrix: ``sum_n (g_n x_n^T)^2 = (G^2)^T (X^2)``.
    """
    x, g = inputs.detach().to(torch.float64), grad_outputs.detach().to(torch.float64)
    if x.dim() == 2:
        return (g ** 2).T @ (x ** 2)
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"inputs {tuple(x.shape)} and output gradients {tuple(g.shape)} do not match")
    out = torch.zeros((g.shape[-1], x.shape[-1]), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        per_example = torch.einsum("bto,bti->boi", g[start:start + chunk], x[start:start + chunk])
        out += (per_example ** 2).sum(dim=0)
    return out


class DiagonalFisher:
    """Running sums of squared per-example gradients; ``result()`` divides by the inputs counted."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.examples = 0

    def add(self, name: str, squared_grads: torch.Tensor) -> None:
        squared_grads = squared_grads.detach().to(device="cpu", dtype=torch.float64)
        self.sums[name] = self.sums[name] + squared_grads if name in self.sums else squared_grads.clone()

    def count(self, examples: int) -> None:
        self.examples += examples

    def result(self) -> dict[str, torch.Tensor]:
        if self.examples == 0:
            raise ValueError("no examples were accumulated")
        return {name: total / self.examples for name, total in self.sums.items()}


def diagonal_fisher(
    model: nn.Module,
    modules: Sequence[str],
    batches: Iterable[Any],
    logits_fn: Callable[[Any], torch.Tensor],
    batch_size: Callable[[Any], int],
    kind: FisherKind = "true",
    labels_fn: Callable[[Any], torch.Tensor] | None = None,
    checkpoints: Sequence[int] | None = None,
    seed: int = 0,
) -> dict[int, dict[str, torch.Tensor]]:
    """The diagonal Fisher of the weights of ``modules`` (``nn.Linear`` paths in ``model``).

    ``logits_fn(batch)`` runs ``model`` on a batch; ``batch_size(batch)`` counts its inputs.
    ``checkpoints``: numbers of inputs after which the running Fisher is kept, so one pass gives the
    Fisher for every N searched (App. E: 256, 512, 1024, 2048); batches must end on them, and the
    pass stops at the last. Returns ``{N: {module: F (out, in)}}``; without checkpoints, N is every
    input given. The model runs in eval mode (no dropout); its gradients are cleared.
    """
    named = dict(model.named_modules())
    missing = [m for m in modules if not isinstance(named.get(m), nn.Linear)]
    if missing:
        raise ValueError(f"module {missing[0]!r} is not an nn.Linear of the model")
    wanted = sorted(set(checkpoints or []))
    generator = torch.Generator().manual_seed(seed)
    fisher = DiagonalFisher()
    inputs: dict[str, torch.Tensor] = {}
    grads: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name] = args[0].detach()
            if output.requires_grad:
                output.register_hook(lambda g: grads.__setitem__(name, g.detach()))

        return hook

    handles = [named[m].register_forward_hook(capture(m)) for m in modules]
    weights = [named[m].weight for m in modules]
    trainable = [w.requires_grad for w in weights]
    was_training = model.training
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for w in weights:  # the graph must reach every targeted layer, frozen or not
            w.requires_grad_(True)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                size = batch_size(batch)
                if wanted and fisher.examples < wanted[0] < fisher.examples + size:
                    raise ValueError(f"a batch crosses the checkpoint {wanted[0]}: end batches on the checkpoints")
                logits = logits_fn(batch)
                pairs = fisher_targets(logits, kind, labels_fn(batch) if labels_fn else None, generator)
                for index, (targets, target_weights) in enumerate(pairs):
                    grads.clear()
                    objective = log_likelihood_objective(logits, targets, target_weights)
                    objective.backward(retain_graph=index < len(pairs) - 1)
                    for m in modules:
                        if m in grads:
                            fisher.add(m, linear_squared_grads(inputs[m], grads[m]))
                model.zero_grad(set_to_none=True)
                fisher.count(size)
                while wanted and fisher.examples >= wanted[0]:
                    snapshots[wanted.pop(0)] = fisher.result()
                if checkpoints and not wanted:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for w, flag in zip(weights, trainable):
            w.requires_grad_(flag)
            w.grad = None
        model.train(was_training)
    if wanted:
        raise ValueError(f"only {fisher.examples} inputs were given; checkpoint {wanted[0]} not reached")
    if checkpoints is None:
        snapshots[fisher.examples] = fisher.result()
    return snapshots


def fisher_merge(
    deltas: Sequence[torch.Tensor],
    fishers: Sequence[torch.Tensor],
    scaling: float = 1.0,
    coefficients: Sequence[float] | None = None,
    floor: float = FISHER_FLOOR,
) -> torch.Tensor:
    """``scaling * sum_i c_i (F_i + floor) dW_i / sum_i c_i (F_i + floor)`` for one tensor."""
    if not deltas or len(deltas) != len(fishers):
        raise ValueError("need one Fisher per update, at least one of each")
    if floor < 0:
        raise ValueError(f"the Fisher floor must be >= 0, got {floor}")
    c = [1.0] * len(deltas) if coefficients is None else list(coefficients)
    if len(c) != len(deltas) or any(v <= 0 for v in c):
        raise ValueError("coefficients must be positive, one per update")
    numerator = torch.zeros_like(deltas[0], dtype=torch.float64)
    denominator = torch.zeros_like(deltas[0], dtype=torch.float64)
    for ci, delta, fisher in zip(c, deltas, fishers):
        if fisher.shape != delta.shape:
            raise ValueError(f"Fisher of shape {tuple(fisher.shape)} for an update of shape {tuple(delta.shape)}")
        weight = ci * (fisher.to(torch.float64) + floor)
        numerator += weight * delta.to(torch.float64)
        denominator += weight
    if (denominator <= 0).any():
        raise ValueError("an entry has zero Fisher in every model; use a positive floor")
    return (scaling * numerator / denominator).to(deltas[0].dtype)


def fisher_norms(fishers: Sequence[Mapping[str, torch.Tensor]]) -> list[float]:
    """Each model's Fisher L2 norm over all merged tensors (FusionBench's ``get_models_fisher_norm``)."""
    return [float(torch.sqrt(sum((f.to(torch.float64) ** 2).sum() for f in fisher.values()))) for fisher in fishers]


def fisher_merge_state(
    deltas: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    scaling: float = 1.0,
    normalize: bool = False,
    floor: float = FISHER_FLOOR,
) -> dict[str, torch.Tensor]:
    """The merged update of every tensor in the tasks' ``deltas`` (``{name: dW_i}``), Fisher-weighted.

    ``normalize``: weight model i by ``1 / ||F_i||`` (its whole-model Fisher norm) so that models with
    a larger Fisher overall do not dominate every entry.
    """
    names = list(deltas[0])
    for index, (delta, fisher) in enumerate(zip(deltas, fishers)):
        if set(delta) != set(names) or set(fisher) != set(names):
            raise ValueError(f"task {index}: updates and Fisher must cover the same tensors as task 0")
    coefficients = None
    if normalize:
        norms = fisher_norms(fishers)
        if any(n == 0 for n in norms):
            raise ValueError("a model's Fisher is zero everywhere; it cannot be normalized")
        coefficients = [1.0 / n for n in norms]
    return {
        name: fisher_merge([d[name] for d in deltas], [f[name] for f in fishers], scaling, coefficients, floor)
        for name in names
    }
