"""Full finetuning (``finetune.mode=full``): the target weights trained in place, put back afterwards (also
after a crash), resumed from a checkpoint to the same update as an uninterrupted run."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from knots.pipeline.cache import is_complete
from knots.pipeline.finetune import finetune
from knots.pipeline.full import load_full_update
from tests.pipeline.test_finetune import CFG, LORA, Interrupt, crash_at, setup  # noqa: F401

FULL = SimpleNamespace(**{**vars(CFG), "mode": "full", "lr": 1e-3})


def test_interrupted_full_finetuning_resumes_and_leaves_the_encoder_as_it_was(setup, tmp_path):  # noqa: F811
    backbone, task, head = setup
    before = {k: v.clone() for k, v in backbone.encoder.state_dict().items()}
    grads = [p.requires_grad for p in backbone.encoder.parameters()]

    def unchanged() -> bool:
        after = backbone.encoder.state_dict()
        return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    finetune(backbone, task, head, LORA, FULL, tmp_path / "uninterrupted", progress=False)
    assert unchanged()

    out = tmp_path / "interrupted"
    with pytest.raises(Interrupt):
        finetune(backbone, task, head, LORA, FULL, out, progress=False, on_step=crash_at(5))
    assert unchanged() and [p.requires_grad for p in backbone.encoder.parameters()] == grads
    assert not is_complete(out)

    steps = []
    info = finetune(backbone, task, head, LORA, FULL, out, progress=False, on_step=steps.append)
    assert info["resumed_from"] == 4 and steps == [5, 6] and unchanged()
    got, want = load_full_update(out), load_full_update(tmp_path / "uninterrupted")
    assert got.keys() == want.keys() and len(got) == 8  # 2 layers x 4 target modules
    assert all(v.abs().sum() > 0 for v in want.values())
    for name in want:
        torch.testing.assert_close(got[name], want[name])
