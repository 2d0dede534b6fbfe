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

from knots.config.schema import register_configs, to_run_config
from knots.errors import KnotsError

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
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
    best = max(m["avg_normalized_accuracy"] for m in results["methods"].values())
    return best


def main() -> None:
    """Entry point of ``knots-run``."""
    register_configs()
    hydra.main(config_path=CONFIG_DIR, config_name="run", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
