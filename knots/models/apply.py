"""Evaluating a model with an update applied: the targeted weights become ``base + delta``, in place.

A hyperparameter search evaluates many merged updates of one base model. At Llama3-8B scale a model
copy per search point is out of the question (16 GB in bf16), and add-then-subtract in bf16 does not
give the base weights back. :class:`WeightPatch` keeps one copy of exactly the targeted weights (the
base) and writes ``base + delta`` from it; :func:`applied` is the context manager every caller uses
(merged models in the evaluator, finetuned models, RegMean's statistics):

- extra memory: one copy of the targeted weights (``saved_bytes``; optionally on the CPU), plus, while
  writing one module, the dense float32 product of a factored update (a dense delta is used as
  given) and, on the CPU, a cache-sized temporary: the sum is written in chunks of rows;
- rounding: every written weight is ``round(float32(base) + float32(delta))``, computed in float32
  (float64 when the delta is float64) and rounded once to the weight's dtype (round to nearest even);
  float32 weights get the IEEE float32 sum, exactly as ``weight.add_(delta)``;
- restore: a copy from the base, so the weights are bit-identical to before;
- bytes moved per search point (bf16 weights, float32 delta): read base 2 + read delta 4 + write
  weight 2 = 8 bytes per weight, and 4 more to restore. The copy is made once per patch (4 bytes).

A delta is a dense tensor ``dW`` shaped like the weight, or factors ``(B, A)`` with ``dW = B @ A``
(a LoRA adapter's ``scale * B`` and ``A``, see :func:`lora_updates`): factors are multiplied in float32
on the weight's device, one module at a time, so the dense delta of the whole model never exists.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from knots.errors import AdapterError
from knots.lora import LoraAdapter, parameter_layout

#: A merged update of one weight: dense ``dW``, or factors ``(B, A)`` with ``dW = B @ A``.
Update = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def _shape(update: Update) -> tuple[int, ...]:
    if isinstance(update, tuple):
        if len(update) != 2 or update[0].dim() != 2 or update[1].dim() != 2 or update[0].shape[1] != update[1].shape[0]:
            return ()
        return (update[0].shape[0], update[1].shape[1])
    return tuple(update.shape)


def dense_update(update: Update, device: torch.device) -> torch.Tensor:
    """The update as a dense tensor on ``device``, in float32 (float64 if it is float64)."""
    if isinstance(update, tuple):
        b, a = update
        dtype = torch.promote_types(torch.promote_types(b.dtype, a.dtype), torch.float32)
        return b.to(device, dtype) @ a.to(device, dtype)
    return update.to(device, torch.promote_types(update.dtype, torch.float32), non_blocking=True)


#: Elements per chunk of a CPU write: the float32 temporaries stay in cache and are reused instead of
#: being freshly mapped (page faults) for every weight.
CPU_CHUNK = 1 << 16


def write_sum(weight: torch.Tensor, base: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight <- round(base + delta)``, summed in ``delta``'s dtype (float32 or float64), one rounding.

    Elementwise, so chunking rows (on the CPU) does not change a single bit.
    """
    base = base.to(weight.device, non_blocking=True)
    if weight.is_cuda or weight.dim() < 2:
        torch.add(base, delta, out=weight)
        return
    rows = max(1, CPU_CHUNK // max(1, weight[0].numel()))
    for r in range(0, weight.shape[0], rows):
        torch.add(base[r:r + rows], delta[r:r + rows], out=weight[r:r + rows])


class WeightPatch:
    """Owns a copy of some of a module's weights and writes ``base + delta`` into them in place.

    Args:
        module: the model; weights are named as in ``module.named_parameters()``.
        names: the weights this patch may change (e.g. every targeted ``...q_proj.weight``).
        offload: keep the copy on the CPU (pinned when CUDA is available) instead of next to the
            weights: saves accelerator memory, costs a host-device transfer per module and write.

    Use ``apply(delta)`` any number of times (each writes ``base + delta``; weights missing from
    ``delta`` are reset to their base) and ``restore()`` at the end, or the :func:`applied` context
    manager for a single update.
    """

    def __init__(self, module: nn.Module, names: Iterable[str], *, offload: bool = False) -> None:
        params = dict(module.named_parameters())
        self.names = tuple(dict.fromkeys(names))
        unknown = [n for n in self.names if n not in params]
        if unknown:
            raise AdapterError(f"update for unknown parameter {unknown[0]!r} ({len(unknown)} unknown of {len(self.names)}; "
                               f"the model has e.g. {next(iter(params), 'no parameters')!r})")
        not_float = [n for n in self.names if not params[n].is_floating_point()]
        if not_float:
            raise AdapterError(f"parameter {not_float[0]!r} is not floating point ({params[not_float[0]].dtype})")
        self.weights = {n: params[n] for n in self.names}
        pin = offload and torch.cuda.is_available()
        with torch.no_grad():
            self.base = {n: (torch.empty(w.shape, dtype=w.dtype, pin_memory=pin).copy_(w) if offload else w.detach().clone())
                         for n, w in self.weights.items()}

    @property
    def saved_bytes(self) -> int:
        """Memory held by the copy of the base weights."""
        return sum(t.numel() * t.element_size() for t in self.base.values())

    @torch.no_grad()
    def apply(self, delta: Mapping[str, Update]) -> None:
        """Write ``base + delta`` into every patched weight (``base`` where ``delta`` has no entry).

        ``delta`` values are read once each, in order, so a lazy mapping works. On any error (an
        unknown name, a wrong shape, out of memory) every weight is restored before it is raised.
        """
        unknown = [n for n in delta if n not in self.weights]
        if unknown:
            raise AdapterError(f"update for parameter {unknown[0]!r}, which this patch does not hold "
                               f"({len(unknown)} such names)")
        try:
            for name, update in delta.items():
                weight = self.weights[name]
                if _shape(update) != tuple(weight.shape):
                    raise AdapterError(f"update for {name!r} has shape {list(_shape(update)) or 'invalid factors'}, "
                                       f"the weight {list(weight.shape)}")
                write_sum(weight, self.base[name], dense_update(update, weight.device))
            for name in self.names:
                if name not in delta:
                    self.weights[name].copy_(self.base[name], non_blocking=True)
        except BaseException:
            self.restore()
            raise

    @torch.no_grad()
    def restore(self) -> None:
        """Put the base weights back, bit for bit."""
        for name, weight in self.weights.items():
            weight.copy_(self.base[name], non_blocking=True)
        if any(w.is_cuda for w in self.weights.values()):
            torch.cuda.synchronize()


@contextmanager
def applied(module: nn.Module, delta: Mapping[str, Update], *, offload: bool = False) -> Iterator[WeightPatch]:
    """Within the block the module's weights are ``base + delta``; afterwards (also on an exception)
    they are bit-identical to before. Extra memory: one copy of the weights named in ``delta``."""
    patch = WeightPatch(module, list(delta), offload=offload)
    patch.apply(delta)
    try:
        yield patch
    finally:
        patch.restore()


def lora_updates(adapter: LoraAdapter) -> dict[str, Update]:
    """An adapter's updates as factors ``(scale * B, A)`` per ``"<module>.weight"`` (float32).

    Equal, bit for bit, to ``adapter.delta_state_dict()`` once multiplied; layers stored transposed
    (``fan_in_fan_out``) get their dense update in the parameter layout instead.
    """
    return {f"{name}.weight": parameter_layout(m.delta(torch.float32), True) if m.fan_in_fan_out
            else (m.scaled_B(torch.float32), m.A.to(torch.float32))
            for name, m in adapter.modules.items()}
