"""The authors' validation / test permutations: fetched once, verified, loaded without code.

Five tasks (Cars, GTSRB, MNIST, SUN397, SVHN) carve validation out of the test split with a fixed
permutation, ``dataset/shuffled_idxs/<task>_shuffled_idxs.pt`` in gstoica27/KnOTS: validation is the
first ``int(0.2 n)`` indices, test the rest. The files are downloaded from the repository at a
pinned commit into ``<cache_dir>/knots-reference/<commit>/``, checked against their sha256 (in
:mod:`knots.vision.paper`) on every use, and read with ``torch.load(weights_only=True)``, allowing
only numpy's array reconstruction: no code in them is ever run.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from knots.errors import ConfigError
from knots.vision.paper import AUTHORS_COMMIT, AUTHORS_REPO, TEST_ORDERS

INDEX_URL = "https://raw.githubusercontent.com/{repo}/{commit}/dataset/shuffled_idxs/{file}"


def index_url(file: str, repo: str = AUTHORS_REPO, commit: str = AUTHORS_COMMIT) -> str:
    """The raw URL of an index file at the pinned commit."""
    return INDEX_URL.format(repo=repo, commit=commit, file=file)


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/knots`` (``~/.cache/knots``) when no cache directory is given."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "knots"


def _download(url: str, timeout: float = 60.0) -> bytes:
    import urllib.request

    with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (a fixed https URL)
        return response.read()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch_index_file(file: str, sha256: str, cache_dir: str | Path | None = None,
                     fetch: Callable[[str], bytes] | None = None, commit: str = AUTHORS_COMMIT) -> Path:
    """The local path of a verified index file, downloaded on first use.

    A cached file is re-hashed on every call (the files are at most 220 KB); one that does not
    match is downloaded again. A download that does not match is an error and nothing is written.
    ``fetch`` (``url -> bytes``) replaces the HTTP download, for tests and mirrors.
    """
    path = Path(cache_dir or default_cache_dir()) / "knots-reference" / commit[:12] / file
    if path.is_file() and _sha256(path.read_bytes()) == sha256:
        return path
    url = index_url(file, commit=commit)
    try:
        data = (fetch or _download)(url)
    except Exception as error:  # offline, HTTP and DNS errors come in many types
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"cannot download the reference split file {url} ({reason}); "
                          f"to work offline, put the file at {path}") from None
    if _sha256(data) != sha256:
        raise ConfigError(f"{url}: sha256 {_sha256(data)} differs from the expected {sha256}; not used")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return path


def _numpy_array_globals() -> list[Any]:
    """The only globals an index file may name: numpy's integer array reconstruction."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]
    # the authors' files name numpy < 2's module path; files written with numpy 2 name its own
    return [_reconstruct, (_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            *(type(np.dtype(t)) for t in (np.int64, np.int32))]


def load_permutation(path: str | Path, length: int | None = None) -> np.ndarray:
    """An index file as an int64 permutation of ``range(n)`` (``n == length`` when given).

    Read with ``torch.load(weights_only=True)``; a numpy array (the authors' files) or a tensor is
    accepted. Anything else, a non-integer array or one that is not a permutation is an error.
    """
    import torch

    try:
        with torch.serialization.safe_globals(_numpy_array_globals()):
            value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        lines = str(error).splitlines() or [type(error).__name__]
        reason = next((line.strip() for line in lines if "Unsupported global" in line or "Can only build" in line), lines[0])
        raise ConfigError(f"{path}: not a readable index file ({reason})") from None
    if torch.is_tensor(value):
        value = value.numpy()
    if not isinstance(value, np.ndarray) or value.ndim != 1 or not np.issubdtype(value.dtype, np.integer):
        raise ConfigError(f"{path}: expected a 1-D integer array, got {type(value).__name__}")
    perm = value.astype(np.int64)
    if length is not None and len(perm) != length:
        raise ConfigError(f"{path}: a permutation of {len(perm)} indices, expected {length}")
    if not np.array_equal(np.sort(perm), np.arange(len(perm))):
        raise ConfigError(f"{path}: not a permutation of 0..{len(perm) - 1}")
    return perm


def permutation_split(perm: np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``(validation, test)`` positions: the first ``int(fraction * n)`` entries of ``perm``, and the rest."""
    k = int(len(perm) * fraction)
    return perm[:k], perm[k:]


def file_names(data: Any, image_key: str) -> list[str] | None:
    """The base file names of a ``datasets`` image column (``None`` if the source stored none).

    Read from the Arrow storage (``{bytes, path}``), so no image is decoded.
    """
    column = data.with_format("arrow")[image_key]
    if not hasattr(column, "type") or "path" not in {f.name for f in column.type}:
        return None
    paths = column.combine_chunks().field("path").to_pylist() if hasattr(column, "combine_chunks") \
        else column.field("path").to_pylist()
    if any(not p for p in paths):
        return None
    return [os.path.basename(str(p)) for p in paths]


def authors_order(order: str, n: int, labels: Sequence[int], names: Sequence[str] | None, task: str) -> np.ndarray:
    """Row ids of a test split listed in the order of the authors' loader (see ``paper.TEST_ORDERS``).

    ``names``: the rows' image file names, needed by the file-name orders.
    """
    if order not in TEST_ORDERS:
        raise ConfigError(f"task {task}: test_order must be one of {', '.join(TEST_ORDERS)}, got {order!r}")
    if order == "dataset":
        return np.arange(n)
    if names is None:
        raise ConfigError(f"task {task}: the authors' permutation indexes the test images in {order.replace('_', ' ')} "
                          f"order, but this dataset stores no image file names; set test_order: dataset to apply "
                          f"it to the dataset's own row order (other images than the authors')")
    if len(set(names)) != len(names):
        raise ConfigError(f"task {task}: the test split's image file names are not unique; cannot restore the authors' order")
    keys = names if order == "file_name" else list(zip(labels, names))
    return np.asarray(sorted(range(n), key=keys.__getitem__), dtype=np.int64)
