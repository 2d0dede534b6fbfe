"""Resume checkpoints of finetuning as tensors and plain data: safetensors plus JSON, never a pickle.

A checkpoint is a directory written atomically with each file's sha256 in its manifest
(:func:`knots.atomic.atomic_directory`): ``tensors.safetensors`` holds every tensor of the state
(LoRA and head weights, the optimizer's moments, the RNG state, the best state kept for early
stopping), ``state.json`` everything else, with each tensor replaced by a reference to it. Loading
reads only those two files, after checking them against the manifest, so a planted or damaged
checkpoint can never run code: at worst it is refused, and finetuning starts from scratch.

The JSON encoding keeps what optimizer and scheduler states need back exactly: integer dictionary
keys (the optimizer's parameter ids), tuples (AdamW's betas), infinities and NaN.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from knots.atomic import atomic_directory, verify_directory

STATE_NAME = "state.json"
TENSORS_NAME = "tensors.safetensors"
FORMAT = 1


class CheckpointError(Exception):
    """A checkpoint that cannot be used (damaged, or not written by this version)."""


def _encode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``value`` as JSON-ready data; tensors are moved into ``tensors`` and referenced by name."""
    if isinstance(value, torch.Tensor):
        name = f"t{len(tensors)}"
        tensors[name] = value.detach().cpu().clone().contiguous()
        return {"tensor": name}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"dict": {k: _encode(v, tensors) for k, v in value.items()}}
        if all(isinstance(k, int) and not isinstance(k, bool) for k in value):
            return {"int_dict": [[k, _encode(v, tensors)] for k, v in value.items()]}
        raise TypeError(f"checkpoint dictionaries need str or int keys, got {sorted({type(k).__name__ for k in value})}")
    if isinstance(value, (list, tuple)):
        return {"tuple" if isinstance(value, tuple) else "list": [_encode(v, tensors) for v in value]}
    if isinstance(value, float) and not math.isfinite(value):
        return {"float": repr(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"a checkpoint holds tensors and plain data only, got {type(value).__name__}")


def _decode(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if not isinstance(value, dict):
        return value
    if len(value) != 1:
        raise CheckpointError(f"unexpected entry {sorted(value)}")
    (kind, data), = value.items()
    if kind == "tensor":
        if data not in tensors:
            raise CheckpointError(f"tensor {data!r} is missing")
        return tensors[data]
    if kind == "dict":
        return {k: _decode(v, tensors) for k, v in data.items()}
    if kind == "int_dict":
        return {int(k): _decode(v, tensors) for k, v in data}
    if kind in ("list", "tuple"):
        items = [_decode(v, tensors) for v in data]
        return tuple(items) if kind == "tuple" else items
    if kind == "float":
        return float(data)
    raise CheckpointError(f"unknown entry kind {kind!r}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` (tensors and plain data) to the directory ``path``, replacing an earlier one."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    encoded = {"format": FORMAT, "state": _encode(state, tensors)}
    with atomic_directory(path, overwrite=True, writer="knots finetune checkpoint", checksums=True) as staging:
        save_file(tensors, str(staging / TENSORS_NAME))
        (staging / STATE_NAME).write_text(json.dumps(encoded))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The state saved at ``path``; :class:`CheckpointError` (one line) if it cannot be used.

    The files are checked against the manifest first; only safetensors and JSON are parsed.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    problems = verify_directory(path)
    if problems:
        first = problems[0].replace(f"{path}/", "")
        raise CheckpointError(first + (f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""))
    try:
        encoded = json.loads((path / STATE_NAME).read_text())
        tensors = load_file(str(path / TENSORS_NAME))
    except (OSError, ValueError, SafetensorError) as error:
        raise CheckpointError(str(error).splitlines()[0]) from None
    if not isinstance(encoded, dict) or encoded.get("format") != FORMAT:
        raise CheckpointError(f"not a format-{FORMAT} checkpoint")
    return _decode(encoded["state"], tensors)
