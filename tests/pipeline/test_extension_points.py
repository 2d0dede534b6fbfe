"""The extension points of docs/architecture.md stay real: a toy method, data-dependent method, task,
model family and analysis are added the documented way (a function or class plus a YAML file) and run
end to end, without touching knots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
import torch
from torch import nn

from knots.analyses import AnalysisContext
from knots.config import to_run_config
from knots.merging import Stages, merge_family
from knots.methods import MergedModel, MergeInputs
from knots.models.base import Backbone
from knots.pipeline.run import run_experiment

WORDS = ["good", "bad", "cat", "car", "the", "a", "very", "is"]


class BagOfWords(nn.Module):
    """``encoder(batch) -> (B, D)``: mean word embedding, then one linear map (the LoRA target)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.embed = nn.EmbeddingBag(len(WORDS) + 1, dim, mode="mean")
        self.proj = nn.Linear(dim, dim)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.proj(self.embed(batch["ids"], batch["offsets"]))


class ToyBackbone(Backbone):
    """A new model family: a bag-of-words text encoder whose class embeddings come from the class words."""

    def __init__(self, name: str, dim: int = 16, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.name, self.feature_dim = name, dim
        self.encoder = BagOfWords(dim).requires_grad_(False)

    def collate(self, inputs: Sequence[Any]) -> dict[str, torch.Tensor]:
        ids, offsets = [], []
        for text in inputs:
            offsets.append(len(ids))
            ids.extend(WORDS.index(w) + 1 if w in WORDS else 0 for w in str(text).split())
        return {"ids": torch.tensor(ids), "offsets": torch.tensor(offsets)}

    @torch.no_grad()
    def class_embeddings(self, class_names: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
        feats = self.encoder(self.collate([t.format(c) for c in class_names for t in templates]))
        per_class = nn.functional.normalize(feats, dim=-1).view(len(class_names), len(templates), -1).mean(1)
        return nn.functional.normalize(per_class, dim=-1)


def toy_scaled_sum(vectors, hp, progress=False):
    """A toy engine method: scaling times the sum of the full updates."""
    return merge_family(vectors, hp, Stages(), progress)


def toy_mean_of_deltas(inputs: MergeInputs, weight: float) -> MergedModel:
    """A toy data-dependent method: ``weight`` times the mean finetuned update, weighted by training-set size."""
    sizes = torch.tensor([len(t.train) for t in inputs.tasks], dtype=torch.float32)
    deltas = [a.adapter.delta_state_dict() for a in inputs.adapters]
    return MergedModel({k: weight * sum(s * d[k] for s, d in zip(sizes / sizes.sum(), deltas)) for k in deltas[0]})


def toy_analysis(context: AnalysisContext, label: str) -> dict[str, Any]:
    """A toy analysis: the best method by test average normalized accuracy, written to a file too."""
    best = max(context.methods, key=lambda m: context.methods[m]["avg_normalized_accuracy"])
    (context.directory("toy") / "best.txt").write_text(best)
    return {"label": label, "best": best, "tasks": context.tasks.names}


@pytest.fixture
def extended(tiny_env, tmp_path):
    """A config directory adding a model, a task (and its benchmark), two methods and an analysis."""
    import knots.analyses as analyses
    import knots.merging.registry as engine
    import knots.methods as methods

    engine.register("toy_scaled_sum", "dense", "Toy et al., 2026", uses=("scaling", "merge_func"), linear=True)(toy_scaled_sum)
    methods.register_method("toy_mean", reference="Toy et al., 2026", uses=("weight",))(toy_mean_of_deltas)
    analyses.register_analysis("toy", reference="Toy et al., 2026")(toy_analysis)

    conf = tmp_path / "conf"
    data = tmp_path / "words.csv"
    rows = [f"the {w} {x} is very {w}" for w in ("good", "bad") for x in ("cat", "car") for _ in range(12)]
    data.write_text("text,label\n" + "\n".join(f"{r} {i % 5},{r.split()[1]}" for i, r in enumerate(rows)) + "\n")
    files = {
        "model/toy.yaml": "name: toy\nbackbone: {_target_: tests.pipeline.test_extension_points.ToyBackbone, dim: 16}\n"
                          "lora: {r: 2, alpha: 2, dropout: 0.0, target_modules: [proj]}\n",
        "task/words.yaml": f"source: csv\npath: {data}\nclasses:\n  - {{name: good, values: [good]}}\n"
                           "  - {name: bad, values: [bad]}\ntemplates: ['{}']\n",
        "benchmark/toy.yaml": "defaults:\n  - /task@tasks.words: words\n  - /task@tasks.words_again: words\n  - _self_\n"
                              "name: toy\n",
        "method/toy_scaled_sum.yaml": "name: toy_scaled_sum\n_target_: tests.pipeline.test_extension_points.toy_scaled_sum\n"
                                      "scaling: 1.0\nmerge_func: sum\nsearch: [scaling]\n",
        "method/toy_mean.yaml": "name: toy_mean\n_target_: tests.pipeline.test_extension_points.toy_mean_of_deltas\n"
                                "weight: 1.0\nsearch: [weight]\nranges: {weight: [0.5, 1.0, 2.0]}\n",
        "analysis/toy.yaml": "label: from-yaml\n",
    }
    for name, text in files.items():
        (conf / name).parent.mkdir(parents=True, exist_ok=True)
        (conf / name).write_text(text)
    yield conf
    engine.METHODS.pop("toy_scaled_sum")
    methods._REGISTERED.pop("toy_mean")
    analyses._REGISTERED.pop("toy")


def test_toy_extensions_run_end_to_end(extended, compose_run, tmp_path):
    cfg = to_run_config(compose_run(
        "model=toy", "benchmark=toy", "logger=none", "progress=false",
        "methods=[toy_scaled_sum,toy_mean,ta]", "analyses=[toy]", f"config_dirs=[{extended}]",
        "finetune.steps=4", "finetune.warmup_steps=1", "finetune.batch_size=4", "search.ranges.scaling=[0.5,1.0]",
        tiny=False, search_dirs=(extended,)))
    results = run_experiment(cfg, tmp_path / "run")
    assert set(results["methods"]) == {"toy_scaled_sum", "toy_mean", "ta"}
    assert results["methods"]["toy_mean"]["hyperparameters"]["weight"] in (0.5, 1.0, 2.0)
    # the toy engine method with merge_func=sum is task arithmetic: the same search, the same numbers
    assert results["methods"]["toy_scaled_sum"]["per_task"] == results["methods"]["ta"]["per_task"]
    analysis = results["analyses"]["toy"]
    assert analysis["label"] == "from-yaml" and analysis["tasks"] == ["words", "words_again"]
    assert (tmp_path / "run" / "analyses" / "toy" / "best.txt").read_text() == analysis["best"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["analyses"]["toy"] == analysis
    assert results["meta"]["model"] == "toy"


def test_configuration_does_not_import_the_pipeline():
    """config/ is below pipeline/: the schema and its validation never import the stages."""
    import subprocess
    import sys

    code = ("import sys, knots.config.schema as s, knots.methods, knots.analyses; "
            "print(sorted(m for m in sys.modules if m.startswith('knots.pipeline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
