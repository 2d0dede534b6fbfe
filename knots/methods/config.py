"""A method's configuration: ``conf/method/<name>.yaml`` plus the run's ``method_params``.

The file holds the method's hyperparameter defaults (the keys ``knots-merge`` reads as ``method.<key>``)
and, for the validation search of ``knots-run``:

- ``search``: the hyperparameters tuned, in order (the paper's linear search: scaling, then top-K or p);
- ``repeat``: hyperparameters whose every value is tried at the selected point, keeping the best (the
  paper runs DARE with three seeds and reports the best);
- ``ranges``: values for hyperparameters whose range is the method's own; the others come from the
  search config's shared ``ranges`` (paper App. C);
- ``_target_``: the Python function that implements the method, imported on use, so a method defined
  outside knots needs nothing but its YAML file on the config search path.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from knots.errors import ConfigError

#: Keys of a method file that are not hyperparameters.
METADATA_KEYS = ("name", "_target_", "search", "repeat", "ranges")


@dataclass(frozen=True)
class MethodConfig:
    """A method's hyperparameter defaults (restricted to the ones it reads) and search declaration."""

    name: str
    defaults: dict[str, Any]
    search: tuple[str, ...] = ()
    repeat: tuple[str, ...] = ()
    ranges: dict[str, list[Any]] = field(default_factory=dict)

    def coordinates(self, shared: Mapping[str, list[Any]], fixed: Iterable[str] = ()) -> tuple[list[tuple[str, list[Any]]], list[tuple[str, list[Any]]]]:
        """``(searched, repeated)`` coordinates with their values; ``fixed`` hyperparameters are left out."""
        fixed = set(fixed)

        def values(name: str) -> list[Any]:
            if name in self.ranges:
                return list(self.ranges[name])
            if name in shared:
                return list(shared[name])
            raise ConfigError(f"method {self.name}: no search range for {name!r} (add it to search.ranges or the method's ranges)")

        searched = [(n, values(n)) for n in self.search if n not in fixed]
        repeated = [(n, values(n)) for n in self.repeat if n not in fixed]
        return searched, repeated


def _import_target(name: str, raw: Mapping[str, Any]) -> None:
    target = raw.get("_target_")
    if not target:
        return
    from hydra.utils import get_object

    try:
        get_object(str(target))
    except Exception:  # Hydra raises ImportError / InstantiationException variants
        raise ConfigError(f"method {name}: cannot import {target!r}") from None


def ensure_registered(name: str, extra_dirs: Iterable[str | Path] = ()) -> None:
    """Import the ``_target_`` of ``method/<name>.yaml`` (if the file exists), which registers a method
    defined outside knots."""
    from knots.config.resources import group_options

    extra_dirs = list(extra_dirs)
    if name in group_options("method", extra_dirs):
        _import_target(name, raw_method_file(name, extra_dirs))


def raw_method_file(name: str, extra_dirs: Iterable[str | Path] = ()) -> dict[str, Any]:
    """The content of ``method/<name>.yaml`` on the config search path (the packaged ``conf/`` first)."""
    from knots.config.resources import load_option

    return OmegaConf.to_container(load_option("method", name, extra_dirs), resolve=True)  # type: ignore[return-value]


def method_config(name: str, overrides: Mapping[str, Any] | None = None, extra_dirs: Iterable[str | Path] = ()) -> MethodConfig:
    """The method's defaults with ``overrides`` (the run's ``method_params.<name>``) on top."""
    from knots.methods import get_method

    raw = raw_method_file(name, extra_dirs)
    _import_target(name, raw)
    method = get_method(name)
    defaults = {k: v for k, v in raw.items() if k in method.uses}
    missing = [k for k in method.uses if k not in defaults]
    if missing:
        raise ConfigError(f"method {name}: conf/method/{name}.yaml has no default for {', '.join(missing)}")
    defaults.update(overrides or {})
    where = f"conf/method/{name}.yaml"
    lists = {key: raw.get(key) or [] for key in ("search", "repeat")}
    ranges = raw.get("ranges") or {}
    for key, value in lists.items():
        if not isinstance(value, list):
            raise ConfigError(f"{where}: {key} must be a list of hyperparameter names, got {value!r}")
    if not isinstance(ranges, dict):
        raise ConfigError(f"{where}: ranges must map hyperparameter names to lists of values")
    for key in (*lists["search"], *lists["repeat"], *ranges):
        if key not in method.uses:
            raise ConfigError(f"{where}: {name} does not read hyperparameter {key!r} (it uses: {', '.join(method.uses)})")
    for key, values in ranges.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}: ranges.{key} must be a non-empty list of values")
        for value in values:
            check_values(name, {**defaults, key: value})
    return MethodConfig(name=name, defaults=defaults, search=tuple(lists["search"]), repeat=tuple(lists["repeat"]),
                        ranges={key: list(values) for key, values in ranges.items()})


def check_method_params(name: str, params: Mapping[str, Any]) -> None:
    """Fail on a hyperparameter the method does not read, or on an invalid value."""
    from knots.methods import get_method

    method = get_method(name)
    for key in params:
        if key not in method.uses:
            raise ConfigError(f"method {name} has no hyperparameter {key!r} (it uses: {', '.join(method.uses) or 'none'})")
    check_values(name, params)


def check_values(name: str, params: Mapping[str, Any]) -> None:
    """Range and type checks of hyperparameter values, before any work (engine methods: the engine's own)."""
    from knots.merging import METHODS as ENGINE
    from knots.merging import Hyperparameters
    from knots.methods import get_method

    method = get_method(name)
    if method.check is not None:
        method.check(dict(params))
    elif name in ENGINE:
        known = Hyperparameters.__dataclass_fields__
        check_types(name, params, Hyperparameters)
        Hyperparameters(**{k: v for k, v in params.items() if k in known})


def check_types(name: str, params: Mapping[str, Any], schema: type) -> None:
    """Each value of ``params`` has the type its field in the dataclass ``schema`` declares: an integer
    (not a bool, not 1.5), a finite number, or a string; others are left to the schema's own checks."""
    import math
    import typing

    hints = typing.get_type_hints(schema)
    for key, value in params.items():
        hint = hints.get(key)
        if hint is int:
            ok, expected = isinstance(value, int) and not isinstance(value, bool), "an integer"
        elif hint is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            expected = "a finite number"
        elif hint is str or typing.get_origin(hint) is typing.Literal:
            ok, expected = isinstance(value, str), "a string"
        else:
            continue
        if not ok:
            raise ConfigError(f"{name}.{key} must be {expected}, got {value!r}")
