"""LoRA finetuning of one adapter per task, cached and resumable.

The encoder is trained with cross-entropy on its task's head: a frozen zero-shot head (CLIP-style,
``100 * cos``), or a trained head that is learned together with the LoRA and saved with it as a PEFT
``modules_to_save`` module (every task starts from the same seeded head). A finished adapter is a PEFT
directory under
``<cache_dir>/adapters/<task>-<key>``, where ``key`` hashes everything that changes the result
(model, task definition, training settings); it is reused, never retrained. During training a
checkpoint (LoRA weights, optimizer, schedule, RNG, early-stopping state) is written atomically
every ``checkpoint_every`` steps to ``<...>.partial``, and a new run resumes from it.

With ``eval_every`` the validation accuracy is measured during training and the best LoRA state (not
the last) becomes the adapter; ``patience`` stops training after that many evaluations without
improvement. On CUDA, ``precision`` runs forward passes under autocast (bf16, or fp16 with loss
scaling). ``num_workers > 0`` decodes and collates batches in DataLoader workers, in the same order.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from knots.data.tasks import Example, TaskData
from knots.errors import ConfigError
from knots.heads import Head, head_logits, init_head_module
from knots.models.base import Backbone
from knots.pipeline.io import atomic_dir, torch_save, write_json
from knots.pipeline.logger import NullLogger

META_NAME = "knots_meta.json"
CHECKPOINT_NAME = "checkpoint.pt"


def _keyed(f: dataclasses.Field, value: Any) -> bool:
    """Whether a dataclass field enters cache keys: ``cache_key`` False never, ``"non_default"`` when set."""
    mode = f.metadata.get("cache_key", True)
    if mode == "non_default":
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        return value != default
    return bool(mode)


def plain_for_key(obj: Any) -> Any:
    """A dataclass as plain data, without the fields that do not change results (see ``_keyed``)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain_for_key(getattr(obj, f.name)) for f in dataclasses.fields(obj) if _keyed(f, getattr(obj, f.name))}
    if isinstance(obj, dict):
        return {str(k): plain_for_key(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [plain_for_key(v) for v in obj]
    return obj


def cache_key(model_cfg: Any, task_cfg: Any, finetune_cfg: Any, task: TaskData, precision: str = "fp32") -> str:
    """A short hash of everything that determines the trained adapter (``precision``: the resolved one)."""
    payload = {
        "model": plain_for_key(model_cfg),
        "task": plain_for_key(task_cfg),
        "finetune": plain_for_key(finetune_cfg),
        "data": [len(task.train), task.class_names, task.templates],
    }
    if precision != "fp32":
        payload["precision"] = precision
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def adapter_dir(cache_dir: str | Path, task: str, key: str) -> Path:
    return Path(cache_dir) / "adapters" / f"{task}-{key}"


def is_complete(path: Path) -> bool:
    return (path / META_NAME).is_file()


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


def resolve_precision(requested: str, device: torch.device | str) -> str:
    """The precision finetuning runs in: fp32 off CUDA; on CUDA ``auto`` is bf16 where supported, else fp16."""
    device = torch.device(device)
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


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@dataclass(frozen=True)
class TrainedHeadSpec:
    """A head to train with the LoRA: an ``nn.Linear`` at ``encoder.<module>`` with ``num_classes``
    outputs, seeded with ``seed`` (the same for every task), classes outside ``mask`` at ``-inf``."""

    module: str
    num_classes: int
    bias: bool = False
    seed: int = 0
    mask: torch.Tensor | None = None


#: What a task is trained against: its frozen zero-shot head, or a head trained with the LoRA.
TrainingHead = Head | TrainedHeadSpec
Logits = Callable[[torch.Tensor], torch.Tensor]


def head_of(model: nn.Module, head: TrainingHead) -> Logits:
    """``features -> logits`` of the model being trained (for a trained head, its live parameters)."""
    if isinstance(head, Head):
        frozen = head.to(next(model.parameters()).device)
        return lambda features: frozen.logits(nn.functional.normalize(features, dim=-1))
    wrapper = model.get_submodule(f"base_model.model.{head.module}")
    linear = wrapper.modules_to_save[wrapper.active_adapters[0]] if hasattr(wrapper, "modules_to_save") else wrapper
    return lambda features: head_logits(features, linear.weight, linear.bias, 1.0, head.mask)


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
            logits = logits_of(model(_to_device(batch, backbone.device)))
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

    def update(self, step: int, acc: float, params: dict[str, nn.Parameter]) -> None:
        """Record an evaluation; a strictly better one replaces the kept LoRA state."""
        self.history.append((step, acc))
        if acc > self.accuracy:
            self.accuracy, self.step, self.bad_evals = acc, step, 0
            self.lora = {n: p.detach().clone() for n, p in params.items()}
        else:
            self.bad_evals += 1


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def peft_encoder(backbone: Backbone, lora: Any, seed: int, head: TrainedHeadSpec | None = None) -> nn.Module:
    """A copy of the backbone's encoder with fresh (seeded) LoRA layers and, for a trained head, a
    fresh seeded head at ``<copy>.<head.module>`` saved by PEFT as ``modules_to_save``; the original
    encoder stays untouched."""
    from peft import LoraConfig, get_peft_model

    encoder = copy.deepcopy(backbone.encoder)
    if head is not None:
        setattr(encoder, head.module, init_head_module(backbone.feature_dim, head.num_classes, head.seed, head.bias)
                .to(device=backbone.device))
    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        bias="none",
        modules_to_save=[head.module] if head is not None else None,
    )
    return get_peft_model(encoder, config)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def finetune(
    backbone: Backbone,
    task: TaskData,
    head: TrainingHead,
    lora: Any,
    cfg: Any,
    out_dir: Path,
    *,
    logger: NullLogger | None = None,
    progress: bool = True,
    on_step: Callable[[int], None] | None = None,
    meta: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train (or resume, or reuse) the adapter of ``task`` in ``out_dir``; return its metadata.

    ``on_step(step)`` is called after every optimizer step (and checkpoint); raising from it
    interrupts training like a crash would.
    """
    if is_complete(out_dir):
        info = json.loads((out_dir / META_NAME).read_text())
        return {**info, "reused": True}
    logger = logger or NullLogger()
    partial = out_dir.with_name(out_dir.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    ckpt_path = partial / CHECKPOINT_NAME
    device = backbone.device
    precision = resolve_precision(cfg.precision, device)
    evaluating = bool(cfg.eval_every)

    model = peft_encoder(backbone, lora, cfg.seed, head if isinstance(head, TrainedHeadSpec) else None)
    logits_of = head_of(model, head)
    params = _trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    step, resumed_from, losses, best = 0, 0, [], BestState()
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for name, value in state["lora"].items():
                params[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        if "best" in state:
            best = BestState(**state["best"])
        torch.set_rng_state(state["rng"])
        step = resumed_from = state["step"]
        losses = state["losses"]
    else:
        torch.manual_seed(cfg.seed)

    inputs = [x for x, _ in task.train]
    labels = torch.tensor([y for _, y in task.train])
    prefix = f"train/{task.name}/"
    logger.define_step(prefix, f"{prefix}step")
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"finetune {task.name}", disable=not progress, leave=False)
    batches = collated_batches(backbone, inputs, StepBatches(len(inputs), cfg.batch_size, cfg.seed, step, cfg.steps),
                               cfg.num_workers, cfg.seed)
    stop = False
    for idx, batch in batches:
        with autocast(precision, device):
            logits = logits_of(model(_to_device(batch, device)))
            target = labels[idx].to(logits.device)
            loss = nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            scaler.unscale_(opt)
            nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        scaler.step(opt)
        scaler.update()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            acc = (logits.argmax(1) == target).float().mean().item() * 100
            logger.log({f"{prefix}step": step, f"{prefix}loss": loss.item(), f"{prefix}acc": acc, f"{prefix}lr": sched.get_last_lr()[0]})
        if evaluating and (step % cfg.eval_every == 0 or step == cfg.steps):
            val = accuracy(model, backbone, task.validation, logits_of, cfg.eval_batch_size, precision, cfg.num_workers)
            best.update(step, val, params)
            logger.log({f"{prefix}step": step, f"{prefix}val_acc": val, f"{prefix}best_val_acc": best.accuracy})
            stop = bool(cfg.patience) and best.bad_evals >= cfg.patience
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not stop:
            state = {"lora": {n: p.detach().clone() for n, p in params.items()}, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "scaler": scaler.state_dict(), "rng": torch.get_rng_state(),
                     "step": step, "losses": losses, "best": dataclasses.asdict(best)}
            torch_save(state, ckpt_path)
        if on_step is not None:
            on_step(step)
        if stop:
            break
    batches.close()  # stops DataLoader workers still prefetching after an early stop
    bar.close()
    if best.lora is not None:
        with torch.no_grad():
            for name, value in best.lora.items():
                params[name].copy_(value)

    info = {
        "task": task.name,
        "steps": cfg.steps,
        "steps_run": step,
        "resumed_from": resumed_from,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "train_seconds": time.perf_counter() - start,
        "train_examples": len(inputs),
        "precision": precision,
        **({"best_step": best.step, "best_val_accuracy": best.accuracy, "val_history": best.history} if evaluating else {}),
        **(meta or {}),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        write_json(tmp / META_NAME, info)
    shutil.rmtree(partial, ignore_errors=True)
    return {**info, "reused": False}
