"""The method registry and the method config files describe the same set of methods."""

import shutil

import pytest

from knots.errors import ConfigError
from knots.merging import Hyperparameters, SearchSpec, get_method, load_method_config, load_search_spec, method_names
from knots.merging.registry import SEARCH_KEYS, config_dir


def test_every_method_has_a_config_file_and_every_file_a_method():
    files = {path.stem for path in (config_dir() / "method").glob("*.yaml")}
    assert files == set(method_names())


@pytest.mark.parametrize("name", method_names())
def test_method_configs_are_valid_defaults(name):
    config = load_method_config(name)
    assert config.pop("name") == name
    Hyperparameters(**{key: value for key, value in config.items() if key not in SEARCH_KEYS})
    method = get_method(name)
    assert method.reference and method.summary
    assert set(method.uses) <= set(Hyperparameters.__dataclass_fields__)


@pytest.mark.parametrize("name", method_names())
def test_every_method_declares_its_search(name):
    spec = load_search_spec(name)
    assert spec.search and spec.search[0] == "scaling"
    assert ("seed" in spec.repeat) == ("p" in spec.search)  # every DARE method re-runs its seeds


def test_search_specs_follow_the_papers():
    assert load_search_spec("ties").search == ("scaling", "top_k")
    assert load_search_spec("knots_dare_ties") == SearchSpec(("scaling", "p"), ("seed",), {})
    iso = load_search_spec("iso_c").ranges["scaling"]
    assert len(iso) == 30 and iso[0] == 0.1 and iso[-1] == 3.0  # np.linspace(0, 3, 31)[1:]
    core = load_search_spec("core_dare_ties")
    assert core.search == ("scaling", "p", "top_k") and len(core.ranges["scaling"]) == 99 and core.ranges["top_k"][0] == 100


def test_bad_search_specs_are_refused(tmp_path, monkeypatch):
    shutil.copytree(config_dir(), tmp_path / "conf")
    monkeypatch.setenv("KNOTS_CONFIG_DIR", str(tmp_path / "conf"))
    path = tmp_path / "conf" / "method" / "ta.yaml"
    for extra, message in [("search: [top_k]", "does not read hyperparameter 'top_k'"), ("ranges: {scaling: []}", "non-empty list"), ("ranges: {scaling: [nan]}", "finite number")]:
        path.write_text("name: ta\nscaling: 0.1\n" + extra + "\n")
        with pytest.raises(ConfigError, match=message):
            load_search_spec("ta")


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known methods: core_dare_ties, core_iso_c, .*, dare, dare_ties, .*, tsv_m$"):
        get_method("nope")


@pytest.mark.parametrize("field,value", [("top_k", 0), ("top_k", 100.5), ("p", 1.0), ("p", -0.1), ("scaling", float("nan")), ("trim_scope", "layer"), ("sign_vote", "vote"), ("merge_func", "max"), ("common_space_fraction", 1.2)])
def test_out_of_range_hyperparameters_are_refused(field, value):
    with pytest.raises(ConfigError, match=field):
        Hyperparameters(**{field: value})
