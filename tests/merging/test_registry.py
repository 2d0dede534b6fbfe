"""The method registry and the method config files describe the same set of methods."""

import shutil

import pytest

from hydra.utils import get_object

import knots.methods
from knots.config.resources import config_dir
from knots.errors import ConfigError
from knots.merging import Hyperparameters, get_method, load_method_config, method_names
from knots.methods.config import METADATA_KEYS, method_config


def test_every_method_has_a_config_file_and_every_file_a_method():
    files = {path.stem for path in (config_dir() / "method").glob("*.yaml")}
    assert files == set(knots.methods.method_names())
    assert set(method_names()) < files  # the engine's methods and the data-dependent ones


@pytest.mark.parametrize("name", knots.methods.method_names())
def test_method_files_declare_a_valid_search(name):
    method = knots.methods.get_method(name)
    config = method_config(name)
    assert set(config.search) | set(config.repeat) <= set(method.uses)
    assert set(config.defaults) == set(method.uses)
    target = get_object(load_method_config(name)["_target_"]) if name in method_names() else None
    if target is not None:
        assert target is get_method(name).function
    assert method.reference and method.summary


@pytest.mark.parametrize("name", method_names())
def test_method_configs_are_valid_defaults(name):
    config = load_method_config(name)
    assert config.pop("name") == name
    Hyperparameters(**{k: v for k, v in config.items() if k not in METADATA_KEYS})
    method = get_method(name)
    assert method.reference and method.summary
    assert set(method.uses) <= set(Hyperparameters.__dataclass_fields__)


@pytest.mark.parametrize("name", method_names())
def test_every_method_declares_its_search(name):
    spec = method_config(name)
    assert spec.search and spec.search[0] == "scaling"
    assert ("seed" in spec.repeat) == ("p" in spec.search)  # every DARE method re-runs its seeds


def test_search_specs_follow_the_papers():
    assert method_config("ties").search == ("scaling", "top_k")
    dare = method_config("knots_dare_ties")
    assert (dare.search, dare.repeat, dare.ranges) == (("scaling", "p"), ("seed",), {})
    iso = method_config("iso_c").ranges["scaling"]
    assert len(iso) == 30 and iso[0] == 0.1 and iso[-1] == 3.0  # np.linspace(0, 3, 31)[1:]
    core = method_config("core_dare_ties")
    assert core.search == ("scaling", "p", "top_k") and len(core.ranges["scaling"]) == 99 and core.ranges["top_k"][0] == 100


def test_bad_search_specs_are_refused(tmp_path, monkeypatch):
    shutil.copytree(config_dir(), tmp_path / "conf")
    monkeypatch.setenv("KNOTS_CONFIG_DIR", str(tmp_path / "conf"))
    path = tmp_path / "conf" / "method" / "ta.yaml"
    for extra, message in [("search: [top_k]", "does not read hyperparameter 'top_k'"), ("ranges: {scaling: []}", "non-empty list"),
                           ("ranges: {scaling: [nan]}", "finite number"), ("search: scaling", "must be a list")]:
        path.write_text("name: ta\nscaling: 0.1\nmerge_func: sum\n" + extra + "\n")
        with pytest.raises(ConfigError, match=message):
            method_config("ta")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known methods: core_dare_ties, core_iso_c, .*, dare, dare_ties, .*, tsv_m$"):
        get_method("nope")


@pytest.mark.parametrize("field,value", [("top_k", 0), ("top_k", 100.5), ("p", 1.0), ("p", -0.1), ("scaling", float("nan")), ("trim_scope", "layer"), ("sign_vote", "vote"), ("merge_func", "max"), ("common_space_fraction", 1.2)])
def test_out_of_range_hyperparameters_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        Hyperparameters(**{field: value})
