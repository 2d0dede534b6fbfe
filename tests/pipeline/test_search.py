"""The hyperparameter searches and the evaluation metrics they optimize."""

from __future__ import annotations

import torch

from knots.metrics import hits, most_confident as pick_most_confident
from knots.pipeline.search import grid_search, linear_search


def surface(p):
    # peak at scaling 0.6, top_k 30; independent coordinates
    return -((p["scaling"] - 0.6) ** 2) - ((p["top_k"] - 30) / 100) ** 2


SCALING = [round(0.1 * i, 1) for i in range(1, 11)]
TOP_K = [10, 20, 30, 40, 50]


def test_linear_search_scaling_first_then_pruning():
    calls = []

    def f(p):
        calls.append(dict(p))
        return surface(p)

    r = linear_search(f, {"scaling": 1.0, "top_k": 100}, [("scaling", SCALING), ("top_k", TOP_K)])
    assert r.params == {"scaling": 0.6, "top_k": 30}
    assert all(c["top_k"] == 100 for c in calls[: len(SCALING)])  # scaling tuned with the base top_k
    assert all(c["scaling"] == 0.6 for c in calls[len(SCALING):])
    assert len(calls) == len(SCALING) + len(TOP_K) == len(r.history)


def test_patience_stops_a_coordinate_at_the_first_drop():
    r = linear_search(surface, {"scaling": 1.0, "top_k": 100}, [("scaling", SCALING), ("top_k", TOP_K)], patience=1)
    # scaling: 0.1..0.6 improve, 0.7 drops -> stop; top_k: 10, 20, 30 improve, 40 drops -> stop
    assert [p["scaling"] for p, _ in r.history[:7]] == SCALING[:7]
    assert len(r.history) == 7 + 4
    assert r.params == {"scaling": 0.6, "top_k": 30}


def test_grid_search_finds_the_joint_optimum():
    def coupled(p):
        return -((p["scaling"] * p["top_k"] - 12) ** 2)  # best pairs lie on scaling * top_k = 12

    r = grid_search(coupled, {}, [("scaling", [0.2, 0.4, 0.6]), ("top_k", [10, 20, 30])])
    assert r.params["scaling"] * r.params["top_k"] == 12
    assert len(r.history) == 9


def test_hits_at_k():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]])
    labels = torch.tensor([1, 0])
    assert hits(logits, labels, ks=(1, 3, 4)) == {"hits@1": 0.0, "hits@3": 50.0, "hits@4": 100.0}


def test_ensemble_takes_the_most_confident_model():
    a = torch.tensor([[5.0, 0.0], [0.1, 0.0]])  # confident on row 0
    b = torch.tensor([[0.0, 0.2], [0.0, 5.0]])  # confident on row 1
    picked = pick_most_confident(torch.stack([a, b]))
    torch.testing.assert_close(picked, torch.stack([a[0], b[1]]))
