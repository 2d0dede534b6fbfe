"""The Llama path end to end on the tiny Llama: the smoke experiment, masking, heads saved and loaded
through PEFT, merged models scored with each task's own head, released adapters, and bad input."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from knots.config.resources import config_dir
from knots.config.schema import to_run_config
from knots.errors import AdapterError, ConfigError

CONF_DIR = config_dir()


def compose(tmp_path: Path, *overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from knots.config import register_configs

    register_configs()
    base = [f"paths.log_dir={tmp_path}/logs", f"paths.output_dir={tmp_path}/out", "progress=false", "threads=1"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("run", overrides=base + list(overrides))


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """``experiment=llama_smoke`` as configured: (config, results, run directory)."""
    from knots.pipeline.run import run_experiment

    root = tmp_path_factory.mktemp("llama_smoke")
    cfg = to_run_config(compose(root, "experiment=llama_smoke"))
    results = run_experiment(cfg, root / "run")
    return cfg, results, root / "run"


def smoke_pool(cfg):
    """The smoke run's model pool, tasks and adapters (from its cache, nothing retrained)."""
    from knots.modelpool import ModelPool
    from knots.pipeline.stages import finetune_stage
    from knots.taskpool import TaskPool

    tasks = TaskPool.load(cfg.benchmark)
    models = ModelPool.build(cfg.model, "cpu")
    adapters = finetune_stage(models, tasks, None, cfg)
    assert all(a.info["reused"] for a in adapters)
    return models, tasks, adapters


def tiny_checkpoint(cfg) -> Path:
    (path,) = Path(cfg.paths.cache_dir, "models").glob("tiny-llama-*")
    return path


# -- the smoke experiment ---------------------------------------------------------------------------
def test_llama_smoke_end_to_end(smoke):
    from knots.methods import method_names

    cfg, results, out = smoke
    tasks = ["entail3", "pairs3", "binary2"]
    assert json.loads((out / "results.json").read_text())["methods"].keys() == results["methods"].keys()
    assert set(results["methods"]) == set(method_names()) - {"ensemble"}  # every method that applies
    assert results["meta"]["heads"] == "trained" and results["meta"]["joint_labels"] is None
    for entry in results["methods"].values():
        assert set(entry["per_task"]) == set(tasks) and entry["joint"] is None
    sizes = results["meta"]["examples"]
    assert sizes["binary2"] == {"train": 96, "validation": 32, "test": 32}  # the validation split cut in half
    assert sizes["entail3"]["train"] == 96 - 14  # no-gold rows dropped
    # the finetuned models learned their tasks (three classes, chance 33%; binary2 two classes)
    assert results["finetuned"]["binary2"]["test_accuracy"] > 75
    assert "| method |" in (out / "results.md").read_text()
    # the cached tiny model has GQA
    config = json.loads((tiny_checkpoint(cfg) / "config.json").read_text())
    assert config["num_key_value_heads"] < config["num_attention_heads"]


# -- masking ----------------------------------------------------------------------------------------
def test_the_missing_class_is_minus_inf_in_training_and_evaluation(smoke):
    from knots.pipeline.finetune import head_of, training_model

    cfg, _, _ = smoke
    models, tasks, adapters = smoke_pool(cfg)
    binary = tasks.tasks[2]
    assert binary.name == "binary2" and binary.class_mask == [True, False, True]
    batch = models.backbone.collate([x for x, _ in binary.train[:8]])
    # training: the head being trained scores the masked class -inf, and the loss stays finite
    spec = models.training_head(binary, None, cfg.finetune.seed)
    with training_model(models.backbone, cfg.model.lora, 0, spec) as model:
        logits = head_of(model, spec)(model(batch))
        assert torch.isneginf(logits[:, 1]).all() and torch.isfinite(logits[:, [0, 2]]).all()
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([y for _, y in binary.train[:8]]))
        assert torch.isfinite(loss)
    # evaluation: the trained head read back from the adapter masks it too, so it is never predicted
    heads = models.heads(tasks.tasks, adapters, None)
    feats = models.backbone.encoder(batch)
    assert torch.isneginf(heads.per_task["binary2"].logits(feats)[:, 1]).all()
    assert heads.per_task["entail3"].mask is None and torch.isfinite(heads.per_task["entail3"].logits(feats)).all()


# -- heads through PEFT -----------------------------------------------------------------------------
def test_head_and_lora_load_back_through_peft_from_pretrained(smoke):
    """An adapter saved by finetuning is a PEFT adapter of LlamaForSequenceClassification: PEFT's own
    loading reproduces our head, our LoRA and our logits."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from knots.lora import load_adapter
    from knots.modelpool import read_trained_head
    from knots.models.apply import applied, lora_updates

    cfg, _, _ = smoke
    models, tasks, adapters = smoke_pool(cfg)
    task, adapter = tasks.tasks[0], adapters[0]
    base = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint(cfg), num_labels=3, local_files_only=True)
    base.config.pad_token_id = models.backbone.tokenizer.pad_token_id
    peft_model = PeftModel.from_pretrained(base, adapter.path).eval()
    head = read_trained_head(adapter.path, "score", task)
    assert torch.equal(peft_model.base_model.model.score.modules_to_save["default"].weight.detach(), head.weight)
    ours = load_adapter(adapter.path)
    lora = dict(peft_model.named_parameters())
    for module, factors in ours.modules.items():
        assert torch.equal(lora[f"base_model.model.{module}.lora_A.default.weight"].detach(), factors.A)
        assert torch.equal(lora[f"base_model.model.{module}.lora_B.default.weight"].detach(), factors.B)
    pairs = [x for x, _ in task.test[:6]]
    batch = models.backbone.collate(pairs)
    assert (batch["attention_mask"] == 0).any()  # padded rows pool their last real token in both
    with torch.no_grad():
        theirs = peft_model(**batch).logits
        with applied(models.backbone.encoder, lora_updates(adapter.adapter)):
            mine = head.logits(models.backbone.encoder(batch))
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)


# -- merged models use each task's own head ---------------------------------------------------------
def test_a_merged_model_is_scored_with_each_tasks_own_head(smoke):
    from knots.metrics import accuracy
    from knots.methods.base import MergedModel
    from knots.pipeline.evaluate import Evaluator, evaluate_finetuned, features

    cfg, results, _ = smoke
    models, tasks, adapters = smoke_pool(cfg)
    heads = models.heads(tasks.tasks, adapters, None)
    data = tasks.eval_sets(models.backbone, 64)
    finetuned = evaluate_finetuned(models.backbone, heads, data, adapters, [None] * 3)
    evaluator = Evaluator(models.backbone, heads, data, finetuned)
    merged = MergedModel({k: 0.5 * v for k, v in adapters[0].adapter.delta_state_dict().items()})
    scores = evaluator.scores("test", merged)
    feats = features(models.backbone, data["test"], heads, merged.delta)
    for name, sl in data["test"].slices.items():
        own = accuracy(heads.per_task[name].logits(feats[sl]), data["test"].labels[sl])
        assert scores["per_task"][name] == own
    # the heads differ: scoring a task with another task's head gives other predictions
    sl = data["test"].slices["pairs3"]
    assert not torch.equal(heads.per_task["pairs3"].logits(feats[sl]).argmax(1), heads.per_task["entail3"].logits(feats[sl]).argmax(1))
    # the finetuned model of a task, merged alone at full scale, is that finetuned model
    alone = evaluator.scores("test", MergedModel(adapters[1].adapter.delta_state_dict()))
    assert alone["per_task"]["pairs3"] == pytest.approx(results["finetuned"]["pairs3"]["test_accuracy"])


# -- finetuning in place ----------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "full"])
def test_finetuning_wraps_the_encoder_in_place_and_leaves_it_as_it_was(smoke, tmp_path, mode):
    from types import SimpleNamespace

    from knots.pipeline.finetune import finetune

    cfg, _, _ = smoke
    models, tasks, _ = smoke_pool(cfg)
    encoder = models.backbone.encoder
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    types = [type(m) for m in encoder.modules()]
    grads = [p.requires_grad for p in encoder.parameters()]
    settings = SimpleNamespace(**{**vars(cfg.finetune), "steps": 2, "eval_every": 1, "checkpoint_every": 1, "mode": mode})
    info = finetune(models.backbone, tasks.tasks[2], models.training_head(tasks.tasks[2], None, 0), cfg.model.lora,
                    settings, tmp_path / "adapter", progress=False)
    saved = "adapter_model.safetensors" if mode == "lora" else "full_update.safetensors"
    assert info["steps_run"] == 2 and (tmp_path / "adapter" / saved).is_file()
    assert [p.requires_grad for p in encoder.parameters()] == grads
    after = encoder.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert [type(m) for m in encoder.modules()] == types and not hasattr(encoder, "score")


def test_finetuning_can_start_from_a_saved_adapter(smoke, tmp_path):
    """finetune.init_adapter: every task starts from one saved LoRA and head (the authors' shared start)."""
    from safetensors.torch import load_file, save_file

    from knots.pipeline.finetune import training_model

    cfg, _, _ = smoke
    models, tasks, adapters = smoke_pool(cfg)
    spec = models.training_head(tasks.tasks[0], None, 0)
    src = Path(adapters[1].path)
    saved = load_file(str(src / "adapter_model.safetensors"))
    with training_model(models.backbone, cfg.model.lora, 0, spec, init=str(src)) as model:
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        assert torch.equal(params["base_model.model.score.modules_to_save.default.weight"], saved["base_model.model.score.weight"])
        lora = [k for k in saved if ".lora_" in k]
        assert len(lora) == len(params) - 1 and all(torch.equal(params[k.replace(".weight", ".default.weight")], saved[k]) for k in lora)
    bad = tmp_path / "bad"
    bad.mkdir()
    shutil.copy(src / "adapter_config.json", bad)
    save_file({**saved, "base_model.model.score.weight": torch.zeros(2, 32)}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="the initial adapter does not fit the model"):
        with training_model(models.backbone, cfg.model.lora, 0, spec, init=str(bad)):
            pass
    save_file({k: v for k, v in saved.items() if "q_proj" not in k}, str(bad / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match="no weight for .*q_proj"):
        with training_model(models.backbone, cfg.model.lora, 0, spec, init=str(bad)):
            pass
    with pytest.raises(ConfigError, match="finetune.init_adapter: cannot get local/no-such-init from the Hugging Face hub"):
        with training_model(models.backbone, cfg.model.lora, 0, spec, init="local/no-such-init"):
            pass
    assert not hasattr(models.backbone.encoder, "score")  # unloaded after each failure too


def test_linear_schedule_is_transformers_get_linear_schedule_with_warmup():
    from transformers import get_linear_schedule_with_warmup

    from knots.pipeline.training import lr_lambda, warmup_length
    from types import SimpleNamespace

    steps = 50
    warmup = warmup_length(SimpleNamespace(steps=steps, warmup_steps=0, warmup_fraction=0.06))
    assert warmup == pytest.approx(3.0)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_linear_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps).lr_lambdas[0]
    ours = lr_lambda(warmup, steps, "linear")
    assert [ours(s) for s in range(steps + 2)] == [reference(s) for s in range(steps + 2)]


# -- released adapters ------------------------------------------------------------------------------
def fake_hub_repo(hub: Path, repo: str, files: dict[str, Path | bytes]) -> Path:
    """A Hugging Face cache entry for ``repo`` (as ``snapshot_download`` leaves it), readable offline."""
    commit = "0" * 40
    root = hub / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)
    for name, content in files.items():
        if isinstance(content, Path):
            shutil.copy(content, snapshot / name)
        else:
            (snapshot / name).write_bytes(content)
    return snapshot


def released_like(adapter_dir: Path) -> dict[str, Path]:
    return {n: adapter_dir / n for n in ("adapter_config.json", "adapter_model.safetensors")}


def test_released_adapters_load_from_the_cache_and_merge_instead_of_finetuning(smoke, tmp_path):
    from knots.pipeline.run import run_experiment

    cfg, results, _ = smoke
    cache = tmp_path / "cache"
    for task in ("entail3", "pairs3", "binary2"):
        (path,) = (p.parent for p in Path(cfg.paths.cache_dir, "adapters").glob(f"{task}-*/adapter_config.json"))
        fake_hub_repo(cache / "hub", f"local/KnOTS-tiny_lora_R16_{task}", released_like(path))
    shutil.copytree(Path(cfg.paths.cache_dir, "datasets"), cache / "datasets")
    shutil.copytree(Path(cfg.paths.cache_dir, "models"), cache / "models")
    given = to_run_config(compose(tmp_path, "experiment=llama_smoke", f"paths.cache_dir={cache}", "methods=[ta,knots_ties]"))
    given.adapters.loader = {"_target_": "knots.models.released_llama.released_llama_adapters", "num_labels": 3,
                             "repo_template": "local/KnOTS-tiny_lora_R16_{task}"}
    out = run_experiment(given, tmp_path / "run")
    assert not (cache / "adapters").exists(), "finetuned although adapters were given"
    assert all(Path(a["path"]).parts[-2] == "snapshots" for a in out["meta"]["adapters"])
    assert out["finetuned"] == results["finetuned"]
    assert out["methods"]["ta"]["per_task"] == results["methods"]["ta"]["per_task"]


def test_released_adapter_checks_keys_and_head_shapes(smoke, tmp_path):
    from safetensors.torch import load_file, save_file

    from knots.models.released_llama import released_llama_adapters

    cfg, _, _ = smoke
    (path,) = (p.parent for p in Path(cfg.paths.cache_dir, "adapters").glob("binary2-*/adapter_config.json"))
    weights = load_file(str(path / "adapter_model.safetensors"))
    config = (path / "adapter_config.json").read_bytes()
    cases = {
        "two_rows": ({**weights, "base_model.model.score.weight": weights["base_model.model.score.weight"][:2]},
                     "head 'score' has shape (2, 32), but the model has 3 labels"),
        "no_head": ({k: v for k, v in weights.items() if ".score." not in k},
                    "no trained head 'score' (base_model.model.score.weight) in the adapter"),
        "extra": ({**weights, "base_model.model.model.embed_tokens.weight": torch.zeros(2, 2)},
                  "unexpected weight 'base_model.model.model.embed_tokens.weight'"),
        "mlp": ({**weights, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(2, 2)},
                "is not on a q_proj/k_proj/v_proj/o_proj projection of a Llama layer"),
    }
    for name, (state, message) in cases.items():
        blob = tmp_path / f"{name}.safetensors"
        save_file(state, str(blob))
        fake_hub_repo(tmp_path / "hub", f"local/bad-{name}", {"adapter_config.json": config, "adapter_model.safetensors": blob})
        with pytest.raises(AdapterError, match="local/bad-" + name) as e:
            released_llama_adapters([name], tmp_path, repo_template="local/bad-{task}")
        assert message in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(AdapterError, match=r"cannot get released adapter local/missing-x from the Hugging Face hub or its cache"):
        released_llama_adapters(["x"], tmp_path, repo_template="local/missing-{task}")


def test_a_given_head_must_match_the_task_and_the_model(smoke, tmp_path):
    from safetensors.torch import load_file, save_file

    cfg, _, _ = smoke
    models, tasks, adapters = smoke_pool(cfg)
    src = Path(adapters[0].path)
    weights = load_file(str(src / "adapter_model.safetensors"))
    for name, head, message in (("rows", weights["base_model.model.score.weight"][:2], "has shape (2, 32), but task entail3 has 3 classes"),
                                ("cols", torch.zeros(3, 16), "takes 16 features, but model llama-tiny gives 32")):
        bad = tmp_path / name
        bad.mkdir()
        shutil.copy(src / "adapter_config.json", bad)
        save_file({**weights, "base_model.model.score.weight": head}, str(bad / "adapter_model.safetensors"))
        with pytest.raises(AdapterError, match=re.escape(message)):
            models.load(tasks.tasks[0], bad)


# -- the Llama3-8B experiments ----------------------------------------------------------------------
LLAMA3 = ["llama3_8b_nli", "llama3_8b_paper_adapters"]


@pytest.mark.parametrize("experiment", LLAMA3)
def test_llama3_experiments_compose_and_validate(tmp_path, experiment):
    cfg = to_run_config(compose(tmp_path, f"experiment={experiment}"))
    assert cfg.benchmark.task_names == ["snli", "mnli", "sick", "qnli", "rte", "scitail"]
    backbone = cfg.model.backbone
    assert (backbone["hub_id"], backbone["dtype"], backbone["pooling"], backbone["gradient_checkpointing"]) == (
        "meta-llama/Meta-Llama-3-8B", "bfloat16", "last", True)
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.target_modules) == (16, 16, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert (cfg.model.head.kind, cfg.model.head.module, cfg.model.head.num_labels, cfg.model.head.bias) == ("trained", "score", 3, False)
    ft = cfg.finetune
    assert (ft.lr, ft.schedule, ft.warmup_fraction, ft.precision) == (3e-5, "linear", 0.06, "auto")
    assert cfg.methods == ["ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties"]
    assert cfg.search.strategy == "linear" and cfg.search.metric == "avg_normalized_accuracy"
    assert cfg.device == "cuda" and cfg.adapters.given == (experiment == "llama3_8b_paper_adapters")


def test_llama3_experiment_offline_fails_on_one_line_naming_the_hub_ids(tmp_path, monkeypatch):
    """No network here: the data, the model and the released adapters each fail on one line naming the
    hub id needed, before any training."""
    from knots.modelpool import ModelPool, given_adapters
    from knots.pipeline.run import run_experiment

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    cfg = to_run_config(compose(tmp_path, "experiment=llama3_8b_paper_adapters", "device=cpu", "logger=none",
                                f"model.backbone.cache_dir={tmp_path}/hub"))
    with pytest.raises(ConfigError, match="task snli: cannot load dataset 'stanfordnlp/snli'") as e:
        run_experiment(cfg, tmp_path / "run")
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"model llama3-8b: cannot get meta-llama/Meta-Llama-3-8B from the Hugging Face "
                                          r"hub or its cache .*huggingface-cli download meta-llama/Meta-Llama-3-8B") as e:
        ModelPool.build(cfg.model, "cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(AdapterError, match="cannot get released adapter hoffman-lab/KnOTS-Llama3_8B_lora_R16_snli") as e:
        given_adapters(cfg.adapters, cfg.benchmark.task_names, str(tmp_path / "cache"))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="device 'cuda' is not available"):
        ModelPool.build(cfg.model, "cuda")  # checked before any weights are read


def test_llama3_cli_offline_is_one_line_and_status_2(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "KNOTS_LOG_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, "-m", "knots.cli.run", "experiment=llama3_8b_nli", "device=cpu", "logger=none"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "stanfordnlp/snli" in lines[0], proc.stderr


def test_text_backbone_reads_a_hub_checkpoint_from_the_cache(tmp_path):
    from knots.models.text import TextBackbone
    from knots.models.tiny import write_tiny_llama

    write_tiny_llama(tmp_path / "ckpt")
    fake_hub_repo(tmp_path / "hub", "local/tiny-llama", {p.name: p for p in (tmp_path / "ckpt").iterdir()})
    backbone = TextBackbone(hub_id="local/tiny-llama", cache_dir=str(tmp_path / "hub"), name="t", pooling="last",
                            dtype="bfloat16", gradient_checkpointing=True)
    assert {p.dtype for p in backbone.encoder.parameters()} == {torch.bfloat16}
    model = backbone.encoder.model
    assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
    assert backbone.tokenizer.pad_token == backbone.tokenizer.eos_token  # set: the checkpoint has none
    feats = backbone.encoder(backbone.collate([("the cat runs .", "a cat runs ."), ("a dog .", "a cow eats now .")]))
    assert feats.dtype == torch.float32 and feats.shape == (2, 32)
    with pytest.raises(ConfigError, match="model t: cannot get local/other from the Hugging Face hub or its cache"):
        TextBackbone(hub_id="local/other", cache_dir=str(tmp_path / "hub"), name="t")
    with pytest.raises(ConfigError, match="unknown dtype 'bf16'"):
        TextBackbone(path=str(tmp_path / "ckpt"), name="t", dtype="bf16")


# -- sentence pairs and masks by config; bad input --------------------------------------------------
PAIR_TASKS = """
name: pairs
tasks:
  three:
    source: csv
    path: {three}
    input_columns: [premise, hypothesis]
    classes:
      - {{name: entailment, key: nli/entailment, values: [0]}}
      - {{name: neutral, key: nli/neutral, values: [1]}}
      - {{name: contradiction, key: nli/contradiction, values: [2]}}
    split: {{seed: 0}}
  two:
    source: csv
    path: {two}
    input_columns: [premise, hypothesis]
    classes:
      - {{name: entailment, key: nli/entailment, values: [0]}}
      - {{name: neutral, key: nli/neutral, masked: true}}
      - {{name: contradiction, key: nli/contradiction, values: [1]}}
    split: {{seed: 0}}
"""


@pytest.fixture
def pair_conf(tmp_path):
    import pandas as pd

    from knots.data.synthetic_nli import rows

    def write(name, relations, code):
        triples = rows(60, relations, seed=len(name))
        pd.DataFrame({"premise": [p for p, _, _ in triples], "hypothesis": [h for _, h, _ in triples],
                      "label": [code[r] for _, _, r in triples]}).to_csv(tmp_path / f"{name}.csv", index=False)
        return tmp_path / f"{name}.csv"

    three = write("three", ["entailment", "neutral", "contradiction"], {"entailment": 0, "neutral": 1, "contradiction": 2})
    two = write("two", ["entailment", "contradiction"], {"entailment": 0, "contradiction": 1})
    (tmp_path / "conf" / "benchmark").mkdir(parents=True)
    (tmp_path / "conf" / "benchmark" / "pairs.yaml").write_text(PAIR_TASKS.format(three=three, two=two))
    return tmp_path


def compose_pairs(pair_conf, *overrides):
    return compose(pair_conf, f"hydra.searchpath=[file://{pair_conf}/conf]", "model=llama_tiny", "benchmark=pairs",
                   "finetune=llama", "logger=none", "methods=[ta]", "search=none", "finetune.steps=2", *overrides)


def test_a_task_config_names_two_input_columns_and_masks_a_class(pair_conf):
    from knots.taskpool import TaskPool

    cfg = to_run_config(compose_pairs(pair_conf))
    three, two = TaskPool.load(cfg.benchmark).tasks
    assert all(isinstance(x, tuple) and len(x) == 2 for x, _ in three.train)
    assert three.class_mask is None and two.class_mask == [True, False, True]
    assert set(two.train.labels) == {0, 2} and three.label_keys == two.label_keys


E = "{name: entailment, key: nli/entailment, values: [0]}"
C = "{name: contradiction, key: nli/contradiction, values: [1]}"


def two_classes(*classes: str) -> str:
    return f"benchmark.tasks.two.classes=[{', '.join(classes)}]"


@pytest.mark.parametrize("override,message", [
    (two_classes(E, "{name: neutral, key: nli/neutral}", C),
     "task two: class 'neutral' has no values; a class the task does not have must be masked"),
    (two_classes(E, "{name: neutral, key: nli/neutral, masked: true, values: [1]}", C),
     "task two: class 'neutral' is masked but raw labels map to it"),
    ("benchmark.tasks.two.input_columns=[premise,hypothesis,label]", "input_columns names one column or two"),
    ("methods=[ensemble]", "method ensemble needs zero-shot heads"),
])
def test_bad_pair_task_configs_fail_validation_on_one_line(pair_conf, override, message):
    with pytest.raises(ConfigError) as e:
        to_run_config(compose_pairs(pair_conf, override))
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("override,message", [
    (two_classes(E, C), "task two has 2 classes, but model.head.num_labels is 3"),
    (two_classes(E, "{name: neutral, key: nli/neutral, values: [7]}", C), "task two: no row has class 'neutral' (values [7])"),
    (two_classes(E, "{name: neutral, key: other/neutral, masked: true}", C), "task two: label keys"),
])
def test_tasks_that_do_not_fit_the_shared_label_space_fail_before_training(pair_conf, override, message):
    from knots.pipeline.run import run_experiment

    cfg = to_run_config(compose_pairs(pair_conf, override))
    with pytest.raises(ConfigError) as e:
        run_experiment(cfg, pair_conf / "run")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not Path(cfg.paths.cache_dir, "adapters").exists()


def test_text6_heads_composes_with_trained_heads_and_no_ensemble(tmp_path):
    cfg = to_run_config(compose(tmp_path, "experiment=text6_heads"))
    assert cfg.model.head.kind == "trained" and cfg.model.name == "all-MiniLM-L6-v2"
    assert "ensemble" not in cfg.methods and {"ta", "ties", "dare_ties", "knots_ties", "knots_dare_ties"} <= set(cfg.methods)
    assert cfg.benchmark.name == "text6"
