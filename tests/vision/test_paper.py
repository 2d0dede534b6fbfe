"""The authors' fixed numbers: normalizers, official sizes, index files, epochs; class names as they wrote them."""

import re

import pytest

from knots.errors import ConfigError
from knots.vision.datasets import class_names_from_feature, prompt_name
from knots.vision.paper import (FINETUNED_ACCURACY, REFERENCE_SPLITS, TASKS, TEST_ORDERS, VALIDATION_FRACTION,
                                VITL14_EPOCHS, paper_normalizers)


def test_paper_normalizers_are_the_authors_fixed_accuracies():
    b32 = paper_normalizers("ViT-B-32", TASKS)
    assert list(b32.values()) == [74.0, 58.3, 99.0, 92.7, 99.3, 88.4, 64.5, 96.2]
    assert sum(b32.values()) / 8 == pytest.approx(84.05)
    assert paper_normalizers("ViT-L-14", ["cars", "mnist"]) == {"cars": 99.76682729675113, "mnist": 99.525}
    with pytest.raises(ConfigError, match="CLIP architectures ViT-B-32, ViT-L-14 only \\(model.backbone.arch is .ViT-H-14.\\)"):
        paper_normalizers("ViT-H-14", TASKS)
    with pytest.raises(ConfigError, match=r"no paper normalizer for task\(s\) digits \(ViT-B-32;"):
        paper_normalizers("ViT-B-32", ["cars", "digits"])


def test_the_official_test_sizes_are_what_the_vitl14_normalizers_are_fractions_of():
    """99.76682...% of Cars' 6433 test images is 6418 images: every ViT-L/14 accuracy is k / n_test."""
    for task, accuracy in FINETUNED_ACCURACY["ViT-L-14"].items():
        correct = accuracy * REFERENCE_SPLITS[task].test / 100
        assert correct == pytest.approx(round(correct), abs=1e-6), task
    assert {t: s.test for t, s in REFERENCE_SPLITS.items()} == {
        "cars": 6433, "dtd": 1880, "eurosat": 2700, "gtsrb": 10104, "mnist": 8000, "resisc45": 6300,
        "sun397": 15880, "svhn": 20826}


def test_reference_split_table_is_consistent():
    assert set(REFERENCE_SPLITS) == set(TASKS) == set(FINETUNED_ACCURACY["ViT-B-32"]) == set(VITL14_EPOCHS)
    permuted = {t for t, s in REFERENCE_SPLITS.items() if s.index_file}
    assert permuted == {"cars", "gtsrb", "mnist", "sun397", "svhn"}
    for task, spec in REFERENCE_SPLITS.items():
        assert spec.test_order in TEST_ORDERS
        if spec.index_file:
            assert spec.index_file == f"{task}_shuffled_idxs.pt" and re.fullmatch(r"[0-9a-f]{64}", spec.sha256)
            assert spec.validation == int(VALIDATION_FRACTION * spec.permutation_length)
            assert spec.mirror is None
        else:  # DTD, EuroSAT, RESISC45: official validation sets as large as their test sets
            assert spec.mirror and spec.sha256 is None and spec.validation == spec.test
    assert [REFERENCE_SPLITS[t].permutation_length for t in sorted(permuted)] == [8041, 12630, 10000, 19850, 26032]
    assert VITL14_EPOCHS == {"cars": 15, "dtd": 15, "eurosat": 8, "gtsrb": 5, "mnist": 2, "resisc45": 7,
                             "sun397": 8, "svhn": 5}


@pytest.mark.parametrize(("raw", "prompt"), [
    ("Ram C/V Cargo Van Minivan 2012", "Ram C/V Cargo Van Minivan 2012"),  # Cars #173, as in the authors' heads
    ("AM General Hummer SUV 2000", "AM General Hummer SUV 2000"),
    ("/b/bakery/shop", "bakery shop"),  # SUN397 paths lose the letter folder and their slashes
    ("/a/apartment_building/outdoor", "apartment building outdoor"),
    ("apartment building outdoor", "apartment building outdoor"),
    ("baseball_diamond", "baseball diamond"),  # RESISC45
    ("polka-dotted", "polka-dotted"),  # DTD
])
def test_prompt_names_match_the_authors_class_names(raw, prompt):
    assert prompt_name(raw) == prompt


def test_the_cars_label_feature_keeps_its_slash():
    names = [f"model {i}" for i in range(196)]
    names[173] = "Ram C/V Cargo Van Minivan 2012"
    assert class_names_from_feature("cars", names, 196, None)[173] == "Ram C/V Cargo Van Minivan 2012"
