"""Training utilities: seeded step batches (optionally collated in DataLoader workers), mixed
precision, the learning-rate schedule, early-stopping state and accuracy through a head."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from knots.data.tasks import Example
from knots.errors import ConfigError
from knots.models.base import Backbone, to_device

Logits = Callable[[torch.Tensor], torch.Tensor]


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The example indices of training step ``step``: epochs of seeded permutations, so any step
    can be recomputed after a restart."""
    start = step * batch_size
    out: list[int] = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.extend(perm[offset : offset + batch_size - len(out)].tolist())
    return out


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


#: Precisions that scale the loss with a ``GradScaler``: fp16 autocast, and fp32 with a scaler (the
#: authors' recipe: no autocast, but the loss is scaled and steps with non-finite gradients skipped).
SCALED_PRECISIONS = ("fp16", "fp32_scaled")


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """The precision finetuning runs in: fp32 off CUDA; on CUDA ``auto`` is bf16 where supported, else fp16.
    ``fp32_scaled`` (fp32 with a gradient scaler) runs on any device."""
    device = torch.device(device)
    if requested == "fp32_scaled":
        return requested
    if device.type != "cuda":
        if requested in AUTOCAST_DTYPES:
            raise ConfigError(f"finetune.precision {requested} needs a CUDA device (device is {device})")
        return "fp32"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise ConfigError("finetune.precision bf16: this GPU does not support bfloat16 (use fp16 or auto)")
    return requested


def autocast(precision: str, device: torch.device) -> AbstractContextManager:
    """Autocast for a resolved mixed precision; nothing for fp32."""
    if precision not in AUTOCAST_DTYPES:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[precision])


class StepBatches:
    """The example indices of training steps ``start .. stop - 1`` (see ``batch_indices``); a DataLoader
    ``batch_sampler`` that reproduces the in-process batch order."""

    def __init__(self, n: int, batch_size: int, seed: int, start: int, stop: int) -> None:
        self.n, self.batch_size, self.seed, self.start, self.stop = n, batch_size, seed, start, stop

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.stop):
            yield batch_indices(self.n, self.batch_size, step, self.seed)

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


class _Inputs(Dataset):
    """Raw inputs by index, for a DataLoader whose ``collate_fn`` is the backbone's."""

    def __init__(self, inputs: Sequence[Any]) -> None:
        self.inputs = inputs

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> Any:
        return self.inputs[i]


def collated_batches(backbone: Backbone, inputs: Sequence[Any], index_batches: Iterable[list[int]],
                     num_workers: int = 0, seed: int = 0) -> Iterator[tuple[list[int], dict[str, Any]]]:
    """``(indices, backbone.collate(inputs[indices]))`` per index batch, collated in this process or in
    ``num_workers`` DataLoader workers (same batches, same order; the global RNG is not touched)."""
    if num_workers <= 0:
        for idx in index_batches:
            yield idx, backbone.collate([inputs[i] for i in idx])
        return
    loader = DataLoader(_Inputs(inputs), batch_sampler=index_batches, collate_fn=backbone.collate,
                        num_workers=num_workers, pin_memory=backbone.device.type == "cuda",
                        generator=torch.Generator().manual_seed(seed))
    yield from zip(iter(index_batches), loader)


@torch.no_grad()
def accuracy(model: nn.Module, backbone: Backbone, examples: Sequence[Example], logits_of: Logits,
             batch_size: int, precision: str = "fp32", num_workers: int = 0) -> float:
    """Top-1 accuracy (%) of ``model`` on ``examples`` through its head; the model's train/eval mode is kept."""
    was_training = model.training
    model.eval()
    inputs = [x for x, _ in examples]
    labels = torch.tensor([y for _, y in examples])
    chunks = [list(range(i, min(i + batch_size, len(inputs)))) for i in range(0, len(inputs), batch_size)]
    correct = 0
    for idx, batch in collated_batches(backbone, inputs, chunks, num_workers):
        with autocast(precision, backbone.device):
            logits = logits_of(model(to_device(batch, backbone.device)))
        correct += int(logits.float().argmax(1).cpu().eq(labels[idx]).sum())
    model.train(was_training)
    return 100.0 * correct / max(1, len(inputs))


@dataclass
class BestState:
    """Early-stopping state: the best validation accuracy so far, its step and LoRA weights."""

    accuracy: float = -1.0
    step: int = 0
    lora: dict[str, torch.Tensor] | None = None
    bad_evals: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)

    def update(self, step: int, acc: float, params: dict[str, nn.Parameter], min_improvement: float = 0.0) -> None:
        """Record an evaluation; one better than the best by more than ``min_improvement`` (points of
        accuracy, the authors' ``min_delta``) replaces the kept LoRA state, any other counts as a bad
        evaluation. The best starts at -1%, so without a margin the first evaluation always counts (the
        authors' stopper starts at 0%: the two differ only for an accuracy within the margin of 0%)."""
        self.history.append((step, acc))
        if acc > self.accuracy + min_improvement:
            self.accuracy, self.step, self.bad_evals = acc, step, 0
            self.lora = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.bad_evals += 1


def warmup_length(cfg: Any) -> float:
    """Warm-up steps of a finetuning config: ``warmup_fraction * steps`` when set (fractional, as the
    reference computes 6% of its steps), else ``warmup_steps``."""
    fraction = getattr(cfg, "warmup_fraction", None)
    return cfg.warmup_steps if fraction is None else fraction * cfg.steps


def lr_lambda(warmup: float, total: int, schedule: str = "cosine") -> Callable[[int], float]:
    """The learning-rate factor of each step; ``total`` is the schedule's horizon.

    ``cosine``: linear warm-up to the peak (``(step + 1) / warmup``), then cosine decay to zero at step
    ``total``. Past the horizon the cosine goes on (the factor rises again), as the authors' ``cosine_lr``
    does; with the horizon at the training length (the default) no step gets there.
    ``linear``: ``transformers.get_linear_schedule_with_warmup``, the reference's Llama3-8B schedule: warm-up
    from zero (``step / warmup``, ``warmup`` may be fractional, e.g. 6% of the steps), then linear decay
    to zero at ``total``.
    """
    if schedule == "linear":
        def linear(step: int) -> float:
            if step < warmup:
                return float(step) / float(max(1, warmup))
            return max(0.0, float(total - step) / float(max(1, total - warmup)))

        return linear

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


def task_recipe(cfg: Any, task: str, n_train: int) -> Any:
    """The finetuning settings of one task, with its training length resolved.

    ``epochs_per_task[task]`` or else ``epochs`` (when set) becomes ``steps = epochs *
    ceil(n_train / batch_size)``; a ``schedule_steps`` equal to the training length becomes null. The
    result trains the same adapter as the settings it came from, and its cache key changes exactly
    when the adapter does (another task's epochs, or ``epochs`` spelled as ``steps``, do not).
    """
    epochs = cfg.epochs_per_task.get(task, cfg.epochs)
    steps = epochs * math.ceil(n_train / cfg.batch_size) if epochs is not None else cfg.steps
    horizon = None if cfg.schedule_steps == steps else cfg.schedule_steps
    return dataclasses.replace(cfg, steps=steps, epochs=None, epochs_per_task={}, schedule_steps=horizon)
