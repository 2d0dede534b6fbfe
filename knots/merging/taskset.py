"""A validated stack of LoRA adapters: one factor pair (or nothing) per task and module."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from knots.errors import AdapterError
from knots.lora import LoraAdapter, LoraModule


@dataclass
class TaskSet:
    """Adapters aligned by module. A module that a task does not target is a zero update for it."""

    tasks: list[str]
    modules: list[str]
    shapes: dict[str, tuple[int, int]]
    factors: dict[str, list[LoraModule | None]]

    @classmethod
    def from_adapters(cls, adapters: list[LoraAdapter]) -> "TaskSet":
        if len(adapters) < 1:
            raise AdapterError("no adapters given")
        names = [adapter.name for adapter in adapters]
        if len(set(names)) != len(names):
            raise AdapterError(f"adapter names must be distinct, got {names}")
        modules = sorted(set().union(*(adapter.modules for adapter in adapters)))
        shapes: dict[str, tuple[int, int]] = {}
        owners: dict[str, str] = {}
        factors: dict[str, list[LoraModule | None]] = {}
        for module in modules:
            row: list[LoraModule | None] = []
            for adapter in adapters:
                lora = adapter.modules.get(module)
                row.append(lora)
                if lora is None:
                    continue
                if module in shapes and shapes[module] != lora.shape:
                    raise AdapterError(
                        f"module {module!r} has shape {shapes[module]} in {owners[module]!r} "
                        f"but {lora.shape} in {adapter.name!r}"
                    )
                shapes.setdefault(module, lora.shape)
                owners.setdefault(module, adapter.name)
            if factors_layout(row) is None:
                raise AdapterError(f"module {module!r}: adapters disagree on fan_in_fan_out (the weight's layout)")
            factors[module] = row
        return cls(tasks=names, modules=modules, shapes=shapes, factors=factors)

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    def fan_in_fan_out(self, module: str) -> bool:
        return next(f for f in self.factors[module] if f is not None).fan_in_fan_out

    def ranks(self, module: str) -> list[int]:
        return [0 if f is None else f.rank for f in self.factors[module]]

    def deltas(self, module: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense updates of every task for one module: ``(n_tasks, out, in)``."""
        out_features, in_features = self.shapes[module]
        stack = torch.zeros((self.n_tasks, out_features, in_features), dtype=dtype)
        for index, lora in enumerate(self.factors[module]):
            if lora is not None:
                stack[index] = lora.delta(dtype)
        return stack

    def numel(self) -> int:
        """Entries of one task's full-update vector over all modules."""
        return sum(o * i for o, i in self.shapes.values())


def factors_layout(row: list[LoraModule | None]) -> bool | None:
    """The shared ``fan_in_fan_out`` flag of a module's factors, or None if the tasks disagree."""
    flags = {lora.fan_in_fan_out for lora in row if lora is not None}
    return flags.pop() if len(flags) == 1 else None
