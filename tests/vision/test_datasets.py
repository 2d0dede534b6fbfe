"""Image task construction: split rules, label checks, the 748-label joint space of the paper."""

from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from knots.config.resources import config_dir
from knots.data.splits import assign_roles
from knots.data.tasks import JointLabelSpace, TaskData
from knots.errors import ConfigError
from knots.metrics import hits
from knots.vision.datasets import LazyImage, class_names_from_feature, prompt_name, task_from_splits

CONF = config_dir() / "benchmark" / "vision8.yaml"
SPLIT = dict(seed=0, fractions={"train": 0.6, "validation": 0.2, "test": 0.2}, carve_from="test", carve_fraction=0.2,
             max_train=None, max_validation=None, max_test=None, balance=False)


def build(name, splits, source_splits=("train", "test"), **options):
    """A task from fake ``datasets`` splits, split like conf/task/hf_image.yaml does."""
    source = task_from_splits(name, splits, **options)
    split = SimpleNamespace(**{**SPLIT, "source_splits": {s: s for s in source_splits}, **options.pop("split", {})})
    sets = assign_roles(source.splits, split, name)
    return TaskData(name, source.class_names, source.templates, label_keys=source.label_keys, **sets)


def _fake(num_classes, sizes, names=None, splits=("train", "test")):
    """A DatasetDict-like mapping of in-memory `datasets` splits with a ClassLabel column."""
    import datasets
    from PIL import Image

    names = names or [f"class_{i}" for i in range(num_classes)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    out = {}
    for split, n in zip(splits, sizes):
        images = [Image.new("RGB", (4, 4), (i % 256, 0, 0)) for i in range(n)]
        out[split] = datasets.Dataset.from_dict({"image": images, "label": [i % num_classes for i in range(n)]},
                                                features=features)
    return out


def test_without_validation_split_20_percent_of_test_is_carved():
    task = build("dtd", _fake(5, (30, 50)), num_classes=5)
    assert len(task.train) == 30 and len(task.validation) == 10 and len(task.test) == 40
    val_rows = {x.index for x, _ in task.validation}
    test_rows = {x.index for x, _ in task.test}
    assert not val_rows & test_rows and len(val_rows | test_rows) == 50
    again = build("dtd", _fake(5, (30, 50)), num_classes=5)
    assert [x.index for x, _ in again.validation] == [x.index for x, _ in task.validation]


def test_the_datasets_own_validation_split_is_used_when_mapped():
    task = build("eurosat", _fake(4, (20, 8, 12), splits=("train", "validation", "test")), ("train", "validation", "test"),
                 num_classes=4)
    assert len(task.validation) == 8 and len(task.test) == 12
    x, y = task.validation[3]
    assert isinstance(x, LazyImage) and y == 3
    assert x.load().size == (4, 4)


def test_labels_follow_the_rows_they_came_from():
    data = _fake(3, (9, 30))
    source = task_from_splits("mnist", data, num_classes=3)
    split = SimpleNamespace(**{**SPLIT, "source_splits": {"train": "train", "test": "test"}, "max_test": 6})
    test = assign_roles(source.splits, split, "mnist")["test"]
    assert len(test) == 6
    for x, y in test:
        assert data["test"][x.index]["label"] == y


def test_class_names_are_derived_and_checked_against_the_label_feature():
    assert class_names_from_feature("r", ["baseball_diamond", "airport"], 2, None) == ["baseball diamond", "airport"]
    assert prompt_name("/b/bakery/shop") == "bakery shop"
    pairs = [["AnnualCrop", "annual crop land"], ["SeaLake", "lake or sea"]]
    assert class_names_from_feature("e", ["annual crop", "Sea Lake"], 2, pairs) == ["annual crop land", "lake or sea"]
    assert class_names_from_feature("e", ["annual crop land", "lake or sea"], 2, pairs) == ["annual crop land", "lake or sea"]
    with pytest.raises(ConfigError, match="label 0"):  # another label order must not pass silently
        class_names_from_feature("e", ["SeaLake", "AnnualCrop"], 2, pairs)
    with pytest.raises(ConfigError, match="expected 3"):
        class_names_from_feature("e", ["a", "b"], 3, None)
    with pytest.raises(ConfigError, match="ClassLabel"):
        import datasets

        plain = {s: datasets.Dataset.from_dict({"image": [None], "label": [0]}) for s in ("train", "test")}
        task_from_splits("x", plain)


def _paper_tasks():
    """The eight tasks of conf/benchmark/vision8.yaml on fake data with the configured class counts."""
    cfg = OmegaConf.load(CONF)
    tasks = []
    for name, spec in cfg.tasks.items():
        options = OmegaConf.to_container(spec.loader)
        options.pop("hf_path"), options.pop("hf_name", None)
        n = options["num_classes"]
        names = [p[0] for p in options["prompt_names"]] if "prompt_names" in options else [str(i) for i in range(n)]
        tasks.append(build(name, _fake(n, (n, 5 * n), names=names), **options))
    return tasks


def test_joint_label_space_has_the_papers_748_layout():
    tasks = _paper_tasks()
    assert [t.name for t in tasks] == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    space = JointLabelSpace.from_tasks(tasks)
    assert len(space) == 748
    ranges = {name: (min(ids), max(ids)) for name, ids in space.task_to_joint.items()}
    assert ranges == {"cars": (0, 195), "dtd": (196, 242), "eurosat": (243, 252), "gtsrb": (253, 295),
                      "mnist": (296, 305), "resisc45": (306, 350), "sun397": (351, 747), "svhn": (296, 305)}
    assert space.task_to_joint["svhn"] == space.task_to_joint["mnist"]
    shared = [m for m in space.members if len(m) > 1]
    assert len(shared) == 10 and all({t for t, _ in m} == {"mnist", "svhn"} for m in shared)
    assert {len(t.templates) for t in tasks} == {8, 3, 1, 18, 2}


def test_hits_at_k_against_hand_computed_ranks():
    # 3 examples over 5 labels; the true label's rank is 1, 3 and 5
    logits = torch.tensor([[9.0, 1, 2, 3, 4], [5.0, 4, 1, 3, 2], [5.0, 4, 3, 2, 1]])
    labels = torch.tensor([0, 3, 4])
    out = hits(logits, labels, ks=(1, 3, 5))
    assert out == pytest.approx({"hits@1": 100 / 3, "hits@3": 200 / 3, "hits@5": 100.0})
