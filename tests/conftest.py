"""Shared test settings: everything offline, quiet, on CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_env(tmp_path_factory):
    """A config directory with ``benchmark=tiny`` and ``model=tiny_bert`` over generated files."""
    from tests.pipeline.helpers import make_tiny_bert, make_tiny_tasks, write_tiny_conf

    root = tmp_path_factory.mktemp("tiny")
    model = make_tiny_bert(root / "bert")
    data = make_tiny_tasks(root / "data")
    return write_tiny_conf(root / "conf", data, model)
