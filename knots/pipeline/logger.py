"""Experiment tracking: Weights & Biases (offline by default) or nothing.

A run directory written offline is uploaded later with ``wandb sync <dir>``. ``finish`` always runs
(the pipeline calls it in a ``finally``), marking failed runs with a non-zero exit code.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class NullLogger:
    """Logs nothing."""

    run_dir: Path | None = None

    def log(self, metrics: dict[str, Any]) -> None:
        pass

    def define_step(self, prefix: str, step_key: str) -> None:
        pass

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def image(self, name: str, path: str | Path) -> None:
        """An image file (a figure's PNG)."""

    def finish(self, exit_code: int = 0) -> None:
        pass


class WandbLogger(NullLogger):
    """A W&B run living in ``<output_dir>/wandb``."""

    def __init__(self, cfg: Any, output_dir: Path, config: dict[str, Any], name: str) -> None:
        import wandb

        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        (output_dir / "wandb").mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            group=cfg.group,
            tags=list(cfg.tags),
            mode=cfg.mode,
            dir=str(output_dir),
            config=config,
            name=name,
            reinit="create_new",
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.run_dir = Path(self.run.dir).parent

    def log(self, metrics: dict[str, Any]) -> None:
        self.run.log(metrics)

    def define_step(self, prefix: str, step_key: str) -> None:
        self.run.define_metric(step_key)
        self.run.define_metric(f"{prefix}*", step_metric=step_key)

    def table(self, name: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.run.log({name: self._wandb.Table(columns=list(columns), data=[list(r) for r in rows])})

    def summary(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            self.run.summary[k] = v

    def image(self, name: str, path: str | Path) -> None:
        self.run.log({name: self._wandb.Image(str(path))})

    def finish(self, exit_code: int = 0) -> None:
        self.run.finish(exit_code=exit_code)


def make_logger(cfg: Any, output_dir: Path, config: dict[str, Any], name: str) -> NullLogger:
    if cfg.backend == "none" or cfg.mode == "disabled":
        return NullLogger()
    return WandbLogger(cfg, output_dir, config, name)
