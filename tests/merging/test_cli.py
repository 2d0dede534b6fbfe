"""``knots-merge`` end to end, and every bad input: exit != 0, one line, no traceback, no output."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from knots.lora import load_adapter
from knots.merging import MergeSession

from .helpers import write_peft_adapter


def knots_merge(*arguments: str) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    return subprocess.run([sys.executable, "-m", "knots.cli.merge", *arguments, "progress=false"], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    for seed in range(3):
        write_peft_adapter(root / f"task{seed}", seed=seed + 1, r=2 + seed, alpha=4)
    return root


def test_merge_writes_every_output(adapters, tmp_path):
    out = tmp_path / "merged"
    dirs = ",".join(str(adapters / f"task{i}") for i in range(3))
    done = knots_merge(f"adapters=[{dirs}]", "method=knots_ties", "method.scaling=0.6", "method.top_k=20", f"out={out}", "export_rank=3", "alignment.save=true")
    assert done.returncode == 0, done.stderr
    assert "knots_ties" in done.stdout and "kept components" in done.stdout
    summary = json.loads((out / "merge.json").read_text())
    assert summary["hyperparameters"]["top_k"] == 20 and summary["hyperparameters"]["scaling"] == 0.6
    assert [entry["name"] for entry in summary["inputs"]] == ["task0", "task1", "task2"]
    for module in summary["modules"].values():  # total rank 9, capped by the output width
        assert module["kept_components"] == min(9, module["shape"][0])
    assert {"load", "align_column", "merge", "write"} <= set(summary["timings_s"]) and "peft" in summary["versions"]
    expected = MergeSession([load_adapter(adapters / f"task{i}") for i in range(3)]).merge("knots_ties", scaling=0.6, top_k=20).delta_state_dict()
    written = load_file(str(out / "delta_weights.safetensors"))
    assert all(torch.allclose(written[key], expected[key], atol=1e-6) for key in expected)
    for name in ("adapter", "adapter_rank3", "alignment"):
        assert (out / name).is_dir()


def test_replaces_an_earlier_result_only_with_overwrite(adapters, tmp_path):
    out = tmp_path / "taken"
    dirs = f"adapters=[{adapters / 'task0'},{adapters / 'task1'}]"
    assert knots_merge(dirs, f"out={out}").returncode == 0
    refused = knots_merge(dirs, f"out={out}", "method=ta")
    assert refused.returncode == 2 and "pass overwrite=true" in refused.stderr and json.loads((out / "merge.json").read_text())["method"]["name"] == "knots_ties"
    replaced = knots_merge(dirs, f"out={out}", "overwrite=true", "method=ta", "save_delta=false")
    assert replaced.returncode == 0, replaced.stderr
    assert (out / "adapter").is_dir() and not (out / "delta_weights.safetensors").exists()


def break_adapter(directory, how):
    if how == "nan":
        from safetensors.torch import save_file

        weights = load_file(str(directory / "adapter_model.safetensors"))
        for value in weights.values():
            value[0, 0] = float("inf")
        save_file(weights, str(directory / "adapter_model.safetensors"))
    elif how == "corrupt":
        (directory / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    elif how == "not_lora":
        config = json.loads((directory / "adapter_config.json").read_text())
        config["peft_type"] = "PREFIX_TUNING"
        (directory / "adapter_config.json").write_text(json.dumps(config))
    elif how == "shape":
        write_peft_adapter(directory, seed=9, r=2, alpha=4)
        from safetensors.torch import save_file

        weights = load_file(str(directory / "adapter_model.safetensors"))
        key = next(k for k in weights if "layers.1.q_proj.lora_A" in k)
        weights[key] = torch.randn(2, 7)
        save_file(weights, str(directory / "adapter_model.safetensors"))


CASES = {
    "missing directory": ([], "adapter directory not found"),
    "unknown method": (["method=nope"], "known methods: core_dare_ties, core_iso_c"),
    "top_k out of range": (["method.top_k=150"], "top_k is a percent"),
    "p out of range": (["method=dare_ties", "method.p=1.0"], "drop rate"),
    "NaN weights": (["break=nan"], "NaN or Inf"),
    "corrupt weights": (["break=corrupt"], "corrupt or unreadable"),
    "non-LoRA adapter": (["break=not_lora"], "not LoRA"),
    "mismatched shapes": (["break=shape"], "layers.1.q_proj"),
    "unknown option": (["method.nope=1"], "method.nope"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_fails_on_one_line(adapters, tmp_path, case):
    import shutil

    extra, message = CASES[case]
    victim = tmp_path / "victim"
    shutil.copytree(adapters / "task1", victim)
    how = next((e.split("=")[1] for e in extra if e.startswith("break=")), None)
    if how:
        break_adapter(victim, how)
    second = tmp_path / "absent" if case == "missing directory" else victim
    arguments = [e for e in extra if not e.startswith("break=")]
    out = tmp_path / "out"
    done = knots_merge(f"adapters=[{adapters / 'task0'},{second}]", f"out={out}", *arguments)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert message in lines[0]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
