"""``knots-run``: the Hydra app that runs one experiment (or, with ``-m``, a sweep of them).

Bad input is one line, ``knots-run: error: ...``, with exit status 2 and no traceback (unless
``HYDRA_FULL_ERROR=1``), before any work: the command line is composed first (with ``-m``, every job
of the sweep; :func:`knots.cli.common.check_composition`), then every setting is validated. In a sweep
a job that fails on its input is reported on one line and the others run; Hydra then ends the sweep
with the first failure (status 1). A job's return value, for sweepers, is its best average normalized
accuracy.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from knots.cli.common import check_composition, fail, one_line_errors, run_cli
from knots.config.resources import config_dir
from knots.config.schema import register_configs, to_run_config

PROGRAM = "knots-run"
log = logging.getLogger("knots")


@one_line_errors(PROGRAM, raise_in_sweep=True)
def _task(cfg: DictConfig) -> float | None:
    from knots.pipeline.run import run_experiment

    run_cfg = to_run_config(cfg)
    output_dir = Path(run_cfg.paths.output_dir)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    results = run_experiment(run_cfg, output_dir, resolved)  # type: ignore[arg-type]
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

    def run() -> None:
        argv = sys.argv[1:]
        problem = check_group_choices(argv, config_dir())
        if problem:
            fail(PROGRAM, problem)
        check_composition(PROGRAM, str(config_dir()), "run", argv, register=register_configs)
        register_configs()
        hydra.main(config_path=str(config_dir()), config_name="run", version_base="1.3")(_task)()

    run_cli(PROGRAM, run)


if __name__ == "__main__":
    main()
