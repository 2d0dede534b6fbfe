"""The pipeline's caches under ``paths.cache_dir``: keys, verified entries, locks.

Layout::

    <cache_dir>/adapters/<task>-<key>/          a finetuned adapter (PEFT directory) + .knots-manifest.json
    <cache_dir>/adapters/<task>-<key>.partial/  its resume checkpoint while training (+ manifest)
    <cache_dir>/adapters/<task>-<key>.lock      held while one process finetunes the entry
    <cache_dir>/features/<task>-<key>/          a finetuned model's features (safetensors + manifest)
    <cache_dir>/features/<task>-<key>.lock
    <cache_dir>/damaged/<kind>/<name>-<time>/   entries that failed verification, moved aside

An adapter's ``key`` hashes everything that changes the trained adapter: the model, the task's
definition, the training settings and the task's resolved rows (:attr:`TaskData.digest`). Every entry is
written by :func:`knots.atomic.atomic_directory` with each file's sha256 in its manifest, so it appears
complete or not at all; on reuse it is checked against its manifest (:func:`verified_entry`). An entry
that does not match (a changed, truncated, missing or extra file) is reported on one line, moved aside
into ``damaged/`` (never deleted) and computed again. Work on one entry is serialized across processes
by a lock file (:func:`entry_lock`): a second process finetuning the same task waits, then reuses the
first one's adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from knots.atomic import MANIFEST_NAME, atomic_directory, read_manifest, verify_directory
from knots.data.tasks import TaskData
from knots.errors import ConfigError, OutputError

META_NAME = "knots_meta.json"
LOCK_SUFFIX = ".lock"
PARTIAL_SUFFIX = ".partial"
DAMAGED_DIR = "damaged"

log = logging.getLogger("knots.pipeline")
Notify = Callable[[str], None]


def check_cache_dir(cache_dir: str | Path) -> None:
    """One ``ConfigError`` line if ``cache_dir`` could not be created or written (checked before any work)."""
    path = Path(cache_dir).expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"paths.cache_dir={cache_dir} cannot be created: {existing} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"paths.cache_dir={cache_dir} cannot be written: no write permission in {existing}")


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


def short_hash(payload: Any) -> str:
    """16 hex digits of the sha256 of ``payload`` as canonical JSON."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_key(model_cfg: Any, task_cfg: Any, finetune_cfg: Any, task: TaskData, precision: str = "fp32") -> str:
    """A short hash of everything that determines the trained adapter (``precision``: the resolved one),
    the content of the task's rows included (:attr:`TaskData.digest`)."""
    payload = {
        "model": plain_for_key(model_cfg),
        "task": plain_for_key(task_cfg),
        "finetune": plain_for_key(finetune_cfg),
        "data": [task.digest, task.class_names, task.templates],
    }
    if precision != "fp32":
        payload["precision"] = precision
    return short_hash(payload)


def adapter_dir(cache_dir: str | Path, task: str, key: str) -> Path:
    return Path(cache_dir) / "adapters" / f"{task}-{key}"


def partial_dir(entry: Path) -> Path:
    """Where the resume checkpoint of ``entry`` lives while it is being computed."""
    return entry.with_name(entry.name + PARTIAL_SUFFIX)


def is_complete(path: Path) -> bool:
    """Whether ``path`` holds an entry that was written completely (its files are not checked)."""
    manifest = read_manifest(path)
    return manifest is not None and bool(manifest.get("complete"))


def entry_checksum(path: Path) -> str:
    """One sha256 for a whole entry: of its manifest's file list (every file's size and sha256)."""
    manifest = read_manifest(path)
    if manifest is None:
        raise OutputError(f"{path}: no {MANIFEST_NAME}")
    return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()


def move_aside(path: Path, reason: str, notify: Notify | None = None, what: str = "cache entry",
               then: str = "computing it again") -> Path:
    """Move a damaged entry to ``<cache root>/damaged/<kind>/<name>-<time>`` and report it on one line.

    ``path`` is ``<cache root>/<kind>/<name>``; nothing is deleted.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.parent.parent / DAMAGED_DIR / path.parent.name / f"{path.name}-{stamp}"
    suffix = 1
    while target.exists():
        suffix += 1
        target = target.with_name(f"{path.name}-{stamp}-{suffix}")
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, target)
    (notify or log.warning)(f"{what} {path} is damaged ({reason}); moved it to {target}, {then}")
    return target


def verified_entry(path: Path, notify: Notify | None = None, what: str = "cache entry") -> bool:
    """Whether ``path`` holds a complete entry that matches its manifest.

    A missing entry is False. A damaged one (no complete manifest, a file changed, truncated, missing
    or added) is moved aside (:func:`move_aside`) and False.
    """
    if not path.exists():
        return False
    problems = verify_directory(path)
    if not problems:
        return True
    first = problems[0].replace(f"{path}/", "").replace(str(path), "the entry")
    more = f" and {len(problems) - 1} more problem(s)" if len(problems) > 1 else ""
    move_aside(path, first + more, notify, what)
    return False


@contextmanager
def entry_lock(path: Path, notify: Notify | None = None, what: str = "entry") -> Iterator[None]:
    """Hold ``<path>.lock`` (an OS file lock, released if the process dies) for the block.

    If another process holds it, say so on one line and wait for it.
    """
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path.with_name(path.name + LOCK_SUFFIX)))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        (notify or log.info)(f"another process is computing {what} {path.name}; waiting for it to finish")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def write_entry(path: Path, write: Callable[[Path], None], writer: str) -> bool:
    """Write a cache entry atomically (``write(staging)`` fills it; each file's sha256 goes to its manifest).

    Returns False, keeping the other one, if an intact entry was written at ``path`` by another process
    meanwhile (possible only where the filesystem does not support locks): one result stands.
    """
    try:
        with atomic_directory(path, writer=writer, checksums=True) as staging:
            write(staging)
        return True
    except OutputError:
        if path.is_dir() and not verify_directory(path):
            log.info("%s was written by another process meanwhile; using that one", path)
            return False
        raise
