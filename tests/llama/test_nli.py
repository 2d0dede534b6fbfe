"""The six NLI tasks: label mapping on rows in each dataset's real layout, splits, dropping, errors.

The reference pipeline (gstoica27/KnOTS dataset/huggingface_datasets.py and the per-task files) is
replayed with the same ``datasets`` operations it uses (filter, map, ``train_test_split``) and compared
with ``build_nli_task`` example for example.
"""

from __future__ import annotations

import random

import datasets
import pytest

from knots.data.nli import (NLI_CLASSES, NLI_SPECS, NLISpec, ValidationCut, build_nli_task, cut_validation,
                            label_index, load_nli_source, load_nli_task, map_row, to_examples)
from knots.errors import ConfigError
from tests.llama.helpers import make_tiny_nli_tasks, tiny_nli_specs

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


@pytest.mark.parametrize("task", sorted(REAL_ROWS))
def test_label_mapping_on_real_layouts(task):
    spec = NLI_SPECS[task]
    for row, expected in REAL_ROWS[task]:
        got = map_row(row, spec)
        if expected is None:
            assert got is None
        else:
            assert got == ((row[spec.premise], row[spec.hypothesis]), expected)
            assert NLI_CLASSES[expected] not in spec.masked


def test_two_class_tasks_mask_the_class_they_never_have():
    masks = {name: spec.mask for name, spec in NLI_SPECS.items()}
    assert masks == {"snli": (), "mnli": (), "sick": (), "qnli": (1,), "rte": (1,), "scitail": (2,)}
    for name, rows in REAL_ROWS.items():
        seen = {y for _, y in rows if y is not None}
        assert seen | set(masks[name]) == {0, 1, 2} and not seen & set(masks[name])


def test_labels_compare_as_strings_and_none_is_dropped():
    spec = NLI_SPECS["rte"]
    assert label_index("1", spec) == label_index(1, spec) == 2
    assert label_index(None, spec) is None and label_index("-1", spec) is None


@pytest.mark.parametrize("task,raw", [("mnli", 3), ("scitail", "contradiction"), ("rte", 2), ("sick", -2)])
def test_unknown_label_value_is_one_line_config_error(task, raw):
    row = {c: "x" for c in (NLI_SPECS[task].premise, NLI_SPECS[task].hypothesis)} | {"label": raw}
    with pytest.raises(ConfigError, match=rf"task {task}: label value {raw!r} maps to no class") as e:
        map_row(row, NLI_SPECS[task])
    assert "\n" not in str(e.value)


def test_missing_column_names_the_columns():
    with pytest.raises(ConfigError, match=r"column 'text1' not in the data \(columns: premise, hypothesis, label\)"):
        map_row({"premise": "p", "hypothesis": "h", "label": 0}, NLI_SPECS["qnli"])
    with pytest.raises(ConfigError, match="column 'text1'"):
        to_examples(datasets.Dataset.from_dict({"premise": ["p"], "label": [0]}), NLI_SPECS["mnli"])


@pytest.mark.parametrize("kwargs,message", [
    (dict(labels={0: "entailment", 1: "not_entailment"}, masked=("neutral",)),
     r"label value 1 maps to 'not_entailment', not one of entailment, neutral, contradiction"),
    (dict(labels={0: "entailment", 1: "contradiction"}),
     r"no label value maps to neutral; a task with fewer than three classes must mask the missing ones \(masked: \[neutral\]\)"),
    (dict(labels={0: "entailment", 1: "neutral", 2: "contradiction"}, masked=("neutral",)),
     r"class 'neutral' is masked but a label value maps to it"),
    (dict(labels={0: "entailment", 1: "contradiction"}, masked=("other",)), r"masked class 'other'"),
    (dict(labels={}), r"no label values given"),
    (dict(labels={0: "entailment", 1: "neutral", 2: "contradiction"}, unlabelled=(2,)),
     r"label value '2' is both a class and a no-gold marker"),
    (dict(labels={0: "entailment", 1: "neutral", 2: "contradiction"}, cut=ValidationCut(1.0, True)),
     r"cut fraction must be in \(0, 1\)"),
])
def test_inconsistent_spec_is_one_line_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message) as e:
        NLISpec("t", "hub/t", None, "premise", "hypothesis", "label", **kwargs)
    assert str(e.value).startswith("task t: ") and "\n" not in str(e.value)


@pytest.mark.parametrize("n,fraction,shuffle", [
    (9815, 0.2, False),  # MNLI validation (matched)
    (5463, 0.2, True),  # QNLI validation
    (277, 0.5, True),  # RTE validation
    (11, 0.3, False), (11, 0.3, True), (2, 0.5, True),
])
def test_cut_is_index_exact_with_datasets_train_test_split(n, fraction, shuffle):
    ref = datasets.Dataset.from_dict({"i": list(range(n))}).train_test_split(test_size=fraction, shuffle=shuffle, seed=42)
    val, test = cut_validation(n, ValidationCut(fraction, shuffle))
    assert val == ref["test"]["i"] and test == ref["train"]["i"]
    assert sorted(val + test) == list(range(n))  # disjoint, covering
    assert (val, test) == cut_validation(n, ValidationCut(fraction, shuffle))  # deterministic


def test_cut_sizes_of_the_reference_tasks():
    sizes = {name: tuple(map(len, cut_validation(n, NLI_SPECS[name].cut)))
             for name, n in {"mnli": 9815, "qnli": 5463, "rte": 277}.items()}
    assert sizes == {"mnli": (1963, 7852), "qnli": (1093, 4370), "rte": (139, 138)}
    assert cut_validation(20, ValidationCut(0.2, False)) == (list(range(16, 20)), list(range(16)))  # tail validates
    assert cut_validation(50, ValidationCut(0.2, True, seed=1)) != cut_validation(50, ValidationCut(0.2, True, seed=42))


def test_cut_too_small_is_config_error():
    with pytest.raises(ConfigError, match="cannot cut 1 examples"):
        cut_validation(1, ValidationCut(0.5, True))


# ---- the reference pipeline, replayed with the datasets operations it uses -------------------------

def reference_splits(task: str, source: dict[str, datasets.Dataset]) -> dict[str, list]:
    """(pair, label) per split exactly as gstoica27/KnOTS builds them (tokenization left out)."""
    spec = NLI_SPECS[task]
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
            row[NLI_SPECS[task].premise] = f"{split} premise {i}"
            row[NLI_SPECS[task].hypothesis] = f"{split} hypothesis {i}"
            rows.append(row)
        out[split] = datasets.Dataset.from_list(rows)
    return out


@pytest.mark.parametrize("task", sorted(NLI_SPECS))
def test_build_matches_the_reference_pipeline(task):
    sizes = {"train": 60, "validation": 41, "test": 23}
    if NLI_SPECS[task].cut is not None:
        sizes.pop("test")
    source = synthetic_source(task, sizes)
    built = build_nli_task(NLI_SPECS[task], source)
    ref = reference_splits(task, source)
    for split in ("train", "validation", "test"):
        assert built.data.split(split) == ref[split], split
    assert built.data.class_names == list(NLI_CLASSES) and built.data.templates == []
    assert built.data.label_keys == ["nli/entailment", "nli/neutral", "nli/contradiction"]
    assert built.mask == NLI_SPECS[task].mask
    assert all(isinstance(x, tuple) and len(x) == 2 for x, _ in built.data.train)


def test_unlabelled_rows_are_dropped_before_the_cut():
    rows = [{"text1": f"p{i}", "text2": f"h{i}", "label": -1 if i % 3 == 0 else i % 2, "idx": i, "label_text": ""}
            for i in range(30)]
    source = {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows)}
    task = build_nli_task(NLI_SPECS["rte"], source)
    labelled = [r for r in rows if r["label"] != -1]
    assert len(task.data.train) == len(labelled) == 20
    assert (len(task.data.validation), len(task.data.test)) == (10, 10)
    val_idx, test_idx = cut_validation(20, NLI_SPECS["rte"].cut)
    assert [x for x, _ in task.data.validation] == [(labelled[i]["text1"], labelled[i]["text2"]) for i in val_idx]
    assert {x for x, _ in task.data.validation}.isdisjoint(x for x, _ in task.data.test)


def test_missing_split_and_empty_split_are_config_errors():
    source = synthetic_source("snli", {"train": 5, "validation": 5})
    with pytest.raises(ConfigError, match="task snli: the data has no 'test' split"):
        build_nli_task(NLI_SPECS["snli"], source)
    source["test"] = datasets.Dataset.from_list([{"premise": "p", "hypothesis": "h", "label": -1}])
    with pytest.raises(ConfigError, match="task snli: the test split has no labelled examples"):
        build_nli_task(NLI_SPECS["snli"], source)


def test_tiny_tasks_load_from_disk_jsonl_and_csv(tmp_path):
    paths = make_tiny_nli_tasks(tmp_path / "data", n_train=21, n_eval=14)
    built = {name: build_nli_task(spec, load_nli_source(spec, paths[name], cache_dir=str(tmp_path / "cache")))
             for name, spec in tiny_nli_specs().items()}
    sizes = {name: tuple(len(t.data.split(s)) for s in ("train", "validation", "test")) for name, t in built.items()}
    assert sizes == {"entail3": (18, 12, 12), "pairs3": (21, 14, 14), "binary2": (21, 14, 14)}  # every 7th -1 dropped
    assert {name: t.mask for name, t in built.items()} == {"entail3": (), "pairs3": (), "binary2": (1,)}
    assert {y for _, y in built["binary2"].data.train} == {0, 2}


def test_loading_offline_names_the_dataset_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = NLISpec("x", "no-such-org/no-such-nli", "cfg", "premise", "hypothesis", "label",
                   {0: "entailment", 1: "neutral", 2: "contradiction"})
    with pytest.raises(ConfigError, match=r"task x: cannot load dataset 'no-such-org/no-such-nli' \(cfg\)") as e:
        load_nli_source(spec, cache_dir=str(tmp_path))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="unknown NLI task 'anli'"):
        load_nli_task("anli")


def test_reference_accuracies_are_whole_counts_over_these_test_sizes():
    """The reference's finetuned test accuracies (eval_scripts/nli_pertask_linearsearch.py L80-87) are
    whole numbers of correct answers exactly over the test sizes these splits give: the cuts take the
    test set from the right end of the validation split, and unlabelled rows are dropped first."""
    accuracy = {"snli": 92.49796416938111, "mnli": 90.30820173204279, "sick": 91.58173664900122,
                "qnli": 94.48512585812358, "rte": 89.85507246376812, "scitail": 96.51928504233303}
    validation_rows = {"mnli": 9815, "qnli": 5463, "rte": 277}  # dataset cards; all labelled
    test_rows = {"snli": 10000 - 176, "sick": 4906, "scitail": 2126}  # SNLI: 176 test pairs have no gold label
    for name, n in validation_rows.items():
        test_rows[name] = len(cut_validation(n, NLI_SPECS[name].cut)[1])
    assert test_rows == {"snli": 9824, "sick": 4906, "scitail": 2126, "mnli": 7852, "qnli": 4370, "rte": 138}
    for name, acc in accuracy.items():
        correct = acc * test_rows[name] / 100
        assert abs(correct - round(correct)) < 1e-6, name
    # the other halves of the cuts do not fit
    for name in validation_rows:
        other = len(cut_validation(validation_rows[name], NLI_SPECS[name].cut)[0])
        assert abs(accuracy[name] * other / 100 - round(accuracy[name] * other / 100)) > 1e-3, name
