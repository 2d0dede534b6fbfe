"""The registry of merge methods: name -> function, task-vector space and paper reference.

Adding a method is one function registered here plus one ``conf/method/<name>.yaml`` with its
default hyperparameters and its search: ``search`` (the hyperparameters the linear validation search
tunes, in order), optionally ``repeat`` (hyperparameters whose every value re-evaluates the selected
point, e.g. DARE's seed) and ``ranges`` (method-specific values, where the paper searches other values
than the shared search config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from knots.errors import ConfigError
from knots.merging.family import Hyperparameters
from knots.merging.vectors import TaskVectors

#: What a method merges: ``dense``, the full updates entry by entry; ``knots`` / ``knots_row``, the KnOTS
#: aligned blocks; ``core``, the Core Space cores; ``subspace``, the full updates through spectral
#: operations that commute with orthonormal changes of basis (computed on the Core Space cores).
Space = Literal["dense", "knots", "knots_row", "core", "subspace"]
MergeFunction = Callable[[TaskVectors, Hyperparameters, bool], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered method. ``space``: full updates, KnOTS column blocks or KnOTS row blocks.

    ``linear``: the merge is a fixed linear combination of the task updates, so a merge of full updates
    is exactly the tasks' LoRA factors concatenated.
    """

    name: str
    function: MergeFunction
    space: Space
    reference: str
    uses: tuple[str, ...]
    linear: bool = False

    @property
    def summary(self) -> str:
        return (self.function.__doc__ or "").strip().splitlines()[0]


METHODS: dict[str, MergeMethod] = {}


def register(name: str, space: Space, reference: str, uses: tuple[str, ...] = ("scaling",), linear: bool = False) -> Callable[[MergeFunction], MergeFunction]:
    """Register ``function`` as method ``name``; ``uses`` names the hyperparameters it reads."""

    def decorator(function: MergeFunction) -> MergeFunction:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        METHODS[name] = MergeMethod(name=name, function=function, space=space, reference=reference, uses=uses, linear=linear)
        return function

    return decorator


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(name: str) -> MergeMethod:
    """The registered method ``name``; an unknown name lists the known ones."""
    import knots.merging.methods  # noqa: F401  (registers the built-in methods)

    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown merge method {name!r}; known methods: {', '.join(method_names())}") from None


def load_method_config(name: str) -> dict[str, object]:
    """The content of ``conf/method/<name>.yaml`` from the configuration shipped with the package."""
    from omegaconf import OmegaConf

    from knots.config.resources import config_dir

    get_method(name)
    path = config_dir() / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"merge method {name!r} has no config file {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]

