"""The KnOTS alignment: one SVD per module of the tasks' updates, concatenated.

Column orientation (the paper's method): ``M = [dW_1, ..., dW_n] = U S V^T`` and
``dW_i = U (S V_i^T)``; merges act on the row-scaled blocks ``S V_i^T`` and rebuild with ``U``.
Row orientation (the paper's ablation): ``M = [dW_1; ...; dW_n]`` with a shared ``S V^T`` and per-task
``U_i``; it is computed as the column alignment of the transposed updates.

The factored path never forms ``M``: ``M = [B_1 .. B_n] blockdiag(A_1 .. A_n)``, so a thin QR of the
stacked ``B`` and of each ``A_i^T`` reduces the SVD to one of a small ``(nr x nr)`` core.

Both paths fix each component's sign the same way (:func:`canonical_signs`), so the aligned blocks, and
every merge of them, do not depend on which SVD routine ran.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal

import torch

from knots.errors import AdapterError
from knots.lora import LoraModule
from knots.merging.taskset import TaskSet

#: The decomposition an :class:`Ingredients` holds: the KnOTS alignment by columns (the paper) or rows
#: (its ablation), or the Core Space basis (:mod:`knots.merging.core`).
Orientation = Literal["column", "row", "core"]
SvdPath = Literal["factored", "dense"]
SINGULAR_VALUE_TOLERANCE = 1e-5
SIGN_TIE_RTOL = 1e-6


@dataclass
class ModuleAlignment:
    """``dW_i = U @ blocks[i]`` (column), ``dW_i = (U @ blocks[i]).T`` (row), or
    ``dW_i = U @ blocks[i] @ V`` when a right basis ``V`` is given (the Core Space).

    ``U``: ``(d, k)`` orthonormal columns; ``blocks``: ``(n_tasks, k, d')``, each ``S V_i^T`` (KnOTS)
    or each task's ``(k, k')`` core; ``V``: ``(k', in)`` orthonormal rows, or None.
    """

    U: torch.Tensor
    blocks: torch.Tensor
    singular_values: torch.Tensor
    V: torch.Tensor | None = None

    @property
    def components(self) -> int:
        return self.U.shape[1]

    def to(self, dtype: torch.dtype) -> "ModuleAlignment":
        return ModuleAlignment(
            U=self.U.to(dtype),
            blocks=self.blocks.to(dtype),
            singular_values=self.singular_values.to(dtype),
            V=None if self.V is None else self.V.to(dtype),
        )


def canonical_signs(U: torch.Tensor) -> torch.Tensor:
    """One sign per column of ``U`` that makes its largest-magnitude entry positive.

    An SVD fixes every component only up to its sign, and different routines (or the factored and
    dense paths) pick different ones. Multiplying column ``j`` of ``U`` and row ``j`` of ``S V^T`` by
    ``signs[j]`` leaves the decomposition exact and makes it the same whichever routine ran.
    """
    if U.numel() == 0:
        return torch.ones(U.shape[1], dtype=U.dtype)
    # Entries within a relative 1e-6 of the column's largest magnitude count as tied, and the first
    # of them decides, so that rounding differences between routines cannot change the choice.
    magnitudes = U.abs()
    near_max = magnitudes >= magnitudes.max(dim=0).values * (1 - SIGN_TIE_RTOL)
    rows = near_max.to(torch.int8).argmax(dim=0)
    signs = torch.sign(U.gather(0, rows[None, :])[0])
    return torch.where(signs == 0, torch.ones_like(signs), signs)


def factor_pairs(row: list[LoraModule | None], orientation: Orientation, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
    """Per task ``(left, right)`` with ``left @ right`` = the update in the orientation's layout."""
    pairs: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for lora in row:
        if lora is None:
            pairs.append(None)
        elif orientation == "column":
            pairs.append((lora.scaled_B(dtype), lora.A.to(dtype)))
        else:
            pairs.append((lora.A.to(dtype).T, lora.scaled_B(dtype).T))
    return pairs


def align_factored(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], tolerance: float) -> ModuleAlignment:
    """Exact SVD of ``[L_1 R_1, ..., L_n R_n]`` through QR factorizations and a small core SVD."""
    present = [index for index, pair in enumerate(pairs) if pair is not None]
    left = torch.cat([pairs[i][0] for i in present], dim=1)
    q_left, r_left = torch.linalg.qr(left)
    q_rights, r_rights = zip(*(torch.linalg.qr(pairs[i][1].T) for i in present))
    core = r_left @ torch.block_diag(*(r.T for r in r_rights))
    u_core, singular, vt_core = torch.linalg.svd(core, full_matrices=False)
    keep = singular > tolerance
    u_core, singular, vt_core = u_core[:, keep], singular[keep], vt_core[keep]
    U = q_left @ u_core
    signs = canonical_signs(U)
    U, vt_core = U * signs, vt_core * signs[:, None]
    width = pairs[present[0]][1].shape[1]
    blocks = torch.zeros((len(pairs), singular.numel(), width), dtype=U.dtype)
    offset = 0
    for index, q_right in zip(present, q_rights):
        columns = q_right.shape[1]
        blocks[index] = singular[:, None] * (vt_core[:, offset:offset + columns] @ q_right.T)
        offset += columns
    return ModuleAlignment(U=U, blocks=blocks, singular_values=singular)


def align_dense(pairs: list[tuple[torch.Tensor, torch.Tensor] | None], shape: tuple[int, int], tolerance: float, dtype: torch.dtype) -> ModuleAlignment:
    """The reference computation: a dense SVD of the concatenated updates."""
    blocks = [torch.zeros(shape, dtype=dtype) if pair is None else pair[0] @ pair[1] for pair in pairs]
    U, singular, vt = torch.linalg.svd(torch.cat(blocks, dim=1), full_matrices=False)
    keep = singular > tolerance
    U, singular, vt = U[:, keep], singular[keep], vt[keep]
    signs = canonical_signs(U)
    U, vt = U * signs, vt * signs[:, None]
    scaled = (singular[:, None] * vt).reshape(singular.numel(), len(pairs), shape[1]).transpose(0, 1)
    return ModuleAlignment(U=U, blocks=scaled.contiguous(), singular_values=singular)


def align_module(
    taskset: TaskSet,
    module: str,
    orientation: Orientation = "column",
    path: SvdPath = "factored",
    dtype: torch.dtype = torch.float64,
    tolerance: float = SINGULAR_VALUE_TOLERANCE,
) -> ModuleAlignment:
    """Align one module's task updates (computed in ``dtype``); ``core``: its Core Space."""
    if orientation == "core":
        from knots.merging.core import core_module

        return core_module(taskset, module, path, dtype)
    pairs = factor_pairs(taskset.factors[module], orientation, dtype)
    out_features, in_features = taskset.shapes[module]
    shape = (out_features, in_features) if orientation == "column" else (in_features, out_features)
    if path == "factored":
        return align_factored(pairs, tolerance)
    if path == "dense":
        return align_dense(pairs, shape, tolerance, dtype)
    raise ValueError(f"unknown SVD path {path!r}; expected 'factored' or 'dense'")


@dataclass
class Ingredients:
    """The KnOTS alignment of a task set: reusable for any number of merges, saveable to disk."""

    tasks: list[str]
    orientation: Orientation
    modules: dict[str, ModuleAlignment]
    shapes: dict[str, tuple[int, int]]

    def items(self) -> Iterator[tuple[str, ModuleAlignment]]:
        return iter(self.modules.items())

    def save(self, directory: str | Path) -> None:
        """Write ``ingredients.safetensors`` and ``ingredients.json`` into ``directory``."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for name, alignment in self.modules.items():
            tensors[f"{name}.U"] = alignment.U.contiguous()
            tensors[f"{name}.blocks"] = alignment.blocks.contiguous()
            tensors[f"{name}.S"] = alignment.singular_values.contiguous()
            if alignment.V is not None:
                tensors[f"{name}.V"] = alignment.V.contiguous()
        save_file(tensors, str(directory / "ingredients.safetensors"))
        meta = {"tasks": self.tasks, "orientation": self.orientation, "shapes": {k: list(v) for k, v in self.shapes.items()}}
        (directory / "ingredients.json").write_text(json.dumps(meta, indent=2))

    @classmethod
    def load(cls, directory: str | Path) -> "Ingredients":
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            meta = json.loads((directory / "ingredients.json").read_text())
            tensors = load_file(str(directory / "ingredients.safetensors"))
        except FileNotFoundError as error:
            raise AdapterError(f"{directory}: no saved alignment ({Path(error.filename).name} missing)") from None
        except Exception as error:
            raise AdapterError(f"{directory}: unreadable saved alignment ({error})") from None
        modules = {
            name: ModuleAlignment(U=tensors[f"{name}.U"], blocks=tensors[f"{name}.blocks"], singular_values=tensors[f"{name}.S"], V=tensors.get(f"{name}.V"))
            for name in meta["shapes"]
        }
        shapes = {name: tuple(shape) for name, shape in meta["shapes"].items()}
        return cls(tasks=meta["tasks"], orientation=meta["orientation"], modules=modules, shapes=shapes)


def align(
    taskset: TaskSet,
    orientation: Orientation = "column",
    path: SvdPath = "factored",
    dtype: torch.dtype = torch.float64,
    storage_dtype: torch.dtype = torch.float32,
    tolerance: float = SINGULAR_VALUE_TOLERANCE,
    progress: bool = False,
) -> Ingredients:
    """Align every module of ``taskset``; results are kept in ``storage_dtype``."""
    from tqdm.auto import tqdm

    modules: dict[str, ModuleAlignment] = {}
    label = "Core Space" if orientation == "core" else "KnOTS alignment"
    for module in tqdm(taskset.modules, desc=f"{label} ({path})", unit="module", disable=not progress, leave=False):
        modules[module] = align_module(taskset, module, orientation, path, dtype, tolerance).to(storage_dtype)
    return Ingredients(tasks=list(taskset.tasks), orientation=orientation, modules=modules, shapes=dict(taskset.shapes))
