"""A content digest of a task's resolved rows: what the adapter and feature caches are keyed on.

The digest covers, for every split in order, each example's input and label, so an edited data file
(a flipped label, a changed sentence, a row added or removed) gives a new digest and a cache entry
made from the old rows is never reused for the new ones.

Inputs are hashed by value: text, numbers, tuples of them (sentence pairs), bytes, arrays, tensors and
PIL images (mode, size and pixels). A lazy input (an image decoded on demand) is hashed by a stable
identity instead of being read: its ``identity()`` if it has one, otherwise, for a dataclass, its class
name and fields, where a Hugging Face ``datasets.Dataset`` stands for its fingerprint (which
``datasets`` derives from the data files and every transform applied to them). So hashing the rows of
an image dataset costs no decoding: a few microseconds per row.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from knots.errors import ConfigError

SPLITS = ("train", "validation", "test")


def _length(hasher: Any, tag: bytes, n: int) -> None:
    hasher.update(tag + struct.pack("<q", n))


def _fingerprint(value: Any) -> str | None:
    """A ``datasets.Dataset``'s fingerprint (None for anything else)."""
    datasets = sys.modules.get("datasets")
    if datasets is not None and isinstance(value, datasets.Dataset):
        return value._fingerprint
    return None


_FIELDS: dict[type, tuple[str, str]] = {}


def _fields(cls: type) -> tuple[str, tuple[str, ...]]:
    """A dataclass's qualified name and field names (cached: this runs once per row of a lazy dataset)."""
    if cls not in _FIELDS:
        _FIELDS[cls] = (f"{cls.__module__}.{cls.__qualname__}", tuple(f.name for f in dataclasses.fields(cls)))
    return _FIELDS[cls]


def feed(hasher: Any, value: Any) -> None:
    """Add ``value`` to ``hasher`` unambiguously (every value is tagged with its kind and length)."""
    kind = type(value)
    if kind is str:
        data = value.encode("utf-8", "surrogatepass")
        _length(hasher, b"s", len(data))
        hasher.update(data)
    elif value is None or kind is int or kind is float or kind is bool:
        text = repr(value).encode()
        _length(hasher, b"n", len(text))
        hasher.update(text)
    elif kind is tuple or kind is list:
        _length(hasher, b"t", len(value))
        for item in value:
            feed(hasher, item)
    elif dataclasses.is_dataclass(kind) and not callable(getattr(value, "identity", None)):
        name, fields = _fields(kind)
        _length(hasher, b"d", len(fields))
        feed(hasher, name)
        for field in fields:
            feed(hasher, getattr(value, field))
    else:
        _feed_other(hasher, value)


def _feed_other(hasher: Any, value: Any) -> None:
    """Subclasses of the plain types, bytes, mappings, datasets, inputs with an ``identity()``, arrays."""
    if isinstance(value, str):
        feed(hasher, str(value))
    elif isinstance(value, (bool, int, float)):
        feed(hasher, float(value) if isinstance(value, float) else int(value))
    elif isinstance(value, (bytes, bytearray, memoryview)):
        _length(hasher, b"b", len(value))
        hasher.update(value)
    elif isinstance(value, (tuple, list)):
        feed(hasher, list(value))
    elif isinstance(value, Mapping):
        _length(hasher, b"m", len(value))
        for key in sorted(value, key=repr):
            feed(hasher, key)
            feed(hasher, value[key])
    elif (fingerprint := _fingerprint(value)) is not None:
        feed(hasher, ("datasets.Dataset", fingerprint))
    elif callable(getattr(value, "identity", None)):
        feed(hasher, (type(value).__qualname__, value.identity()))
    else:
        _feed_array(hasher, value)


def _feed_array(hasher: Any, value: Any) -> None:
    """Tensors, arrays and PIL images by content; lazy inputs without an identity by their content."""
    from knots.data.tasks import LazyInput

    if isinstance(value, LazyInput):
        feed(hasher, value.load())
        return
    if hasattr(value, "tobytes") and hasattr(value, "mode") and hasattr(value, "size"):  # a PIL image
        feed(hasher, ("PIL", value.mode, tuple(value.size)))
        feed(hasher, value.tobytes())
        return
    try:
        import numpy as np
        import torch
    except ImportError:  # pragma: no cover - both are dependencies
        np = torch = None
    if torch is not None and isinstance(value, torch.Tensor):
        value = value.detach().cpu().contiguous().numpy() if value.dtype != torch.bfloat16 else value.float().numpy()
    if np is not None and isinstance(value, (np.ndarray, np.generic)):
        array = np.ascontiguousarray(value)
        feed(hasher, ("array", str(array.dtype), tuple(array.shape)))
        feed(hasher, array.tobytes())
        return
    raise ConfigError(f"cannot key the cache on an input of type {type(value).__name__}: give it an identity() "
                      "method returning plain data, or make it a dataclass")


def rows_digest(examples: Sequence[tuple[Any, int]]) -> str:
    """sha256 of a sequence of ``(input, label)`` examples, in order."""
    hasher = hashlib.sha256()
    _length(hasher, b"rows", len(examples))
    for x, y in examples:
        feed(hasher, x)
        feed(hasher, int(y))
    return hasher.hexdigest()


def task_digest(splits: Mapping[str, Sequence[tuple[Any, int]]]) -> str:
    """sha256 over the digests of every split (train, validation, test) of a task."""
    hasher = hashlib.sha256()
    for name in SPLITS:
        feed(hasher, (name, rows_digest(splits[name])))
    return hasher.hexdigest()
