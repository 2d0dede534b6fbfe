"""Hand-computed cases for the pure merge functions and the streaming selection."""

import pytest
import torch

from knots.merging import functions as F
from knots.merging.family import Hyperparameters, Stages, merge_module

X = torch.tensor([[1.0, -2.0, 3.0, 0.5], [-1.0, -1.0, 2.0, -4.0], [2.0, 1.0, -1.0, 0.1]])


def test_trim_keeps_entries_at_or_above_the_reference_threshold():
    thresholds = torch.stack([F.magnitude_threshold(row, 50) for row in X])
    assert thresholds.tolist() == [1.0, 1.0, 1.0]
    assert F.trim(X, thresholds).tolist() == [[1, -2, 3, 0], [-1, -1, 2, -4], [2, 1, -1, 0]]


def test_ties_hand_computed():
    merged = F.ties_merge(X, top_k=50, vote="mass", merge_func="mean")
    assert merged.tolist() == [1.5, -1.5, 2.5, -4.0]
    assert F.ties_merge(X, top_k=50, merge_func="sum").tolist() == [3.0, -3.0, 5.0, -4.0]


def test_sign_votes_differ_by_mass_and_count():
    stack = torch.tensor([[5.0], [-1.0], [-1.0]])
    assert F.elect_sign(stack, "mass").item() == 1.0
    assert F.elect_sign(stack, "count").item() == -1.0
    assert F.ties_merge(stack, vote="mass").item() == 5.0
    assert F.ties_merge(stack, vote="count").item() == -1.0


def test_tied_vote_takes_the_majority_sign():
    stack = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 3.0, 1.0]])
    assert F.ties_merge(stack).tolist() == [1.0, 2.5, 2.5]


def test_disjoint_mean_is_zero_where_nothing_agrees():
    stack = torch.zeros(2, 3)
    assert F.disjoint_merge(stack, torch.ones(3)).tolist() == [0, 0, 0]


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
    generator_state = [F.seeded_generator(0, i, "m") for i in range(3)]
    masks = [torch.rand(4, generator=g) >= 0.5 for g in generator_state]
    dropped = torch.stack([X[i] * masks[i] / 0.5 for i in range(3)])
    expected = F.ties_merge(dropped, top_k=100)
    hp = Hyperparameters(scaling=1.0, p=0.5, seed=0)
    stack = torch.stack([F.dare(X[i], 0.5, F.seeded_generator(0, i, "m")) for i in range(3)])
    merged, _, _ = merge_module(stack, hp, Stages(drop=True, trim=True, elect=True), None, F.majority_sign(F.elect_sign(stack)))
    assert torch.allclose(merged, expected)


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
