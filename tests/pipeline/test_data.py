"""Tasks defined by config: readers, label mapping, seeded stratified splits, joint label space."""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import pytest

from knots.data.build import build_task, label_of, split_examples
from knots.data.splits import capped, stratified_parts
from knots.data.tasks import JointLabelSpace, LabelledPool, TaskData, TaskSource
from knots.errors import ConfigError


def stratified_split(examples, fractions, seed):
    parts = stratified_parts([y for _, y in examples], fractions, seed)
    return [[examples[i] for i in part] for part in parts]


def subsample(examples, cap, seed, balance):
    return [examples[i] for i in capped([y for _, y in examples], range(len(examples)), cap, seed, balance)]


def cls(name, values=(), lo=None, hi=None, key=None):
    return SimpleNamespace(name=name, values=list(values), min=lo, max=hi, key=key)


def split_cfg(**kw):
    base = dict(seed=0, fractions={"train": 0.6, "validation": 0.2, "test": 0.2}, source_splits={}, carve_from="test",
                carve_fraction=0.2, max_train=None, max_validation=None, max_test=None, balance=False)
    return SimpleNamespace(**{**base, **kw})


def test_label_of_values_and_ranges():
    classes = [cls("neg", lo=None, hi=-0.5), cls("pos", lo=0.5), cls("spam", values=[1, "x"])]
    assert label_of(-2.0, classes) == 0
    assert label_of(0.7, classes) == 1
    assert label_of(0.0, classes) is None
    assert label_of("x", classes[2:]) == 0 and label_of(1, classes[2:]) == 0 and label_of("1", classes[2:]) == 0


def test_stratified_split_is_seeded_disjoint_and_keeps_proportions():
    ex = [(f"t{i}", int(i % 4 == 0)) for i in range(200)]
    a = stratified_split(ex, [0.6, 0.2, 0.2], seed=3)
    b = stratified_split(ex, [0.6, 0.2, 0.2], seed=3)
    c = stratified_split(ex, [0.6, 0.2, 0.2], seed=4)
    assert a == b and a != c
    assert [len(p) for p in a] == [120, 40, 40]
    assert sorted(x for p in a for x, _ in p) == sorted(x for x, _ in ex)
    assert [Counter(y for _, y in p)[1] for p in a] == [30, 10, 10]


def test_balanced_subsample():
    ex = [(f"t{i}", int(i % 10 == 0)) for i in range(300)]
    out = subsample(ex, 20, seed=0, balance=True)
    assert Counter(y for _, y in out) == {0: 10, 1: 10}
    assert Counter(y for _, y in subsample(ex, 20, seed=0, balance=False)) == {0: 18, 1: 2}


def test_source_splits_and_carved_validation():
    rows = {"tr": [(f"a{i}", i % 2) for i in range(50)], "te": [(f"b{i}", i % 2) for i in range(50)]}
    sets = split_examples(rows, [cls("x", [0]), cls("y", [1])], split_cfg(source_splits={"train": "tr", "test": "te"}), "t")
    assert len(sets["train"]) == 50 and len(sets["validation"]) == 10 and len(sets["test"]) == 40
    assert all(x.startswith("b") for x, _ in sets["validation"])


def test_repeated_inputs_are_dropped():
    rows = [("same", 0)] * 5 + [(f"u{i}", i % 2) for i in range(40)]
    sets = split_examples(rows, [cls("x", [0]), cls("y", [1])], split_cfg(), "t")
    assert sum(x == "same" for s in sets.values() for x, _ in s) == 1


def test_hf_dataset_from_disk(tmp_path):
    import datasets

    d = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(30)], "lab": [i % 3 for i in range(30)]}),
        "test": datasets.Dataset.from_dict({"sentence": [f"q{i}" for i in range(30)], "lab": [i % 3 for i in range(30)]}),
    })
    d.save_to_disk(str(tmp_path / "ds"))
    cfg = SimpleNamespace(source="hf", path=str(tmp_path / "ds"), input_column="sentence", label_column="lab", read_options={},
                          classes=[cls("a", [0]), cls("b", [1]), cls("c", [2])], templates=["{}"],
                          split=split_cfg(source_splits={"train": "train", "test": "test"}))
    task = build_task("hfx", cfg)
    assert len(task.train) == 30 and len(task.validation) == 6 and len(task.test) == 24
    assert task.label_keys == ["hfx/a", "hfx/b", "hfx/c"]


def test_missing_column_is_a_config_error(tmp_path):
    (tmp_path / "d.csv").write_text("text,label\nhello,0\n")
    cfg = SimpleNamespace(source="csv", path=str(tmp_path / "d.csv"), input_column="sentence", label_column="label",
                          read_options={}, classes=[cls("a", [0]), cls("b", [1])], templates=["{}"], split=split_cfg())
    with pytest.raises(ConfigError, match="column 'sentence' not in"):
        build_task("x", cfg)


def _task(name, keys):
    return TaskData(name=name, class_names=[k.split("/")[-1] for k in keys], templates=["{}"], train=[], validation=[], test=[], label_keys=keys)


def test_joint_label_space_shares_equal_keys_only():
    mnist = _task("mnist", [f"digit/{i}" for i in range(3)])
    svhn = _task("svhn", [f"digit/{i}" for i in range(3)])
    eurosat = TaskData(name="eurosat", class_names=["forest", "river"], templates=["{}"], train=[], validation=[], test=[])
    resisc = TaskData(name="resisc", class_names=["forest"], templates=["{}"], train=[], validation=[], test=[])
    space = JointLabelSpace.from_tasks([mnist, eurosat, svhn, resisc])
    assert len(space) == 6
    assert space.task_to_joint["mnist"] == space.task_to_joint["svhn"] == [0, 1, 2]
    assert space.task_to_joint["eurosat"] == [3, 4] and space.task_to_joint["resisc"] == [5]
    assert space.members[0] == [("mnist", 0), ("svhn", 0)]


def source_builder(name: str, n: int = 100) -> TaskSource:
    """A whole-task builder (``source: task``) with train and test splits of its own."""
    pools = {split: LabelledPool([f"{split}{i}" for i in range(n)], [i % 2 for i in range(n)]) for split in ("train", "test")}
    return TaskSource(name=name, class_names=["even", "odd"], templates=["{}"], splits=pools)


def test_split_settings_apply_to_builder_tasks():
    cfg = SimpleNamespace(source="task", loader={"_target_": "tests.pipeline.test_data.source_builder", "n": 100},
                          split=split_cfg(source_splits={"train": "train", "test": "test"}, max_train=40, balance=True))
    task = build_task("b", cfg)
    assert len(task.train) == 40 and Counter(y for _, y in task.train) == {0: 20, 1: 20}
    assert len(task.validation) == 20 and len(task.test) == 80
    assert all(x.startswith("test") for x, _ in task.validation) and not {x for x, _ in task.validation} & {x for x, _ in task.test}
    again = build_task("b", cfg)
    assert list(task.validation) == list(again.validation)


def misnamed_builder(name: str) -> TaskSource:
    return source_builder("b")


def test_builder_errors_are_one_line():
    cfg = SimpleNamespace(source="task", loader={"_target_": "tests.pipeline.test_data.misnamed_builder"}, split=split_cfg())
    with pytest.raises(ConfigError, match="built a task named 'b'"):
        build_task("other", cfg)
    with pytest.raises(ConfigError, match="the loader 'nowhere.nothing' failed"):
        build_task("b", SimpleNamespace(**{**vars(cfg), "loader": {"_target_": "nowhere.nothing"}}))


def test_pool_views_keep_labels_without_reading_inputs():
    class Unreadable(list):
        def __getitem__(self, i):
            raise AssertionError("an input was read")

    pool = LabelledPool(Unreadable(range(10)), [i % 3 for i in range(10)])
    parts = stratified_parts(pool.labels, [0.5, 0.5], seed=0)
    views = [pool.subset(p) for p in parts]
    assert sorted(views[0].labels + views[1].labels) == sorted(pool.labels)
