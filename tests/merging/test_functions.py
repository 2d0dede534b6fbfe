"""Hand-computed cases for the pure merge functions and the streaming selection."""

import pytest
import torch

from knots.merging import functions as F
from knots.merging.family import Hyperparameters, Stages, merge_family

X = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.0, 2.0, -4.0], [2.0, 1.0, -1.0, 0.1]])
TIES = Stages(trim=True, elect=True)


class Stacks:
    """Task vectors given directly as one task stack per module."""

    def __init__(self, **stacks: torch.Tensor) -> None:
        self.stacks = stacks
        self.modules = list(stacks)
        self.tasks = [f"task{i}" for i in range(next(iter(stacks.values())).shape[0])]

    def stack(self, module: str) -> torch.Tensor:
        return self.stacks[module]

    def task_numel(self, module: str) -> int:
        return self.stacks[module][0].numel()

    def to_delta(self, module: str, merged: torch.Tensor) -> torch.Tensor:
        return merged


def merge(stack: torch.Tensor, stages: Stages = TIES, **hyperparameters) -> torch.Tensor:
    """The engine's merge of a one-module model."""
    return merge_family(Stacks(m=stack), Hyperparameters(**{"scaling": 1.0, **hyperparameters}), stages)["m"]


def test_trim_keeps_entries_at_or_above_the_reference_threshold():
    thresholds = torch.stack([F.magnitude_threshold(row, 50) for row in X])
    assert thresholds.tolist() == [1.0, 1.0, 1.0]
    assert F.trim(X, thresholds).tolist() == [[1, -2, 3, 0], [-1, -1, 2, -4], [2, 1, -1, 0]]


def test_ties_hand_computed():
    assert merge(X, top_k=50, sign_vote="mass", merge_func="mean").tolist() == [1.5, -1.5, 2.5, -4.0]
    assert merge(X, top_k=50, merge_func="sum").tolist() == [3.0, -3.0, 5.0, -4.0]
    assert merge(X, top_k=50, scaling=0.5).tolist() == [0.75, -0.75, 1.25, -2.0]


def test_sign_votes_differ_by_mass_and_count():
    stack = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert F.elect_sign(stack, "mass").item() == 1.0
    assert F.elect_sign(stack, "count").item() == -1.0
    assert merge(stack, sign_vote="mass").item() == 5.0
    assert merge(stack, sign_vote="count").item() == -1.0


@pytest.mark.parametrize("trim_scope", ["model", "module"])
def test_tied_vote_takes_the_majority_sign(trim_scope):
    stack = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 3.0, 1.0]])
    assert merge(stack, trim_scope=trim_scope).tolist() == [1.0, 2.5, 2.5]


def test_tie_majority_is_counted_over_the_whole_model():
    # Module "a" ties in its first entry and its own majority is negative; the model's is positive.
    a = torch.tensor([[1.0, -2.0, -3.0], [-1.0, -1.0, -1.0]])
    b = torch.tensor([[4.0, 5.0, 6.0, 7.0], [1.0, 1.0, 1.0, 1.0]])
    hp = Hyperparameters(scaling=1.0)
    assert merge_family(Stacks(a=a, b=b), hp, TIES)["a"].tolist() == [1.0, -1.5, -2.0]
    module_scope = Hyperparameters(scaling=1.0, trim_scope="module")
    assert merge_family(Stacks(a=a, b=b), module_scope, TIES)["a"].tolist() == [-1.0, -1.5, -2.0]


def test_disjoint_mean_is_zero_where_nothing_agrees():
    total, count = F.agreeing_sum_and_count(torch.zeros(2, 3), torch.ones(3))
    assert F.finish_disjoint(total, count, "mean").tolist() == [0, 0, 0]


def test_dare_drops_and_rescales_reproducibly():
    values = torch.ones(100_000)
    first = F.dare(values, 0.9, F.seeded_generator(3, "task0", "module"))
    again = F.dare(values, 0.9, F.seeded_generator(3, "task0", "module"))
    other = F.dare(values, 0.9, F.seeded_generator(4, "task0", "module"))
    assert torch.equal(first, again) and not torch.equal(first, other)
    survivors = first[first != 0]
    assert torch.allclose(survivors, torch.full_like(survivors, 10.0))
    assert abs((first > 0).float().mean().item() - 0.1) < 0.01


def test_dare_ties_hand_computed_with_a_known_mask():
    masks = [torch.rand(4, generator=F.seeded_generator(0, i, "m")) >= 0.5 for i in range(3)]
    dropped = torch.stack([X[i] * masks[i] / 0.5 for i in range(3)])
    merged = merge(X, Stages(drop=True, trim=True, elect=True), p=0.5, seed=0)
    assert torch.allclose(merged, merge(dropped))
    # TIES without trimming, by hand: sign of the sum (ties take the majority of the elected signs;
    # here that majority is itself 0, so, as in the reference, the tied entry selects negatives),
    # then the mean of the agreeing survivors.
    signs = torch.sign(dropped.sum(0))
    signs[signs == 0] = torch.sign(signs.sum())
    expected = []
    for column, sign in zip(dropped.T, signs):
        agreeing = column[column < 0] if sign == 0 else column[column * sign > 0]
        expected.append(agreeing.mean().item() if agreeing.numel() else 0.0)
    assert merged.tolist() == expected == [-2.0, -4.0, 0.0, pytest.approx(0.2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("sample_size,margin", [(1 << 20, 4.0), (7, 0.0), (1, 0.0)])
def test_streaming_selection_is_exact(dtype, sample_size, margin):
    generator = torch.Generator().manual_seed(0)
    chunks = [torch.randn(3, 1000, generator=generator, dtype=dtype).abs(), torch.randn(3, 5, 7, generator=generator, dtype=dtype).abs(), torch.zeros(3, 50, dtype=dtype)]
    flat = torch.cat([chunk.reshape(3, -1) for chunk in chunks], dim=1)
    ranks = [1, 517, flat.shape[1]]
    got = F.streaming_kth_smallest(lambda: iter(chunks), ranks, total=flat.shape[1], sample_size=sample_size, margin=margin)
    assert torch.equal(got, torch.stack([flat[j].kthvalue(ranks[j]).values for j in range(3)]))


def test_keep_count_follows_the_reference():
    assert F.kth_smallest_rank(10, 30) == 7
    assert F.kth_smallest_rank(10, 5) == 10  # int(0.5) == 0: only the largest survives
    assert F.kth_smallest_rank(3, 100) == 1
    # The reference divides K by 100 first: int(600 * 0.57) = int(341.99999999999994) = 341.
    assert F.keep_count(600, 57) == 341 and F.kth_smallest_rank(600, 57) == 259


def test_top_k_rounding_changes_the_trimmed_entries():
    """d = 600, K = 57: the threshold is the 259th smallest magnitude, so 342 entries survive (343 with
    int(d * K / 100))."""
    values = torch.arange(1, 601, dtype=torch.float64)[torch.randperm(600, generator=torch.Generator().manual_seed(0))]
    merged = merge(values[None], top_k=57)
    assert int((merged != 0).sum()) == 342
    assert float(merged.abs()[merged != 0].min()) == 259.0
