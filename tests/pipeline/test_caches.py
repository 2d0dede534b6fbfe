"""The adapter and feature caches: keyed on the data's content, verified on reuse, damaged entries moved
aside and recomputed, features that always describe the adapter being merged."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from knots.atomic import MANIFEST_NAME, verify_directory
from knots.config import to_run_config
from knots.data.digest import rows_digest, task_digest
from knots.data.tasks import LabelledPool, LazyInput, TaskData
from knots.errors import ConfigError
from knots.pipeline.cache import DAMAGED_DIR, adapter_dir, cache_key, entry_checksum, is_complete, verified_entry
from knots.pipeline.run import run_experiment

WEIGHTS = "adapter_model.safetensors"


def read(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, copied (load_file maps the file: rewriting it in place under a
    mapping would crash the process)."""
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def task_of(train, name="t"):
    return TaskData(name, ["a", "b"], ["{}"], train=train, validation=train[:2], test=train[2:])


ROWS = [("good", 1), ("bad", 0), ("fine", 1), ("awful", 0)]


# ------------------------------------------------------------------------------------- the digest
def test_the_key_follows_the_content_of_every_split():
    base = task_of(ROWS)
    flipped = task_of([(x, 1 - y) for x, y in ROWS])
    edited = task_of([("good!", 1), *ROWS[1:]])
    assert base.digest == task_of(list(ROWS)).digest
    assert len({base.digest, flipped.digest, edited.digest}) == 3
    # the same rows in another split, or one row moved between splits, are other data
    moved = TaskData("t", ["a", "b"], ["{}"], train=ROWS, validation=ROWS[:3], test=ROWS[3:])
    assert moved.digest != base.digest
    # values of different kinds never collide: 1 vs "1" vs 1.0 vs True, ("a", "b") vs "ab"
    assert len({rows_digest([(v, 0)]) for v in (1, "1", 1.0, True, ("a", "b"), "ab", ("ab",))}) == 7
    cfg = object()
    assert cache_key(None, None, cfg, base) != cache_key(None, None, cfg, flipped)


@dataclass(frozen=True)
class Unreadable(LazyInput):
    """A lazy input whose content must not be read to key a cache (an image in a large dataset)."""

    data: object
    index: int

    def load(self):
        raise AssertionError("the digest decoded a lazy input")


def test_lazy_inputs_are_keyed_by_identity_without_being_read():
    datasets = pytest.importorskip("datasets")
    data = datasets.Dataset.from_dict({"x": list(range(6))})
    other = datasets.Dataset.from_dict({"x": list(range(1, 7))})
    pool = LabelledPool([Unreadable(data, i) for i in range(6)], [0, 1] * 3)
    same = LabelledPool([Unreadable(data, i) for i in range(6)], [0, 1] * 3)
    assert rows_digest(pool) == rows_digest(same)
    assert rows_digest(pool) != rows_digest(LabelledPool([Unreadable(other, i) for i in range(6)], [0, 1] * 3))
    assert rows_digest(pool) != rows_digest(LabelledPool([Unreadable(data, i) for i in range(6)], [1, 0] * 3))
    assert rows_digest(pool) != rows_digest(pool.subset([1, 0, 2, 3, 4, 5]))


def test_inputs_are_hashed_by_content():
    from PIL import Image

    black, white = Image.new("L", (4, 4), 0), Image.new("L", (4, 4), 255)
    assert rows_digest([(black, 0)]) == rows_digest([(Image.new("L", (4, 4), 0), 0)])
    assert rows_digest([(black, 0)]) != rows_digest([(white, 0)])
    assert rows_digest([(torch.zeros(3), 0)]) != rows_digest([(torch.zeros(4), 0)])

    class Opaque:
        pass

    with pytest.raises(ConfigError, match="cannot key the cache on an input of type Opaque"):
        rows_digest([(Opaque(), 0)])


def test_task_digest_covers_every_split():
    splits = {"train": ROWS, "validation": ROWS[:1], "test": ROWS[1:]}
    assert task_digest(splits) != task_digest({**splits, "test": ROWS[2:]})


# ------------------------------------------------------------------------------- whole runs: data
def copy_mood(tiny_env: Path, tmp_path: Path) -> Path:
    source = tiny_env.parent / "data" / "mood.csv"
    target = tmp_path / "mood.csv"
    target.write_text(source.read_text())
    return target


def flip_labels(csv: Path) -> None:
    lines = csv.read_text().splitlines()
    flipped = [lines[0]] + [f"{row.rsplit(',', 1)[0]},{1 - int(row.rsplit(',', 1)[1])}" for row in lines[1:]]
    csv.write_text("\n".join(flipped) + "\n")


def test_an_edited_data_file_retrains_its_adapter(compose_run, tiny_env, tmp_path):
    csv = copy_mood(tiny_env, tmp_path)
    cfg = to_run_config(compose_run("logger=none", "stage=finetune", f"benchmark.tasks.mood.path={csv}"))
    first = run_experiment(cfg, tmp_path / "a")
    flip_labels(csv)
    again = run_experiment(cfg, tmp_path / "b")
    status = {a["task"]: a["status"] for a in again["meta"]["adapters"]}
    assert status == {"mood": "trained", "topic": "reused", "review": "reused"}
    paths = {a["task"]: a["path"] for a in first["meta"]["adapters"]}
    assert {a["task"]: a["path"] for a in again["meta"]["adapters"]}["mood"] != paths["mood"]


# --------------------------------------------------------------------------- verified cache entries
def tamper_values(entry: Path) -> None:
    tensors = read(entry / WEIGHTS)
    save_file({k: v * 3 for k, v in tensors.items()}, str(entry / WEIGHTS))


def truncate(entry: Path) -> None:
    data = (entry / WEIGHTS).read_bytes()
    (entry / WEIGHTS).write_bytes(data[: len(data) // 2])


TAMPERING = {
    "values changed": tamper_values,
    "truncated": truncate,
    "file removed": lambda entry: (entry / WEIGHTS).unlink(),
    "file added": lambda entry: (entry / "extra.bin").write_bytes(b"x"),
    "manifest removed": lambda entry: (entry / MANIFEST_NAME).unlink(),
}


@pytest.fixture
def finetuned(compose_run, tmp_path):
    """A finetune-only run of the tiny benchmark, and its config."""
    cfg = to_run_config(compose_run("logger=none", "stage=finetune"))
    return cfg, run_experiment(cfg, tmp_path / "first")


@pytest.mark.parametrize("tamper", list(TAMPERING), ids=list(TAMPERING))
def test_a_damaged_adapter_is_reported_moved_aside_and_retrained(finetuned, tmp_path, caplog, tamper):
    cfg, first = finetuned
    mood = Path(next(a["path"] for a in first["meta"]["adapters"] if a["task"] == "mood"))
    original = read(mood / WEIGHTS)
    TAMPERING[tamper](mood)
    with caplog.at_level(logging.WARNING, logger="knots"):
        again = run_experiment(cfg, tmp_path / "again")
    status = {a["task"]: a["status"] for a in again["meta"]["adapters"]}
    assert status == {"mood": "trained", "topic": "reused", "review": "reused"}
    notices = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(notices) == 1 and "mood" in notices[0] and "\n" not in notices[0], notices
    moved = list((Path(cfg.paths.cache_dir) / DAMAGED_DIR / "adapters").iterdir())
    assert [p.name.rsplit("-", 2)[0] for p in moved] == [mood.name] and str(moved[0]) in notices[0]
    assert verify_directory(mood) == []  # retrained: identical to the first training
    torch.testing.assert_close(read(mood / WEIGHTS), original, rtol=0, atol=0)


def test_verified_entry_accepts_an_intact_entry_and_ignores_a_missing_one(finetuned, tmp_path):
    cfg, first = finetuned
    mood = Path(first["meta"]["adapters"][0]["path"])
    assert is_complete(mood) and verified_entry(mood)
    assert not verified_entry(tmp_path / "nothing-here")
    assert first["meta"]["adapters"][0]["status"] == "trained"
    checksum = entry_checksum(mood)
    assert checksum == hashlib.sha256(json.dumps(json.loads((mood / MANIFEST_NAME).read_text())["files"],
                                                 sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------- features
def reseal(entry: Path) -> None:
    """Rewrite an entry's manifest to match its files: a different, but intact, adapter at the same key."""
    manifest = json.loads((entry / MANIFEST_NAME).read_text())
    for name, item in manifest["files"].items():
        item["size"] = (entry / name).stat().st_size
        item["sha256"] = hashlib.sha256((entry / name).read_bytes()).hexdigest()
    (entry / MANIFEST_NAME).write_text(json.dumps(manifest))


def test_features_follow_the_adapter_not_its_cache_key(compose_run, tmp_path):
    cfg = to_run_config(compose_run("logger=none", "methods=[ta]"))
    first = run_experiment(cfg, tmp_path / "a")
    mood = Path(next(a["path"] for a in first["meta"]["adapters"] if a["task"] == "mood"))
    tensors = read(mood / WEIGHTS)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in tensors.items()}, str(mood / WEIGHTS))
    reseal(mood)  # intact, and another adapter than the one the cached features describe
    again = run_experiment(cfg, tmp_path / "b")
    assert [a["status"] for a in again["meta"]["adapters"]] == ["reused"] * 3
    # what the adapter on disk gives, measured without any cache
    paths = ",".join(f"{a['task']}:{a['path']}" for a in again["meta"]["adapters"])
    truth = run_experiment(to_run_config(compose_run("logger=none", "methods=[ta]", f"+adapters.paths={{{paths}}}")), tmp_path / "c")
    assert truth["finetuned"]["mood"] != first["finetuned"]["mood"]  # the swap is visible in the numbers
    assert again["finetuned"] == truth["finetuned"]
    assert len([p for p in (Path(cfg.paths.cache_dir) / "features").glob("mood-*") if p.is_dir()]) == 2


def test_damaged_features_are_reported_and_recomputed(compose_run, tmp_path, caplog):
    cfg = to_run_config(compose_run("logger=none", "methods=[ta]"))
    first = run_experiment(cfg, tmp_path / "a")
    entries = sorted(p for p in (Path(cfg.paths.cache_dir) / "features").glob("mood-*") if p.is_dir())
    assert len(entries) == 1 and verify_directory(entries[0]) == []
    features = entries[0] / "features.safetensors"
    features.write_bytes(features.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="knots"):
        again = run_experiment(cfg, tmp_path / "b")
    notices = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(notices) == 1 and "cached features" in notices[0] and "mood" in notices[0]
    assert again["finetuned"] == first["finetuned"]
    assert verify_directory(entries[0]) == []
    assert len(list((Path(cfg.paths.cache_dir) / DAMAGED_DIR / "features").iterdir())) == 1


def test_adapter_and_feature_entries_carry_checksums(finetuned):
    cfg, first = finetuned
    for adapter in first["meta"]["adapters"]:
        manifest = json.loads((Path(adapter["path"]) / MANIFEST_NAME).read_text())
        assert manifest["complete"] and all("sha256" in f for f in manifest["files"].values())
        assert WEIGHTS in manifest["files"] and "knots_meta.json" in manifest["files"]
    assert adapter_dir(cfg.paths.cache_dir, "mood", "k").parent == Path(cfg.paths.cache_dir) / "adapters"


def test_without_locks_the_first_complete_entry_stands(tmp_path):
    from knots.pipeline.cache import write_entry

    entry = tmp_path / "adapters" / "t-key"

    def other(staging: Path) -> None:
        (staging / "a.txt").write_text("other")

    def mine(staging: Path) -> None:
        (staging / "a.txt").write_text("mine")
        assert write_entry(entry, other, "test")  # another process completes the entry meanwhile

    assert write_entry(entry, mine, "test") is False
    assert (entry / "a.txt").read_text() == "other" and verify_directory(entry) == []
    assert [p.name for p in entry.parent.iterdir()] == ["t-key"]  # no staging directory left behind
