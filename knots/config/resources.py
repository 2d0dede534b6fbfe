"""Where the configuration lives: ``conf/`` ships inside the package as ``knots/conf``.

In a checkout, ``knots/conf`` is a link to the top-level ``conf/`` that users edit; in a wheel it is a
real directory of package data. Nothing here depends on the current directory or on a checkout, so
``knots-run`` and ``knots-merge`` work from anywhere after ``pip install``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from knots.errors import ConfigError

#: Environment variable naming another configuration directory to use instead of the packaged one.
CONFIG_DIR_ENV = "KNOTS_CONFIG_DIR"


def config_dir() -> Path:
    """The configuration directory: ``$KNOTS_CONFIG_DIR``, else the one shipped with the package."""
    override = os.environ.get(CONFIG_DIR_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1] / "conf"


def search_dirs(extra: Iterable[str | Path] = ()) -> list[Path]:
    """The packaged configuration directory, then ``extra`` directories (a run's ``hydra.searchpath``)."""
    return [config_dir(), *(Path(p) for p in extra)]


def group_options(group: str, extra: Iterable[str | Path] = ()) -> list[str]:
    """The option names of a config group, over every search directory (sorted, unique)."""
    return sorted({p.stem for d in search_dirs(extra) for p in (d / group).glob("*.yaml")})


def load_option(group: str, name: str, extra: Iterable[str | Path] = ()) -> DictConfig:
    """The YAML of ``<group>/<name>.yaml``; the last search directory that has it wins (as in Hydra)."""
    found = [d / group / f"{name}.yaml" for d in search_dirs(extra) if (d / group / f"{name}.yaml").is_file()]
    if not found:
        known = ", ".join(group_options(group, extra))
        raise ConfigError(f"unknown {group} {name!r}; known: {known}")
    loaded = OmegaConf.load(found[-1])
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{found[-1]}: expected a mapping")
    return loaded


def runtime_search_dirs() -> list[Path]:
    """The ``file://`` directories of the running Hydra app's search path (none outside an app)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        sources = HydraConfig.get().runtime.config_sources
    except (ValueError, AttributeError):
        return []
    return [Path(s.path) for s in sources if s.schema == "file" and Path(s.path) != config_dir()]
