"""Linear CKA between the outputs of task updates, accumulated in one streaming pass (paper Sec. 3, Fig. 2).

Linear CKA (Kornblith et al., ICML 2019, eq. 5) compares two representations ``X`` (N x p) and ``Y``
(N x q) of the same N inputs, each column-centred::

    CKA(X, Y) = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)

It is invariant to orthogonal transforms and isotropic scaling of either representation.

**The views.** Per targeted module and for the same inputs ``x`` (the module's inputs in the
pretrained model), every view is a linear map of ``x``:

- ``lora``: ``dW_i x = s_i B_i (A_i x)``;
- ``knots``: ``V_i^T x``, where ``[dW_1 .. dW_n] = U S [V_1^T .. V_n^T]`` (paper Fig. 2c). Since ``U``
  has orthonormal columns, ``V_i^T x = S^-1 U^T dW_i x = S^-1 U^T s_i B_i (A_i x)``. The row-scaled
  blocks ``S V_i^T`` that the merges act on are *not* used: ``S V_i^T x = U^T dW_i x`` is ``dW_i x``
  seen through the same isometry for every task, so its CKA equals the ``lora`` view's exactly
  (``knots_scaled`` computes it, as a check). Dropping ``S`` gives every shared direction unit weight,
  which is what can make the aligned views agree more than the raw updates (the reference code,
  gstoica27/KnOTS, has no CKA script to compare with);
- ``full``: ``(W_i - W_0) x``, dense full-finetuning updates.

So each view is ``z_i = P_i c`` for a *code* ``c`` shared by all tasks: the stacked ``[A_1 x; ..; A_n x]``
(dimension ``n r``) for ``lora`` and ``knots``, and ``x`` itself (dimension ``I``) for ``full``. With
the code's centred covariance ``C = L L^T``, the output cross-covariance is ``P_i C P_j^T = Y_i Y_j^T``
(``Y_i = P_i L``), and ``||Y_i Y_j^T||_F^2 = <H_i, H_j>_F`` with ``H_i = L^T P_i^T P_i L``. Hence

    CKA_ij = <H_i, H_j> / (||H_i|| ||H_j||),

which needs only the code's running mean and covariance (streamed over the inputs) and each task's
Gram ``P_i^T P_i`` (``s_i^2 B_i^T B_i`` for ``lora``: r x r).

**Memory** per module, independent of the number of inputs: while the inputs stream, ``(n r)^2 + n r``
accumulated floats for ``lora`` and ``knots`` together (plus the stacked ``A_i``, ``n r I``, and an
``r x r`` Gram per task), and ``I^2 + I`` for ``full``, independent of the number of tasks when the
full updates are given as a function that ``result()`` calls (the analysis reads them from the cache
then, one module at a time: ``n O I`` floats, transiently). ``result()`` also forms ``n`` matrices of
the code's size. Inputs are rows: every token of a sequence is one row (padding removed with ``mask``).

**The analysis** ``cka`` (``knots-run 'analyses=[cka]'``, options in ``conf/analysis/cka.yaml``) feeds
every targeted module's inputs in the pretrained model, over the validation inputs of all tasks, to
these accumulators, in one forward pass (or one per ``modules_per_pass`` modules). The full view's
models are trained with ``finetune.mode=full`` (:mod:`knots.pipeline.full`), cached like adapters,
only when that view is asked for.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from knots.analyses import AnalysisContext, register_analysis
from knots.errors import ConfigError
from knots.lora import LoraModule, parameter_layout
from knots.merging.alignment import SINGULAR_VALUE_TOLERANCE, ModuleAlignment, align_factored, factor_pairs

VIEWS = ("lora", "knots", "full")


def _centre(x: torch.Tensor) -> torch.Tensor:
    x = x.to(torch.float64)
    return x - x.mean(dim=0, keepdim=True)


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA of two representations ``(N, p)`` and ``(N, q)`` of the same N inputs (batch)."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"representations of different inputs: {x.shape[0]} and {y.shape[0]} rows")
    x, y = _centre(x), _centre(y)
    cross = torch.linalg.matrix_norm(y.T @ x) ** 2
    norm = torch.linalg.matrix_norm(x.T @ x) * torch.linalg.matrix_norm(y.T @ y)
    return float(cross / norm) if norm > 0 else float("nan")


def cka_matrix(features: Sequence[torch.Tensor]) -> torch.Tensor:
    """The n x n linear CKA of every pair of representations ``(N, d_i)`` (batch reference)."""
    n = len(features)
    out = torch.empty((n, n), dtype=torch.float64)
    for i in range(n):
        for j in range(i, n):
            out[i, j] = out[j, i] = linear_cka(features[i], features[j])
    return out


class MomentAccumulator:
    """Running count, mean and centred scatter of code vectors, merged batch by batch (float64).

    Batches are combined with the parallel update of Chan, Golub and LeVeque (1979), which keeps the
    centring exact without subtracting large uncentred moments.
    """

    def __init__(self, dim: int) -> None:
        self.count = 0
        self.mean = torch.zeros(dim, dtype=torch.float64)
        self.scatter = torch.zeros((dim, dim), dtype=torch.float64)

    def update(self, codes: torch.Tensor) -> None:
        """Add rows of codes; the running state lives on the codes' device (float64)."""
        codes = codes.detach().to(torch.float64).reshape(-1, self.mean.numel())
        m = codes.shape[0]
        if m == 0:
            return
        if self.mean.device != codes.device:
            self.mean, self.scatter = self.mean.to(codes.device), self.scatter.to(codes.device)
        batch_mean = codes.mean(dim=0)
        centred = codes - batch_mean
        delta = batch_mean - self.mean
        total = self.count + m
        self.scatter += centred.T @ centred + torch.outer(delta, delta) * (self.count * m / total)
        self.mean += delta * (m / total)
        self.count = total

    def covariance(self) -> torch.Tensor:
        """The centred covariance (scatter / count), on the CPU."""
        if self.count == 0:
            raise ValueError("no inputs were accumulated")
        return (self.scatter / self.count).cpu()


@dataclass(frozen=True)
class TaskMap:
    """One task's view ``z = P c[start:stop]`` of the code, given by its Gram ``P^T P`` or by ``P`` itself."""

    start: int
    stop: int
    gram: torch.Tensor | None = None
    factor: torch.Tensor | None = None

    def spectrum(self, root: torch.Tensor) -> torch.Tensor:
        """``H = L^T P^T P L`` for the covariance root rows ``L`` of this map's code slice."""
        block = root[self.start:self.stop]
        if self.factor is not None:
            projected = self.factor.to(torch.float64) @ block
            return projected.T @ projected
        assert self.gram is not None
        return block.T @ self.gram.to(torch.float64) @ block


def covariance_root(covariance: torch.Tensor, tolerance: float = 1e-12) -> torch.Tensor:
    """``L`` with ``L L^T = covariance`` (PSD), keeping eigen-directions above ``tolerance`` x the largest."""
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance.to(torch.float64))
    top = eigenvalues.max().clamp_min(0.0)
    keep = eigenvalues > tolerance * top if top > 0 else eigenvalues > 0
    return eigenvectors[:, keep] * eigenvalues[keep].sqrt()


def cka_from_covariance(covariance: torch.Tensor, maps: Sequence[TaskMap | None]) -> torch.Tensor:
    """The n x n CKA of the views ``P_i c`` from the code's centred covariance and each view's Gram.

    A view that is zero (``None`` or a zero Gram: a module the task does not target) has NaN CKA.
    """
    root = covariance_root(covariance)
    spectra = [None if task_map is None else task_map.spectrum(root) for task_map in maps]
    n = len(maps)
    out = torch.full((n, n), float("nan"), dtype=torch.float64)
    norms = [None if h is None else torch.linalg.matrix_norm(h) for h in spectra]
    for i in range(n):
        for j in range(i, n):
            if spectra[i] is None or spectra[j] is None or norms[i] == 0 or norms[j] == 0:
                continue
            out[i, j] = out[j, i] = (spectra[i] * spectra[j]).sum() / (norms[i] * norms[j])
    return out


#: A view's task maps, or a function that makes them when the result is computed (e.g. reading large
#: full-finetuning updates from disk then, one module at a time, instead of holding them while streaming).
Maps = list[TaskMap | None] | Callable[[], list[TaskMap | None]]


@dataclass
class CodeStream:
    """Views that are linear maps of one code ``c = code_map @ x`` (``code_map`` None: ``c = x``)."""

    code_map: torch.Tensor | None
    views: dict[str, Maps]
    moments: MomentAccumulator

    def update(self, inputs: torch.Tensor) -> None:
        dtype = torch.promote_types(inputs.dtype, torch.float32)  # never form codes in half precision
        inputs = inputs.to(dtype)
        codes = inputs if self.code_map is None else inputs @ self.code_map.T.to(device=inputs.device, dtype=dtype)
        self.moments.update(codes)

    def result(self) -> dict[str, torch.Tensor]:
        covariance = self.moments.covariance()
        return {name: cka_from_covariance(covariance, maps() if callable(maps) else maps) for name, maps in self.views.items()}


@dataclass
class ModuleCKA:
    """The CKA views of one module, fed with the module's inputs batch by batch."""

    in_features: int
    streams: list[CodeStream] = field(default_factory=list)

    @property
    def views(self) -> list[str]:
        return [name for stream in self.streams for name in stream.views]

    @property
    def accumulated_floats(self) -> int:
        """Floats held by the accumulators (independent of the number of inputs)."""
        return sum(s.moments.scatter.numel() + s.moments.mean.numel() for s in self.streams)

    @property
    def held_floats(self) -> int:
        """Everything held while inputs stream: the accumulators, the code maps and the task maps
        given as tensors (maps made at ``result()`` are not held)."""
        total = self.accumulated_floats
        for stream in self.streams:
            total += 0 if stream.code_map is None else stream.code_map.numel()
            for maps in stream.views.values():
                if not callable(maps):
                    total += sum(t.numel() for m in maps if m is not None for t in (m.gram, m.factor) if t is not None)
        return total

    def update(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add a batch of inputs ``(..., in_features)``; ``mask`` (``inputs.shape[:-1]``) keeps real tokens."""
        if inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs have {inputs.shape[-1]} features, the module takes {self.in_features}")
        rows = inputs.detach().reshape(-1, self.in_features)
        if mask is not None:
            rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
        for stream in self.streams:
            stream.update(rows)

    def result(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for stream in self.streams:
            out.update(stream.result())
        return out


def knots_projections(row: Sequence[LoraModule | None], alignment: ModuleAlignment, scaled: bool = False) -> list[torch.Tensor | None]:
    """Each task's ``S^-1 U^T s_i B_i`` (``scaled``: ``U^T s_i B_i``): its KnOTS view of ``A_i x``."""
    U = alignment.U.to(torch.float64)
    inverse = torch.ones_like(alignment.singular_values, dtype=torch.float64) if scaled else 1.0 / alignment.singular_values.to(torch.float64)
    return [None if lora is None else inverse[:, None] * (U.T @ lora.scaled_B(torch.float64)) for lora in row]


FullDeltas = Sequence[torch.Tensor | None] | Callable[[], Sequence[torch.Tensor | None]]


def module_cka(
    row: Sequence[LoraModule | None],
    views: Sequence[str] = ("lora", "knots"),
    full_deltas: FullDeltas | None = None,
    alignment: ModuleAlignment | None = None,
    knots_scaled: bool = False,
    tolerance: float = SINGULAR_VALUE_TOLERANCE,
    in_features: int | None = None,
) -> ModuleCKA:
    """The CKA accumulator of one module from its tasks' LoRA factors (``None``: task not targeted).

    ``full_deltas``: each task's dense ``W_i - W_0`` (``(out, in)``), needed for the ``full`` view, or a
    function returning them, called once when the result is computed (so they are not held while the
    inputs stream). ``alignment``: the module's column KnOTS alignment; computed here in float64 when
    not given. ``in_features``: the module's input width, needed only without LoRA factors and with
    ``full_deltas`` given as a function.
    """
    unknown = [v for v in views if v not in VIEWS]
    if unknown:
        raise ValueError(f"unknown CKA view {unknown[0]!r}; expected one of {', '.join(VIEWS)}")
    present = [lora for lora in row if lora is not None]
    if not present and any(v in views for v in ("lora", "knots")):
        raise ValueError("no task targets this module")
    given = [] if full_deltas is None or callable(full_deltas) else [d for d in full_deltas if d is not None]
    if in_features is None:
        if not present and not given:
            raise ValueError("no task updates this module")
        in_features = present[0].shape[1] if present else given[0].shape[1]
    module = ModuleCKA(in_features=in_features)
    low_rank = [v for v in views if v in ("lora", "knots")]
    if low_rank:
        slices, offset = [], 0
        for lora in row:
            slices.append(None if lora is None else (offset, offset + lora.rank))
            offset += 0 if lora is None else lora.rank
        code_map = torch.cat([lora.A.to(torch.float64) for lora in present], dim=0)
        stream_views: dict[str, list[TaskMap | None]] = {}
        if "lora" in low_rank:
            stream_views["lora"] = [
                None if lora is None else TaskMap(*span, lora.scaled_B(torch.float64).T @ lora.scaled_B(torch.float64))
                for lora, span in zip(row, slices)
            ]
        if "knots" in low_rank:
            if alignment is None:
                alignment = align_factored(factor_pairs(list(row), "column", torch.float64), tolerance)
            projections = knots_projections(row, alignment, knots_scaled)
            stream_views["knots"] = [None if p is None else TaskMap(*span, p.T @ p) for p, span in zip(projections, slices)]
        module.streams.append(CodeStream(code_map, stream_views, MomentAccumulator(code_map.shape[0])))
    if "full" in views:
        if full_deltas is None or (not callable(full_deltas) and len(full_deltas) != len(row)):
            raise ValueError("the 'full' view needs one full-finetuning update W_i - W_0 per task")
        width = in_features

        def full_maps(deltas: Sequence[torch.Tensor | None]) -> list[TaskMap | None]:
            if len(deltas) != len(row):
                raise ValueError("the 'full' view needs one full-finetuning update W_i - W_0 per task")
            if all(d is None for d in deltas):
                raise ValueError("no task updates this module")
            return [None if d is None else TaskMap(0, width, factor=d) for d in deltas]

        maps: Maps = (lambda: full_maps(full_deltas())) if callable(full_deltas) else full_maps(full_deltas)
        module.streams.append(CodeStream(None, {"full": maps}, MomentAccumulator(in_features)))
    return module


def _plain(value: float) -> float | None:
    return None if value != value else round(value, 6)


def mean_offdiagonal(matrix: torch.Tensor) -> float:
    """The mean of a CKA matrix's off-diagonal entries (NaN ones skipped; NaN when none is left)."""
    n = matrix.shape[0]
    values = matrix[~torch.eye(n, dtype=torch.bool)]
    values = values[~values.isnan()]
    return float(values.mean()) if values.numel() else float("nan")


@dataclass
class CKAResult:
    """CKA matrices per view: averaged over modules (NaN entries skipped) and per module."""

    tasks: list[str]
    mean: dict[str, torch.Tensor]
    per_module: dict[str, dict[str, torch.Tensor]]
    inputs: int

    def mean_offdiagonal(self, view: str) -> float:
        """The average pairwise CKA between different tasks (the number the paper's Fig. 2 contrasts)."""
        return mean_offdiagonal(self.mean[view])

    def to_json(self) -> dict:
        """JSON-ready: tasks, per-view mean matrices and average pairwise CKA, module and input counts."""
        def plain(matrix: torch.Tensor) -> list[list[float | None]]:
            return [[None if v != v else round(float(v), 6) for v in row] for row in matrix.tolist()]

        return {
            "tasks": self.tasks,
            "views": {view: plain(matrix) for view, matrix in self.mean.items()},
            "mean_pairwise": {view: _plain(self.mean_offdiagonal(view)) for view in self.mean},
            "modules": len(self.per_module),
            "inputs": self.inputs,
        }


class CKAAccumulator:
    """CKA accumulators for a set of modules, fed with each module's inputs; averaged over modules."""

    def __init__(self, tasks: Sequence[str], modules: Mapping[str, ModuleCKA]) -> None:
        self.tasks = list(tasks)
        self.modules = dict(modules)

    @property
    def accumulated_floats(self) -> int:
        return sum(m.accumulated_floats for m in self.modules.values())

    @property
    def held_floats(self) -> int:
        return sum(m.held_floats for m in self.modules.values())

    def update(self, module: str, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.modules[module].update(inputs, mask)

    def result(self) -> CKAResult:
        per_module = {name: module.result() for name, module in self.modules.items()}
        counts = {m.streams[0].moments.count for m in self.modules.values() if m.streams}
        return combine_modules(self.tasks, per_module, max(counts, default=0))


def combine_modules(tasks: Sequence[str], per_module: Mapping[str, Mapping[str, torch.Tensor]], inputs: int) -> CKAResult:
    """Average per-module CKA matrices over modules (NaN entries skipped), view by view."""
    views = {v for result in per_module.values() for v in result}
    mean = {}
    for view in [v for v in VIEWS if v in views]:
        stack = torch.stack([result[view] for result in per_module.values() if view in result])
        mean[view] = stack.nanmean(dim=0)
    return CKAResult(tasks=list(tasks), mean=mean, per_module={k: dict(v) for k, v in per_module.items()}, inputs=inputs)


def cka_accumulator(
    taskset,
    views: Sequence[str] = ("lora", "knots"),
    full_deltas: Mapping[str, FullDeltas] | None = None,
    modules: Sequence[str] | None = None,
    knots_scaled: bool = False,
) -> CKAAccumulator:
    """Accumulators for every module of a :class:`~knots.merging.TaskSet` (or the ``modules`` given).

    ``full_deltas[module]``: each task's ``W_i - W_0`` for the ``full`` view (or a function returning them).
    """
    names = list(taskset.modules if modules is None else modules)
    built = {
        name: module_cka(taskset.factors[name], views, None if full_deltas is None else full_deltas[name], knots_scaled=knots_scaled,
                         in_features=taskset.shapes[name][1])
        for name in names
    }
    return CKAAccumulator(taskset.tasks, built)


# -- the registered analysis ----------------------------------------------------------------------
def full_deltas(context: AnalysisContext, overrides: Mapping[str, Any]) -> tuple[dict[str, FullDeltas], list[dict[str, Any]]]:
    """Per module, a function reading every task's full-finetuning update ``(out, in)`` from the cache
    (trained with the run's finetuning recipe, ``mode: full`` and ``overrides`` on top, or reused)."""
    from knots.pipeline.full import full_finetune_stage

    cfg = context.cfg
    finetune_cfg = full_settings(cfg.finetune, overrides)
    finetune_cfg.validate()
    zero_shot = None if context.models.trains_heads else context.evaluator.heads
    updates = full_finetune_stage(context.models, context.tasks, zero_shot, cfg, finetune_cfg, context.logger)
    taskset = context.inputs.session.taskset
    by_task = {u.task: u for u in updates}

    def reader(module: str) -> Callable[[], list[torch.Tensor | None]]:
        def read() -> list[torch.Tensor | None]:
            deltas = [by_task[task].tensor(f"{module}.weight") for task in taskset.tasks]
            return [None if d is None else parameter_layout(d, taskset.fan_in_fan_out(module)) for d in deltas]

        return read

    out: dict[str, FullDeltas] = {module: reader(module) for module in taskset.modules}
    info = [{k: u.info.get(k) for k in ("task", "path", "reused", "resumed_from", "final_loss", "train_seconds")} for u in updates]
    return out, info


@torch.no_grad()
def stream_inputs(backbone: Any, data: Any, accumulator: CKAAccumulator, progress: bool = False) -> None:
    """Feed every targeted module's inputs in the pretrained model, over ``data``'s collated batches
    (a :class:`~knots.taskpool.EvalSet`), to ``accumulator``; padding tokens are masked out."""
    from tqdm.auto import tqdm

    from knots.models.base import to_device

    named = dict(backbone.encoder.named_modules())
    mask_box: list[torch.Tensor | None] = [None]

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
            mask = mask_box[0]
            inputs = args[0]
            accumulator.update(name, inputs, mask if mask is not None and mask.numel() * inputs.shape[-1] == inputs.numel() else None)

        return fn

    handles = [named[m].register_forward_hook(hook(m)) for m in accumulator.modules]
    try:
        backbone.encoder.eval()
        for batch in tqdm(data.batches, desc="cka inputs", disable=not progress, leave=False):
            mask_box[0] = backbone.token_mask(batch)
            backbone.encoder(to_device(batch, backbone.device))
    finally:
        for handle in handles:
            handle.remove()


def check(options: Mapping[str, Any], cfg: Any = None) -> None:
    """The cka analysis's options, checked before any work; with the run config ``cfg``, also the full
    view's finetuning settings (the run's, ``full_finetune`` on top, ``mode: full``)."""
    from knots.config.schema import FinetuneConfig

    views = list(options.get("views", VIEWS))
    unknown = sorted(set(views) - set(VIEWS))
    if unknown or not views:
        raise ConfigError(f"cka views: expected some of {', '.join(VIEWS)}, got {', '.join(unknown) or 'none'}")
    per_pass = options.get("modules_per_pass")
    if per_pass is not None and per_pass < 1:
        raise ConfigError(f"cka modules_per_pass must be >= 1 or null, got {per_pass}")
    settings = {f.name for f in dataclasses.fields(FinetuneConfig)} - {"mode"}
    for key in options.get("full_finetune") or {}:
        if key not in settings:
            raise ConfigError(f"cka full_finetune: unknown finetuning setting {key!r}; known: {', '.join(sorted(settings))}")
    if cfg is not None and "full" in views:
        try:
            full_settings(cfg.finetune, options.get("full_finetune") or {}).validate()
        except ConfigError as error:
            raise ConfigError(f"cka view full (analysis_params.cka.full_finetune): {error}") from None


def full_settings(finetune: Any, overrides: Mapping[str, Any]) -> Any:
    """The full view's finetuning settings: the run's ``finetune``, ``overrides`` on top, ``mode: full``."""
    try:
        return dataclasses.replace(finetune, **{**overrides, "mode": "full"})
    except TypeError as error:
        raise ConfigError(f"cka full_finetune: {error}") from None


@register_analysis("cka", reference="Kornblith et al., ICML 2019 (linear CKA); Stoica, Ramesh et al., ICLR 2025, Sec. 3, Fig. 2",
                   check=check)
def cka_analysis(context: AnalysisContext, views: Sequence[str] = VIEWS, full_finetune: Mapping[str, Any] | None = None,
                 modules_per_pass: int | None = None) -> dict[str, Any]:
    """Linear CKA between the tasks' update outputs (full finetuning, LoRA, KnOTS) on the validation inputs."""
    from knots.analyses.figures import cka_figure, write_figures

    check({"views": views, "full_finetune": full_finetune, "modules_per_pass": modules_per_pass}, context.cfg)
    views = [v for v in VIEWS if v in views]
    seconds: dict[str, float] = {}
    taskset = context.inputs.session.taskset
    full, trained = None, []
    if "full" in views:
        start, cpu = time.perf_counter(), time.process_time()
        full, trained = full_deltas(context, full_finetune or {})
        seconds["full_finetune"], seconds["full_finetune_cpu"] = time.perf_counter() - start, time.process_time() - cpu
    start, cpu = time.perf_counter(), time.process_time()
    modules = list(taskset.modules)
    step = modules_per_pass or len(modules)
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    floats, inputs = 0, 0
    data = context.evaluator.data["validation"]
    for begin in range(0, len(modules), step):
        chunk = modules[begin:begin + step]
        accumulator = cka_accumulator(taskset, views, full, chunk)
        floats = max(floats, accumulator.held_floats)
        stream_inputs(context.models.backbone, data, accumulator, context.cfg.progress)
        result = accumulator.result()
        per_module.update(result.per_module)
        inputs = result.inputs
    combined = combine_modules(taskset.tasks, per_module, inputs)
    seconds["cka"], seconds["cka_cpu"] = time.perf_counter() - start, time.process_time() - cpu
    out = combined.to_json()
    out["per_module_pairwise"] = {
        module: {view: _plain(mean_offdiagonal(matrix)) for view, matrix in matrices.items()} for module, matrices in per_module.items()
    }
    out["held_floats"] = floats  # while the inputs stream, in the largest pass (float64)
    out["passes"] = -(-len(modules) // step)
    if trained:
        out["full_finetuning"] = trained
    out["seconds"] = seconds
    figure = cka_figure(out["views"], taskset.tasks)
    out["files"] = [str(p) for p in write_figures({"cka": figure}, context.directory("cka"), context.logger, "analysis/cka")]
    for view, matrix in out["views"].items():
        context.logger.table(f"analysis/cka/{view}", ["task", *taskset.tasks], [[t, *row] for t, row in zip(taskset.tasks, matrix)])
    context.logger.summary({f"analysis/cka/{view}_mean_pairwise": value for view, value in out["mean_pairwise"].items()})
    return out
