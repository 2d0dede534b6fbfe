"""Iso-C, Iso-CTS, TSV-M and the Core Space merges: both SVD paths, an independent dense implementation,
identities between the methods, and hand-computed cases."""

import numpy as np
import pytest
import torch

from knots.errors import ConfigError
from knots.lora import LoraAdapter, LoraModule
from knots.merging import Hyperparameters, MergeSession, method_names
from knots.merging.spectral import common_space_split, factored_svd, tsv_per_task

from . import dense_reference as ref
from .helpers import random_adapters

SHAPES = {
    "wide": (6, 40),    # n*r > out
    "tall": (40, 6),    # n*r > in
    "square": (24, 24),
    "rect": (30, 50),
}
NEW_METHODS = ["iso_c", "iso_cts", "tsv_m", "core_ta", "core_ties", "core_dare_ties", "core_tsv", "core_iso_c"]


def sessions(adapters):
    return {path: MergeSession(adapters, svd_path=path, storage_dtype=torch.float64, dense_dtype=torch.float64) for path in ("factored", "dense")}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def mixed():
    """Four tasks of mixed ranks over modules of every aspect ratio."""
    return random_adapters(4, SHAPES, rank=[3, 4, 2, 5], seed=3)


@pytest.mark.parametrize("sign_vote", ["mass", "count"])
@pytest.mark.parametrize("method", method_names())
def test_every_method_gives_the_same_merge_on_both_paths(mixed, method, sign_vote):
    """The factored path (QRs and small cores) and the dense reference agree for every method and vote,
    KnOTS included: the alignment's sign convention makes the count vote's tie-breaks path-independent."""
    merged = {}
    for path, session in sessions(mixed).items():
        merged[path] = session.merge(method, scaling=0.6, top_k=40, p=0.3, seed=1, sign_vote=sign_vote).delta_state_dict(torch.float64)
    for name in merged["dense"]:
        assert relative(merged["factored"][name], merged["dense"][name]) < 1e-6, name


@pytest.mark.parametrize("method", ["knots_ties", "core_ties", "core_dare_ties"])
def test_module_scope_votes_agree_on_both_paths(mixed, method):
    merged = {path: s.merge(method, scaling=1.0, top_k=30, p=0.2, trim_scope="module", sign_vote="count").delta_state_dict(torch.float64) for path, s in sessions(mixed).items()}
    for name in merged["dense"]:
        assert relative(merged["factored"][name], merged["dense"][name]) < 1e-6


def updates(adapters, module):
    return [adapter.modules[module].delta(torch.float64).numpy() for adapter in adapters]


@pytest.mark.parametrize("fraction", [0.8, 0.5, 0.0, 1.0])
def test_spectral_methods_match_the_independent_dense_implementation(mixed, fraction):
    session = MergeSession(mixed, storage_dtype=torch.float64)
    iso = session.merge("iso_c", scaling=0.7).delta_state_dict(torch.float64)
    cts = session.merge("iso_cts", scaling=0.7, common_space_fraction=fraction).delta_state_dict(torch.float64)
    tsv = session.merge("tsv_m", scaling=0.7).delta_state_dict(torch.float64)
    for module, (out, inp) in SHAPES.items():
        dws = updates(mixed, module)
        joint = min(out, inp, sum(a.modules[module].rank for a in mixed))
        expected = {
            "iso": ref.iso_c(dws, 0.7),
            "cts": ref.iso_cts(dws, joint, fraction, 0.7),
            "tsv": ref.tsv_m(dws, int(min(out, inp) * (1 / 4)), 0.7),
        }
        got = {"iso": iso, "cts": cts, "tsv": tsv}
        for key, value in expected.items():
            assert relative(got[key][f"{module}.weight"], torch.from_numpy(value)) < 1e-6, (key, module)


def core_inputs(adapters, module):
    Bs = [a.modules[module].scaled_B(torch.float64).numpy() for a in adapters]
    As = [a.modules[module].A.to(torch.float64).numpy() for a in adapters]
    U, V = ref.core_basis(Bs, As)
    return U, V, np.stack([U.T @ B @ A @ V.T for B, A in zip(Bs, As)])


def test_core_methods_match_the_independent_dense_implementation(mixed):
    session = MergeSession(mixed, storage_dtype=torch.float64)
    modules = session.taskset.modules
    cores = {m: core_inputs(mixed, m) for m in modules}
    got = {name: session.merge(name, scaling=0.5, merge_func="sum").delta_state_dict(torch.float64) for name in ("core_ta", "core_iso_c", "core_tsv")}
    per_layer = session.merge("core_ties", scaling=0.5, top_k=30, trim_scope="module").delta_state_dict(torch.float64)
    whole_model = session.merge("core_ties", scaling=0.5, top_k=30, trim_scope="model").delta_state_dict(torch.float64)
    model_ties = ref.ties([cores[m][2] for m in modules], 30, 0.5)
    for module, model_core in zip(modules, model_ties):
        U, V, M = cores[module]
        key = f"{module}.weight"
        expected = {
            "core_ta": 0.5 * U @ M.sum(0) @ V,
            "core_iso_c": U @ ref.iso_c(list(M), 0.5) @ V,
            "core_tsv": U @ ref.tsv_m(list(M), int(min(M.shape[1:]) * (1 / len(M))), 0.5) @ V,
        }
        for name, value in expected.items():
            assert relative(got[name][key], torch.from_numpy(value)) < 1e-6, (name, module)
        layer_core = ref.ties([M], 30, 0.5)[0]
        assert relative(per_layer[key], torch.from_numpy(U @ layer_core @ V)) < 1e-6
        assert relative(whole_model[key], torch.from_numpy(U @ model_core @ V)) < 1e-6


def test_basis_invariant_methods_equal_their_full_space_versions():
    """TA, Iso-C and TSV-M commute with orthonormal changes of basis: in the Core Space they are the
    full-space methods exactly (TSV-M when all tasks have the same rank)."""
    session = MergeSession(random_adapters(3, SHAPES, rank=4, seed=5), storage_dtype=torch.float64, dense_dtype=torch.float64)
    for core, full in [("core_ta", "ta"), ("core_iso_c", "iso_c"), ("core_tsv", "tsv_m")]:
        a = session.merge(core, scaling=0.3).delta_state_dict(torch.float64)
        b = session.merge(full, scaling=0.3).delta_state_dict(torch.float64)
        for name in a:
            assert relative(a[name], b[name]) < 1e-9, (core, name)
    iso = session.merge("iso_c", scaling=0.3).delta_state_dict(torch.float64)
    all_common = session.merge("iso_cts", scaling=0.3, common_space_fraction=1.0).delta_state_dict(torch.float64)
    core_ties = session.merge("core_ties", scaling=0.3, top_k=30).delta_state_dict(torch.float64)
    ties = session.merge("ties", scaling=0.3, top_k=30).delta_state_dict(torch.float64)
    for name in iso:
        assert relative(all_common[name], iso[name]) < 1e-9
        assert relative(core_ties[name], ties[name]) > 1e-3  # entry-wise merges depend on the basis


def adapter(name, modules):
    return LoraAdapter(name=name, modules={m: LoraModule(A=torch.tensor(A, dtype=torch.float64), B=torch.tensor(B, dtype=torch.float64), scale=1.0) for m, (B, A) in modules.items()})


def diagonal_task(name, values):
    """A LoRA whose update is ``diag(values)``: one rank-1 factor per non-zero value."""
    size = len(values)
    nonzero = [i for i, v in enumerate(values) if v]
    B = [[values[i] if row == i else 0.0 for i in nonzero] for row in range(size)]
    A = [[1.0 if col == i else 0.0 for col in range(size)] for i in nonzero]
    return adapter(name, {"m": (B, A)})


def merged(adapters, method, **hp):
    results = {}
    for path, session in sessions(adapters).items():
        results[path] = session.merge(method, **hp).delta_state_dict(torch.float64)["m.weight"]
    assert torch.allclose(results["factored"], results["dense"], atol=1e-12)
    return results["factored"]


def test_iso_c_hand_computed():
    # diag(3, 0) + diag(0, 1) = diag(3, 1); its singular values become their mean, 2.
    tasks = [diagonal_task("a", [3.0, 0.0]), diagonal_task("b", [0.0, 1.0])]
    assert torch.allclose(merged(tasks, "iso_c", scaling=0.5), torch.eye(2, dtype=torch.float64), atol=1e-12)


def test_iso_cts_hand_computed():
    # Sum diag(4, 3, 2, 1), joint rank 4, fraction 0.5: common = the sum's e1 (4) and e2 (3); one
    # direction per task: task a's residual diag(0, 0, 2, 1) gives e3 (2), task b's residual is zero.
    # Kept singular values 2, 4, 3: mean 3 on e1, e2, e3. Iso-C would put 2.5 on all four.
    tasks = [diagonal_task("a", [4.0, 0.0, 2.0, 1.0]), diagonal_task("b", [0.0, 3.0, 0.0, 0.0])]
    assert torch.allclose(merged(tasks, "iso_cts", scaling=1.0, common_space_fraction=0.5), torch.diag(torch.tensor([3.0, 3.0, 3.0, 0.0], dtype=torch.float64)), atol=1e-12)
    assert torch.allclose(merged(tasks, "iso_c", scaling=1.0), 2.5 * torch.eye(4, dtype=torch.float64), atol=1e-12)


def test_tsv_of_orthogonal_tasks_is_their_sum():
    # Each task keeps int(3 / 3) = 1 direction; they are already orthonormal, so nothing moves.
    tasks = [diagonal_task("a", [5.0, 0.0, 0.0]), diagonal_task("b", [0.0, -2.0, 0.0]), diagonal_task("c", [0.0, 0.0, 0.5])]
    assert torch.allclose(merged(tasks, "tsv_m", scaling=1.0), torch.diag(torch.tensor([5.0, -2.0, 0.5], dtype=torch.float64)), atol=1e-12)
    # Two tasks: int(3 / 2) = 1 direction each, which is all they have: the sum again.
    assert torch.allclose(merged(tasks[:2], "tsv_m", scaling=2.0), torch.diag(torch.tensor([10.0, -4.0, 0.0], dtype=torch.float64)), atol=1e-12)


def test_core_ties_hand_computed():
    """dW_a = [[2, 1], [0, 0]], dW_b = [[-1, -2], [0, 0]].

    Stacked B = [[1, -1], [0, 0]]: U_ref = I. Stacked A = [[2, 1], [1, 2]]: V_ref rows (1, 1)/sqrt2 and
    (1, -1)/sqrt2 (largest entries positive). Cores: a = [[3, 1], [0, 0]]/sqrt2, b = [[-3, 1], [0, 0]]/sqrt2.
    Count vote: entry (0, 0) ties and takes the module's majority sign (+), entry (0, 1) is +: the merged
    core is a's, and the merge is dW_a. TIES (mass vote) on the full updates gives [[2, -2], [0, 0]].
    """
    tasks = [adapter("a", {"m": ([[1.0], [0.0]], [[2.0, 1.0]])}), adapter("b", {"m": ([[-1.0], [0.0]], [[1.0, 2.0]])})]
    core = merged(tasks, "core_ties", scaling=1.0, top_k=100, sign_vote="count", trim_scope="module")
    assert torch.allclose(core, torch.tensor([[2.0, 1.0], [0.0, 0.0]], dtype=torch.float64), atol=1e-12)
    full = MergeSession(tasks, dense_dtype=torch.float64).merge("ties", scaling=1.0, top_k=100, sign_vote="mass").delta_state_dict(torch.float64)
    assert torch.allclose(full["m.weight"], torch.tensor([[2.0, -2.0], [0.0, 0.0]], dtype=torch.float64))


def test_core_space_reconstructs_every_task_exactly(mixed):
    for path, session in sessions(mixed).items():
        for module, core in session.ingredients("core").items():
            out, inp = session.taskset.shapes[module]
            total_rank = sum(session.taskset.ranks(module))
            assert core.blocks.shape[1:] == (min(out, total_rank), min(inp, total_rank))
            assert torch.allclose(core.U.T @ core.U, torch.eye(core.U.shape[1], dtype=torch.float64), atol=1e-12)
            assert torch.allclose(core.V @ core.V.T, torch.eye(core.V.shape[0], dtype=torch.float64), atol=1e-12)
            for task, lora in enumerate(session.taskset.factors[module]):
                assert relative(core.U @ core.blocks[task] @ core.V, lora.delta(torch.float64)) < 1e-10, path


def test_iso_cts_splits_the_rank_as_the_authors():
    assert common_space_split(768, 8, 0.8) == (616, 19)
    assert common_space_split(128, 8, 0.8) == (104, 3)
    assert common_space_split(10, 4, 0.5) == (6, 1)  # 5 common, round(5 / 4) = 1 per task, so 6 common
    assert common_space_split(6, 4, 0.0) == (2, 1)  # round(1.5) = 2 would need 8 > 6 directions
    assert common_space_split(4, 2, 1.0) == (4, 0)
    assert tsv_per_task(768, 8) == 96 and tsv_per_task(7, 3) == 2


@pytest.mark.parametrize("value", [-0.1, 1.5, float("nan")])
def test_common_space_fraction_is_validated(value):
    with pytest.raises(ConfigError, match="common_space_fraction"):
        Hyperparameters(common_space_fraction=value)


def test_missing_module_is_a_zero_update_in_every_new_method():
    adapters = random_adapters(3, {"a": (8, 12), "b": (10, 6)}, rank=2, seed=9)
    del adapters[1].modules["b"]
    reduced = [LoraAdapter(name=a.name, modules={"b": a.modules["b"]}) for a in (adapters[0], adapters[2])]
    for method in NEW_METHODS:
        full = {p: s.merge(method, scaling=0.5, top_k=50, p=0.2, merge_func="sum").delta_state_dict(torch.float64)["b.weight"] for p, s in sessions(adapters).items()}
        assert relative(full["factored"], full["dense"]) < 1e-6, method
        if method in ("core_ta", "iso_c", "core_iso_c"):  # the zero task changes nothing else
            alone = MergeSession(reduced, storage_dtype=torch.float64).merge(method, scaling=0.5, merge_func="sum").delta_state_dict(torch.float64)["b.weight"]
            assert relative(full["factored"], alone) < 1e-9, method


@pytest.mark.parametrize("shape", [(30, 4, 20), (5, 8, 40), (40, 8, 5)])
def test_factored_svd_is_the_svd_of_the_product(shape):
    a, r, b = shape
    generator = torch.Generator().manual_seed(0)
    left, right = torch.randn(a, r, generator=generator, dtype=torch.float64), torch.randn(r, b, generator=generator, dtype=torch.float64)
    u, s, vt = factored_svd(left, right)
    assert torch.allclose((u * s) @ vt, left @ right, atol=1e-12)
    assert torch.allclose(u.T @ u, torch.eye(u.shape[1], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(vt @ vt.T, torch.eye(vt.shape[0], dtype=torch.float64), atol=1e-12)
    assert torch.allclose(s, torch.linalg.svdvals(left @ right)[: s.numel()], atol=1e-12)
