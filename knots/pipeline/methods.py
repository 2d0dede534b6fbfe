"""Method names and hyperparameters: the merge engine's methods plus the data-dependent baselines."""

from __future__ import annotations

from typing import Any

from knots.errors import ConfigError

#: Baselines that need data, so the pipeline (not the merge engine) runs them, with their hyperparameters.
PIPELINE_METHODS: dict[str, tuple[str, ...]] = {"regmean": ("alpha",), "ensemble": ()}


def known_methods() -> list[str]:
    """Every method name ``knots-run`` accepts."""
    from knots.merging import method_names

    return [*method_names(), *PIPELINE_METHODS]


def method_uses(method: str) -> tuple[str, ...]:
    """The hyperparameters a method reads."""
    if method in PIPELINE_METHODS:
        return PIPELINE_METHODS[method]
    from knots.merging import get_method

    return tuple(get_method(method).uses)


def check_params(method: str, params: dict[str, Any]) -> None:
    """Fail on a hyperparameter the method does not read."""
    uses = method_uses(method)
    for key in params:
        if key not in uses:
            raise ConfigError(f"method {method} has no hyperparameter {key!r} (it uses: {', '.join(uses) or 'none'})")


def method_defaults(method: str, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """An engine method's defaults (conf/method/<name>.yaml), restricted to what it reads, with
    ``overrides`` on top."""
    from knots.merging import load_method_config

    uses = method_uses(method)
    params = {k: v for k, v in load_method_config(method).items() if k in uses}
    params.update(overrides or {})
    return params


def pruning_parameter(params: dict[str, Any]) -> str | None:
    """The second coordinate of the linear search: ``p`` for DARE methods, else ``top_k`` if any."""
    if "p" in params:
        return "p"
    if "top_k" in params:
        return "top_k"
    return None
