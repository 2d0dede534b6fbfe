"""Task-subset enumeration and the confidence intervals of the scaling analysis."""

import itertools
import json
import math
import os
import subprocess
import sys

import pytest

from knots.analyses.scaling import (
    enumerate_subsets,
    subset_score,
    subsets_of_size,
    summarize_scaling,
    t_interval,
    unrank_combination,
)

TASKS = ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]


def test_unranking_is_lexicographic_order():
    for n, k in [(5, 2), (6, 3), (8, 8), (4, 1)]:
        assert [unrank_combination(r, n, k) for r in range(math.comb(n, k))] == list(itertools.combinations(range(n), k))
    with pytest.raises(ValueError):
        unrank_combination(10, 5, 2)


def test_paper_setting_eight_tasks():
    subsets = enumerate_subsets(TASKS)
    assert sorted(subsets) == [2, 3, 4, 5, 6, 7, 8]
    # C(8, n) = 28, 56, 70, 56, 28, 8, 1: all subsets where there are at most 28, else 28 sampled
    assert {n: len(s) for n, s in subsets.items()} == {2: 28, 3: 28, 4: 28, 5: 28, 6: 28, 7: 8, 8: 1}
    assert subsets[2] == list(itertools.combinations(TASKS, 2))
    assert subsets[8] == [tuple(TASKS)]
    for n, chosen in subsets.items():
        assert len(set(chosen)) == len(chosen)  # distinct
        assert all(len(s) == n and list(s) == sorted(s, key=TASKS.index) for s in chosen)
        assert set(chosen) <= set(itertools.combinations(TASKS, n))


def test_sampling_is_seeded_and_deterministic_across_processes():
    first = subsets_of_size(TASKS, 4, 28, seed=0)
    assert first == subsets_of_size(TASKS, 4, 28, seed=0)
    assert first != subsets_of_size(TASKS, 4, 28, seed=1)
    # a fresh interpreter (another hash seed) draws the same subsets
    code = "from knots.analyses.scaling import subsets_of_size as s; import json; print(json.dumps(s(%r, 4, 28, 0)))" % TASKS
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "123"})
    assert [tuple(s) for s in json.loads(out.stdout)] == first
    # a size's sample does not depend on which other sizes are asked for
    assert enumerate_subsets(TASKS, sizes=[4])[4] == enumerate_subsets(TASKS)[4]


def test_budget_and_bad_arguments():
    assert {n: len(s) for n, s in enumerate_subsets(TASKS[:4], max_subsets=2).items()} == {2: 2, 3: 2, 4: 1}
    with pytest.raises(ValueError, match="at least 2 tasks"):
        enumerate_subsets(["a"])
    with pytest.raises(ValueError, match="distinct"):
        enumerate_subsets(["a", "a"])
    with pytest.raises(ValueError, match="max_subsets"):
        subsets_of_size(TASKS, 2, 0)


def test_t_interval_hand_computed():
    # values 1..5: mean 3, sample std sqrt(2.5), t_{0.975, 4} = 2.776445105
    interval = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    half = 2.7764451051977987 * math.sqrt(2.5) / math.sqrt(5)
    assert interval.mean == 3.0 and interval.count == 5
    assert interval.std == pytest.approx(math.sqrt(2.5))
    assert interval.low == pytest.approx(3 - half, rel=1e-9) and interval.high == pytest.approx(3 + half, rel=1e-9)
    # two values: t_{0.975, 1} = 12.7062047
    two = t_interval([0.0, 2.0])
    assert two.high - two.mean == pytest.approx(12.706204736174707 * math.sqrt(2) / math.sqrt(2), rel=1e-9)
    single = t_interval([7.0])
    assert (single.mean, single.low, single.high, single.std) == (7.0, None, None, None)
    assert t_interval([1.0, 2.0, 3.0], confidence=0.5).high < interval.high


def test_summary_is_json_ready_and_scores_only_the_subset():
    per_task = {"ta": {"a": 80.0, "b": 60.0, "c": 70.0}, "knots_ties": {"a": 90.0, "b": 70.0, "c": 74.0}}
    tasks = ["a", "b", "c"]
    scores = {m: {s: subset_score(per_task[m], s) for n, ss in enumerate_subsets(tasks).items() for s in ss} for m in per_task}
    assert scores["ta"][("a", "b")] == 70.0
    summary = summarize_scaling(scores, n_tasks=3)
    json.dumps(summary)
    points = summary["methods"]["ta"]
    assert [p["n"] for p in points] == [2, 3]
    assert points[0]["count"] == 3 and points[0]["possible"] == 3
    assert points[0]["mean"] == pytest.approx((70 + 75 + 65) / 3)
    assert points[1] == {"n": 3, "mean": 70.0, "low": None, "high": None, "std": None, "count": 1, "possible": 1}
    assert summary["subsets"]["knots_ties"][0] == {"tasks": ["a", "b"], "score": 80.0}
