"""Fisher merging: hand-computed Fisher and merge, and the hook-based Fisher against per-example gradients
computed independently with torch.func."""

import math

import pytest
import torch
from torch import nn

from knots.methods.fisher import (
    DiagonalFisher,
    diagonal_fisher,
    fisher_merge,
    fisher_merge_state,
    fisher_targets,
    linear_squared_grads,
    log_likelihood_objective,
)

# A linear classifier logits = W x with W = [[ln 3, 0], [0, 0]] on x1 = (1, 0) and x2 = (0, 1):
#   p(x1) = (3/4, 1/4), p(x2) = (1/2, 1/2);  d/dW_cj log p(y|x) = (delta_yc - p_c) x_j.
# True Fisher, entry (c, j): mean_n sum_y p_y (delta_yc - p_c)^2 x_nj^2 = mean_n p_c (1 - p_c) x_nj^2 (two classes):
#   x1: 3/16 in column 0; x2: 1/4 in column 1  ->  F = [[3/32, 1/8], [3/32, 1/8]].
# Empirical Fisher with labels (1, 0): x1: (0 - 3/4)^2 = (1 - 1/4)^2 = 9/16; x2: 1/4 -> [[9/32, 1/8], [9/32, 1/8]].
W = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
X = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
LABELS = torch.tensor([1, 0])


def classifier() -> nn.Linear:
    layer = nn.Linear(2, 2, bias=False).double()
    layer.weight.data = W.clone()
    layer.weight.requires_grad_(False)  # frozen, as merged base weights are: the Fisher must still reach it
    return layer


@pytest.mark.parametrize(("kind", "expected"), [("exact", [[3 / 32, 1 / 8], [3 / 32, 1 / 8]]), ("empirical", [[9 / 32, 1 / 8], [9 / 32, 1 / 8]])])
def test_fisher_hand_computed(kind, expected):
    model = nn.Sequential(classifier())
    result = diagonal_fisher(model, ["0"], [(X, LABELS)], lambda b: model(b[0]), lambda b: b[0].shape[0], kind=kind, labels_fn=lambda b: b[1])
    assert list(result) == [2]
    assert torch.allclose(result[2]["0"], torch.tensor(expected, dtype=torch.float64), atol=1e-15)
    assert not model[0].weight.requires_grad and model[0].weight.grad is None  # restored


def test_one_example_per_batch_gives_the_same_fisher():
    model = nn.Sequential(classifier())
    batches = [(X[:1], LABELS[:1]), (X[1:], LABELS[1:])]
    result = diagonal_fisher(model, ["0"], batches, lambda b: model(b[0]), lambda b: b[0].shape[0])
    assert torch.allclose(result[2]["0"], torch.tensor([[3 / 32, 1 / 8], [3 / 32, 1 / 8]], dtype=torch.float64))


class TokenModel(nn.Module):
    """Tokens -> linear -> tanh -> linear, mean-pooled over tokens: per-example gradients sum over tokens."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(4, 5).double()
        self.head = nn.Linear(5, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.first(x))).mean(dim=1)


def reference_fisher(model: TokenModel, x: torch.Tensor, kind: str, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """mean_n sum_y w_ny (d/dW log p(y|x_n))^2 with per-example gradients from torch.func (no hooks)."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters()}

    def log_p(p, xi, y):
        logits = functional_call(model, p, (xi[None],))[0]
        return torch.log_softmax(logits, -1).gather(0, y[None])[0]

    per_example = grad(log_p)
    total = {k: torch.zeros_like(params[f"{k}.weight"]) for k in ("first", "head")}
    with torch.no_grad():
        probabilities = torch.softmax(model(x), -1)
    for c in range(3):
        ys = torch.full((x.shape[0],), c) if kind == "exact" else labels
        w = probabilities[:, c] if kind == "exact" else torch.ones(x.shape[0], dtype=torch.float64)
        g = vmap(per_example, in_dims=(None, 0, 0))(params, x, ys)
        for k in total:
            total[k] += (w[:, None, None] * g[f"{k}.weight"] ** 2).sum(0)
        if kind != "exact":
            break
    return {k: v / x.shape[0] for k, v in total.items()}


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_hooks_match_per_example_gradients_with_tokens_and_checkpoints(kind):
    model = TokenModel()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, 4, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 3, (8,), generator=g)
    batches = [(x[i:i + 2], labels[i:i + 2]) for i in range(0, 8, 2)] + [(x[:2], labels[:2])]  # the last is never read
    result = diagonal_fisher(model, ["first", "head"], batches, lambda b: model(b[0]), lambda b: b[0].shape[0],
                             kind=kind, labels_fn=lambda b: b[1], checkpoints=[4, 8])
    assert sorted(result) == [4, 8]
    for n in (4, 8):
        expected = reference_fisher(model, x[:n], kind, labels[:n])
        for name in ("first", "head"):
            assert torch.allclose(result[n][name], expected[name], rtol=1e-10, atol=1e-14)
    assert model.training  # mode restored


def test_checkpoints_must_be_reached_and_not_crossed():
    model = TokenModel()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    run = lambda batches, checkpoints: diagonal_fisher(model, ["head"], batches, lambda b: model(b), lambda b: b.shape[0], checkpoints=checkpoints)  # noqa: E731
    with pytest.raises(ValueError, match="crosses the checkpoint 2"):
        run([x[:3], x[3:]], [2])
    with pytest.raises(ValueError, match="checkpoint 8 not reached"):
        run([x[:3], x[3:]], [8])
    with pytest.raises(ValueError, match="not an nn.Linear"):
        diagonal_fisher(model, ["nope"], [], model, len)


def test_sampled_fisher_is_seeded_and_unbiased():
    model = TokenModel()
    x = torch.randn(4, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    run = lambda kind, seed, repeats: diagonal_fisher(model, ["first"], [x] * repeats, model, lambda b: b.shape[0], kind=kind, seed=seed)[4 * repeats]["first"]  # noqa: E731
    assert torch.equal(run("sampled", 3, 2), run("sampled", 3, 2))
    assert not torch.equal(run("sampled", 3, 2), run("sampled", 4, 2))
    # averaged over many draws of y ~ p(y|x), the sampled estimate approaches the exact expectation
    assert run("sampled", 0, 400).sum().item() == pytest.approx(run("exact", 0, 1).sum().item(), rel=0.05)


def test_masked_classes_are_skipped():
    logits = torch.tensor([[0.0, -math.inf, 1.0], [2.0, -math.inf, 0.0]], requires_grad=True)
    pairs = fisher_targets(logits, "exact")
    assert [int(t[0]) for t, _ in pairs] == [0, 2]
    for targets, weights in pairs:
        value = log_likelihood_objective(logits, targets, weights)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(logits.grad).all()
    with pytest.raises(ValueError, match="labels"):
        fisher_targets(logits, "empirical")
    with pytest.raises(ValueError, match="unknown Fisher kind"):
        fisher_targets(logits, "nope")


def test_squared_grads_rows_and_tokens_agree():
    g = torch.Generator().manual_seed(2)
    x, grads = torch.randn(5, 3, generator=g), torch.randn(5, 4, generator=g)
    direct = sum(torch.outer(grads[n], x[n]).double() ** 2 for n in range(5))
    assert torch.allclose(linear_squared_grads(x, grads), direct)
    assert torch.allclose(linear_squared_grads(x[:, None], grads[:, None], chunk=2), direct)


def test_fisher_merge_hand_computed():
    # dW1 = [1, 2], dW2 = [3, -2], F1 = [1, 3], F2 = [3, 1]:
    #   entry 0: (1*1 + 3*3) / 4 = 2.5;  entry 1: (3*2 + 1*(-2)) / 4 = 1.0
    d1, d2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -2.0])
    f1, f2 = torch.tensor([1.0, 3.0]), torch.tensor([3.0, 1.0])
    assert fisher_merge([d1, d2], [f1, f2], floor=0.0).tolist() == [2.5, 1.0]
    assert fisher_merge([d1, d2], [f1, f2], scaling=0.5, floor=0.0).tolist() == [1.25, 0.5]
    # equal Fisher: the plain average; a zero Fisher everywhere with the floor: also the plain average
    assert fisher_merge([d1, d2], [f1, f1], floor=0.0).tolist() == [2.0, 0.0]
    assert fisher_merge([d1, d2], [torch.zeros(2), torch.zeros(2)]).tolist() == [2.0, 0.0]
    with pytest.raises(ValueError, match="zero Fisher in every model"):
        fisher_merge([d1, d2], [torch.zeros(2), torch.zeros(2)], floor=0.0)
    with pytest.raises(ValueError, match="shape"):
        fisher_merge([d1, d2], [f1, torch.ones(3)])


def test_normalization_removes_a_models_overall_fisher_scale():
    deltas = [{"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.5]])}, {"a": torch.tensor([3.0, -2.0]), "b": torch.tensor([[-1.0]])}]
    fishers = [{"a": torch.tensor([1.0, 3.0]), "b": torch.tensor([[2.0]])}, {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([[1.0]])}]
    louder = [fishers[0], {k: 100 * v for k, v in fishers[1].items()}]
    plain = fisher_merge_state(deltas, fishers, floor=0.0)
    assert plain["a"].tolist() == [2.5, 1.0] and plain["b"].item() == pytest.approx((2 * 0.5 - 1.0) / 3)
    assert not torch.allclose(fisher_merge_state(deltas, louder, floor=0.0)["a"], plain["a"])
    # ||F_1|| = sqrt(14), ||F_2|| = sqrt(11): c_i = 1 / ||F_i||, unchanged by rescaling a model's Fisher
    normalized = fisher_merge_state(deltas, fishers, normalize=True, floor=0.0)
    c1, c2 = 1 / math.sqrt(14), 1 / math.sqrt(11)
    assert normalized["a"][0].item() == pytest.approx((c1 * 1 * 1 + c2 * 3 * 3) / (c1 * 1 + c2 * 3))
    louder_normalized = fisher_merge_state(deltas, louder, normalize=True, floor=0.0)
    assert all(torch.allclose(louder_normalized[k], normalized[k]) for k in normalized)
    with pytest.raises(ValueError, match="same tensors"):
        fisher_merge_state(deltas, [fishers[0], {"a": fishers[1]["a"]}])


def test_diagonal_fisher_accumulator():
    acc = DiagonalFisher()
    with pytest.raises(ValueError, match="no examples"):
        acc.result()
    acc.add("w", torch.ones(2))
    acc.add("w", torch.ones(2))
    acc.count(4)
    assert acc.result()["w"].tolist() == [0.5, 0.5]


# -- the registered method on a hand-computed case ---------------------------------------------------
class OneHot(nn.Module):
    """features = proj(x) for one-hot inputs x: the LoRA target is the only layer."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)
        self.proj.weight.data.zero_()

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(batch["x"])


def one_hot_inputs(trained_heads: bool):
    from knots.data.tasks import TaskData
    from knots.heads import Head, HeadSet
    from knots.lora import LoraAdapter, LoraModule
    from knots.methods import MergeInputs, TaskAdapter
    from knots.models.base import Backbone

    class OneHotBackbone(Backbone):
        name, feature_dim = "one-hot", 2

        def __init__(self) -> None:
            self.encoder = OneHot()

        def collate(self, inputs):
            return {"x": torch.eye(2)[[int(i) for i in inputs]]}

    ln3 = math.log(3.0)
    # dW_1 = [[ln 3, 0], [0, 0]] and dW_2 = [[0, 0], [0, ln 3]], rank one each
    factors = {"one": (torch.tensor([[1.0, 0.0]]), torch.tensor([[ln3], [0.0]])),
               "two": (torch.tensor([[0.0, 1.0]]), torch.tensor([[0.0], [ln3]]))}
    rows = [("0", 0), ("1", 1)]
    tasks = [TaskData(name, ["a", "b"], ["{}"], rows, rows, rows) for name in factors]
    adapters = [TaskAdapter(name, "", LoraAdapter(name, {"proj": LoraModule(A, B, 1.0)})) for name, (A, B) in factors.items()]
    heads = HeadSet.trained({name: Head(torch.eye(2)) for name in factors}, tasks) if trained_heads else None
    if not trained_heads:  # the adapters carry the trained heads, as a run's do
        adapters = [TaskAdapter(a.task, a.path, a.adapter, Head(torch.eye(2))) for a in adapters]
    return MergeInputs(adapters, OneHotBackbone(), tasks, batch_size=2, heads=heads)


@pytest.mark.parametrize("heads_given", [True, False])
def test_fisher_method_hand_computed(heads_given):
    """Two tasks, logits = (W_0 + dW_i) x with W_0 = 0 and an identity head, inputs e_1 and e_2.

    Task one: p(e_1) = (3/4, 1/4), p(e_2) = (1/2, 1/2): F_1 = [[3/32, 1/8], [3/32, 1/8]] (see above).
    Task two: p(e_1) = (1/2, 1/2), p(e_2) = (1/4, 3/4): F_2 = [[1/8, 3/32], [1/8, 3/32]].
    Merged entry = scaling * (F_1 dW_1 + F_2 dW_2 + eps (dW_1 + dW_2)) / (F_1 + F_2 + 2 eps).
    """
    from knots.methods import get_method
    from knots.methods.fisher import task_fishers

    inputs = one_hot_inputs(heads_given)
    fishers = [f["proj.weight"].double() for f in task_fishers(inputs, 256, "exact")]
    assert torch.allclose(fishers[0], torch.tensor([[3 / 32, 1 / 8], [3 / 32, 1 / 8]], dtype=torch.float64), atol=1e-7)
    assert torch.allclose(fishers[1], torch.tensor([[1 / 8, 3 / 32], [1 / 8, 3 / 32]], dtype=torch.float64), atol=1e-7)
    ln3, eps = math.log(3.0), 1e-6
    merged = get_method("fisher").build(inputs, scaling=0.5, num_examples=256, fisher="exact", normalize=False).delta["proj.weight"]
    diagonal = 0.5 * (3 / 32 + eps) * ln3 / (3 / 32 + 1 / 8 + 2 * eps)  # = 0.5 * 3/7 ln 3, up to eps
    assert torch.allclose(merged, torch.tensor([[diagonal, 0.0], [0.0, diagonal]]), atol=1e-6)
    weight = inputs.backbone.encoder.proj.weight
    assert weight.requires_grad and weight.grad is None and weight.abs().sum() == 0  # flags and weights restored


def test_fisher_stream_continues_and_restarts():
    """A larger N continues the pass; a smaller one starts again; both equal a fresh computation."""
    from knots.methods.fisher import FisherCache, task_fishers

    inputs = one_hot_inputs(True)
    first = task_fishers(inputs, 1, "exact")  # e_1 only: F_1 = [[3/16, 0], [3/16, 0]]
    assert torch.allclose(first[0]["proj.weight"].double(), torch.tensor([[3 / 16, 0], [3 / 16, 0]], dtype=torch.float64), atol=1e-7)
    both = task_fishers(inputs, 2, "exact")
    cache: FisherCache = inputs.cached("fisher_streams", FisherCache)
    assert cache.streams[("exact", 0)].position == 2
    again = task_fishers(inputs, 1, "exact")
    assert all(torch.equal(a["proj.weight"], b["proj.weight"]) for a, b in zip(first, again))
    fresh = task_fishers(one_hot_inputs(True), 2, "exact")
    assert all(torch.allclose(a["proj.weight"], b["proj.weight"]) for a, b in zip(both, fresh))
