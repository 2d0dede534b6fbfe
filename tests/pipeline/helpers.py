"""Tiny offline fixtures for the pipeline tests: a random BERT and three small text tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

from knots.config.resources import config_dir

CONF_DIR = config_dir()

POSITIVE = ["good", "great", "nice", "fine", "lovely"]
NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
ANIMALS = ["cat", "dog", "cow", "horse", "bird"]
VEHICLES = ["car", "bus", "truck", "train", "boat"]
FILLER = ["the", "a", "this", "is", "was", "very", "so", "it", "and", "of"]
LABEL_WORDS = ["positive", "negative", "animal", "vehicle", "review", "text", "about"]


def make_tiny_bert(path: Path) -> Path:
    """A 2-layer, 32-wide BERT with a word-level vocabulary, saved like a pretrained checkpoint."""
    import torch
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "{", "}"]
    vocab += sorted(set(POSITIVE + NEGATIVE + ANIMALS + VEHICLES + FILLER + LABEL_WORDS))
    BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(str(path))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, initializer_range=0.5)
    BertModel(config).save_pretrained(str(path))
    return path


def _sentences(words_by_label: dict[str, list[str]], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    labels = list(words_by_label)
    rows = []
    for i in range(n):
        label = labels[i % len(labels)]
        words = rng.sample(FILLER, 3) + [rng.choice(words_by_label[label])] + rng.sample(FILLER, 2)
        rows.append((" ".join(words) + f" {i % 7}", label))
    return rows


def make_tiny_tasks(root: Path, n: int = 60) -> dict[str, Path]:
    """Three tasks in three formats: a CSV (mood), a JSONL (topic), a text file of lines (review).

    mood and review share their sentiment labels in the joint label space."""
    import pandas as pd

    root.mkdir(parents=True, exist_ok=True)
    mood = _sentences({"1": POSITIVE, "0": NEGATIVE}, n, seed=1)
    pd.DataFrame({"sentence": [s for s, _ in mood], "score": [int(y) for _, y in mood]}).to_csv(root / "mood.csv", index=False)
    topic = _sentences({"animal": ANIMALS, "vehicle": VEHICLES}, n, seed=2)
    with open(root / "topic.jsonl", "w") as f:
        for s, y in topic:
            f.write(json.dumps({"text": s, "label": y}) + "\n")
    review = _sentences({"POS": POSITIVE, "NEG": NEGATIVE}, n, seed=3)
    (root / "review.txt").write_text("".join(f"{y}\t{s}\n" for s, y in review))
    return {"mood": root / "mood.csv", "topic": root / "topic.jsonl", "review": root / "review.txt"}


def write_tiny_conf(conf: Path, data: dict[str, Path], model_dir: Path) -> Path:
    """A config directory (added to Hydra's search path) with the tiny benchmark and model."""
    (conf / "benchmark").mkdir(parents=True, exist_ok=True)
    (conf / "model").mkdir(parents=True, exist_ok=True)
    (conf / "benchmark" / "tiny.yaml").write_text(f"""
name: tiny
tasks:
  mood:
    source: csv
    path: {data['mood']}
    input_column: sentence
    label_column: score
    classes:
      - {{name: negative, key: sentiment/negative, values: [0]}}
      - {{name: positive, key: sentiment/positive, values: [1]}}
    templates: ["a {{}} text.", "this is {{}}."]
  topic:
    source: json
    path: {data['topic']}
    classes:
      - {{name: animal, values: [animal]}}
      - {{name: vehicle, values: [vehicle]}}
    templates: ["a text about a {{}}."]
  review:
    source: lines
    path: {data['review']}
    pattern: '^(?P<label>[A-Z]+)\\t(?P<input>.+)$'
    classes:
      - {{name: negative, key: sentiment/negative, values: [NEG]}}
      - {{name: positive, key: sentiment/positive, values: [POS]}}
    templates: ["a {{}} review."]
""")
    (conf / "model" / "tiny_bert.yaml").write_text(f"""
name: tiny-bert
backbone: {{_target_: knots.models.text.TextBackbone, path: {model_dir}, max_length: 16, batch_size: 16}}
lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [query, key, value, attention.output.dense]}}
""")
    return conf


#: Overrides that make a whole run take seconds: tiny model and tasks, few steps, short searches.
TINY_OVERRIDES = [
    "model=tiny_bert",
    "benchmark=tiny",
    "finetune.steps=6",
    "finetune.batch_size=8",
    "finetune.warmup_steps=1",
    "finetune.checkpoint_every=2",
    "finetune.log_every=1",
    "finetune.lr=1e-2",
    "search.ranges.scaling=[0.5,1.0]",
    "search.ranges.top_k=[20,100]",
    "search.ranges.p=[0.5,0.1]",
    "search.ranges.alpha=[0.5,0.9]",
    "search.ranges.seed=[0,1]",
    "+method_params.regmean.num_examples=16",
    "progress=false",
]
