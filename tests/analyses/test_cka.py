"""Linear CKA: the batch definition against a kernel (HSIC) computation, the streaming low-rank and dense
paths against the batch definition, and the KnOTS view on a hand-made aligned case."""

import math

import pytest
import torch

from knots.analyses.cka import (
    MomentAccumulator,
    cka_accumulator,
    cka_matrix,
    linear_cka,
    module_cka,
)
from knots.lora import LoraModule
from knots.merging import TaskSet
from knots.merging.alignment import ModuleAlignment
from tests.merging.helpers import random_adapters

G = torch.Generator().manual_seed(0)


def hsic_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """CKA through centred linear kernels: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)) (Kornblith et al., eq. 4)."""
    n = x.shape[0]
    h = torch.eye(n, dtype=torch.float64) - 1.0 / n
    k, l = x.double() @ x.double().T, y.double() @ y.double().T
    hsic = lambda a, b: torch.trace(a @ h @ b @ h)  # noqa: E731
    return float(hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l)))


def random_orthogonal(d: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=G, dtype=torch.float64))
    return q


def lora_row(n: int, out_features: int, in_features: int, rank: int, seed: int) -> list[LoraModule]:
    g = torch.Generator().manual_seed(seed)
    return [
        LoraModule(A=torch.randn(rank, in_features, generator=g, dtype=torch.float64),
                   B=torch.randn(out_features, rank, generator=g, dtype=torch.float64), scale=0.5 + i)
        for i in range(n)
    ]


def test_linear_cka_matches_the_kernel_definition():
    x, y = torch.randn(50, 7, generator=G), torch.randn(50, 4, generator=G)
    y = y + x[:, :4]
    assert linear_cka(x, y) == pytest.approx(hsic_cka(x, y), rel=1e-10)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_identical_inputs_give_one():
    x = torch.randn(40, 6, generator=G)
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(torch.diagonal(cka_matrix([x, 2 * x, x + 1])), torch.ones(3, dtype=torch.float64))


def test_invariant_to_orthogonal_transforms_and_isotropic_scaling():
    x, y = torch.randn(60, 5, generator=G, dtype=torch.float64), torch.randn(60, 8, generator=G, dtype=torch.float64)
    y[:, :5] += 0.7 * x
    reference = linear_cka(x, y)
    assert linear_cka(x @ random_orthogonal(5), y) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(x, y @ random_orthogonal(8)) == pytest.approx(reference, rel=1e-10)
    assert linear_cka(3.5 * x, 0.01 * y) == pytest.approx(reference, rel=1e-10)
    # not invariant to a non-isotropic scaling (a sanity check that the test can fail)
    assert linear_cka(x * torch.tensor([10.0, 1, 1, 1, 1], dtype=torch.float64), y) != pytest.approx(reference, rel=1e-3)


def test_moments_streaming_equals_batch():
    codes = torch.randn(101, 6, generator=G, dtype=torch.float64) * 5 + 100.0  # a large mean: centring must be exact
    streamed = MomentAccumulator(6)
    for chunk in torch.split(codes, [1, 30, 0, 57, 13]):
        streamed.update(chunk)
    centred = codes - codes.mean(0)
    assert streamed.count == 101
    assert torch.allclose(streamed.covariance(), centred.T @ centred / 101, rtol=1e-12, atol=1e-9)


@pytest.mark.parametrize("views", [("lora",), ("lora", "knots")])
def test_low_rank_streaming_equals_dense_batch(views):
    row = lora_row(4, out_features=12, in_features=10, rank=3, seed=1)
    x = torch.randn(3, 40, 10, generator=G, dtype=torch.float64)  # (batch, tokens, in): every token is a row
    mask = torch.rand(3, 40, generator=G) > 0.2
    module = module_cka(row, views)
    for batch in range(3):
        module.update(x[batch:batch + 1], mask[batch:batch + 1])
    rows = x[mask]
    expected = cka_matrix([rows @ lora.delta(torch.float64).T for lora in row])
    assert torch.allclose(module.result()["lora"], expected, rtol=1e-9, atol=1e-12)
    assert not torch.allclose(expected, torch.ones_like(expected))


def test_lora_low_rank_path_equals_dense_update_path():
    row = lora_row(3, out_features=9, in_features=11, rank=2, seed=2)
    module = module_cka(row, ("lora", "full"), full_deltas=[lora.delta(torch.float64) for lora in row])
    x = torch.randn(80, 11, generator=G, dtype=torch.float64)
    for chunk in torch.split(x, 17):
        module.update(chunk)
    result = module.result()
    assert torch.allclose(result["lora"], result["full"], rtol=1e-9, atol=1e-12)
    # memory: (n r)^2 + n r for the low-rank code, I^2 + I for the dense one, whatever the number of inputs
    assert module.accumulated_floats == (6 * 6 + 6) + (11 * 11 + 11)


def test_full_view_matches_batch_for_dense_updates():
    deltas = [torch.randn(6, 8, generator=G, dtype=torch.float64) for _ in range(3)]
    deltas[1] = deltas[1] + 2 * deltas[0]
    module = module_cka([None, None, None], ("full",), full_deltas=deltas)
    x = torch.randn(30, 8, generator=G, dtype=torch.float64)
    module.update(x[:11])
    module.update(x[11:])
    assert torch.allclose(module.result()["full"], cka_matrix([x @ d.T for d in deltas]), rtol=1e-9)


def test_full_updates_read_at_result_time_give_the_same_matrix_and_are_not_held():
    deltas = [torch.randn(6, 8, generator=G, dtype=torch.float64) for _ in range(3)]
    reads = []
    lazy = module_cka([None, None, None], ("full",), full_deltas=lambda: reads.append(1) or deltas, in_features=8)
    eager = module_cka([None, None, None], ("full",), full_deltas=deltas)
    x = torch.randn(25, 8, generator=G, dtype=torch.float64)
    for module in (lazy, eager):
        module.update(x[:9])
        module.update(x[9:])
    assert reads == [] and lazy.held_floats == lazy.accumulated_floats == 8 * 8 + 8  # nothing but the moments while streaming
    assert eager.held_floats == 8 * 8 + 8 + 3 * 6 * 8
    assert torch.equal(lazy.result()["full"], eager.result()["full"]) and reads == [1]
    empty = module_cka([None, None], ("full",), full_deltas=lambda: [None, None], in_features=8)
    empty.update(x)
    with pytest.raises(ValueError, match="no task updates"):
        empty.result()


def test_views_are_invariant_to_per_task_rotation_and_scaling_of_the_update():
    row = lora_row(2, out_features=7, in_features=5, rank=2, seed=3)
    rotated = [LoraModule(A=row[0].A, B=random_orthogonal(7) @ row[0].B * 4.0, scale=row[0].scale), row[1]]
    x = torch.randn(50, 5, generator=G, dtype=torch.float64)
    results = []
    for r in (row, rotated):
        module = module_cka(r, ("lora",))
        module.update(x)
        results.append(module.result()["lora"])
    assert torch.allclose(results[0], results[1], rtol=1e-9)


# The hand-made aligned case: dW_i = U S V_i^T with the concatenated [V_1^T V_2^T] orthonormal.
#   V_1^T = [[1, 0, 0], [0, 1, 0]] / sqrt(2),  V_2^T = [[1, 0, 0], [0, 0, 1]] / sqrt(2),  S = diag(3, 1).
# With whitened inputs (X^T X = N I): V_1^T x = (x1, x2)/sqrt(2), V_2^T x = (x1, x3)/sqrt(2), so
#   KnOTS CKA = (N^2/4) / ((N/2) sqrt(2))^2 = 1/2,
# while dW_1 x = (3 x1, x2, 0)/sqrt(2), dW_2 x = (3 x1, x3, 0)/sqrt(2) give
#   LoRA CKA = (81 N^2/4) / ((N/2)^2 (81 + 1)) = 81/82.
U = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
S = torch.tensor([3.0, 1.0], dtype=torch.float64)
V1T = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64) / math.sqrt(2)
V2T = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64) / math.sqrt(2)
HADAMARD = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)  # centred, X^T X = 4 I
ALIGNED_ROW = [LoraModule(A=V1T, B=U * S, scale=1.0), LoraModule(A=V2T, B=U * S, scale=1.0)]


def test_knots_view_on_a_hand_made_aligned_case():
    module = module_cka(ALIGNED_ROW, ("lora", "knots"))
    module.update(HADAMARD)
    result = module.result()
    assert result["knots"][0, 1].item() == pytest.approx(0.5, abs=1e-12)
    assert result["lora"][0, 1].item() == pytest.approx(81 / 82, abs=1e-12)
    assert torch.diagonal(result["knots"]).tolist() == pytest.approx([1.0, 1.0])
    # the same with the alignment given by hand instead of computed
    given = ModuleAlignment(U=U, blocks=torch.stack([S[:, None] * V1T, S[:, None] * V2T]), singular_values=S)
    by_hand = module_cka(ALIGNED_ROW, ("knots",), alignment=given)
    by_hand.update(HADAMARD)
    assert by_hand.result()["knots"][0, 1].item() == pytest.approx(0.5, abs=1e-12)


def test_knots_view_equals_the_batch_cka_of_the_aligned_blocks():
    from knots.merging.alignment import align_dense, factor_pairs

    row = lora_row(3, out_features=8, in_features=6, rank=2, seed=4)
    x = torch.randn(70, 6, generator=G, dtype=torch.float64)
    module = module_cka(row, ("knots",))
    for chunk in torch.split(x, 9):
        module.update(chunk)
    dense = align_dense(factor_pairs(row, "column", torch.float64), (8, 6), 1e-5, torch.float64)
    vt = dense.blocks / dense.singular_values[None, :, None]  # V_i^T = S^-1 (S V_i^T)
    expected = cka_matrix([x @ block.T for block in vt])
    assert torch.allclose(module.result()["knots"], expected, rtol=1e-8)


def test_row_scaled_blocks_give_exactly_the_lora_view():
    row = lora_row(3, out_features=8, in_features=6, rank=2, seed=5)
    module = module_cka(row, ("lora", "knots"), knots_scaled=True)
    module.update(torch.randn(40, 6, generator=G, dtype=torch.float64))
    result = module.result()
    assert torch.allclose(result["knots"], result["lora"], rtol=1e-9)


def test_untargeted_module_gives_nan_and_is_skipped_in_the_module_average():
    shapes = {"a": (5, 4), "b": (5, 4)}
    adapters = random_adapters(3, shapes, rank=2, seed=6)
    del adapters[2].modules["b"]
    taskset = TaskSet.from_adapters(adapters)
    accumulator = cka_accumulator(taskset, ("lora",))
    x = torch.randn(30, 4, generator=G, dtype=torch.float64)
    for name in taskset.modules:
        accumulator.update(name, x)
    result = accumulator.result()
    b = result.per_module["b"]["lora"]
    assert b[2].isnan().all() and b[:, 2].isnan().all() and not b[:2, :2].isnan().any()
    a = result.per_module["a"]["lora"]
    assert torch.allclose(result.mean["lora"][:2, :2], (a[:2, :2] + b[:2, :2]) / 2)
    assert torch.allclose(result.mean["lora"][2], a[2], equal_nan=True)
    summary = result.to_json()
    assert summary["tasks"] == ["task0", "task1", "task2"] and summary["modules"] == 2 and summary["inputs"] == 30
    assert summary["views"]["lora"][0][0] == 1.0 and 0 < summary["mean_pairwise"]["lora"] < 1


def test_bad_inputs_are_refused():
    row = lora_row(2, 4, 3, 1, seed=7)
    with pytest.raises(ValueError, match="unknown CKA view"):
        module_cka(row, ("lora", "nope"))
    with pytest.raises(ValueError, match="one full-finetuning update"):
        module_cka(row, ("full",))
    with pytest.raises(ValueError, match="no task updates"):
        module_cka([None, None], ("full",), full_deltas=[None, None])
    module = module_cka(row, ("lora",))
    with pytest.raises(ValueError, match="features"):
        module.update(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="no inputs"):
        module.result()
