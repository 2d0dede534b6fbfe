"""The authors' merge functions, for side-by-side tests.

Nothing of the authors' code is part of this project. Each function is read at test time from a local
bare git mirror of the authors' repository (``$KNOTS_AUTHOR_MIRRORS/<owner>+<name>/repo``, default
``/work/.mirror``), written to a temporary directory and imported from there; the calling test is skipped,
with the reason, when the mirror is absent (as on CI).
"""

from __future__ import annotations

import atexit
import contextlib
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

ISO_MERGING = "danielm1405/iso-merging"
TSV = "AntoAndGar/task_singular_vectors"
CORE_SPACE = "apanariello4/core-space-merging"
KNOTS = "gstoica27/KnOTS"


def mirror(repo: str) -> Path:
    return Path(os.environ.get("KNOTS_AUTHOR_MIRRORS", "/work/.mirror")) / repo.replace("/", "+") / "repo"


def extract(repo: str, files: list[str]) -> Path:
    """Write ``files`` of ``repo``'s HEAD into a fresh temporary directory (skips without the mirror)."""
    git_dir = mirror(repo)
    if not git_dir.is_dir():
        pytest.skip(f"no local mirror of {repo} at {git_dir} (set KNOTS_AUTHOR_MIRRORS); the authors' code is never shipped")
    root = Path(tempfile.mkdtemp(prefix="knots-authors-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    for name in files:
        text = subprocess.run(["git", "--git-dir", str(git_dir), "show", f"HEAD:{name}"], check=True, capture_output=True).stdout
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(text)
    return root


@contextlib.contextmanager
def isolated_imports(root: Path, stubs: dict[str, ModuleType]):
    """Import from ``root`` with ``stubs`` standing in for modules the tested functions never use;
    ``sys.path`` and ``sys.modules`` are restored afterwards."""
    saved_path = list(sys.path)
    shadowed = {name: sys.modules[name] for name in stubs if name in sys.modules}
    sys.path.insert(0, str(root))
    sys.modules.update(stubs)
    try:
        yield
    finally:
        sys.path[:] = saved_path
        for name, module in list(sys.modules.items()):
            if name in stubs or str(getattr(module, "__file__", None) or "").startswith(str(root)) or name in {"src", "src.utils"}:
                del sys.modules[name]
        sys.modules.update(shadowed)


def load(repo: str, files: list[str], module: str, stubs: dict[str, ModuleType] | None = None) -> ModuleType:
    root = extract(repo, files)
    with isolated_imports(root, stubs or {}):
        return importlib.import_module(module)


def iso_module() -> ModuleType:
    """``src/utils/iso.py``: ``iso_c(task_vectors, config)`` and ``iso_cts(task_vectors, config)``."""
    return load(ISO_MERGING, ["src/utils/iso.py"], "src.utils.iso")


def tsv_module() -> ModuleType:
    """``src/utils/TSVM_utils.py``: ``compute_and_sum_svd_mem_reduction(task_vectors, config)``."""
    return load(TSV, ["src/utils/TSVM_utils.py"], "src.utils.TSVM_utils")


def core_space_module() -> ModuleType:
    """``task_merger.py`` with the ``merging_functions.py`` and ``masking_ops.py`` it imports.

    Its ``utils`` (datasets, CLIP, training helpers) and ``einops`` are replaced by empty stubs: the
    functions run here (``get_core_matrices``, ``_merge_tensors``, ``isotropize_matrix``) use neither.
    """
    stubs = {"utils": types.ModuleType("utils"), "einops": types.ModuleType("einops")}
    stubs["utils"].get_mask_fn = None
    return load(CORE_SPACE, ["task_merger.py", "merging_functions.py", "masking_ops.py"], "task_merger", stubs)


def knots_merging_functions() -> ModuleType:
    """The KnOTS reference's ``merging_functions.py`` (``ties_merging``, ``topk_values_mask``)."""
    return load(KNOTS, ["merging_functions.py"], "merging_functions")


def task_vectors(updates: list) -> list[SimpleNamespace]:
    """The authors' task-vector objects: ``.vector`` maps a parameter name to its update."""
    return [SimpleNamespace(vector={"layer.weight": update}) for update in updates]


def iso_config(n_tasks: int, common_space_fraction: float = 0.8) -> SimpleNamespace:
    return SimpleNamespace(
        device="cpu", DATASETS=[f"task{i}" for i in range(n_tasks)], method=SimpleNamespace(common_space_fraction=common_space_fraction)
    )


def core_merger(task_merger: ModuleType):
    """A ``MatrixPerLayerMerger`` without models: only its per-layer merge functions are used."""
    merger = object.__new__(task_merger.MatrixPerLayerMerger)
    merger.cache = {}
    return merger
