"""The tiny end-to-end run's numbers, pinned: a change to the pipeline that moves any of them fails here.

The pinned file was written by this run on a 2-core x86-64 CPU (one thread). Accuracies are counts over
small test sets, so they move only when a prediction changes; the tolerance absorbs float noise only.
To re-pin after an intended change of results, write ``run_pinned(...)`` to the file and say why in
the commit.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from knots.config import to_run_config
from knots.pipeline.run import run_experiment

PINNED = Path(__file__).parent / "data" / "tiny_results.json"


def run_pinned(compose_run, out: Path) -> dict[str, Any]:
    """The tiny run with every default method, one thread, no tracker; ``meta`` (paths, times) dropped.

    Each method's ``search`` history (every evaluated point) is checked against the pinned selection and
    then dropped: the pin holds the selected point and its scores, which the history must contain.
    """
    results = run_experiment(to_run_config(compose_run("logger=none", "threads=1")), out)
    results.pop("meta")
    for name, method in results["methods"].items():
        points = method.pop("search")
        assert points, name
        assert {"params": method["hyperparameters"], "val_score": method["val_score"]} in points, name
    return json.loads(json.dumps(results))


def differences(expected: Any, actual: Any, path: str = "") -> list[str]:
    if isinstance(expected, dict) and isinstance(actual, dict):
        out = [f"{path}/{k}: missing" for k in expected if k not in actual]
        out += [f"{path}/{k}: unexpected" for k in actual if k not in expected]
        for k in expected.keys() & actual.keys():
            out += differences(expected[k], actual[k], f"{path}/{k}")
        return out
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return [] if math.isclose(expected, actual, rel_tol=0, abs_tol=1e-6) else [f"{path}: {expected} != {actual}"]
    return [] if expected == actual else [f"{path}: {expected!r} != {actual!r}"]


def test_tiny_run_numbers_are_pinned(compose_run, tmp_path):
    expected = json.loads(PINNED.read_text())
    assert differences(expected, run_pinned(compose_run, tmp_path / "run")) == []
