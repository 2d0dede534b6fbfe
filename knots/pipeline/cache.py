"""The adapter cache: where a finetuned adapter lives and the key that names it.

A finished adapter is a PEFT directory ``<cache_dir>/adapters/<task>-<key>``, where ``key`` hashes
everything that changes the result (model, task definition, training settings); it is reused, never
retrained. A directory is complete when its metadata file exists (it is written last, atomically).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from knots.data.tasks import TaskData

META_NAME = "knots_meta.json"


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
