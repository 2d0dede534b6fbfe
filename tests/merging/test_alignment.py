"""The factored KnOTS alignment against the dense SVD, and the merges against independent computations."""

import pytest
import torch

from knots.merging import Ingredients, MergeSession, TaskSet, align, align_module
from knots.merging.alignment import canonical_signs
from knots.merging import functions as F

from .helpers import random_adapters

SHAPES = {
    "wide": (6, 40),    # n*r > out
    "tall": (40, 6),    # n*r > in
    "square": (24, 24),
}


def reconstruction(alignment, orientation):
    parts = torch.stack([alignment.U @ block for block in alignment.blocks])
    return parts if orientation == "column" else parts.transpose(1, 2)


@pytest.mark.parametrize("orientation", ["column", "row"])
@pytest.mark.parametrize("module", list(SHAPES))
def test_factored_equals_dense(orientation, module):
    taskset = TaskSet.from_adapters(random_adapters(4, SHAPES, rank=[3, 4, 2, 5]))
    factored = align_module(taskset, module, orientation, "factored")
    dense = align_module(taskset, module, orientation, "dense")
    assert factored.components == dense.components
    assert torch.allclose(factored.singular_values, dense.singular_values, rtol=1e-10, atol=1e-10)
    truth = taskset.deltas(module, torch.float64)
    for alignment in (factored, dense):
        error = (reconstruction(alignment, orientation) - truth).norm() / truth.norm()
        assert error < 1e-6
    # Same U and S V_i^T: both paths fix each component's sign (largest-magnitude entry of U positive).
    assert (factored.U - dense.U).norm() / dense.U.norm() < 1e-6
    assert (factored.blocks - dense.blocks).norm() / dense.blocks.norm() < 1e-6
    rows = factored.U.abs().argmax(dim=0)
    assert (factored.U[rows, torch.arange(factored.components)] > 0).all()


def test_sign_convention_hand_computed():
    # Largest magnitudes: -0.8 (flip), -0.8 (flip), a near-tie decided by the first entry (keep).
    U = torch.tensor([[0.6, -0.8, 0.70710678], [-0.8, 0.6, -0.70710679]], dtype=torch.float64)
    assert canonical_signs(U).tolist() == [-1.0, -1.0, 1.0]
    assert canonical_signs(-U).tolist() == [1.0, 1.0, -1.0]


def test_missing_module_is_a_zero_update():
    adapters = random_adapters(3, {"a": (8, 8), "b": (8, 8)})
    del adapters[1].modules["b"]
    taskset = TaskSet.from_adapters(adapters)
    alignment = align_module(taskset, "b")
    assert alignment.blocks[1].abs().max() == 0
    assert torch.allclose(reconstruction(alignment, "column"), taskset.deltas("b", torch.float64))


def test_knots_ta_equals_ta():
    session = MergeSession(random_adapters(5, SHAPES, rank=[2, 3, 4, 5, 6]), storage_dtype=torch.float64, dense_dtype=torch.float64)
    for merge_func in ("sum", "mean"):
        ta = session.merge("ta", scaling=0.7, merge_func=merge_func).delta_state_dict(torch.float64)
        knots = session.merge("knots_ta", scaling=0.7, merge_func=merge_func).delta_state_dict(torch.float64)
        for name in ta:
            assert torch.allclose(ta[name], knots[name], rtol=1e-10, atol=1e-12)


def reference_family(task_vectors: list[torch.Tensor], top_k: float, scaling: float, dare_masks=None, p=0.0) -> list[torch.Tensor]:
    """TIES/DARE-TIES written independently: one flat whole-model vector per task, as in the reference code."""
    shapes = [v.shape[1:] for v in task_vectors]
    flat = torch.cat([v.reshape(v.shape[0], -1) for v in task_vectors], dim=1)
    if dare_masks is not None:
        flat = flat * dare_masks / (1 - p)
    n, d = flat.shape
    if top_k < 100:
        k = d - int(d * (top_k / 100))
        kth = flat.abs().kthvalue(k, dim=1, keepdim=True).values
        flat = flat * (flat.abs() >= kth)
    sign = torch.sign(flat.sum(0))
    sign[sign == 0] = torch.sign(sign.sum())
    keep = torch.where(sign > 0, flat > 0, flat < 0)
    merged = (flat * keep).sum(0) / keep.sum(0).clamp(min=1)
    merged = scaling * merged
    out, offset = [], 0
    for shape in shapes:
        size = shape.numel()
        out.append(merged[offset:offset + size].reshape(shape))
        offset += size
    return out


@pytest.mark.parametrize("top_k", [100, 20, 55])
def test_whole_model_ties_matches_independent_computation(top_k):
    session = MergeSession(random_adapters(4, SHAPES, rank=3), storage_dtype=torch.float64, dense_dtype=torch.float64)
    modules = session.taskset.modules
    expected = reference_family([session.taskset.deltas(m, torch.float64) for m in modules], top_k, 0.4)
    got = session.merge("ties", scaling=0.4, top_k=top_k).delta_state_dict(torch.float64)
    for module, tensor in zip(modules, expected):
        assert torch.allclose(got[f"{module}.weight"], tensor, atol=1e-12)
    ingredients = session.ingredients()
    blocks = reference_family([ingredients.modules[m].blocks for m in modules], top_k, 0.4)
    got = session.merge("knots_ties", scaling=0.4, top_k=top_k).delta_state_dict(torch.float64)
    for module, block in zip(modules, blocks):
        assert torch.allclose(got[f"{module}.weight"], ingredients.modules[module].U @ block, atol=1e-10)


def test_dare_ties_matches_independent_computation():
    session = MergeSession(random_adapters(3, SHAPES, rank=3), storage_dtype=torch.float64, dense_dtype=torch.float64)
    modules = session.taskset.modules
    masks = torch.cat(
        [
            torch.stack([(torch.rand(session.taskset.shapes[m], generator=F.seeded_generator(7, i, m)) >= 0.3).flatten() for i in range(3)])
            for m in modules
        ],
        dim=1,
    )
    expected = reference_family([session.taskset.deltas(m, torch.float64) for m in modules], 60, 0.5, masks, 0.3)
    got = session.merge("dare_ties", scaling=0.5, top_k=60, p=0.3, seed=7).delta_state_dict(torch.float64)
    for module, tensor in zip(modules, expected):
        assert torch.allclose(got[f"{module}.weight"], tensor, atol=1e-12)


def test_module_scope_trims_each_module_alone():
    session = MergeSession(random_adapters(3, SHAPES, rank=3), dense_dtype=torch.float64)
    merged = session.merge("ties", scaling=1.0, top_k=30, trim_scope="module").delta_state_dict(torch.float64)
    for module in session.taskset.modules:
        expected = reference_family([session.taskset.deltas(module, torch.float64)], 30, 1.0)[0]
        assert torch.allclose(merged[f"{module}.weight"], expected, atol=1e-12)
    whole = session.merge("ties", scaling=1.0, top_k=30).delta_state_dict(torch.float64)
    assert any(not torch.allclose(whole[k], merged[k]) for k in whole)


def test_ingredients_round_trip(tmp_path):
    session = MergeSession(random_adapters(3, SHAPES, rank=2))
    before = session.merge("knots_ties", scaling=0.5, top_k=30).delta_state_dict()
    session.ingredients().save(tmp_path)
    fresh = MergeSession(random_adapters(3, SHAPES, rank=2))
    fresh.set_ingredients(Ingredients.load(tmp_path))
    after = fresh.merge("knots_ties", scaling=0.5, top_k=30).delta_state_dict()
    assert "align_column" not in fresh.timings
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_alignment_is_computed_once_per_session():
    session = MergeSession(random_adapters(3, SHAPES, rank=2))
    first = session.ingredients()
    for top_k in (10, 50, 100):
        session.merge("knots_ties", scaling=0.5, top_k=top_k)
        session.merge("knots_dare_ties", scaling=0.5, p=0.5)
    assert session.ingredients() is first


def test_row_variant_reconstructs_and_differs_from_column():
    session = MergeSession(random_adapters(3, SHAPES, rank=2), storage_dtype=torch.float64, dense_dtype=torch.float64)
    row = session.merge("knots_row_ties", scaling=1.0, top_k=100).delta_state_dict(torch.float64)
    ingredients = session.ingredients("row")
    blocks = reference_family([ingredients.modules[m].blocks for m in session.taskset.modules], 100, 1.0)
    for module, block in zip(session.taskset.modules, blocks):
        assert torch.allclose(row[f"{module}.weight"], (ingredients.modules[module].U @ block).T, atol=1e-10)
