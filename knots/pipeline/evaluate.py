"""Evaluating candidates: the finetuned models, merged models and the ensemble, on one split at a time.

The finetuned models' features are computed once per split (and cached, keyed on the adapter's
checksum, so that they always describe the adapter being merged): they give the normalizers (each
task's own finetuned accuracy) and feed the ensemble. A merged model's features
are computed with its update applied in place to the backbone (:mod:`knots.models.apply`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from knots.heads import HeadSet
from knots.methods.base import Candidate, FinetunedEnsemble, MergedModel, TaskAdapter
from knots.metrics import accuracy, summarize
from knots.models.apply import Update, applied, lora_updates
from knots.models.base import Backbone
from knots.pipeline.cache import entry_lock, short_hash, verified_entry, write_entry
from knots.taskpool import EvalSet, ensemble_scores, score_features


def features(backbone: Backbone, data: EvalSet, heads: HeadSet, delta: Mapping[str, Update] | None,
             desc: str | None = None) -> torch.Tensor:
    """Head inputs of every example of ``data`` for the backbone with ``delta`` applied (if any)."""
    if not delta:
        return data.features(backbone, heads, desc)
    with applied(backbone.encoder, delta):
        return data.features(backbone, heads, desc)


@dataclass
class FinetunedOutputs:
    """Each finetuned model's head inputs per split (in task order), its own-task accuracies, and the
    normalizers (per split, per task): the measured accuracies, or ``fixed`` values (e.g. the
    paper's) used on validation and test alike."""

    features: dict[str, list[torch.Tensor]]
    accuracies: dict[str, dict[str, float]]
    fixed: dict[str, float] | None = None

    @property
    def normalizers(self) -> dict[str, dict[str, float]]:
        if self.fixed is not None:
            return {split: {t: self.fixed[t] for t in self.accuracies} for split in ("validation", "test")}
        return {split: {t: acc[f"{key}_accuracy"] for t, acc in self.accuracies.items()}
                for split, key in (("validation", "val"), ("test", "test"))}


FEATURES_NAME = "features.safetensors"


def fixed_normalizers(cfg: Any) -> dict[str, float] | None:
    """The run's fixed normalizers per task: the paper's (``normalizers: paper``, by the backbone's
    ``arch``, from :mod:`knots.vision.paper`), or None to use the measured accuracies."""
    if cfg.normalizers == "measured":
        return None
    from knots.vision.paper import paper_normalizers

    return paper_normalizers(cfg.model.backbone.get("arch"), cfg.benchmark.task_names)


def feature_cache_path(cache_dir: str | Path, adapter: TaskAdapter, task_definitions: Mapping[str, Any],
                       data_digests: Sequence[str], batch_size: int, head_kind: str) -> Path | None:
    """Where an adapter's features of this task set's validation and test inputs are kept.

    Keyed by the adapter's checksum (its verified content, not only its cache key), every task's
    definition and rows (``data_digests``: :attr:`TaskData.digest`, which fix the inputs and their
    order), the batch size and the head kind (zero-shot heads read normalized features); given
    adapters, which have no checksum, are not cached.
    """
    checksum = adapter.info.get("checksum")
    if checksum is None:
        return None
    digest = short_hash([checksum, dict(task_definitions), list(data_digests), batch_size, head_kind])
    return Path(cache_dir) / "features" / f"{adapter.task}-{digest}"


def _cached_features(cache: Path, compute: Any) -> dict[str, torch.Tensor]:
    """The features kept at ``cache`` if they match their manifest, else ``compute()`` (then kept)."""
    from safetensors.torch import load_file, save_file

    with entry_lock(cache, what="the features"):
        if verified_entry(cache, what="cached features"):
            return load_file(str(cache / FEATURES_NAME))
        computed = compute()
        write_entry(cache, lambda staging: save_file({split: t.contiguous() for split, t in computed.items()},
                                                     str(staging / FEATURES_NAME)), "knots features")
        return computed


def evaluate_finetuned(backbone: Backbone, heads: HeadSet, data: Mapping[str, EvalSet], adapters: Sequence[TaskAdapter],
                       cache_paths: Sequence[Path | None], progress: bool = False,
                       fixed_normalizers: Mapping[str, float] | None = None) -> FinetunedOutputs:
    """Every finetuned model on every task's inputs of each split (features cached at ``cache_paths``);
    ``fixed_normalizers`` (per task) replace the measured accuracies as normalizers."""
    feats: dict[str, list[torch.Tensor]] = {s: [] for s in data}
    for adapter, cache in zip(adapters, cache_paths):
        def compute(adapter: TaskAdapter = adapter) -> dict[str, torch.Tensor]:
            delta = lora_updates(adapter.adapter)
            return {split: features(backbone, d, heads, delta, f"finetuned {adapter.task} {split}" if progress else None)
                    for split, d in data.items()}

        computed = compute() if cache is None else _cached_features(cache, compute)
        for split in data:
            feats[split].append(computed[split])
    accuracies = {}
    for i, adapter in enumerate(adapters):
        accs = {}
        for split, key in (("validation", "val"), ("test", "test")):
            sl = data[split].slices[adapter.task]
            accs[f"{key}_accuracy"] = accuracy(heads.per_task[adapter.task].logits(feats[split][i][sl]), data[split].labels[sl])
        accuracies[adapter.task] = accs
    return FinetunedOutputs(feats, accuracies, None if fixed_normalizers is None else dict(fixed_normalizers))


@dataclass
class Evaluator:
    """Scores candidates on a split: per-task accuracy with each task's head, normalized accuracy,
    joint Hits@k (None where the joint task does not apply)."""

    backbone: Backbone
    heads: HeadSet
    data: dict[str, EvalSet]
    finetuned: FinetunedOutputs
    progress: bool = False

    def scores(self, split: str, candidate: Candidate, desc: str | None = None) -> dict[str, Any]:
        data = self.data[split]
        if isinstance(candidate, FinetunedEnsemble):
            return ensemble_scores(self.finetuned.features[split], data, self.heads, candidate.rule)
        assert isinstance(candidate, MergedModel)
        feats = features(self.backbone, data, self.heads, candidate.delta, desc if self.progress else None)
        return score_features(feats, data, self.heads)

    def summary(self, split: str, candidate: Candidate, desc: str | None = None) -> dict[str, Any]:
        return summarize(self.scores(split, candidate, desc), self.finetuned.normalizers[split])
