"""LoRA finetuning of one adapter per task, cached and resumable.

The encoder is trained with cross-entropy on its task's head: a frozen zero-shot head (CLIP-style,
``100 * cos``), or a trained head that is learned together with the LoRA and saved with it as a PEFT
``modules_to_save`` module (every task starts from the same seeded head). A finished adapter is a PEFT
directory under
``<cache_dir>/adapters/<task>-<key>`` (:mod:`knots.pipeline.cache`: the key covers the model, the
task's definition and rows, the training settings); it is reused after checking it against its
manifest, never retrained. One process at a time works on an entry (a lock file). During training
a checkpoint (LoRA and head weights, optimizer, schedule, RNG, early-stopping state; safetensors and
JSON, :mod:`knots.pipeline.checkpoint`) is written atomically every ``checkpoint_every`` steps to
``<...>.partial``, and a new run resumes from it ("resumed from step N"); a damaged one is moved
aside and training starts from scratch.

With ``eval_every`` the validation accuracy is measured during training and the best LoRA state (not
the last) becomes the adapter; ``patience`` stops training after that many evaluations without
improvement. On CUDA, ``precision`` runs forward passes under autocast (bf16, or fp16 with loss
scaling). ``num_workers > 0`` decodes and collates batches in DataLoader workers, in the same order.
The authors' recipe adds a cosine horizon apart from the training length (``schedule_steps``), a
minimum improvement for early stopping, fp32 with a gradient scaler and a training logit scale apart
from the evaluation one (``knots.config.schema.FinetuneConfig``); ``cfg`` is one task's settings, with
its steps resolved (``knots.pipeline.training.task_recipe``).

``finetune.mode=full`` trains the dense weights of the same target modules instead of a LoRA
(:mod:`knots.pipeline.full`), with the same recipe and cache.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.data.tasks import TaskData
from knots.heads import Head, head_logits, init_head_module
from knots.models.base import Backbone, to_device
from knots.atomic import clean_leftovers, remove_owned, write_json
from knots.errors import OutputError
from knots.pipeline.cache import (META_NAME, entry_checksum, entry_lock, move_aside, partial_dir, verified_entry,
                                  write_entry)
from knots.pipeline.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from knots.pipeline.logger import NullLogger
from knots.pipeline.training import (SCALED_PRECISIONS, BestState, Logits, StepBatches, accuracy, autocast,
                                     collated_batches, lr_lambda, resolve_precision, warmup_length)

log = logging.getLogger("knots.pipeline")


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


def head_of(model: nn.Module, head: TrainingHead, scale: float | None = None) -> Logits:
    """``features -> logits`` of the model being trained (for a trained head, its live parameters);
    ``scale`` replaces a zero-shot head's logit scale (``finetune.train_logit_scale``)."""
    if isinstance(head, Head):
        frozen = head.to(next(model.parameters()).device)
        if scale is not None:
            frozen = dataclasses.replace(frozen, scale=scale)
        return lambda features: frozen.logits(nn.functional.normalize(features, dim=-1))
    wrapper = model.get_submodule(f"base_model.model.{head.module}" if hasattr(model, "peft_config") else head.module)
    linear = wrapper.modules_to_save[wrapper.active_adapters[0]] if hasattr(wrapper, "modules_to_save") else wrapper
    return lambda features: head_logits(features, linear.weight, linear.bias, 1.0, head.mask)


def peft_encoder(backbone: Backbone, lora: Any, seed: int, head: TrainedHeadSpec | None = None, *,
                 in_place: bool = False) -> nn.Module:
    """A copy of the backbone's encoder (or, ``in_place``, the encoder itself) with fresh (seeded) LoRA
    layers and, for a trained head, a fresh seeded head at ``<encoder>.<head.module>`` saved by PEFT as
    ``modules_to_save``. Without ``in_place`` the original encoder stays untouched."""
    from peft import LoraConfig, get_peft_model

    encoder = backbone.encoder if in_place else copy.deepcopy(backbone.encoder)
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


def load_initial_state(model: nn.Module, source: str) -> None:
    """Start from a saved adapter's LoRA (and head) instead of the fresh seeded ones: ``source`` is a PEFT
    adapter directory or a hub id (e.g. the authors' shared ``hoffman-lab/KnOTS-Llama3_8B_lora_R16_pretrained_model``),
    downloaded once into the Hugging Face cache. Every trained weight must be in it, with its shape."""
    from peft import set_peft_model_state_dict

    from knots.errors import AdapterError, ConfigError
    from knots.lora import read_weights

    path = Path(source)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(source, allow_patterns=["adapter_config.json", "adapter_model.*"]))
        except Exception as error:  # offline and not cached, missing repo, auth: one line for the user
            reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise ConfigError(f"finetune.init_adapter: cannot get {source} from the Hugging Face hub or its cache ({reason})") from None
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    try:
        result = set_peft_model_state_dict(model, read_weights(path))
    except RuntimeError as error:  # a shape mismatch
        raise AdapterError(f"{path}: the initial adapter does not fit the model ({str(error).splitlines()[-1].strip()})") from None
    missing = sorted(trained & set(result.missing_keys))
    if missing or result.unexpected_keys:
        problem = f"no weight for {missing[0]!r}" if missing else f"unexpected weight {result.unexpected_keys[0]!r}"
        raise AdapterError(f"{path}: the initial adapter does not fit the model ({problem})")


@contextmanager
def training_model(backbone: Backbone, lora: Any, seed: int, head: TrainedHeadSpec | None = None,
                   init: str | None = None) -> Iterator[nn.Module]:
    """The backbone's encoder wrapped in place for training (:func:`peft_encoder`), optionally starting
    from the adapter ``init`` (:func:`load_initial_state`): no copy of the model is made (an 8B model is not
    copied). On exit, also after an error, PEFT's ``unload`` puts every base layer back in place of its
    LoRA layer and the head is removed, so the encoder holds exactly the modules and (never trained)
    weights it held before."""
    encoder = backbone.encoder
    was_training = encoder.training
    model = peft_encoder(backbone, lora, seed, head, in_place=True)
    try:
        if init:
            load_initial_state(model, init)
        yield model
    finally:
        model.unload()
        if head is not None and hasattr(encoder, head.module):
            delattr(encoder, head.module)
        encoder.train(was_training)


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

    The entry is locked for the whole call: a second process finetuning the same entry waits, then
    reuses the adapter. A cached adapter is checked against its manifest first; a damaged one is moved
    aside and trained again. The returned metadata adds ``reused``, ``status`` (``reused``,
    ``trained`` or ``resumed from step N``) and ``checksum`` (:func:`entry_checksum`).
    ``on_step(step)`` is called after every optimizer step (and checkpoint); raising from it
    interrupts training like a crash would.
    """
    with entry_lock(out_dir, what="the adapter"):
        if verified_entry(out_dir, what="cached adapter"):
            info = json.loads((out_dir / META_NAME).read_text())
            return {**info, "reused": True, "status": "reused", "checksum": entry_checksum(out_dir)}
        spec = head if isinstance(head, TrainedHeadSpec) else None
        if getattr(cfg, "mode", "lora") == "full":  # dense target weights (knots.pipeline.full), same recipe
            from knots.pipeline.full import full_training_model

            context = full_training_model(backbone, lora, spec)
        else:
            context = training_model(backbone, lora, cfg.seed, spec, getattr(cfg, "init_adapter", None))
        with context as model:
            return _train(model, backbone, task, head, cfg, out_dir, logger or NullLogger(), progress, on_step, meta)


def _resume_state(partial: Path, task: str) -> dict[str, Any] | None:
    """The checkpoint at ``partial``, or None (none, or a damaged one, which is moved aside)."""
    if not partial.exists():
        return None
    try:
        return load_checkpoint(partial)
    except CheckpointError as error:
        move_aside(partial, str(error), what=f"the resume checkpoint of {task}", then="finetuning from scratch")
        return None


def _restore(state: dict[str, Any], params: dict[str, nn.Parameter], opt: torch.optim.Optimizer,
             sched: Any, scaler: torch.amp.GradScaler) -> None:
    """Put a checkpoint's state back into fresh training objects (raises if it does not fit).

    The trained weights are written last, once everything else has loaded, and only after every one of
    them is checked: a checkpoint that does not fit leaves them as they were (the fresh start), so no copy
    of them is needed to fall back (for full finetuning that would be a copy of every target weight)."""
    lora = state["lora"]
    if set(lora) != set(params) or any(not isinstance(lora[n], torch.Tensor) or lora[n].shape != p.shape
                                       for n, p in params.items()):
        raise ValueError("its weights do not match the model being trained")
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng"])
    with torch.no_grad():
        for name, value in lora.items():
            params[name].copy_(value)


def _train(model: nn.Module, backbone: Backbone, task: TaskData, head: TrainingHead, cfg: Any, out_dir: Path,
           logger: NullLogger, progress: bool, on_step: Callable[[int], None] | None,
           meta: dict[str, Any] | None) -> dict[str, Any]:
    """The training loop of :func:`finetune` on ``model`` (the PEFT-wrapped encoder; the caller holds the
    lock of ``out_dir``), resuming from the checkpoint next to it if there is a usable one."""
    partial = partial_dir(out_dir)
    device = backbone.device
    precision = resolve_precision(cfg.precision, device)
    evaluating = bool(cfg.eval_every)
    state = _resume_state(partial, task.name)

    logits_of = head_of(model, head, cfg.train_logit_scale)
    eval_logits_of = head_of(model, head)
    params = _trainable(model)

    def optimizers() -> tuple[torch.optim.Optimizer, Any, torch.amp.GradScaler]:
        opt = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup_length(cfg), cfg.schedule_steps or cfg.steps,
                                                                 getattr(cfg, "schedule", "cosine")))
        return opt, sched, torch.amp.GradScaler(device.type, enabled=precision in SCALED_PRECISIONS)

    opt, sched, scaler = optimizers()
    step, resumed_from, losses, best = 0, 0, [], BestState()
    if state is not None:
        try:
            best = BestState(**state["best"])
            step = resumed_from = int(state["step"])
            losses = list(state["losses"])
            _restore(state, params, opt, sched, scaler)
            log.info("finetune %s: resumed from step %d of %d (%s)", task.name, step, cfg.steps, partial)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            move_aside(partial, f"it does not fit: {str(error).splitlines()[0]}", what=f"the resume checkpoint of {task.name}",
                       then="finetuning from scratch")
            opt, sched, scaler = optimizers()  # the weights are untouched (see _restore): a fresh start
            step, resumed_from, losses, best = 0, 0, [], BestState()
            state = None
    if state is None:
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
            logits = logits_of(model(to_device(batch, device)))
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
            val = accuracy(model, backbone, task.validation, eval_logits_of, cfg.eval_batch_size, precision, cfg.num_workers)
            best.update(step, val, params, cfg.min_improvement)
            logger.log({f"{prefix}step": step, f"{prefix}val_acc": val, f"{prefix}best_val_acc": best.accuracy})
            stop = bool(cfg.patience) and best.bad_evals >= cfg.patience
        if step % cfg.checkpoint_every == 0 and step < cfg.steps and not stop:
            save_checkpoint(partial, {"lora": dict(params), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                                      "scaler": scaler.state_dict(), "rng": torch.get_rng_state(), "step": step,
                                      "losses": losses, "best": dataclasses.asdict(best)})
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
    def write(staging: Path) -> None:
        model.save_pretrained(str(staging))
        write_json(staging / META_NAME, info, durable=False)

    write_entry(out_dir, write, "knots finetune")
    if partial.exists():
        try:
            remove_owned(partial)
        except OutputError as error:
            log.warning("finetune %s: left %s in place (%s)", task.name, partial, error)
    for notice in clean_leftovers(partial):  # staging directories of checkpoint writers killed outright
        log.info("finetune %s: %s", task.name, notice)
    status = f"resumed from step {resumed_from}" if resumed_from else "trained"
    return {**info, "reused": False, "status": status, "checksum": entry_checksum(out_dir)}
