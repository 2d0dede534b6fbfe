"""Analyses: pluggable studies that run after (or beside) the merge stages, registered like methods.

An analysis is one function registered with :func:`register_analysis` that receives an
:class:`AnalysisContext` (everything the run produced, passed explicitly) and its options
(``conf/analysis/<name>.yaml`` when present, then the run's ``analysis_params.<name>``), writes any
files under ``context.output_dir / "analyses" / <name>``, and returns JSON-ready data that goes into
``results.json`` under ``analyses.<name>``. Select them with ``knots-run 'analyses=[name,...]'``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from knots.errors import ConfigError

AnalysisFunction = Callable[..., dict[str, Any]]


@dataclass
class AnalysisContext:
    """What an analysis may read: the run config, the pools, the finetuned adapters, the merge
    inputs, the evaluator, the methods' results, and where to write (``output_dir``) and log."""

    cfg: Any
    tasks: Any
    models: Any
    adapters: list[Any]
    inputs: Any
    evaluator: Any
    methods: dict[str, Any]
    output_dir: Path
    logger: Any

    def directory(self, name: str) -> Path:
        """The analysis's own output directory (created)."""
        path = self.output_dir / "analyses" / name
        path.mkdir(parents=True, exist_ok=True)
        return path


@dataclass(frozen=True)
class Analysis:
    name: str
    run: AnalysisFunction
    reference: str
    check: Callable[[dict[str, Any], Any], None] | None = None

    def check_options(self, options: dict[str, Any], cfg: Any = None) -> None:
        """Fail before any work on an option the analysis does not take, on an invalid value, or where the
        analysis does not apply to the run ``cfg`` (when given)."""
        import inspect

        parameters = list(inspect.signature(self.run).parameters.values())[1:]
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            known = [p.name for p in parameters]
            for key in options:
                if key not in known:
                    raise ConfigError(f"analysis {self.name} has no option {key!r} (its options: {', '.join(known) or 'none'})")
        if self.check is not None:
            self.check(options, cfg)

    @property
    def summary(self) -> str:
        return (self.run.__doc__ or "").strip().splitlines()[0] if self.run.__doc__ else ""


_REGISTERED: dict[str, Analysis] = {}


def register_analysis(name: str, reference: str = "", check: Callable[[dict[str, Any], Any], None] | None = None
                      ) -> Callable[[AnalysisFunction], AnalysisFunction]:
    """Register ``function(context, **options) -> dict`` as analysis ``name``; ``check(options, cfg)``
    validates option values before any work, and refuses a run (``cfg``, the run config, or None when
    only the options are checked) the analysis does not apply to, raising ``ConfigError``."""

    def decorator(function: AnalysisFunction) -> AnalysisFunction:
        if name in _REGISTERED:
            raise ValueError(f"analysis {name!r} is registered twice")
        _REGISTERED[name] = Analysis(name=name, run=function, reference=reference, check=check)
        return function

    return decorator


def _load_builtins() -> None:
    """Import the analyses shipped with knots (each module registers itself)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{info.name}")


def analysis_names() -> list[str]:
    _load_builtins()
    return sorted(_REGISTERED)


def get_analysis(name: str) -> Analysis:
    _load_builtins()
    try:
        return _REGISTERED[name]
    except KeyError:
        raise ConfigError(f"unknown analysis {name!r}; known: {', '.join(sorted(_REGISTERED)) or 'none'}") from None


def analysis_options(name: str, overrides: dict[str, Any] | None = None, extra_dirs: Sequence[str | Path] = ()) -> dict[str, Any]:
    """Options of an analysis: its ``conf/analysis/<name>.yaml`` (if any, the last on the search path)
    with ``overrides`` on top."""
    from omegaconf import OmegaConf

    from knots.config.resources import group_options, load_option

    options: dict[str, Any] = {}
    if name in group_options("analysis", extra_dirs):
        options = OmegaConf.to_container(load_option("analysis", name, extra_dirs), resolve=True)  # type: ignore[assignment]
    target = options.pop("_target_", None)
    if target:  # an analysis defined outside knots registers itself when its module is imported
        from hydra.utils import get_object

        try:
            get_object(str(target))
        except Exception:  # Hydra raises ImportError / InstantiationException variants
            raise ConfigError(f"analysis {name}: cannot import {target!r}") from None
    options.update(overrides or {})
    return options


__all__ = ["Analysis", "AnalysisContext", "analysis_names", "analysis_options", "get_analysis", "register_analysis"]
