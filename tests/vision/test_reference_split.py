"""The authors' splits: index files fetched once and verified, loaded without code, applied as they do."""

import hashlib
import io

import numpy as np
import pytest
import torch

import knots.vision.paper as paper
import knots.vision.reference_split as ref
from knots.errors import ConfigError
from knots.data.splits import assign_roles
from knots.data.tasks import TaskSource
from knots.vision.datasets import task_from_splits
from knots.vision.paper import ReferenceSplit
from knots.vision.reference_split import (authors_order, fetch_index_file, index_url, load_permutation,
                                          permutation_split)


def _pt_bytes(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class FakeFetch:
    """``url -> bytes`` that serves one file and counts its calls."""

    def __init__(self, data: bytes):
        self.data, self.urls = data, []

    def __call__(self, url: str) -> bytes:
        self.urls.append(url)
        return self.data


def _fake(num_classes, sizes, splits=("train", "test"), paths=None):
    """In-memory ``datasets`` splits; ``paths[split]``: the image file names to store."""
    import datasets
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (2, 2)).save(png, format="PNG")
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[f"c{i}" for i in range(num_classes)])})
    out = {}
    for split, n in zip(splits, sizes):
        names = (paths or {}).get(split)
        images = [{"bytes": png.getvalue(), "path": names[i] if names else None} for i in range(n)]
        out[split] = datasets.Dataset.from_dict({"image": images, "label": [(3 * i) % num_classes for i in range(n)]},
                                                features=features)
    return out


# --- download and cache --------------------------------------------------------------------------

def test_an_index_file_is_fetched_once_from_the_pinned_commit_and_verified(tmp_path):
    data = _pt_bytes(np.random.default_rng(0).permutation(50))
    fetch = FakeFetch(data)
    path = fetch_index_file("mnist_shuffled_idxs.pt", _sha(data), tmp_path, fetch=fetch)
    assert fetch.urls == [f"https://raw.githubusercontent.com/gstoica27/KnOTS/{paper.AUTHORS_COMMIT}"
                          "/dataset/shuffled_idxs/mnist_shuffled_idxs.pt"]
    assert path.read_bytes() == data and path.is_relative_to(tmp_path)
    assert fetch_index_file("mnist_shuffled_idxs.pt", _sha(data), tmp_path, fetch=fetch) == path
    assert len(fetch.urls) == 1, "a verified cached file is not downloaded again"
    path.write_bytes(b"corrupt")  # a damaged cache is replaced, never used
    assert fetch_index_file("mnist_shuffled_idxs.pt", _sha(data), tmp_path, fetch=fetch).read_bytes() == data
    assert len(fetch.urls) == 2 and not list(path.parent.glob("*.tmp"))


def test_a_download_with_another_checksum_is_refused_and_nothing_is_written(tmp_path):
    with pytest.raises(ConfigError, match="differs from the expected") as err:
        fetch_index_file("cars_shuffled_idxs.pt", "0" * 64, tmp_path, fetch=FakeFetch(b"tampered"))
    assert "\n" not in str(err.value)
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_offline_the_error_says_where_to_put_the_file(tmp_path):
    def offline(url):
        raise OSError("Network is unreachable")

    with pytest.raises(ConfigError, match=r"Network is unreachable\); to work offline, put the file at .*gtsrb") as err:
        fetch_index_file("gtsrb_shuffled_idxs.pt", "0" * 64, tmp_path, fetch=offline)
    assert "\n" not in str(err.value)


def test_the_default_download_reads_the_raw_url(tmp_path, monkeypatch):
    import urllib.request

    data = _pt_bytes(np.arange(5))
    opened = []

    class Response(io.BytesIO):
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    def urlopen(url, timeout):
        opened.append((url, timeout))
        return Response(data)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    path = fetch_index_file("svhn_shuffled_idxs.pt", _sha(data), tmp_path)
    assert path.read_bytes() == data and opened == [(index_url("svhn_shuffled_idxs.pt"), 60.0)]


# --- loading -------------------------------------------------------------------------------------

def test_the_authors_format_a_pickled_numpy_array_loads_as_an_int64_permutation(tmp_path):
    perm = np.random.default_rng(1).permutation(30)  # what torch.save(np.random.permutation(n)) writes
    (tmp_path / "a.pt").write_bytes(_pt_bytes(perm))
    (tmp_path / "b.pt").write_bytes(_pt_bytes(torch.from_numpy(perm.astype(np.int32))))
    for name in ("a.pt", "b.pt"):
        out = load_permutation(tmp_path / name, 30)
        assert out.dtype == np.int64 and np.array_equal(out, perm)


@pytest.mark.parametrize(("value", "message"), [
    (np.array([0, 1, 1, 3]), "not a permutation"),
    (np.array([0.0, 1.0, 2.0, 3.0]), "not a readable index file .*Float64DType"),  # only integer dtypes may load
    (torch.arange(4.0), "expected a 1-D integer array"),
    (np.arange(4).reshape(2, 2), "expected a 1-D integer array"),
    (np.arange(5), "a permutation of 5 indices, expected 4"),
    ({"idx": torch.arange(4)}, "expected a 1-D integer array"),
])
def test_bad_index_files_are_refused_on_one_line(tmp_path, value, message):
    (tmp_path / "x.pt").write_bytes(_pt_bytes(value))
    with pytest.raises(ConfigError, match=message) as err:
        load_permutation(tmp_path / "x.pt", 4)
    assert "\n" not in str(err.value)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_an_index_file_that_carries_code_is_never_unpickled(tmp_path, capsys):
    (tmp_path / "evil.pt").write_bytes(_pt_bytes([_Payload()]))
    with pytest.raises(ConfigError, match="not a readable index file"):
        load_permutation(tmp_path / "evil.pt")
    assert "code ran" not in capsys.readouterr().out


def test_validation_is_the_first_20_percent_of_the_permutation_and_test_the_rest():
    perm = np.random.default_rng(2).permutation(8041)
    val, test = permutation_split(perm, 0.2)
    assert len(val) == 1608 and len(test) == 6433  # int(0.2 * 8041): the authors' Cars sizes
    assert np.array_equal(val, perm[:1608]) and np.array_equal(test, perm[1608:])
    assert not set(val) & set(test) and len(set(val) | set(test)) == 8041


def test_the_authors_row_orders():
    labels, names = [1, 0, 1, 0], ["b.jpg", "d.jpg", "a.jpg", "c.jpg"]
    assert authors_order("dataset", 4, labels, None, "t").tolist() == [0, 1, 2, 3]
    assert authors_order("file_name", 4, labels, names, "t").tolist() == [2, 0, 3, 1]
    assert authors_order("label_file_name", 4, labels, names, "t").tolist() == [3, 1, 2, 0]
    with pytest.raises(ConfigError, match="stores no image file names; set test_order: dataset"):
        authors_order("file_name", 4, labels, None, "t")
    with pytest.raises(ConfigError, match="not unique"):
        authors_order("file_name", 2, [0, 0], ["a.jpg", "a.jpg"], "t")
    with pytest.raises(ConfigError, match="test_order must be one of"):
        authors_order("random", 4, labels, names, "t")


# --- the task builder ----------------------------------------------------------------------------

ONE_TO_ONE = {"train": "train", "validation": "validation", "test": "test"}


def roles(source, **caps):
    """The pipeline's split (knots.data.splits) of a reference source: every role mapped, nothing carved."""
    from knots.config.schema import SplitConfig

    return assign_roles(source.splits, SplitConfig(source_splits=dict(ONE_TO_ONE), **caps), source.name)


def rows(pool):
    return [x.index for x, _ in pool]


@pytest.fixture
def tiny_reference(monkeypatch, tmp_path):
    """A hand-made 50-image permutation standing in for the authors' file of task ``mnist``."""
    perm = np.random.default_rng(3).permutation(50)
    data = _pt_bytes(perm)
    fetch = FakeFetch(data)
    monkeypatch.setattr(ref, "_download", fetch)
    monkeypatch.setitem(paper.REFERENCE_SPLITS, "mnist", ReferenceSplit(10, 40, "mnist_shuffled_idxs.pt", _sha(data)))
    return perm, fetch


def test_the_reference_split_is_the_permutation_of_the_test_split_as_source_splits(tmp_path, tiny_reference):
    perm, fetch = tiny_reference
    data = _fake(5, (30, 50))
    source = task_from_splits("mnist", data, num_classes=5, reference_split=True, cache_dir=str(tmp_path))
    assert isinstance(source, TaskSource) and list(source.splits) == ["train", "validation", "test"]
    # validation: the first int(0.2 n) = 10 entries of the permutation; test: the other 40
    assert rows(source.splits["validation"]) == perm[:10].tolist() and rows(source.splits["test"]) == perm[10:].tolist()
    assert not set(rows(source.splits["validation"])) & set(rows(source.splits["test"]))
    assert all(data["test"][x.index]["label"] == y for x, y in [*source.splits["validation"], *source.splits["test"]])
    assert rows(source.splits["train"]) == list(range(30))
    assert source.info["split"] == "reference" and source.info["test_order"] == "dataset"
    assert source.info["expected"] == {"validation": 10, "test": 40}
    assert source.info["index_file"]["url"].endswith("/dataset/shuffled_idxs/mnist_shuffled_idxs.pt")
    # the pipeline's splitter maps the three roles one to one: the same examples, in the same order
    sets = roles(source)
    assert {r: rows(p) for r, p in sets.items()} == {r: rows(p) for r, p in source.splits.items()}
    capped = roles(task_from_splits("mnist", data, num_classes=5, reference_split=True, cache_dir=str(tmp_path)),
                   max_test=7, balance=True)
    assert len(fetch.urls) == 1, "the index file comes from the cache the second time"
    assert len(capped["test"]) == 7 and set(rows(capped["test"])) <= set(perm[10:].tolist())


def test_a_test_split_of_another_size_than_the_permutation_is_an_error(tmp_path, tiny_reference):
    with pytest.raises(ConfigError, match="permutation covers 50 test images, this dataset's 'test' split has 49") as err:
        task_from_splits("mnist", _fake(5, (30, 49)), num_classes=5, reference_split=True, cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)


def test_the_permutation_indexes_rows_in_the_authors_file_name_order(tmp_path, monkeypatch):
    perm = np.random.default_rng(4).permutation(10)
    data = _pt_bytes(perm)
    monkeypatch.setattr(ref, "_download", FakeFetch(data))
    monkeypatch.setitem(paper.REFERENCE_SPLITS, "cars", ReferenceSplit(2, 8, "cars_shuffled_idxs.pt", _sha(data),
                                                                       "file_name"))
    shuffled = np.random.default_rng(5).permutation(10)  # the mirror stores the images in another order
    names = [f"sub/{i + 1:05d}.jpg" for i in shuffled]
    built = task_from_splits("cars", _fake(3, (6, 10), paths={"test": names}), num_classes=3, reference_split=True,
                             cache_dir=str(tmp_path))
    # authors' row k is the image named f"{k + 1:05d}.jpg"; the permutation indexes those rows
    by_name = {n.split("/")[-1]: row for row, n in enumerate(names)}
    expected = [by_name[f"{k + 1:05d}.jpg"] for k in perm]
    assert rows(built.splits["validation"]) + rows(built.splits["test"]) == expected
    with pytest.raises(ConfigError, match="stores no image file names"):
        task_from_splits("cars", _fake(3, (6, 10)), num_classes=3, reference_split=True, cache_dir=str(tmp_path))
    plain = task_from_splits("cars", _fake(3, (6, 10)), num_classes=3, reference_split=True, cache_dir=str(tmp_path),
                             test_order="dataset")
    assert rows(plain.splits["validation"]) == perm[:2].tolist()


def test_official_validation_tasks_need_the_datasets_validation_split_of_the_official_size(tmp_path, monkeypatch):
    monkeypatch.setitem(paper.REFERENCE_SPLITS, "dtd", ReferenceSplit(8, 12, mirror="someone/dtd_with_val"))
    with_val = _fake(4, (20, 8, 12), splits=("train", "validation", "test"))
    source = task_from_splits("dtd", with_val, num_classes=4, reference_split=True)
    assert {r: len(p) for r, p in source.splits.items()} == {"train": 20, "validation": 8, "test": 12}
    assert source.info["validation"] == "the dataset's 'validation' split"
    renamed = {"train": with_val["train"], "val": with_val["validation"], "test": with_val["test"]}
    assert len(task_from_splits("dtd", renamed, num_classes=4, reference_split=True,
                                split_names={"validation": "val"}).splits["validation"]) == 8
    with pytest.raises(ConfigError, match="has none .* e.g. someone/dtd_with_val") as err:
        task_from_splits("dtd", _fake(4, (20, 12)), num_classes=4, reference_split=True)
    assert "\n" not in str(err.value)
    for sizes, found in (((20, 9, 12), "9 validation, 12 test"), ((20, 8, 13), "8 validation, 13 test")):
        wrong = _fake(4, sizes, splits=("train", "validation", "test"))
        with pytest.raises(ConfigError, match=f"expects 8 validation and 12 test images, the data gives {found}") as err:
            task_from_splits("dtd", wrong, num_classes=4, reference_split=True)
        assert "\n" not in str(err.value)


def test_without_the_reference_split_the_builder_returns_the_datasets_own_splits(tmp_path):
    source = task_from_splits("dtd", _fake(5, (30, 50)), num_classes=5)
    assert {r: len(p) for r, p in source.splits.items()} == {"train": 30, "test": 50}
    assert source.info == {"split": "dataset"}
    with pytest.raises(ConfigError, match="test_order applies only with reference_split: true"):
        task_from_splits("dtd", _fake(5, (30, 50)), num_classes=5, test_order="dataset")
    with pytest.raises(ConfigError, match="no reference split for task 'digits'"):
        task_from_splits("digits", _fake(5, (30, 50)), num_classes=5, reference_split=True, template_set="mnist")


def test_a_vision8_task_builds_the_reference_split_under_the_reference_protocol(tmp_path, monkeypatch, tiny_reference):
    """protocol=reference is all it takes; the index files share the data cache; the split sizes and
    their provenance reach TaskData.info."""
    import datasets

    from knots.config.schema import to_run_config
    from knots.data.build import build_task
    from tests.vision.test_experiments import compose

    perm, fetch = tiny_reference
    monkeypatch.setenv("KNOTS_DATA_CACHE", str(tmp_path / "data"))
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: _fake(10, (30, 50)))
    cfg = to_run_config(compose(tmp_path, "experiment=vitb32_per_task", "protocol=reference"))
    task = build_task("mnist", cfg.benchmark.tasks["mnist"])
    assert rows(task.validation) == perm[:10].tolist() and rows(task.test) == perm[10:].tolist()
    assert task.info["split"] == "reference" and task.info["expected"] == {"validation": 10, "test": 40}
    assert task.info["source_sizes"] == {"train": 30, "validation": 10, "test": 40}
    assert task.info["dataset"]["hf_path"] == "ylecun/mnist"
    assert len(list((tmp_path / "data" / "knots-reference").rglob("mnist_shuffled_idxs.pt"))) == 1
    default = to_run_config(compose(tmp_path, "experiment=vitb32_per_task", "protocol=default"))
    seeded = build_task("mnist", default.benchmark.tasks["mnist"])
    assert (len(seeded.validation), len(seeded.test)) == (10, 40) and seeded.info["split"] == "dataset"
    assert rows(seeded.validation) != perm[:10].tolist() and len(fetch.urls) == 1
