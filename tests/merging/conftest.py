"""Fixtures shared by the merge tests."""

import pytest

from .helpers import write_peft_adapter


@pytest.fixture(scope="module")
def peft_adapters(tmp_path_factory):
    """Three PEFT adapters: alpha != r, rsLoRA, and mixed ranks through rank/alpha patterns."""
    root = tmp_path_factory.mktemp("adapters")
    write_peft_adapter(root / "a", seed=1, r=4, alpha=8)
    write_peft_adapter(root / "b", seed=2, r=2, alpha=4, use_rslora=True)
    write_peft_adapter(root / "c", seed=3, r=8, alpha=8, rank_pattern={"layers.1.q_proj": 3}, alpha_pattern={"v_proj": 2})
    return [root / name for name in "abc"]
