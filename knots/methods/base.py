"""What every merge method of ``knots-run`` is: a registered function from merge inputs and
hyperparameters to a candidate model, with the metadata a search needs.

Engine methods (``knots.merging``: TA, TIES, DARE, KnOTS, ...) merge the adapters' factors; data-dependent
methods (RegMean, the ensemble, ...) also read the backbone and the tasks' training inputs or the
finetuned models' outputs. All of them share :class:`Method`, one dispatch and one search.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

from knots.data.tasks import TaskData
from knots.heads import Head
from knots.lora import LoraAdapter
from knots.models.base import Backbone


@dataclass(frozen=True)
class MergedModel:
    """The backbone plus one merged update ``{"<module>.weight": dW}``, evaluated with each task's own head."""

    delta: dict[str, torch.Tensor]


@dataclass(frozen=True)
class FinetunedEnsemble:
    """Every finetuned model at once; ``rule`` combines their logits (see ``knots.metrics.ENSEMBLE_RULES``)."""

    rule: str = "most_confident"


Candidate = MergedModel | FinetunedEnsemble


@dataclass(frozen=True)
class TaskAdapter:
    """One task's finetuned (or given) model in the model pool: its LoRA factors and, with trained
    heads, its head. ``info`` says where it came from (cache key, reused, resumed, checksum)."""

    task: str
    path: str
    adapter: LoraAdapter
    head: Head | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class MergeInputs:
    """What methods merge from. ``session`` is the engine over the adapters (its KnOTS alignment is
    computed once, on first use); the backbone and tasks serve data-dependent methods.

    ``cached(key, compute)`` keeps statistics that several search points share (e.g. RegMean's Gram
    matrices); values depend only on the key, never on which point asked first. ``heads``: the
    :class:`~knots.heads.HeadSet` merged models are evaluated with, for methods that need the
    finetuned models' logits (Fisher).
    """

    adapters: list[TaskAdapter]
    backbone: Backbone
    tasks: list[TaskData]
    batch_size: int
    progress: bool = False
    session: Any = None
    heads: Any = None
    _cache: dict[Hashable, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.session is None:
            from knots.merging import MergeSession

            self.session = MergeSession([a.adapter for a in self.adapters])

    def cached(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]


MethodFunction = Callable[..., Candidate]


@dataclass(frozen=True)
class Method:
    """A registered method: ``build(inputs, **hyperparameters) -> Candidate``.

    ``uses``: the hyperparameters it reads; ``needs_data``: whether it reads data or model outputs
    beyond the adapters (RegMean, Fisher, the ensemble); ``reference``: its paper; ``check``: validates
    hyperparameter values before any work (raises ``ConfigError``).
    """

    name: str
    build: MethodFunction
    reference: str
    uses: tuple[str, ...]
    needs_data: bool
    check: Callable[[dict[str, Any]], None] | None = None

    @property
    def summary(self) -> str:
        return (self.build.__doc__ or "").strip().splitlines()[0] if self.build.__doc__ else ""
