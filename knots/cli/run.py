"""``knots-run``: the Hydra app that runs one experiment (or, with ``-m``, a sweep of them)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from knots.config.resources import config_dir
from knots.config.schema import register_configs, to_run_config
from knots.errors import KnotsError

log = logging.getLogger("knots")


class JobError(CompactHydraException):
    """A one-line failure of one job of a sweep; Hydra reports it and the other jobs go on."""


def _task(cfg: DictConfig) -> float | None:
    from knots.pipeline.run import run_experiment

    try:
        run_cfg = to_run_config(cfg)
        output_dir = Path(run_cfg.paths.output_dir)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        results = run_experiment(run_cfg, output_dir, resolved)  # type: ignore[arg-type]
    except KnotsError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise JobError(f"error: {e}") from None
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    log.info("results: %s", output_dir / "results.md")
    if "methods" not in results:
        return None
    return max(m["avg_normalized_accuracy"] for m in results["methods"].values())


def check_group_choices(argv: list[str], config_dir: Path) -> str | None:
    """The problem with a ``group=option`` override naming a config file that does not exist, if any.

    Hydra would report it too, over several lines; this keeps bad input to one line. Directories
    added with ``hydra.searchpath=[file://...]`` are searched as well.
    """
    dirs = [config_dir]
    for arg in argv:
        if arg.startswith("hydra.searchpath="):
            dirs += [Path(p.strip()[len("file://"):]) for p in arg.split("=", 1)[1].strip("[]").split(",") if p.strip().startswith("file://")]
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        key, value = arg.split("=", 1)
        group = key.lstrip("+~")
        if "/" in group or "." in group or group == "hydra" or not any((d / group).is_dir() for d in dirs):
            continue
        for option in value.split(","):
            option = option.strip()
            if option and option != "null" and not any((d / group / f"{option}.yaml").is_file() for d in dirs):
                known = sorted({p.stem for d in dirs for p in (d / group).glob("*.yaml")})
                return f"unknown {group} {option!r}; available: {', '.join(known)}"
    return None


def main() -> None:
    """Entry point of ``knots-run``."""
    problem = check_group_choices(sys.argv[1:], config_dir())
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(2)
    register_configs()
    hydra.main(config_path=str(config_dir()), config_name="run", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
