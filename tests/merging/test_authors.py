"""The engine against the authors' own functions, run as they are on small inputs (see ``authors.py``;
skipped without local mirrors of their repositories).

- Iso-C, Iso-CTS: danielm1405/iso-merging ``src/utils/iso.py``.
- TSV-M: AntoAndGar/task_singular_vectors ``src/utils/TSVM_utils.py``.
- Core Space: apanariello4/core-space-merging ``task_merger.py`` (``MatrixPerLayerMerger``).
- TIES top-K: gstoica27/KnOTS ``merging_functions.py``.

Their Iso/TSV code is meant for full-rank updates: on those, it is compared with the engine's merge of
the dense updates directly. On low-rank LoRA updates it is run on the tasks' exact cores in an
orthonormal basis (where the updates are full-rank) and rebuilt.
"""

import pytest
import torch

from knots.merging import MergeSession
from knots.merging import functions as F

from . import authors
from .helpers import random_adapters

# Full-rank updates: the tasks' ranks reach min(out, in) (wide and tall), or their sum does (square).
FULL_RANK = {"wide": (6, 40), "tall": (40, 6), "odd": (7, 30)}
LOW_RANK = {"square": (24, 24), "rect": (20, 36)}


def relative(a, b) -> float:
    return float((a - b).norm() / b.norm())


def deltas(session, module):
    return [lora.delta(torch.float64) for lora in session.taskset.factors[module]]


@pytest.fixture(scope="module")
def full_rank():
    return MergeSession(random_adapters(3, FULL_RANK, rank=[6, 7, 6], seed=11), storage_dtype=torch.float64)


@pytest.fixture(scope="module")
def low_rank():
    return MergeSession(random_adapters(3, LOW_RANK, rank=3, seed=12), storage_dtype=torch.float64)


@pytest.mark.parametrize("fraction", [0.8, 0.5])
def test_iso_on_full_rank_updates(full_rank, fraction):
    iso = authors.iso_module()
    config = authors.iso_config(3, fraction)
    ours_c = full_rank.merge("iso_c", scaling=1.0).delta_state_dict(torch.float64)
    ours_cts = full_rank.merge("iso_cts", scaling=1.0, common_space_fraction=fraction).delta_state_dict(torch.float64)
    for module in FULL_RANK:
        vectors = authors.task_vectors(deltas(full_rank, module))
        assert relative(ours_c[f"{module}.weight"], iso.iso_c(vectors, config)["layer.weight"]) < 1e-10
        assert relative(ours_cts[f"{module}.weight"], iso.iso_cts(vectors, config)["layer.weight"]) < 1e-10


def test_tsv_on_full_rank_updates(full_rank):
    tsv = authors.tsv_module()
    ours = full_rank.merge("tsv_m", scaling=1.0).delta_state_dict(torch.float64)
    for module in FULL_RANK:  # "odd": int(7 / 3) = 2 per task leaves one empty slot in their factors
        theirs = tsv.compute_and_sum_svd_mem_reduction(authors.task_vectors(deltas(full_rank, module)), authors.iso_config(3))
        assert relative(ours[f"{module}.weight"], theirs["layer.weight"]) < 1e-10


def test_iso_and_tsv_on_the_cores_of_low_rank_updates(low_rank):
    """On LoRA updates the engine equals the authors' functions applied to the tasks' exact cores."""
    iso, tsv = authors.iso_module(), authors.tsv_module()
    config = authors.iso_config(3)
    ours = {name: low_rank.merge(name, scaling=1.0).delta_state_dict(torch.float64) for name in ("iso_c", "iso_cts", "tsv_m")}
    for module, core in low_rank.ingredients("core").items():
        vectors = authors.task_vectors(list(core.blocks))
        theirs = {
            "iso_c": iso.iso_c(vectors, config),
            "iso_cts": iso.iso_cts(vectors, config),
            "tsv_m": tsv.compute_and_sum_svd_mem_reduction(vectors, config),
        }
        for name, result in theirs.items():
            rebuilt = core.U @ result["layer.weight"] @ core.V
            assert relative(ours[name][f"{module}.weight"], rebuilt) < 1e-9, (name, module)


def core_space_merge(task_merger, session, module, merge_config, isotropize=False, masks=None):
    """The authors' Core Space merge of one module (scaling 1): their bases, cores and merge."""
    merger = authors.core_merger(task_merger)
    if masks is not None:
        queue = iter(masks)
        merger.randbin = lambda rows, columns, p: next(queue)
    factors = [{module: (lora.A.to(torch.float64), lora.scaled_B(torch.float64))} for lora in session.taskset.factors[module]]
    cores, U_ref, V_ref = merger.get_core_matrices(factors, module, merge_config)
    merged = merger._merge_tensors([core.clone() for core in cores], merge_config)
    if isotropize:
        merged = task_merger.isotropize_matrix(merged)
    return U_ref @ merged @ V_ref


@pytest.mark.parametrize("fixture", ["full_rank", "low_rank"])
def test_core_space_merges(request, fixture):
    session = request.getfixturevalue(fixture)
    task_merger = authors.core_space_module()
    ours = {
        "tv": session.merge("core_ta", scaling=1.0, merge_func="sum"),
        "ties": session.merge("core_ties", scaling=1.0, top_k=40, trim_scope="module"),
        "tsv": session.merge("core_tsv", scaling=1.0),
        "iso": session.merge("core_iso_c", scaling=1.0),
    }
    for module in session.taskset.modules:
        theirs = {
            "tv": core_space_merge(task_merger, session, module, {"merge_method": "tv"}),
            "ties": core_space_merge(task_merger, session, module, {"merge_method": "ties", "topK": 40}),
            "tsv": core_space_merge(task_merger, session, module, {"merge_method": "tsv"}),
            "iso": core_space_merge(task_merger, session, module, {"merge_method": "tv"}, isotropize=True),
        }
        for name, result in theirs.items():
            assert relative(ours[name].delta(module, torch.float64), result) < 1e-9, (name, module)


def test_core_space_dare_ties_with_the_same_masks(low_rank):
    """Their DARE draws from torch's global generator; it is handed the engine's masks, the rest runs as is."""
    task_merger = authors.core_space_module()
    ours = low_rank.merge("core_dare_ties", scaling=1.0, top_k=60, p=0.3, seed=4, trim_scope="module")
    for module, core in low_rank.ingredients("core").items():
        masks = [(torch.rand(block.shape, generator=F.seeded_generator(4, index, module)) >= 0.3).to(torch.float64) for index, block in enumerate(core.blocks)]
        theirs = core_space_merge(task_merger, low_rank, module, {"merge_method": "dare-ties", "topK": 60, "dare_pruning_coeffs": 0.3}, masks=masks)
        assert relative(ours.delta(module, torch.float64), theirs) < 1e-9


def test_ties_top_k_rounding_matches_the_knots_reference():
    """600 entries per task at K = 57: the reference's threshold is the (600 - int(600 * 0.57)) = 259th
    smallest magnitude (int(600 * 57 / 100) would make it the 258th): 342 entries are at or above it."""
    reference = authors.knots_merging_functions()
    session = MergeSession(random_adapters(4, {"a": (10, 30), "b": (15, 20)}, rank=2, seed=13), storage_dtype=torch.float64, dense_dtype=torch.float64)
    modules = session.taskset.modules
    assert sum(o * i for o, i in session.taskset.shapes.values()) == 600
    flat = torch.cat([session.taskset.deltas(m, torch.float64).flatten(1) for m in modules], dim=1)
    _, _, mask = reference.topk_values_mask(flat.clone(), K=57, return_mask=True)
    assert mask.sum(dim=1).tolist() == [342] * 4 and F.kth_smallest_rank(600, 57) == 259
    thresholds = F.streaming_kth_smallest(lambda: [flat.abs()], [F.kth_smallest_rank(600, 57)] * 4, total=600)
    assert torch.equal(F.trim(flat, thresholds) != 0, mask)
    theirs, _, _ = reference.ties_merging(list(flat), topK=57, merging_type="mean", weights=torch.tensor([0.4]))
    ours = session.merge("ties", scaling=0.4, top_k=57).delta_state_dict(torch.float64)
    assert torch.allclose(torch.cat([ours[f"{m}.weight"].flatten() for m in modules]), theirs, atol=1e-12)
    blocks = session.ingredients()
    aligned = torch.cat([blocks.modules[m].blocks.flatten(1) for m in modules], dim=1)
    theirs, _, _ = reference.ties_merging(list(aligned), topK=57, merging_type="mean", weights=torch.tensor([0.4]))
    ours = session.merge("knots_ties", scaling=0.4, top_k=57).delta_state_dict(torch.float64)
    offset = 0
    for m in modules:
        alignment = blocks.modules[m]
        size = alignment.blocks[0].numel()
        expected = alignment.U @ theirs[offset:offset + size].reshape(alignment.blocks.shape[1:])
        offset += size
        assert torch.allclose(ours[f"{m}.weight"], expected, atol=1e-12)
