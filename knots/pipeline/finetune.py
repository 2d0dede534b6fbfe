"""LoRA finetuning of one adapter per task, cached and resumable.

The encoder is trained CLIP-style against the task's frozen class heads (cross-entropy on
``logit_scale * cos``). A finished adapter is a PEFT directory under
``<cache_dir>/adapters/<task>-<key>``, where ``key`` hashes everything that changes the result
(model, task definition, training settings); it is reused, never retrained. During training a
checkpoint (LoRA weights, optimizer, schedule, RNG) is written atomically every
``checkpoint_every`` steps to ``<...>.partial``, and a new run resumes from it.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.data.tasks import TaskData
from knots.models.base import Backbone
from knots.pipeline.io import atomic_dir, torch_save, write_json
from knots.pipeline.logger import NullLogger

META_NAME = "knots_meta.json"
CHECKPOINT_NAME = "checkpoint.pt"


def plain_for_key(obj: Any) -> Any:
    """A dataclass as plain data, without the fields marked ``cache_key=False``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: plain_for_key(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.metadata.get("cache_key", True)}
    if isinstance(obj, dict):
        return {str(k): plain_for_key(v) for k, v in sorted(obj.items())}
    if isinstance(obj, (list, tuple)):
        return [plain_for_key(v) for v in obj]
    return obj


def cache_key(model_cfg: Any, task_cfg: Any, finetune_cfg: Any, task: TaskData) -> str:
    """A short hash of everything that determines the trained adapter."""
    payload = {
        "model": plain_for_key(model_cfg),
        "task": plain_for_key(task_cfg),
        "finetune": plain_for_key(finetune_cfg),
        "data": [len(task.train), task.class_names, task.templates],
    }
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


def lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    """Linear warm-up to the peak, then cosine decay to zero."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def peft_encoder(backbone: Backbone, lora: Any, seed: int) -> nn.Module:
    """A copy of the backbone's encoder with fresh (seeded) LoRA layers; the original stays untouched."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        use_rslora=lora.use_rslora,
        bias="none",
    )
    return get_peft_model(copy.deepcopy(backbone.encoder), config)


def _trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def finetune(
    backbone: Backbone,
    task: TaskData,
    heads: torch.Tensor,
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

    model = peft_encoder(backbone, lora, cfg.seed)
    params = _trainable(model)
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps))
    step, resumed_from, losses = 0, 0, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        with torch.no_grad():
            for name, value in state["lora"].items():
                params[name].copy_(value)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"])
        step = resumed_from = state["step"]
        losses = state["losses"]
    else:
        torch.manual_seed(cfg.seed)

    heads = heads.to(backbone.device)
    inputs = [x for x, _ in task.train]
    labels = torch.tensor([y for _, y in task.train])
    prefix = f"train/{task.name}/"
    logger.define_step(prefix, f"{prefix}step")
    model.train()
    start = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=step, desc=f"finetune {task.name}", disable=not progress, leave=False)
    while step < cfg.steps:
        idx = batch_indices(len(inputs), cfg.batch_size, step, cfg.seed)
        batch = backbone.collate([inputs[i] for i in idx])
        batch = {k: v.to(backbone.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        feats = nn.functional.normalize(model(batch), dim=-1)
        logits = backbone.logit_scale * feats @ heads.T
        target = labels[idx].to(logits.device)
        loss = nn.functional.cross_entropy(logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            acc = (logits.argmax(1) == target).float().mean().item() * 100
            logger.log({f"{prefix}step": step, f"{prefix}loss": loss.item(), f"{prefix}acc": acc, f"{prefix}lr": sched.get_last_lr()[0]})
        if step % cfg.checkpoint_every == 0 and step < cfg.steps:
            state = {"lora": {n: p.detach().clone() for n, p in params.items()}, "optimizer": opt.state_dict(),
                     "scheduler": sched.state_dict(), "rng": torch.get_rng_state(), "step": step, "losses": losses}
            torch_save(state, ckpt_path)
        if on_step is not None:
            on_step(step)
    bar.close()

    info = {
        "task": task.name,
        "steps": cfg.steps,
        "resumed_from": resumed_from,
        "final_loss": sum(losses[-10:]) / max(1, len(losses[-10:])),
        "train_seconds": time.perf_counter() - start,
        "train_examples": len(inputs),
        **(meta or {}),
    }
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp))
        write_json(tmp / META_NAME, info)
    shutil.rmtree(partial, ignore_errors=True)
    return {**info, "reused": False}

