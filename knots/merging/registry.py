"""The registry of merge methods: name -> function, task-vector space and paper reference.

Adding a method is one function registered here plus one ``conf/method/<name>.yaml`` with its
default hyperparameters and its search: ``search`` (the hyperparameters the linear validation search
tunes, in order), optionally ``repeat`` (hyperparameters whose every value re-evaluates the selected
point, e.g. DARE's seed) and ``ranges`` (method-specific values, where the paper searches other values
than the shared search config).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

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


def config_dir() -> Path:
    """The project's ``conf/`` directory (``KNOTS_CONFIG_DIR`` overrides it)."""
    override = os.environ.get("KNOTS_CONFIG_DIR")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "conf"


def load_method_config(name: str) -> dict[str, object]:
    """The default hyperparameters of ``name`` from ``conf/method/<name>.yaml``."""
    from omegaconf import OmegaConf

    get_method(name)
    path = config_dir() / "method" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"merge method {name!r} has no config file {path}")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)  # type: ignore[return-value]


#: Keys of a method config file that describe its search, not its defaults.
SEARCH_KEYS = ("search", "repeat", "ranges")


@dataclass(frozen=True)
class SearchSpec:
    """How the validation search tunes a method: coordinates in order, repeated ones, own ranges."""

    search: tuple[str, ...]
    repeat: tuple[str, ...] = ()
    ranges: dict[str, tuple[Any, ...]] = field(default_factory=dict)


def load_search_spec(name: str) -> SearchSpec:
    """The ``search``, ``repeat`` and ``ranges`` of ``conf/method/<name>.yaml``, checked against the
    hyperparameters the method reads and their valid values."""
    method = get_method(name)
    config = load_method_config(name)
    where = f"conf/method/{name}.yaml"
    lists = {key: config.get(key, []) for key in ("search", "repeat")}
    ranges = config.get("ranges", {}) or {}
    for key, value in lists.items():
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list of hyperparameter names, got {value!r}")
    if not isinstance(ranges, dict):
        raise ConfigError(f"{where}: ranges must map hyperparameter names to lists of values")
    for hp in [*lists["search"], *lists["repeat"], *ranges]:
        if hp not in method.uses:
            raise ConfigError(f"{where}: {name} does not read hyperparameter {hp!r} (it uses: {', '.join(method.uses)})")
    for hp, values in ranges.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: ranges.{hp} must be a non-empty list of values")
        for value in values:
            Hyperparameters(**{hp: value})
    return SearchSpec(tuple(lists["search"]), tuple(lists["repeat"]), {hp: tuple(values) for hp, values in ranges.items()})
