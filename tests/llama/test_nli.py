"""The six NLI tasks as their config files define them: label mapping on rows in each dataset's real
layout, splits, dropping, errors.

The reference pipeline (gstoica27/KnOTS dataset/huggingface_datasets.py and the per-task files) is
replayed with the same ``datasets`` operations it uses (filter, map, ``train_test_split``) and compared
with what ``conf/task/<task>.yaml`` builds (``knots.data.nli`` and ``knots.data.splits``) example for example.
"""

from __future__ import annotations

import random
import re

import datasets
import pytest
from omegaconf import OmegaConf

from knots.config.resources import config_dir
from knots.config.schema import SplitConfig
from knots.data.nli import NLI_CLASSES, NLISpec, label_index, load_nli_source, map_row, nli_source, nli_task, to_examples
from knots.data.splits import assign_roles, carved_parts
from knots.errors import ConfigError

TASKS = ("snli", "mnli", "sick", "qnli", "rte", "scitail")


def task_yaml(task: str):
    return OmegaConf.load(config_dir() / "task" / f"{task}.yaml")


def spec_of(task: str) -> NLISpec:
    """The task's definition exactly as its config file gives it to the builder."""
    loader = OmegaConf.to_container(task_yaml(task).loader, resolve=False)
    assert loader.pop("_target_") == "knots.data.nli.nli_task"
    loader.pop("cache_dir")
    return NLISpec(name=task, **loader)


def split_of(task: str) -> SplitConfig:
    split = SplitConfig(**OmegaConf.to_container(task_yaml(task).split))
    split.validate()
    return split


def build(task: str, source) -> dict:
    """Train / validation / test of a task built from ``source`` the way knots-run builds it."""
    return assign_roles(nli_source(spec_of(task), source).splits, split_of(task), task)


# One hand-made row per label value, in each dataset's real columns and label encoding
# (dataset cards: stanfordnlp/snli, SetFit/{mnli,qnli,rte}, RobZamp/sick, allenai/scitail tsv_format),
# with the 3-way class index the reference gives it (None: dropped, no gold label).
REAL_ROWS = {
    "snli": [
        ({"premise": "A man plays.", "hypothesis": "A person plays.", "label": 0}, 0),
        ({"premise": "A man plays.", "hypothesis": "He is tall.", "label": 1}, 1),
        ({"premise": "A man plays.", "hypothesis": "Nobody plays.", "label": 2}, 2),
        ({"premise": "A man plays.", "hypothesis": "It rains.", "label": -1}, None),
    ],
    "mnli": [
        ({"text1": "P", "text2": "H0", "label": 0, "idx": 0, "label_text": "entailment"}, 0),
        ({"text1": "P", "text2": "H1", "label": 1, "idx": 1, "label_text": "neutral"}, 1),
        ({"text1": "P", "text2": "H2", "label": 2, "idx": 2, "label_text": "contradiction"}, 2),
        ({"text1": "P", "text2": "H3", "label": -1, "idx": 3, "label_text": ""}, None),
    ],
    "sick": [
        ({"id": "1", "sentence_A": "A", "sentence_B": "B0", "label": 0, "relatedness_score": 4.5,
          "entailment_AB": "A_entails_B", "entailment_BA": "B_neutral_A"}, 0),
        ({"id": "2", "sentence_A": "A", "sentence_B": "B1", "label": 1, "relatedness_score": 3.0,
          "entailment_AB": "A_neutral_B", "entailment_BA": "B_neutral_A"}, 1),
        ({"id": "3", "sentence_A": "A", "sentence_B": "B2", "label": 2, "relatedness_score": 1.5,
          "entailment_AB": "A_contradicts_B", "entailment_BA": "B_contradicts_A"}, 2),
    ],
    "qnli": [
        ({"text1": "Who?", "text2": "Ann did.", "label": 0, "idx": 0, "label_text": "entailment"}, 0),
        ({"text1": "Who?", "text2": "It rained.", "label": 1, "idx": 1, "label_text": "not_entailment"}, 2),
        ({"text1": "Who?", "text2": "Test row.", "label": -1, "idx": 2, "label_text": ""}, None),
    ],
    "rte": [
        ({"text1": "P", "text2": "H0", "label": 0, "idx": 0, "label_text": "entailment"}, 0),
        ({"text1": "P", "text2": "H1", "label": 1, "idx": 1, "label_text": "not_entailment"}, 2),
        ({"text1": "P", "text2": "H2", "label": -1, "idx": 2, "label_text": ""}, None),
    ],
    "scitail": [
        ({"premise": "Cells divide.", "hypothesis": "Cells split.", "label": "entails"}, 0),
        ({"premise": "Cells divide.", "hypothesis": "Rocks melt.", "label": "neutral"}, 1),
    ],
}


@pytest.mark.parametrize("task", TASKS)
def test_label_mapping_on_real_layouts(task):
    spec = spec_of(task)
    for row, expected in REAL_ROWS[task]:
        mapped = map_row(row, spec)
        if expected is None:
            assert mapped is None
        else:
            assert mapped == ((row[spec.premise], row[spec.hypothesis]), expected)


def test_the_six_configs_match_the_reference():
    specs = {t: spec_of(t) for t in TASKS}
    assert {t: s.dataset for t, s in specs.items()} == {
        "snli": "stanfordnlp/snli", "mnli": "SetFit/mnli", "sick": "RobZamp/sick", "qnli": "SetFit/qnli",
        "rte": "SetFit/rte", "scitail": "allenai/scitail"}
    assert specs["scitail"].config == "tsv_format"
    assert {t: s.class_mask for t, s in specs.items()} == {
        "snli": [True] * 3, "mnli": [True] * 3, "sick": [True] * 3,
        "qnli": [True, False, True], "rte": [True, False, True], "scitail": [True, True, False]}
    splits = {t: split_of(t) for t in TASKS}
    assert {t: (s.carve, s.carve_fraction, s.seed) for t, s in splits.items() if "validation" not in s.source_splits} == {
        "mnli": ("tail", 0.2, 42), "qnli": ("random", 0.2, 42), "rte": ("random", 0.5, 42)}


def test_two_class_tasks_mask_the_class_they_never_have():
    for task, masked in (("qnli", "neutral"), ("rte", "neutral"), ("scitail", "contradiction")):
        source = nli_source(spec_of(task), {"train": [row for row, _ in REAL_ROWS[task]]})
        assert source.class_mask == [c != masked for c in NLI_CLASSES]
        assert source.class_names == list(NLI_CLASSES)
        assert source.label_keys == ["nli/entailment", "nli/neutral", "nli/contradiction"]
        assert NLI_CLASSES.index(masked) not in source.splits["train"].labels


def test_labels_compare_as_strings_and_none_is_dropped():
    spec = spec_of("rte")
    assert label_index("1", spec) == 2 and label_index(" 0 ", spec) == 0
    assert label_index(None, spec) is None and label_index(-1, spec) is None


@pytest.mark.parametrize("task,raw", [("mnli", 3), ("scitail", "contradiction"), ("rte", 2), ("sick", -2)])
def test_unknown_label_value_is_one_line_config_error(task, raw):
    with pytest.raises(ConfigError, match=f"task {task}: label value {raw!r} maps to no class") as e:
        label_index(raw, spec_of(task))
    assert "\n" not in str(e.value)


def test_missing_column_names_the_columns():
    with pytest.raises(ConfigError, match="task snli: column 'premise' not in the data"):
        map_row({"text1": "a", "text2": "b", "label": 0}, spec_of("snli"))
    with pytest.raises(ConfigError, match="task snli: column 'premise' not in the data"):
        to_examples(datasets.Dataset.from_dict({"text1": ["a"], "hypothesis": ["b"], "label": [0]}), spec_of("snli"))


THREE = {"entailment": [0], "neutral": [1], "contradiction": [2]}


@pytest.mark.parametrize("kwargs,message", [
    (dict(classes={"entailment": [0], "not_entailment": [1]}, masked=["neutral"]),
     "label values [1] map to 'not_entailment', not one of entailment, neutral, contradiction"),
    (dict(classes={"entailment": [0], "contradiction": [1]}),
     "no label value maps to neutral; a task with fewer than three classes must mask the missing ones"),
    (dict(classes=THREE, masked=["neutral"]), "class 'neutral' is masked but label values map to it"),
    (dict(classes={**THREE, "neutral": [0]}), "label value 0 maps to two classes"),
    (dict(classes=THREE, masked=["other"]), "masked class 'other' is not one of"),
    (dict(classes=THREE, unlabelled=[2]), "label value '2' is both a class and a no-gold marker"),
    (dict(classes={}), "no classes given"),
    (dict(classes={**THREE, "neutral": []}), "class 'neutral' has no label values"),
])
def test_inconsistent_definition_is_one_line_config_error_before_reading_data(kwargs, message, monkeypatch):
    import knots.data.nli as nli

    monkeypatch.setattr(nli, "load_nli_source", lambda *a, **k: pytest.fail("data read before the definition was checked"))
    with pytest.raises(ConfigError, match=re.escape(f"task x: {message}")) as e:
        nli_task(name="x", dataset="some/nli", premise="p", hypothesis="h", **kwargs)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("n,fraction,shuffle", [
    (9815, 0.2, False),  # MNLI validation (matched)
    (5463, 0.2, True),  # QNLI validation
    (277, 0.5, True),  # RTE validation
    (11, 0.3, False), (11, 0.3, True), (2, 0.5, True),
])
def test_carve_is_index_exact_with_datasets_train_test_split(n, fraction, shuffle):
    ref = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=fraction, shuffle=shuffle, seed=42)
    carved, rest = carved_parts([0] * n, fraction, 42, "random" if shuffle else "tail")
    assert carved == ref["test"]["i"] and rest == ref["train"]["i"]
    assert sorted(carved + rest) == list(range(n))  # disjoint, covering


def test_carve_sizes_of_the_reference_tasks():
    sizes = {t: tuple(map(len, carved_parts([0] * n, split_of(t).carve_fraction, split_of(t).seed, split_of(t).carve)))
             for t, n in {"mnli": 9815, "qnli": 5463, "rte": 277}.items()}
    assert sizes == {"mnli": (1963, 7852), "qnli": (1093, 4370), "rte": (139, 138)}
    assert carved_parts([0] * 20, 0.2, 42, "tail") == (list(range(16, 20)), list(range(16)))  # the tail validates
    assert carved_parts([0] * 50, 0.2, 1, "random") != carved_parts([0] * 50, 0.2, 42, "random")


def test_carve_too_small_is_config_error():
    with pytest.raises(ConfigError, match="cannot carve 0.5 of 1 examples"):
        carved_parts([0], 0.5, 42, "random")


# ---- the reference pipeline, replayed with the datasets operations it uses -------------------------

def reference_splits(task: str, source: dict[str, datasets.Dataset]) -> dict[str, list]:
    """(pair, label) per split exactly as gstoica27/KnOTS builds them (tokenization left out)."""
    spec = spec_of(task)
    ds = datasets.DatasetDict(source).rename_column("label", "labels")
    if task == "scitail":  # dataset/scitail.py L47-48
        ds = ds.filter(lambda e: e["labels"] == "neutral" or e["labels"] == "entails")
        ds = ds.map(lambda e: {"labels": 0 if e["labels"] == "entails" else 1 if e["labels"] == "neutral" else e["labels"]})
    else:  # dataset/huggingface_datasets.py L66
        ds = ds.filter(lambda e: e["labels"] == 0 or e["labels"] == 1 or e["labels"] == 2)
    if task in ("qnli", "rte"):  # dataset/qnli.py L17, dataset/rte.py L15
        ds = ds.map(lambda e: {"labels": 2 if e["labels"] == 1 else e["labels"]})
    if task in ("mnli", "qnli", "rte"):  # dataset/{mnli,qnli,rte}.py: test <- "train" part, val <- "test" part
        fraction = {"mnli": 0.2, "qnli": 0.2, "rte": 0.5}[task]
        cut = ds["validation"].train_test_split(test_size=fraction, shuffle=task != "mnli", seed=42)
        val, test = cut["test"], cut["train"]
    else:
        val, test = ds["validation"], ds["test"]

    def pairs(d):
        return [((p, h), y) for p, h, y in zip(d[spec.premise], d[spec.hypothesis], d["labels"])]

    return {"train": pairs(ds["train"]), "validation": pairs(val), "test": pairs(test)}


def synthetic_source(task: str, sizes: dict[str, int], seed: int = 0) -> dict[str, datasets.Dataset]:
    """Random rows in the task's real layout, with its real label values (and some no-gold rows)."""
    rng = random.Random(seed)
    template = [row for row, _ in REAL_ROWS[task]]
    out = {}
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            row = dict(rng.choice(template))
            row[spec_of(task).premise] = f"{split} premise {i}"
            row[spec_of(task).hypothesis] = f"{split} hypothesis {i}"
            rows.append(row)
        out[split] = datasets.Dataset.from_list(rows)
    return out


@pytest.mark.parametrize("task", TASKS)
def test_build_matches_the_reference_pipeline(task):
    sizes = {"train": 60, "validation": 41, "test": 23}
    if "validation" not in split_of(task).source_splits:  # the cut tasks have an unlabelled test split
        sizes["test"] = 5
    source = synthetic_source(task, sizes)
    built = build(task, source)
    ref = reference_splits(task, source)
    for split in ("train", "validation", "test"):
        assert list(built[split]) == ref[split], split
    assert all(isinstance(x, tuple) and len(x) == 2 for x, _ in built["train"])


def test_unlabelled_rows_are_dropped_before_the_cut():
    rows = [{"text1": f"p{i}", "text2": f"h{i}", "label": -1 if i % 3 == 0 else i % 2, "idx": i, "label_text": ""}
            for i in range(30)]
    source = {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows)}
    built = build("rte", source)
    labelled = [r for r in rows if r["label"] != -1]
    assert len(built["train"]) == len(labelled) == 20
    assert (len(built["validation"]), len(built["test"])) == (10, 10)
    val_idx, _ = carved_parts([0] * 20, 0.5, 42, "random")
    assert [x for x, _ in built["validation"]] == [(labelled[i]["text1"], labelled[i]["text2"]) for i in val_idx]
    assert {x for x, _ in built["validation"]}.isdisjoint(x for x, _ in built["test"])


def test_missing_split_and_empty_split_are_config_errors():
    source = synthetic_source("snli", {"train": 5, "validation": 5})
    with pytest.raises(ConfigError, match="task snli: source has no split 'test'"):
        build("snli", source)
    source["test"] = datasets.Dataset.from_list([{"premise": "p", "hypothesis": "h", "label": -1}])
    with pytest.raises(ConfigError, match="task snli: the test split is empty"):
        build("snli", source)


def test_synthetic_tasks_load_from_disk_jsonl_and_csv(tmp_path):
    """The smoke benchmark's tasks: written in three real layouts, read back by the real builder."""
    from knots.data.synthetic_nli import synthetic_nli_task

    cfg = OmegaConf.load(config_dir() / "benchmark" / "nli_smoke.yaml")
    built = {}
    for name, task in cfg.tasks.items():
        loader = OmegaConf.to_container(task.loader, resolve=False)
        loader.pop("_target_"), loader.pop("root")
        source = synthetic_nli_task(name=name, root=str(tmp_path), **{**loader, "n_train": 21, "n_eval": 14})
        split = SplitConfig(**OmegaConf.to_container(task.split))
        built[name] = (source, assign_roles(source.splits, split, name))
    sizes = {name: tuple(len(sets[s]) for s in ("train", "validation", "test")) for name, (_, sets) in built.items()}
    assert sizes == {"entail3": (18, 12, 12), "pairs3": (21, 14, 14), "binary2": (21, 14, 14)}  # every 7th -1 dropped
    assert {name: src.class_mask for name, (src, _) in built.items()} == {
        "entail3": None, "pairs3": None, "binary2": [True, False, True]}
    assert set(built["binary2"][1]["train"].labels) == {0, 2}
    assert {p.name for p in tmp_path.iterdir()} == {"entail3-snli-21-14-0", "pairs3-sick-21-14-0", "binary2-rte-21-14-0"}


def test_loading_offline_names_the_dataset_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = NLISpec("x", "no-such-org/no-such-nli", "premise", "hypothesis", THREE, config="cfg")
    with pytest.raises(ConfigError, match=r"task x: cannot load dataset 'no-such-org/no-such-nli' \(cfg\)") as e:
        load_nli_source(spec, cache_dir=str(tmp_path))
    assert "\n" not in str(e.value)


def test_reference_accuracies_are_whole_counts_over_these_test_sizes():
    """The reference's finetuned test accuracies (eval_scripts/nli_pertask_linearsearch.py L80-87) are
    whole numbers of correct answers exactly over the test sizes these splits give: the cuts take the
    test set from the right end of the validation split, and unlabelled rows are dropped first."""
    accuracy = {"snli": 92.49796416938111, "mnli": 90.30820173204279, "sick": 91.58173664900122,
                "qnli": 94.48512585812358, "rte": 89.85507246376812, "scitail": 96.51928504233303}
    validation_rows = {"mnli": 9815, "qnli": 5463, "rte": 277}  # dataset cards; all labelled
    test_rows = {"snli": 10000 - 176, "sick": 4906, "scitail": 2126}  # SNLI: 176 test pairs have no gold label
    for name, n in validation_rows.items():
        test_rows[name] = len(carved_parts([0] * n, split_of(name).carve_fraction, 42, split_of(name).carve)[1])
    assert test_rows == {"snli": 9824, "sick": 4906, "scitail": 2126, "mnli": 7852, "qnli": 4370, "rte": 138}
    for name, acc in accuracy.items():
        correct = acc * test_rows[name] / 100
        assert abs(correct - round(correct)) < 1e-6, name
    # the other halves of the cuts do not fit
    for name in validation_rows:
        other = len(carved_parts([0] * validation_rows[name], split_of(name).carve_fraction, 42, split_of(name).carve)[0])
        assert abs(accuracy[name] * other / 100 - round(accuracy[name] * other / 100)) > 1e-3, name
