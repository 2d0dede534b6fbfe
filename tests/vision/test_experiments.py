"""The paper's vision experiments compose, validate and build their tasks (no network: HF loading is faked)."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from knots.config.schema import to_run_config
from knots.data.build import build_task
from hydra.utils import get_object
from knots.errors import ConfigError

from knots.config.resources import config_dir

CONF_DIR = config_dir()
VISION_EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("vit*.yaml"))


def compose(tmp_path: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from knots.config import register_configs

    register_configs()
    base = [f"paths.log_dir={tmp_path}/logs", f"paths.output_dir={tmp_path}/out"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("run", overrides=base + list(overrides))


def fake_hf_dataset(num_classes: int, names: list[str] | None = None, sizes: tuple[int, ...] = (40, 50)):
    """A ``DatasetDict``-like mapping of small in-memory splits with a ``ClassLabel`` column."""
    import datasets
    from PIL import Image

    names = names or [f"class_{i}" for i in range(num_classes)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    image = Image.new("RGB", (4, 4))
    return {split: datasets.Dataset.from_dict({"image": [image] * n, "label": [i % num_classes for i in range(n)]},
                                              features=features)
            for split, n in zip(("train", "test"), sizes)}


def test_the_paper_experiments_are_all_found():
    assert {"vitb32_per_task", "vitb32_joint", "vitb32_paper_adapters",
            "vitl14_per_task", "vitl14_joint", "vitl14_paper_adapters"} <= set(VISION_EXPERIMENTS)


def _check_common(cfg, experiment):
    assert cfg.benchmark.task_names == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    assert cfg.model.backbone["_target_"] == "knots.vision.clip.ClipBackbone"
    assert cfg.search.metric == ("joint_hits@3" if experiment.endswith("_joint") else "avg_normalized_accuracy")
    for name in cfg.benchmark.task_names:
        task = cfg.benchmark.tasks[name]
        assert task.source == "task" and task.classes == []
        assert callable(get_object(task.loader["_target_"]))
    ft = cfg.finetune
    assert (ft.batch_size, ft.warmup_steps, ft.lr) == (32, 500, 3e-4)
    assert ft.weight_decay == (1e-4 if experiment.startswith("vitl14") else 0.1)
    assert ft.num_workers >= 1
    if experiment.endswith("paper_adapters"):
        assert cfg.adapters.loader["_target_"] == "knots.vision.released.released_adapters"
        loader = get_object(cfg.adapters.loader["_target_"])
        # the pipeline instantiates the loader with tasks=... and cache_dir=...
        options = {k: v for k, v in cfg.adapters.loader.items() if k != "_target_"}
        inspect.signature(loader).bind(tasks=cfg.benchmark.task_names, cache_dir="x", **options)
    else:
        assert not cfg.adapters.given


@pytest.mark.parametrize("experiment", VISION_EXPERIMENTS)
def test_every_vision_experiment_uses_the_reference_protocol(tmp_path, experiment):
    """The paper's experiments compose and validate with every authors' choice (conf/protocol/reference.yaml)."""
    from knots.vision.paper import REFERENCE_SPLITS, VITL14_EPOCHS

    for overrides in ((), ("protocol=reference",)):
        cfg = to_run_config(compose(tmp_path, f"experiment={experiment}", *overrides))
        _check_common(cfg, experiment)
        assert cfg.normalizers == "paper" and cfg.method_params["ensemble"] == {"rule": "max_logit"}
        for name in cfg.benchmark.task_names:
            task = cfg.benchmark.tasks[name]
            assert task.loader["reference_split"] is True
            assert task.split.source_splits == {"train": "train", "validation": "validation", "test": "test"}
            if REFERENCE_SPLITS[name].mirror:  # the official validation sets come from mirrors that carry them
                assert task.loader["hf_path"] == REFERENCE_SPLITS[name].mirror
        ft = cfg.finetune
        assert (ft.seed, ft.grad_clip, ft.precision, ft.train_logit_scale) == (420, 0.0, "fp32_scaled", 1e4)
        if experiment.startswith("vitb32"):
            assert (ft.epochs, ft.schedule_steps, ft.eval_every, ft.patience, ft.min_improvement) == (1000, 50_000, 2000, 5, 0.1)
            assert ft.epochs_per_task == {}
        else:
            assert ft.epochs is None and ft.epochs_per_task == VITL14_EPOCHS
            assert (ft.schedule_steps, ft.eval_every, ft.patience, ft.min_improvement) == (None, None, None, 0.0)


@pytest.mark.parametrize("experiment", VISION_EXPERIMENTS)
def test_every_vision_experiment_switches_back_to_the_default_protocol(tmp_path, experiment):
    cfg = to_run_config(compose(tmp_path, f"experiment={experiment}", "protocol=default"))
    _check_common(cfg, experiment)
    assert cfg.normalizers == "measured" and "ensemble" not in cfg.method_params
    defaults = OmegaConf.load(CONF_DIR / "task" / "hf_image.yaml")
    for name in cfg.benchmark.task_names:
        task = cfg.benchmark.tasks[name]
        assert "reference_split" not in task.loader and task.loader["hf_path"].split("/")[0] in ("tanganke", "ylecun", "ufldl-stanford")
        assert task.split.source_splits == dict(defaults.split.source_splits)
    ft = cfg.finetune
    assert (ft.steps, ft.seed, ft.grad_clip, ft.precision, ft.eval_every, ft.patience) == (4000, 0, 1.0, "auto", 250, 4)
    assert (ft.epochs, ft.epochs_per_task, ft.schedule_steps, ft.min_improvement, ft.train_logit_scale) == (None, {}, None, 0.0, 100.0)


@pytest.mark.parametrize(("experiment", "message"), [
    ("vision_smoke", r"model.backbone.arch is None\); use normalizers=measured"),
    ("text6_joint", r"model.backbone.arch is None\); use normalizers=measured"),
])
def test_the_reference_protocol_outside_the_papers_models_is_a_one_line_error(tmp_path, experiment, message):
    with pytest.raises(ConfigError, match=message) as err:
        to_run_config(compose(tmp_path, f"experiment={experiment}", "protocol=reference"))
    assert "\n" not in str(err.value)
    cfg = to_run_config(compose(tmp_path, f"experiment={experiment}", "protocol=reference", "normalizers=measured"))
    assert cfg.finetune.seed == 420 and cfg.method_params["ensemble"]["rule"] == "max_logit"


def test_paper_normalizers_need_a_value_for_every_task(tmp_path):
    with pytest.raises(ConfigError, match=r"no paper normalizer for task\(s\) digits \(ViT-B-32;") as err:
        to_run_config(compose(tmp_path, "experiment=vitb32_per_task", "benchmark=vision_smoke", "benchmark.select=[digits,mnist]"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(("task", "classes"), [("cars", 196), ("sun397", 397), ("dtd", 47)])
def test_task_source_builds_from_the_datasets_label_feature(tmp_path, monkeypatch, task, classes):
    import datasets

    cfg = to_run_config(compose(tmp_path, "experiment=vitb32_per_task", "protocol=default"))
    names = [f"/{chr(97 + i % 26)}/scene_{i}" if task == "sun397" else f"model {i}" for i in range(classes)]
    calls = []

    def load_dataset(path, name=None, **kwargs):
        calls.append(path)
        return fake_hf_dataset(classes, names, sizes=(2 * classes, 5 * classes))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    built = build_task(task, cfg.benchmark.tasks[task])
    assert calls == [cfg.benchmark.tasks[task].loader["hf_path"]]
    assert built.name == task and built.num_classes == classes
    assert built.class_names[1] == ("scene 1" if task == "sun397" else "model 1")  # from the label feature
    assert len(built.validation) == classes and len(built.test) == 4 * classes  # 20% of test carved
    assert built.info["split"] == "dataset" and built.info["source_sizes"] == {"train": 2 * classes, "test": 5 * classes}


def test_task_source_rejects_a_wrong_class_count(tmp_path, monkeypatch):
    import datasets

    cfg = to_run_config(compose(tmp_path, "experiment=vitb32_per_task"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: fake_hf_dataset(195))
    with pytest.raises(ConfigError, match="has 195 classes, expected 196"):
        build_task("cars", cfg.benchmark.tasks["cars"])


def _not_a_task(name: str) -> list:
    return []


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("benchmark.tasks.cars.loader._target_=knots.vision.datasets.nope", "task cars: loader: cannot import"),
        ("benchmark.tasks.cars.loader._target_=nomodule", "task cars: loader: cannot import 'nomodule'"),
        ("+benchmark.tasks.cars.classes=[{name: a}, {name: b}]", "takes its classes from the builder"),
    ],
)
def test_bad_task_source_fails_validation_on_one_line(tmp_path, override, message):
    with pytest.raises(ConfigError) as err:
        to_run_config(compose(tmp_path, "experiment=vitb32_per_task", override))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_builder_must_return_task_data(tmp_path):
    cfg = to_run_config(compose(tmp_path, "experiment=vitb32_per_task"))
    task_cfg = cfg.benchmark.tasks["cars"]
    task_cfg.loader = {"_target_": f"{__name__}._not_a_task"}
    with pytest.raises(ConfigError, match="returned list, expected TaskSource"):
        build_task("cars", task_cfg)


def test_vision_benchmark_yaml_has_no_class_lists():
    """Class names of the task-source benchmark come from the datasets, never from the config."""
    tasks = OmegaConf.load(CONF_DIR / "benchmark" / "vision8.yaml").tasks
    assert all("classes" not in t for t in tasks.values())


@pytest.mark.parametrize("experiment", [e for e in VISION_EXPERIMENTS if e.endswith("paper_adapters")])
def test_released_adapter_experiment_merges_what_its_loader_returns(tmp_path, monkeypatch, experiment):
    """The experiment's loader (faked: tiny adapters for the tiny CLIP) replaces finetuning."""
    import json

    import knots.vision.released
    from knots.models import build_backbone
    from knots.pipeline.finetune import peft_encoder
    from knots.pipeline.run import run_experiment

    cfg = to_run_config(compose(
        tmp_path, f"experiment={experiment}", "model=clip_tiny", "benchmark=vision_smoke",
        "benchmark.select=[digits,mnist]", "device=cpu", "logger=none", "progress=false",
        "methods=[ta,knots_ties]", "search.ranges.scaling=[0.5,1.0]", "search.ranges.top_k=[50]",
        "normalizers=measured"))  # the paper has no normalizers for the smoke tasks
    calls = []

    def fake_released(tasks, cache_dir, arch, repo_template="", revisions=None):
        calls.append((list(tasks), arch))
        backbone = build_backbone(cfg.model)
        out = {}
        for i, task in enumerate(tasks):
            model = peft_encoder(backbone, cfg.model.lora, seed=i)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_B" in name:
                        p.normal_(std=0.05)
            out[task] = Path(cache_dir) / "released" / task
            model.save_pretrained(str(out[task]))
        return out

    monkeypatch.setattr(knots.vision.released, "released_adapters", fake_released)
    results = run_experiment(cfg, tmp_path / "run")
    assert calls == [(["digits", "mnist"], cfg.adapters.loader["arch"])]
    adapters = results["meta"]["adapters"]
    assert [a["task"] for a in adapters] == ["digits", "mnist"] and all(a["reused"] for a in adapters)
    assert all(Path(a["path"]).parent.name == "released" for a in adapters)
    assert not (Path(cfg.paths.cache_dir) / "adapters").exists(), "finetuned although adapters were given"
    assert set(results["methods"]) == {"ta", "knots_ties"}
    assert json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["model"] == "clip-tiny"
