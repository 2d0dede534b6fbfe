"""Fixtures of the pipeline tests: a tiny random BERT, tiny tasks, and composed configs."""

from __future__ import annotations

import pytest

from tests.pipeline.helpers import CONF_DIR


@pytest.fixture
def compose_run(tiny_env, tmp_path):
    """``compose_run(*overrides)``: the real ``conf/run.yaml`` composed with the tiny setup available."""
    from hydra import compose, initialize_config_dir

    from knots.config import register_configs

    register_configs()

    def compose_fn(*overrides: str, tiny: bool = True, search_dirs: tuple = ()):
        from tests.pipeline.helpers import TINY_OVERRIDES

        dirs = ",".join(f"file://{d}" for d in (tiny_env, *search_dirs))
        base = [f"hydra.searchpath=[{dirs}]", f"paths.log_dir={tmp_path}/logs", f"paths.output_dir={tmp_path}/out"]
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("run", overrides=base + (TINY_OVERRIDES if tiny else []) + list(overrides))

    return compose_fn
