"""Small synthetic sentence-pair tasks in the layouts of real NLI datasets, for offline smoke runs.

A pair's relation is decided by the words it shares: the hypothesis restates the premise's animal and
verb (entailment), names another animal (neutral), or denies the verb (contradiction). The vocabulary is
:data:`WORDS`, which the tiny Llama's tokenizer (:mod:`knots.models.tiny`) knows.

:func:`write_layout` writes one task in one of three real layouts and file formats, and
:func:`synthetic_nli_task` (a task builder) writes it once, then reads it back through
:func:`knots.data.nli.nli_task` exactly like the real data: the same loading, label mapping and checks.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from knots.data.tasks import TaskSource
from knots.errors import ConfigError

ANIMALS = ["cat", "dog", "cow", "horse", "bird", "fish"]
VERBS = ["runs", "sleeps", "eats", "swims", "sings", "jumps"]
COLORS = ["red", "brown", "white", "black", "grey", "small"]
FILLER = ["a", "the", "is", "not", "now", "here", "."]
#: Every word a synthetic pair can hold.
WORDS = sorted(set(ANIMALS + VERBS + COLORS + FILLER))

THREE_WAY = {"entailment": 0, "neutral": 1, "contradiction": 2}
#: The layouts: real datasets' columns, label encodings and file formats.
LAYOUTS = ("snli", "sick", "rte")


def pair(rng: random.Random, relation: str) -> tuple[str, str]:
    """A premise/hypothesis pair whose relation is decided by the words it shares."""
    animal, verb, color = rng.choice(ANIMALS), rng.choice(VERBS), rng.choice(COLORS)
    premise = f"the {color} {animal} {verb} {rng.choice(['now', 'here'])} ."
    if relation == "entailment":
        hypothesis = f"a {animal} {verb} ."
    elif relation == "contradiction":
        hypothesis = f"the {animal} is not {rng.choice([v for v in VERBS if v != verb])} ."
    else:  # neutral: a different animal
        hypothesis = f"a {rng.choice([a for a in ANIMALS if a != animal])} {verb} ."
    return premise, hypothesis


def rows(n: int, relations: Sequence[str], seed: int) -> list[tuple[str, str, str]]:
    """``n`` (premise, hypothesis, relation) triples cycling through ``relations``."""
    rng = random.Random(seed)
    return [(*pair(rng, relations[i % len(relations)]), relations[i % len(relations)]) for i in range(n)]


def write_layout(root: str | Path, layout: str, n_train: int, n_eval: int, seed: int = 0) -> Path:
    """Write one synthetic task to ``root`` in a real dataset's layout; returns ``root``.

    - ``snli`` (``save_to_disk``): ``premise``, ``hypothesis``, ``label`` 0/1/2 =
      entailment/neutral/contradiction; train/validation/test, every 7th row labelled -1 (no gold label).
    - ``sick`` (JSON lines, one file per split): ``id``, ``sentence_A``, ``sentence_B``, ``label`` 0/1/2,
      ``relatedness_score``; train/validation/test.
    - ``rte`` (CSV, SetFit's GLUE copies): ``text1``, ``text2``, ``label`` 0 = entailment, 1 = not entailment,
      ``idx``, ``label_text``; train and validation only (``2 * n_eval`` rows, to be cut in two).
    """
    import datasets
    import pandas as pd

    root = Path(root)
    three = list(THREE_WAY)
    sizes = {"train": n_train, "validation": n_eval, "test": n_eval}
    if layout == "snli":
        splits = {}
        for i, (split, n) in enumerate(sizes.items()):
            triples = rows(n, three, seed * 100 + 10 + i)
            labels = [THREE_WAY[r] for _, _, r in triples]
            labels[::7] = [-1] * len(labels[::7])
            splits[split] = datasets.Dataset.from_dict(
                {"premise": [p for p, _, _ in triples], "hypothesis": [h for _, h, _ in triples], "label": labels})
        datasets.DatasetDict(splits).save_to_disk(str(root))
    elif layout == "sick":
        root.mkdir(parents=True, exist_ok=True)
        for i, (split, n) in enumerate(sizes.items()):
            with open(root / f"{split}.jsonl", "w") as f:
                for j, (a, b, r) in enumerate(rows(n, three, seed * 100 + 20 + i)):
                    f.write(json.dumps({"id": f"{split}-{j}", "sentence_A": a, "sentence_B": b, "label": THREE_WAY[r],
                                        "relatedness_score": 4.5 if r == "entailment" else 2.0}) + "\n")
    elif layout == "rte":
        root.mkdir(parents=True, exist_ok=True)
        for i, (split, n) in enumerate({"train": n_train, "validation": 2 * n_eval}.items()):
            triples = rows(n, ["entailment", "contradiction"], seed * 100 + 30 + i)
            label = [0 if r == "entailment" else 1 for _, _, r in triples]
            pd.DataFrame({"text1": [p for p, _, _ in triples], "text2": [h for _, h, _ in triples], "label": label,
                          "idx": range(n), "label_text": ["entailment" if y == 0 else "not_entailment" for y in label],
                          }).to_csv(root / f"{split}.csv", index=False)
    else:
        raise ConfigError(f"unknown synthetic layout {layout!r}; expected one of {', '.join(LAYOUTS)}")
    return root


def synthetic_nli_task(name: str, layout: str, root: str, classes: Mapping[str, Sequence[Any]], premise: str,
                       hypothesis: str, n_train: int = 64, n_eval: int = 24, seed: int = 0, **definition: Any) -> TaskSource:
    """Task builder: a synthetic task written once under ``root`` (one directory per size and seed), then
    read by :func:`knots.data.nli.nli_task` with the task's definition (columns, classes, mask)."""
    from knots.data.nli import nli_task
    from knots.atomic import atomic_directory

    path = Path(root) / f"{name}-{layout}-{n_train}-{n_eval}-{seed}"
    if not path.exists():
        with atomic_directory(path, overwrite=True, writer="knots synthetic data") as tmp:  # a concurrent writer wrote the same
            write_layout(tmp / "data", layout, n_train, n_eval, seed)
    return nli_task(name=name, dataset=f"synthetic/{layout}", premise=premise, hypothesis=hypothesis, classes=classes,
                    path=str(path / "data"), **definition)
