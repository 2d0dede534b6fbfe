"""Writing merge results: the merged ``dW`` (sharded, streamed), PEFT adapters, ``merge.json``.

The functions here write into a staging directory; :func:`knots.atomic.atomic_directory` makes it
``out`` only once the whole merge is written, so ``out`` never holds a partial result.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
from safetensors.torch import save_file

from knots.lora import CONFIG_NAME, PEFT_PREFIX, SAFETENSORS_NAME
from knots.merging.session import MergeResult

DELTA_NAME = "delta_weights.safetensors"
DELTA_INDEX_NAME = "delta_weights.safetensors.index.json"


def write_sharded(tensors: Iterable[tuple[str, torch.Tensor]], directory: Path, max_shard_bytes: int) -> list[str]:
    """Stream tensors into safetensors shards of at most ``max_shard_bytes`` (Hugging Face layout).

    One shard is written as ``delta_weights.safetensors``; several as
    ``delta_weights-0000i-of-0000n.safetensors`` with ``delta_weights.safetensors.index.json``.
    """
    written: list[tuple[Path, list[str]]] = []
    current: dict[str, torch.Tensor] = {}
    current_bytes, total_bytes = 0, 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            path = directory / f".shard-{len(written):05d}.safetensors"
            save_file(current, str(path))
            written.append((path, list(current)))
            current, current_bytes = {}, 0

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if current and current_bytes + size > max_shard_bytes:
            flush()
        current[name] = tensor.contiguous()
        current_bytes += size
        total_bytes += size
    flush()
    if len(written) == 1:
        written[0][0].rename(directory / DELTA_NAME)
        return [DELTA_NAME]
    names, weight_map = [], {}
    for index, (path, keys) in enumerate(written, start=1):
        name = f"delta_weights-{index:05d}-of-{len(written):05d}.safetensors"
        path.rename(directory / name)
        names.append(name)
        weight_map.update({key: name for key in keys})
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (directory / DELTA_INDEX_NAME).write_text(json.dumps(index, indent=2))
    return names + [DELTA_INDEX_NAME]


def adapter_config(template: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """A PEFT LoRA config whose every module has scale 1 (alpha == r) at its own rank."""
    config = {key: value for key, value in template.items() if key not in {"rank_pattern", "alpha_pattern", "modules_to_save"}}
    base_rank = max(ranks.values())
    pattern = {re.escape(module): rank for module, rank in ranks.items() if rank != base_rank}
    config.update(
        peft_type="LORA",
        r=base_rank,
        lora_alpha=base_rank,
        use_rslora=False,
        use_dora=False,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=sorted(ranks),
        modules_to_save=None,
        bias="none",
        inference_mode=True,
    )
    for key in ("layers_to_transform", "layers_pattern", "exclude_modules"):
        config.pop(key, None)
    return config


def write_adapter(factors: Iterable[tuple[str, torch.Tensor, torch.Tensor]], template: dict[str, Any], directory: Path) -> dict[str, int]:
    """Write ``(module, B, A)`` factors as a PEFT LoRA adapter; returns each module's rank."""
    directory.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for module, B, A in factors:
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = A.to(torch.float32).contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = B.to(torch.float32).contiguous()
        ranks[module] = A.shape[0]
    save_file(tensors, str(directory / SAFETENSORS_NAME))
    (directory / CONFIG_NAME).write_text(json.dumps(adapter_config(template, ranks), indent=2, default=list))
    return ranks


def truncated_factors(result: MergeResult, module: str, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Best rank-``rank`` factors of the merged ``dW`` and the relative Frobenius error they leave."""
    if result.exact_low_rank:
        B, A = (t.to(torch.float64) for t in result.lora(module))
        q, r = torch.linalg.qr(B)
        u, s, vt = torch.linalg.svd(r @ A, full_matrices=False)
        u = q @ u
    else:
        u, s, vt = torch.linalg.svd(result.vectors.to_delta(module, result.merged[module]).to(torch.float64), full_matrices=False)
    total = float(s.square().sum())
    kept = min(rank, s.numel())
    error = math.sqrt(max(total - float(s[:kept].square().sum()), 0.0) / total) if total > 0 else 0.0
    return u[:, :kept] * s[:kept], vt[:kept], error


def write_merge_outputs(
    result: MergeResult,
    staging: Path,
    template: dict[str, Any],
    save_delta: bool = True,
    save_adapter: bool = True,
    export_rank: int | None = None,
    max_shard_bytes: int = 2 << 30,
    progress: bool = False,
) -> dict[str, Any]:
    """Write every requested output of ``result`` into ``staging``; returns a report for merge.json."""
    from tqdm.auto import tqdm

    report: dict[str, Any] = {"files": []}
    if save_adapter and result.exact_low_rank:
        ranks = write_adapter(((m, *result.lora(m)) for m in tqdm(result.modules, desc="write adapter", disable=not progress, leave=False)), template, staging / "adapter")
        report["adapter"] = {"path": "adapter", "ranks": ranks, "total_rank": sum(ranks.values())}
        report["files"] += ["adapter/" + CONFIG_NAME, "adapter/" + SAFETENSORS_NAME]
    if export_rank is not None:
        errors: dict[str, float] = {}

        def truncated() -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
            for module in tqdm(result.modules, desc=f"rank-{export_rank} export", disable=not progress, leave=False):
                B, A, errors[module] = truncated_factors(result, module, export_rank)
                yield module, B, A

        ranks = write_adapter(truncated(), template, staging / f"adapter_rank{export_rank}")
        report["truncated_adapter"] = {
            "path": f"adapter_rank{export_rank}",
            "rank": export_rank,
            "relative_error": {"max": max(errors.values()), "mean": sum(errors.values()) / len(errors), "per_module": errors},
        }
        report["files"] += [f"adapter_rank{export_rank}/{CONFIG_NAME}", f"adapter_rank{export_rank}/{SAFETENSORS_NAME}"]
    if save_delta:
        deltas = ((name, tensor) for name, tensor in tqdm(result.deltas(), total=len(result.modules), desc="write delta", disable=not progress, leave=False))
        report["files"] += write_sharded(deltas, staging, max_shard_bytes)
    return report
