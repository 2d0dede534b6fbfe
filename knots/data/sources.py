"""Readers that turn a task's data source into rows ``(input, raw_label)``.

A reader returns either one pool of rows or a dict of named source splits. Readers never download:
``hf`` datasets come from a local directory or the local Hugging Face cache.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from knots.errors import ConfigError

Row = tuple[Any, Any]
Rows = list[Row] | dict[str, list[Row]]


def _require_file(path: str, task: str) -> Path:
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"task {task}: data file not found: {p}")
    return p


def _require_text(path: str, task: str, options: Any) -> Path:
    """A data file that exists, is not empty and does not look binary (NUL bytes in its first 8 KiB,
    unless ``read_options`` names an ``encoding``, such as UTF-16, that has them)."""
    p = _require_file(path, task)
    opener = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}.get(p.suffix, open)
    try:
        with opener(p, "rb") as handle:
            head = handle.read(8192)
    except (OSError, EOFError, lzma.LZMAError) as error:
        raise ConfigError(f"task {task}: cannot read {p} ({error})") from None
    if not head:
        raise ConfigError(f"task {task}: {p} is empty")
    if b"\x00" in head and not options.get("encoding"):
        raise ConfigError(f"task {task}: {p} is a binary file, not text")
    return p


def input_columns(cfg: Any) -> list[str]:
    """The input columns of a task: ``input_columns`` (one, or two for a sentence pair) or ``[input_column]``."""
    return list(getattr(cfg, "input_columns", None) or [cfg.input_column])


def _inputs(columns: list[list[Any]]) -> list[Any]:
    """One input per row: the value of a single input column, or the ``(first, second)`` pair."""
    return list(columns[0]) if len(columns) == 1 else list(zip(*columns))


def _frame_rows(frame: Any, cfg: Any, task: str) -> list[Row]:
    columns = input_columns(cfg)
    for col in (*columns, cfg.label_column):
        if col not in frame.columns:
            raise ConfigError(f"task {task}: column {col!r} not in {cfg.path} (columns: {', '.join(map(str, frame.columns))})")
    frame = frame[[*columns, cfg.label_column]].dropna()
    return list(zip(_inputs([frame[c].tolist() for c in columns]), frame[cfg.label_column].tolist()))


def _read_frame(reader: Callable[..., Any], path: Path, kind: str, task: str, **options: Any) -> Any:
    """``reader(path, **options)``; an empty, binary or malformed file is one ``ConfigError`` line."""
    import pandas as pd

    try:
        return reader(path, **options)
    except pd.errors.EmptyDataError:
        raise ConfigError(f"task {task}: {path} is empty") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"task {task}: {path} is not {kind} text ({error.reason} at byte {error.start}); "
                          "a binary file, or another encoding (read_options.encoding)") from None
    except (pd.errors.ParserError, ValueError) as error:
        raise ConfigError(f"task {task}: {path} is not valid {kind} ({' '.join(str(error).split())})") from None


def read_csv(cfg: Any, task: str) -> Rows:
    import pandas as pd

    frame = _read_frame(pd.read_csv, _require_text(cfg.path, task, cfg.read_options), "CSV", task, **cfg.read_options)
    return _frame_rows(frame, cfg, task)


def read_json(cfg: Any, task: str) -> Rows:
    import pandas as pd

    path = _require_text(cfg.path, task, cfg.read_options)
    options = {"lines": path.suffix == ".jsonl", **cfg.read_options}
    return _frame_rows(_read_frame(pd.read_json, path, "JSON", task, **options), cfg, task)


def read_lines(cfg: Any, task: str) -> Rows:
    pattern = re.compile(cfg.pattern)
    if not {"input", "label"} <= set(pattern.groupindex):
        raise ConfigError(f"task {task}: pattern needs named groups 'input' and 'label'")
    encoding = cfg.read_options.get("encoding", "utf-8")
    rows = []
    with open(_require_text(cfg.path, task, cfg.read_options), encoding=encoding, errors="replace") as f:
        for line in f:
            m = pattern.match(line.rstrip("\n"))
            if m:
                rows.append((m["input"], m["label"]))
    return rows


def read_hf(cfg: Any, task: str) -> Rows:
    import datasets

    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    path = Path(cfg.path).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "dataset_info.json").is_file()):
            data = datasets.load_from_disk(str(path))
        else:
            data = datasets.load_dataset(cfg.path, **cfg.read_options)
    except (FileNotFoundError, ConnectionError, ValueError) as e:
        raise ConfigError(f"task {task}: cannot load dataset {cfg.path!r} offline ({str(e).splitlines()[0]})") from None
    if isinstance(data, datasets.Dataset):
        return _dataset_rows(data, cfg, task)
    return {name: _dataset_rows(split, cfg, task) for name, split in data.items()}


def _dataset_rows(data: Any, cfg: Any, task: str) -> list[Row]:
    columns = input_columns(cfg)
    for col in (*columns, cfg.label_column):
        if col not in data.column_names:
            raise ConfigError(f"task {task}: column {col!r} not in dataset {cfg.path} (columns: {', '.join(data.column_names)})")
    return list(zip(_inputs([data[c] for c in columns]), data[cfg.label_column]))


def instantiate_loader(node: Any, task: str, **kwargs: Any) -> Any:
    """Call the loader a task names with ``_target_`` (its other keys and ``kwargs`` are the arguments)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs, _convert_="all")
    except InstantiationException as error:
        cause = error.__cause__
        if isinstance(cause, ConfigError):
            raise cause from None
        message = str(cause or error).splitlines()[0]
        raise ConfigError(f"task {task}: the loader {node.get('_target_')!r} failed ({message})") from None


def read_callable(cfg: Any, task: str) -> Rows:
    """Rows from a task's ``loader`` (``_target_`` plus arguments)."""
    return instantiate_loader(cfg.loader, task)


READERS: dict[str, Callable[[Any, str], Rows]] = {
    "csv": read_csv,
    "json": read_json,
    "lines": read_lines,
    "hf": read_hf,
    "callable": read_callable,
}


def check_source(cfg: Any, task: str) -> None:
    """Fail early (before any training) when a file-based source's file is missing."""
    if cfg.source in ("csv", "json", "lines"):
        _require_file(cfg.path, task)
