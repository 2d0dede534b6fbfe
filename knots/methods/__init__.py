"""The methods of ``knots-run``: one registry, one interface, one dispatch.

Every engine method of :mod:`knots.merging` is a method here automatically; data-dependent methods
register with :func:`register_method`. Each method's defaults, searched hyperparameters and ranges live
in ``conf/method/<name>.yaml`` (see :mod:`knots.methods.config`). Adding a data-dependent method is one
function plus one config file::

    @register_method("my_method", reference="Me et al., 2026", uses=("scaling",))
    def my_method(inputs: MergeInputs, scaling: float) -> MergedModel:
        \"\"\"One line that says what it does.\"\"\"
        ...
"""

from __future__ import annotations

from collections.abc import Callable

from knots.errors import ConfigError
from knots.methods.base import Candidate, FinetunedEnsemble, MergedModel, MergeInputs, Method, MethodFunction, TaskAdapter
from knots.methods.config import MethodConfig, check_method_params, method_config

_REGISTERED: dict[str, Method] = {}


def register_method(name: str, reference: str, uses: tuple[str, ...] = (), needs_data: bool = True,
                    check: Callable[[dict], None] | None = None) -> Callable[[MethodFunction], MethodFunction]:
    """Register ``function(inputs, **hyperparameters) -> Candidate`` as method ``name``.

    ``check(hyperparameters)`` validates values before any work, raising ``ConfigError``.
    """

    def decorator(function: MethodFunction) -> MethodFunction:
        if name in _REGISTERED:
            raise ValueError(f"method {name!r} is registered twice")
        _REGISTERED[name] = Method(name=name, build=function, reference=reference, uses=tuple(uses),
                                   needs_data=needs_data, check=check)
        return function

    return decorator


def _engine_method(name: str) -> Method:
    from knots.merging import get_method as get_engine_method

    spec = get_engine_method(name)

    def build(inputs: MergeInputs, **hyperparameters: object) -> MergedModel:
        return MergedModel(inputs.session.merge(name, **hyperparameters).delta_state_dict())

    build.__doc__ = spec.function.__doc__
    return Method(name=name, build=build, reference=spec.reference, uses=tuple(spec.uses), needs_data=False)


def _load_builtins() -> None:
    """Import the data-dependent methods shipped with knots (each module registers itself)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        if info.name not in ("base", "config"):
            importlib.import_module(f"{__name__}.{info.name}")


def method_names() -> list[str]:
    """Every method name: the engine's and the registered data-dependent ones."""
    from knots.merging import method_names as engine_names

    _load_builtins()
    return sorted({*engine_names(), *_REGISTERED})


def get_method(name: str) -> Method:
    """The method ``name``; an unknown name lists the known ones."""
    from knots.merging import METHODS as ENGINE

    _load_builtins()
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name in ENGINE:
        return _engine_method(name)
    raise ConfigError(f"unknown method {name!r}; known: {', '.join(method_names())}")


__all__ = [
    "Candidate",
    "FinetunedEnsemble",
    "MergeInputs",
    "MergedModel",
    "Method",
    "MethodConfig",
    "TaskAdapter",
    "check_method_params",
    "get_method",
    "method_config",
    "method_names",
    "register_method",
]
