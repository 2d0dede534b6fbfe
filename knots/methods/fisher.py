"""Fisher merging (Matena & Raffel, NeurIPS 2022; KnOTS paper App. E, Table A1): diagonal Fisher
information of each finetuned model and the Fisher-weighted average of the targeted weights.

**Fisher.** The diagonal of the Fisher information of the model's predictive distribution, estimated
on N training inputs of the task (Matena & Raffel, eq. 4)::

    F = 1/N sum_n E_{y ~ p(y | x_n)} [ (d/dW log p(y | x_n))^2 ]

``kind="exact"`` takes the expectation over classes exactly (one backward pass per class), as Matena
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

**The method** ``fisher`` (``conf/method/fisher.yaml``): the Fisher of each finetuned model (the backbone
with the task's update applied, logits through the task's own head, zero-shot or trained:
:mod:`knots.heads`) from its first ``num_examples`` training inputs, over the LoRA-targeted weights,
then the merge above. App. E searches ``num_examples`` in {256, 512, 1024, 2048} and the scaling in
0.1..1.0. A task with fewer training inputs uses all of them. The Fisher is accumulated in one pass per
task, continued (not restarted) when a search asks for a larger N, and kept for the last N asked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.errors import ConfigError
from knots.methods import register_method
from knots.methods.base import MergedModel, MergeInputs
from knots.models.apply import applied
from knots.models.base import to_device

REFERENCE = "Matena & Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022"
FISHER_KINDS = ("exact", "sampled", "empirical")
#: Inputs per batch of the Fisher passes (they keep a graph for the backward passes).
FISHER_BATCH = 32

FisherKind = Literal["exact", "sampled", "empirical"]
FISHER_FLOOR = 1e-6


def fisher_targets(
    logits: torch.Tensor,
    kind: FisherKind = "exact",
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(targets, weights)`` pairs, one backward pass each: ``F`` sums ``weight * (grad log p(target))^2``.

    ``"exact"``: every class ``c`` with weight ``p(c | x)`` (classes with zero probability everywhere,
    e.g. masked with ``-inf`` logits, are skipped); ``"sampled"``: one ``y ~ p(y | x)`` with weight 1;
    ``"empirical"``: the labels with weight 1.
    """
    probabilities = torch.softmax(logits.detach().to(torch.float64), dim=-1)
    batch = logits.shape[0]
    if kind == "exact":
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
    raise ValueError(f"unknown Fisher kind {kind!r}; expected 'exact', 'sampled' or 'empirical'")


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
    of the objective w.r.t. the layer's output). Returns ``(O, I)``. One row per example needs no
    per-example matrix: ``sum_n (g_n x_n^T)^2 = (G^2)^T (X^2)``. Per-example gradients are formed in at
    least float32 (float64 inputs stay float64), their squares summed in float64.
    """
    dtype = torch.promote_types(torch.promote_types(inputs.dtype, grad_outputs.dtype), torch.float32)
    x, g = inputs.detach().to(dtype), grad_outputs.detach().to(dtype)
    if x.dim() == 2:
        return (g.to(torch.float64) ** 2).T @ (x.to(torch.float64) ** 2)
    if x.dim() != 3 or g.dim() != 3 or x.shape[:2] != g.shape[:2]:
        raise ValueError(f"inputs {tuple(x.shape)} and output gradients {tuple(g.shape)} do not match")
    out = torch.zeros((g.shape[-1], x.shape[-1]), dtype=torch.float64, device=x.device)
    for start in range(0, x.shape[0], chunk):
        per_example = torch.einsum("bto,bti->boi", g[start:start + chunk], x[start:start + chunk])
        out += (per_example.to(torch.float64) ** 2).sum(dim=0)
    return out


class DiagonalFisher:
    """Running sums of squared per-example gradients (in ``dtype``, on the CPU); ``result()`` divides by
    the inputs counted."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        self.dtype = dtype
        self.sums: dict[str, torch.Tensor] = {}
        self.examples = 0

    def add(self, name: str, squared_grads: torch.Tensor) -> None:
        squared_grads = squared_grads.detach().to(device="cpu", dtype=self.dtype)
        if name in self.sums:
            self.sums[name] += squared_grads
        else:
            self.sums[name] = squared_grads.clone()

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
    kind: FisherKind = "exact",
    labels_fn: Callable[[Any], torch.Tensor] | None = None,
    checkpoints: Sequence[int] | None = None,
    seed: int = 0,
    fisher: DiagonalFisher | None = None,
    generator: torch.Generator | None = None,
) -> dict[int, dict[str, torch.Tensor]]:
    """The diagonal Fisher of the weights of ``modules`` (``nn.Linear`` paths in ``model``).

    ``logits_fn(batch)`` runs ``model`` on a batch; ``batch_size(batch)`` counts its inputs.
    ``checkpoints``: numbers of inputs after which the running Fisher is kept, so one pass gives the
    Fisher for every N searched (App. E: 256, 512, 1024, 2048); batches must end on them, and the
    pass stops at the last. Returns ``{N: {module: F (out, in)}}``; without checkpoints, N is every
    input counted. ``fisher`` and ``generator`` (seeded with ``seed`` when not given) carry a pass on
    from where an earlier call left it. The model runs in eval mode (no dropout); only the targeted
    weights take part in the backward passes, and every ``requires_grad`` flag is restored.
    """
    named = dict(model.named_modules())
    missing = [m for m in modules if not isinstance(named.get(m), nn.Linear)]
    if missing:
        raise ValueError(f"module {missing[0]!r} is not an nn.Linear of the model")
    wanted = sorted(set(checkpoints or []))
    generator = generator if generator is not None else torch.Generator().manual_seed(seed)
    fisher = fisher if fisher is not None else DiagonalFisher()
    inputs: dict[str, torch.Tensor] = {}
    outputs: dict[str, torch.Tensor] = {}

    def capture(name: str):
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            inputs[name], outputs[name] = args[0].detach(), output

        return hook

    targets = {named[m].weight for m in modules}
    flags = [(p, p.requires_grad) for p in model.parameters()]
    handles = [named[m].register_forward_hook(capture(m)) for m in modules]
    was_training = model.training
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for parameter, _ in flags:  # the graph must reach every targeted layer (frozen or not), and nothing else
            parameter.requires_grad_(parameter in targets)
        model.eval()
        with torch.enable_grad():
            for batch in batches:
                size = batch_size(batch)
                if wanted and fisher.examples < wanted[0] < fisher.examples + size:
                    raise ValueError(f"a batch crosses the checkpoint {wanted[0]}: end batches on the checkpoints")
                inputs.clear()
                outputs.clear()
                logits = logits_fn(batch)
                reached = [m for m in modules if m in outputs and outputs[m].requires_grad]
                pairs = fisher_targets(logits, kind, labels_fn(batch) if labels_fn else None, generator)
                for index, (classes, weights) in enumerate(pairs):
                    objective = log_likelihood_objective(logits, classes, weights)
                    grads = torch.autograd.grad(objective, [outputs[m] for m in reached], retain_graph=index < len(pairs) - 1,
                                                allow_unused=True)
                    for m, grad in zip(reached, grads):
                        if grad is not None:
                            fisher.add(m, linear_squared_grads(inputs[m], grad))
                fisher.count(size)
                while wanted and fisher.examples >= wanted[0]:
                    snapshots[wanted.pop(0)] = fisher.result()
                if checkpoints and not wanted:
                    break
    finally:
        for handle in handles:
            handle.remove()
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
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


# -- the registered method ------------------------------------------------------------------------
def task_heads(inputs: MergeInputs) -> Any:
    """The heads the finetuned models predict with: the run's, else the adapters' trained heads, else
    zero-shot heads built by the frozen backbone."""
    from knots.heads import HeadSet

    if inputs.heads is not None:
        return inputs.heads
    if all(a.head is not None for a in inputs.adapters):
        return HeadSet.trained({a.task: a.head for a in inputs.adapters}, inputs.tasks)
    embeddings = {t.name: inputs.backbone.class_embeddings(t.class_names, t.templates).float().cpu() for t in inputs.tasks}
    return HeadSet.zero_shot(embeddings, inputs.tasks)


@dataclass
class FisherStream:
    """One task's running Fisher over its training inputs, in order: ``position`` inputs so far."""

    fisher: DiagonalFisher
    generator: torch.Generator
    position: int = 0


@dataclass
class FisherCache:
    """Every task's stream, and the Fishers of the last ``(kind, N)`` asked for."""

    streams: dict[tuple[str, int], FisherStream] = field(default_factory=dict)
    last: tuple[tuple[str, int], list[dict[str, torch.Tensor]]] | None = None


def _batches(rows: Sequence[Any], start: int, stop: int) -> Iterator[list[Any]]:
    for begin in range(start, stop, FISHER_BATCH):
        yield list(rows[begin:min(begin + FISHER_BATCH, stop)])


def advance(inputs: MergeInputs, index: int, stream: FisherStream, stop: int, kind: str, modules: Sequence[str]) -> None:
    """Add task ``index``'s training inputs ``stream.position:stop`` to its stream's Fisher."""
    task, adapter = inputs.tasks[index], inputs.adapters[index]
    heads = task_heads(inputs)
    head = heads.per_task[task.name]
    backbone = inputs.backbone
    rows = task.train

    def logits(batch: list[Any]) -> torch.Tensor:
        collated = to_device(backbone.collate([x for x, _ in batch]), backbone.device)
        return head.logits(heads.prepare(backbone.encoder(collated)))

    batches = _batches(rows, stream.position, stop)
    if inputs.progress:
        batches = tqdm(batches, total=-(-(stop - stream.position) // FISHER_BATCH), desc=f"fisher {task.name}", leave=False)
    with applied(backbone.encoder, adapter.adapter.delta_state_dict()):
        diagonal_fisher(backbone.encoder, modules, batches, logits, len, kind,  # type: ignore[arg-type]
                        labels_fn=lambda batch: torch.tensor([y for _, y in batch]), fisher=stream.fisher,
                        generator=stream.generator)
    stream.position = stop


def task_fishers(inputs: MergeInputs, num_examples: int, kind: str) -> list[dict[str, torch.Tensor]]:
    """Each finetuned model's diagonal Fisher ``{"<module>.weight": F}`` over its first
    ``num_examples`` training inputs (all of them when the task has fewer)."""
    cache: FisherCache = inputs.cached("fisher_streams", FisherCache)
    if cache.last is not None and cache.last[0] == (kind, num_examples):
        return cache.last[1]
    cache.last = None  # free the previous N's Fishers before computing these
    modules = sorted(inputs.adapters[0].adapter.modules)
    out = []
    for index, task in enumerate(inputs.tasks):
        stop = min(num_examples, len(task.train))
        stream = cache.streams.get((kind, index))
        if stream is None or stream.position > stop:  # a smaller N than the stream has passed: start again
            stream = cache.streams[(kind, index)] = FisherStream(DiagonalFisher(torch.float32), torch.Generator().manual_seed(index))
        if stream.position < stop:
            advance(inputs, index, stream, stop, kind, modules)
        out.append({f"{m}.weight": f for m, f in stream.fisher.result().items()})
    cache.last = ((kind, num_examples), out)
    return out


def check(params: dict[str, Any]) -> None:
    if "scaling" in params and not params["scaling"] > 0:
        raise ConfigError(f"fisher scaling must be > 0, got {params['scaling']}")
    if "num_examples" in params and params["num_examples"] < 1:
        raise ConfigError(f"fisher num_examples must be >= 1, got {params['num_examples']}")
    if "fisher" in params and params["fisher"] not in FISHER_KINDS:
        raise ConfigError(f"unknown fisher kind {params['fisher']!r}; expected one of {', '.join(FISHER_KINDS)}")


@register_method("fisher", reference=REFERENCE, uses=("scaling", "num_examples", "fisher", "normalize"), check=check)
def fisher(inputs: MergeInputs, scaling: float, num_examples: int, fisher: str, normalize: bool) -> MergedModel:
    """Fisher merging: per entry, the Fisher-weighted average of the finetuned updates, times ``scaling``."""
    fishers = task_fishers(inputs, num_examples, fisher)
    deltas = inputs.cached("finetuned_deltas", lambda: [a.adapter.delta_state_dict() for a in inputs.adapters])
    return MergedModel(fisher_merge_state(deltas, fishers, scaling, normalize))
