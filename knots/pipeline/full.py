"""Full finetuning of the LoRA target modules (``finetune.mode=full``): the updates ``W_i - W_0`` that the
CKA analysis compares with LoRA's (paper Sec. 3, Fig. 2a).

The recipe is LoRA finetuning's (:func:`knots.pipeline.finetune.finetune`: optimizer, schedule, heads,
checkpoints, early stopping), applied to the dense weights of the modules LoRA targets
(``model.lora.target_modules``, matched as PEFT matches them); every other weight stays frozen. A finished
model is cached like an adapter, in ``<cache_dir>/adapters/<task>-<key>`` (its key includes ``mode: full``),
as ``full_update.safetensors``, ``{"<module>.weight": W_i - W_0}`` in float32 and, with trained heads,
``head.<module>.weight`` (and ``.bias``), next to ``knots_meta.json``, written last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from knots.errors import AdapterError
from knots.heads import init_head_module
from knots.models.base import Backbone

UPDATE_NAME = "full_update.safetensors"
HEAD_PREFIX = "head."


def target_modules(encoder: nn.Module, lora: Any) -> list[str]:
    """The modules of ``encoder`` that ``lora.target_modules`` selects, exactly as PEFT selects them."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    config = LoraConfig(r=lora.r, target_modules=list(lora.target_modules))
    names = [name for name, module in encoder.named_modules()
             if name and isinstance(getattr(module, "weight", None), torch.Tensor) and check_target_module_exists(config, name)]
    if not names:
        raise AdapterError(f"model.lora.target_modules {list(lora.target_modules)} select no module with a weight")
    return names


class FullTrainingModel(nn.Module):
    """The backbone's encoder with its target modules' dense weights trainable (in place, no copy), and, for
    a trained head, a fresh seeded head at ``<self>.<head module>``; :meth:`save_pretrained` writes
    ``W_i - W_0`` from the original weights kept aside."""

    def __init__(self, encoder: nn.Module, targets: list[str], head: nn.Module | None, head_module: str | None) -> None:
        super().__init__()
        self.encoder = encoder
        self.targets = targets
        self.head_module = head_module
        if head is not None and head_module is not None:
            setattr(self, head_module, head)
        self.originals = {name: encoder.get_submodule(name).weight.detach().clone() for name in targets}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.encoder(*args, **kwargs)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``W_i - W_0`` of every target module (and the trained head, if any) to ``directory``."""
        from knots.atomic import save_safetensors

        tensors = {}
        for name in self.targets:
            trained = self.encoder.get_submodule(name).weight
            tensors[f"{name}.weight"] = (trained.detach().float() - self.originals[name].float()).cpu().contiguous()
        if self.head_module is not None:
            for key, value in self.get_submodule(self.head_module).state_dict().items():
                tensors[f"{HEAD_PREFIX}{self.head_module}.{key}"] = value.detach().float().cpu().contiguous()
        save_safetensors(Path(directory) / UPDATE_NAME, tensors, metadata={"format": "knots-full-update"})


@contextmanager
def full_training_model(backbone: Backbone, lora: Any, head: Any = None) -> Iterator[FullTrainingModel]:
    """The backbone's encoder set up in place for full finetuning of ``lora``'s target modules (every other
    weight frozen), like :func:`knots.pipeline.finetune.training_model` for LoRA: no copy of the model is
    made, only of the target weights. On exit, also after an error, the original weights, ``requires_grad``
    flags and training mode are put back, so the encoder holds exactly what it held before."""
    encoder = backbone.encoder
    was_training = encoder.training
    grads = {name: p.requires_grad for name, p in encoder.named_parameters()}
    names = target_modules(encoder, lora)
    linear = None
    if head is not None:
        linear = init_head_module(backbone.feature_dim, head.num_classes, head.seed, head.bias).to(device=backbone.device)
    model = FullTrainingModel(encoder, names, linear, head.module if head is not None else None)
    try:
        for parameter in encoder.parameters():
            parameter.requires_grad_(False)
        for name in names:
            encoder.get_submodule(name).weight.requires_grad_(True)
        yield model
    finally:
        with torch.no_grad():
            for name, original in model.originals.items():
                encoder.get_submodule(name).weight.copy_(original)
        for name, parameter in encoder.named_parameters():
            parameter.requires_grad_(grads[name])
        encoder.train(was_training)


def load_full_update(path: str | Path, tensors: bool = True) -> dict[str, torch.Tensor]:
    """``{"<module>.weight": W_i - W_0}`` of a finished full-finetuning directory (head tensors left out);
    ``tensors=False`` only checks that the directory is one."""
    from safetensors.torch import load_file

    from knots.pipeline.cache import is_complete

    path = Path(path)
    if not is_complete(path) or not (path / UPDATE_NAME).is_file():
        raise AdapterError(f"{path}: not a finished full-finetuning update ({UPDATE_NAME} and the metadata file)")
    if not tensors:
        return {}
    return {k: v for k, v in load_file(str(path / UPDATE_NAME)).items() if not k.startswith(HEAD_PREFIX)}


def load_full_tensor(path: str | Path, name: str) -> torch.Tensor | None:
    """One tensor (``"<module>.weight"``) of a full-finetuning update, read alone; None if absent."""
    from safetensors import safe_open

    with safe_open(str(Path(path) / UPDATE_NAME), framework="pt") as handle:
        return handle.get_tensor(name) if name in handle.keys() else None


@dataclass(frozen=True)
class FullUpdate:
    """One task's full-finetuning update in the cache (read tensor by tensor), with where it came from."""

    task: str
    path: str
    info: dict[str, Any] = field(default_factory=dict)

    def tensor(self, name: str) -> torch.Tensor | None:
        """``W_i - W_0`` of parameter ``name`` (``"<module>.weight"``), or None if not updated."""
        return load_full_tensor(self.path, name)


def full_finetune_stage(models: Any, tasks: Any, zero_shot: Any, cfg: Any, finetune_cfg: Any,
                        logger: Any = None, names: Sequence[str] | None = None) -> list[FullUpdate]:
    """One full-finetuning update per task (``names``: these tasks only), trained with ``finetune_cfg``
    (``mode: full``) into the adapter cache, or reused from it."""
    from knots.pipeline.cache import adapter_dir, cache_key
    from knots.pipeline.finetune import finetune
    from knots.pipeline.training import resolve_precision, task_recipe

    assert finetune_cfg.mode == "full"
    precision = resolve_precision(finetune_cfg.precision, models.backbone.device)
    chosen = [t for t in tasks.tasks if names is None or t.name in names]
    out = []
    for task in tqdm(chosen, desc="full finetune", disable=not cfg.progress):
        recipe = task_recipe(finetune_cfg, task.name, len(task.train))  # the task's steps, as for its LoRA
        key = cache_key(cfg.model, cfg.benchmark.tasks[task.name], recipe, task, precision)
        path = adapter_dir(cfg.paths.cache_dir, task.name, key)
        head = models.training_head(task, zero_shot, recipe.seed)
        info = finetune(models.backbone, task, head, cfg.model.lora, recipe, path, logger=logger,
                        progress=cfg.progress, meta={"cache_key": key, "mode": "full"})
        load_full_update(path, tensors=False)  # checks the directory is a finished full update
        out.append(FullUpdate(task.name, str(path), {**info, "path": str(path), "cache_key": key}))
    return out
