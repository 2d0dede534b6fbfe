"""Atomic outputs: a reader sees the old version, the complete new one, or nothing; never a half.

Directories (:func:`atomic_directory`) are written into a hidden staging directory beside ``out``,
``.<name>.partial-<pid>-<token>``, which becomes ``out`` in one rename once complete. Every directory
written this way carries a manifest (:data:`MANIFEST_NAME`) listing its files, and only directories
whose every file is in their manifest are ever replaced or removed (:func:`foreign_files`,
:func:`remove_owned`): nothing this project did not write itself is deleted.

Replacing an existing ``out`` (``overwrite=True``) swaps the two directories in one step where the
filesystem can (Linux ``renameat2(RENAME_EXCHANGE)``), otherwise in two renames that are rolled back if
the second fails. A process killed in between leaves ``.<name>.old-<pid>-<token>``, which the next writer
of the same ``out`` restores (:func:`clean_leftovers`); leftovers of processes that have exited are
removed, and each cleanup is reported on one line.

Single files (:func:`write_text`, :func:`write_json`, :func:`write_bytes`, :func:`save_safetensors`,
:func:`atomic_path`) are written to a temporary sibling and renamed over the target.

SIGINT and SIGTERM raise :class:`Interrupted` under :func:`interrupts_as_exceptions`, so the same clean-up
runs for both; the final renames are shielded from them (:func:`deferred_signals`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from knots.errors import OutputError

MANIFEST_NAME = ".knots-manifest.json"
LEFTOVER_KINDS = ("partial", "old")
Notify = Callable[[str], None]

log = logging.getLogger("knots")


# ----------------------------------------------------------------------------------------- signals
class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM, raised where the process was so that every clean-up handler runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def interrupts_as_exceptions(signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Turn the given signals into :class:`Interrupted` for the duration of the block (main thread only)."""
    if not _in_main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)


@contextlib.contextmanager
def deferred_signals(signals: Iterable[int] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold the given signals until the block has finished, then deliver them (main thread only).

    Used around the final renames, so that an interruption cannot fall between them.
    """
    if not _in_main_thread():
        yield
        return
    pending: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: pending.append(signum)) for signum in signals}
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
        if pending:
            signal.raise_signal(pending[0])


# ------------------------------------------------------------------------------------- single files
def _fsync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """Yield a temporary sibling path to write; it replaces ``path`` only if the block completes.

    For writers that take a path (``safetensors.torch.save_file``, ``matplotlib``'s ``savefig``...).
    ``durable`` flushes the file and its directory to disk before and after the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.parent / f".{path.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        yield temporary
        if durable:
            _fsync_file(temporary)
        os.replace(temporary, path)
        if durable:
            _fsync_directory(path.parent)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)


def write_bytes(path: str | Path, data: bytes, durable: bool = True) -> None:
    with atomic_path(path, durable) as temporary:
        temporary.write_bytes(data)


def write_text(path: str | Path, text: str, durable: bool = True) -> None:
    with atomic_path(path, durable) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any, durable: bool = True, **dumps: Any) -> None:
    """JSON with ``indent=2`` and a final newline (``dumps`` keywords go to :func:`json.dumps`)."""
    write_text(path, json.dumps(data, **{"indent": 2, **dumps}) + "\n", durable)


def save_safetensors(path: str | Path, tensors: Mapping[str, Any], metadata: Mapping[str, str] | None = None, durable: bool = True) -> None:
    """``safetensors.torch.save_file``, atomically: tensors only, never pickled code."""
    from safetensors.torch import save_file

    with atomic_path(path, durable) as temporary:
        save_file(dict(tensors), str(temporary), metadata=dict(metadata) if metadata else None)


# ---------------------------------------------------------------------------------------- manifests
def read_manifest(directory: str | Path) -> dict[str, Any] | None:
    """The manifest of a directory written by :func:`atomic_directory`, or None."""
    try:
        manifest = json.loads((Path(directory) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _listing(directory: Path) -> Iterator[str]:
    """Relative paths (POSIX) of every file, symlink and special file under ``directory``."""
    for root, dirs, files in os.walk(directory):
        base = Path(root)
        for name in files + [d for d in dirs if (base / d).is_symlink()]:
            yield (base / name).relative_to(directory).as_posix()


def foreign_files(directory: str | Path) -> list[str]:
    """Entries of ``directory`` that its manifest does not list: what this project did not write.

    A directory without a manifest is foreign as a whole (its top-level entries are listed). An empty
    directory, or one holding only empty directories, has none.
    """
    directory = Path(directory)
    listing = list(_listing(directory))
    if not listing:
        return []
    manifest = read_manifest(directory)
    if manifest is None or not manifest.get("complete"):
        return sorted(entry.name for entry in directory.iterdir())
    listed = set(manifest.get("files", {})) | {MANIFEST_NAME}
    return sorted(path for path in listing if path not in listed)


def _digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 22):
            hasher.update(chunk)
    return hasher.hexdigest()


def verify_directory(directory: str | Path) -> list[str]:
    """Problems with a directory against its manifest: missing, resized, altered or extra files.

    Checksums are compared where the manifest has them (``atomic_directory(..., checksums=True)``).
    An empty list means the directory is exactly what was written.
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if manifest is None or not manifest.get("complete"):
        return [f"{directory}: no complete {MANIFEST_NAME}"]
    problems = [f"{directory / path}: not written here" for path in foreign_files(directory)]
    for path, entry in manifest.get("files", {}).items():
        file = directory / path
        if not file.is_file():
            problems.append(f"{file}: missing")
        elif file.stat().st_size != entry.get("size"):
            problems.append(f"{file}: {file.stat().st_size} bytes, {entry.get('size')} written")
        elif "sha256" in entry and _digest(file) != entry["sha256"]:
            problems.append(f"{file}: content differs from what was written (sha256)")
    return problems


def _seal(staging: Path, writer: str, checksums: bool, durable: bool) -> None:
    """Write the manifest listing every file of ``staging`` (flushing them to disk if ``durable``)."""
    files: dict[str, dict[str, Any]] = {}
    for relative in sorted(_listing(staging)):
        if relative == MANIFEST_NAME:
            continue
        file = staging / relative
        entry: dict[str, Any] = {"size": file.lstat().st_size}
        if checksums and file.is_file():
            entry["sha256"] = _digest(file)
        if durable and file.is_file() and not file.is_symlink():
            _fsync_file(file)
        files[relative] = entry
    manifest = {"writer": writer, "complete": True, "pid": os.getpid(), "host": _host(), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    write_json(staging / MANIFEST_NAME, manifest, durable)


def remove_owned(directory: str | Path) -> None:
    """Delete a directory written by :func:`atomic_directory`; refuse if it holds anything else."""
    directory = Path(directory)
    foreign = foreign_files(directory)
    if foreign:
        raise OutputError(f"{directory} holds files knots did not write ({_some(foreign)}); not removed")
    shutil.rmtree(directory)


def _some(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


# ---------------------------------------------------------------------------------------- leftovers
def _host() -> str:
    return socket.gethostname()


def _new_leftover(out: Path, kind: str) -> Path:
    """Create ``.<name>.<kind>-<pid>-<token>`` beside ``out`` with a marker naming its owner."""
    path = out.parent / f".{out.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}"
    path.mkdir()
    marker = {"writer": "knots", "complete": False, "kind": kind, "target": out.name, "pid": os.getpid(), "host": _host()}
    (path / MANIFEST_NAME).write_text(json.dumps(marker))
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_leftovers(out: str | Path) -> list[str]:
    """Tidy what interrupted writers of ``out`` left beside it; returns what was done, one phrase each.

    Only directories named ``.<name>.partial-<pid>-<token>`` / ``.<name>.old-<pid>-<token>`` that carry
    this project's manifest (or are empty) are touched. One made by a process of this host that has
    exited is removed, except an ``old`` one (the previous ``out``, moved aside by a replace that was
    stopped halfway), which is put back if ``out`` is missing. A ``partial`` one holding another
    writer's complete result is the previous ``out`` swapped out by a finished replace: removed once
    ``out`` exists. Leftovers of another host are left to it.
    """
    out = Path(out)
    if not out.parent.is_dir():
        return []
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?P<kind>{'|'.join(LEFTOVER_KINDS)})-(?P<pid>\d+)-[0-9a-f]{{8}}$")
    done: list[str] = []
    for entry in sorted(out.parent.iterdir()):
        match = pattern.match(entry.name)
        if match is None or entry.is_symlink() or not entry.is_dir():
            continue
        pid, marker = int(match["pid"]), read_manifest(entry)
        if marker is None and any(entry.iterdir()):
            continue  # not written here
        if marker is None or marker.get("pid") == pid:  # made by the process in its name
            if (marker is not None and marker.get("host") != _host()) or pid == os.getpid() or _alive(pid):
                continue
            if match["kind"] == "old" and not out.exists() and (entry / out.name).is_dir():
                os.rename(entry / out.name, out)
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"restored {out.name} from {entry.name} (process {pid} was stopped while replacing it)")
            else:
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry.name} (left by process {pid}, which has exited)")
        elif match["kind"] == "partial" and marker.get("complete") and out.exists():
            shutil.rmtree(entry, ignore_errors=True)
            done.append(f"removed {entry.name} (the previous {out.name}, set aside by a finished replace)")
    return done


# ------------------------------------------------------------------------------------ output checks
def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _within(path: Path, ancestor: Path) -> bool:
    return path == ancestor or ancestor in path.parents


def check_output_dir(
    out: str | Path,
    overwrite: bool = False,
    *,
    protect: Iterable[str | Path] = (),
    notify: Notify | None = None,
) -> Path:
    """The resolved ``out``, after checking that writing it can lose nothing; raises :class:`OutputError`.

    First tidies leftovers of interrupted writers (:func:`clean_leftovers`, reported through
    ``notify``). Refused: an ``out`` equal to or containing a ``protect`` path (the inputs); an ``out``
    that is a file or lies under one; a directory that cannot be written; an ``out`` holding anything
    this project did not write (even with ``overwrite``); an earlier result without ``overwrite``.
    An ``out`` inside a protected path is allowed when it is new, empty or an earlier result.
    """
    raw = str(out)
    out = Path(out).expanduser().resolve()
    for path in protect:
        guarded = Path(path).expanduser().resolve()
        if out == guarded:
            raise OutputError(f"out={raw} is the input {guarded}; choose another out")
        if _within(guarded, out):
            raise OutputError(f"out={raw} contains the input {guarded}; choose another out")
    existing = _nearest_existing(out)
    if existing != out and not existing.is_dir():
        raise OutputError(f"out={raw} cannot be created: {existing} is a file, not a directory")
    cleaned = clean_leftovers(out)
    if cleaned:
        (notify or log.warning)(f"cleaned up after an interrupted run: {'; '.join(cleaned)}")
    if out.exists() and not out.is_dir():
        raise OutputError(f"out={raw} exists and is not a directory")
    if out.is_dir():
        foreign = foreign_files(out)
        inside = next((Path(p).expanduser().resolve() for p in protect if _within(out, Path(p).expanduser().resolve())), None)
        if foreign:
            where = f" (inside the input {inside})" if inside else ""
            raise OutputError(f"out={raw}{where} holds files knots did not write ({_some(foreign)}); choose another out or move them away")
        if any(out.iterdir()) and not overwrite:
            raise OutputError(f"out={raw} holds an earlier result; pass overwrite=true to replace it")
    writable = out.parent if out.parent.exists() else _nearest_existing(out.parent)
    if not os.access(writable, os.W_OK | os.X_OK):
        raise OutputError(f"out={raw} cannot be written: no write permission in {writable}")
    return out


# ---------------------------------------------------------------------------------------- directory
def _load_exchange() -> Callable[[Path, Path], None] | None:
    """Linux ``renameat2(RENAME_EXCHANGE)``: swap two paths in one step; None where unavailable."""
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2

    def exchange(a: Path, b: Path) -> None:
        if function(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(b))

    return exchange


_exchange = _load_exchange()
_UNSUPPORTED = {errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP}


def _swap(new: Path, out: Path) -> Path:
    """Put ``new`` at ``out``; returns the directory now holding the previous ``out`` (to remove).

    One atomic exchange where supported. Otherwise ``out`` is moved into a marked ``.old-`` directory
    first and moved back if the second rename fails, so that ``out`` is never lost.
    """
    if _exchange is not None:
        try:
            _exchange(new, out)
            return new
        except OSError as error:
            if error.errno not in _UNSUPPORTED:
                raise
    retired = _new_leftover(out, "old")
    os.rename(out, retired / out.name)
    try:
        os.rename(new, out)
    except BaseException:
        try:
            os.rename(retired / out.name, out)
        except OSError:
            raise OutputError(f"could not restore {out}: the previous version is in {retired / out.name}") from None
        shutil.rmtree(retired, ignore_errors=True)
        raise
    return retired


def _commit(staging: Path, out: Path, overwrite: bool, existed: bool, notify: Notify) -> None:
    """Move the complete ``staging`` to ``out`` without replacing anything it must not."""
    try:
        os.rename(staging, out)  # succeeds only if out is absent or an empty directory
        return
    except OSError as error:
        if error.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise OutputError(f"could not move the result to out={out}: {error.strerror}") from None
    if not out.is_dir() or out.is_symlink():
        raise OutputError(f"out={out} was created by another process while this one was writing; it is not a directory and was not replaced")
    if not existed and not overwrite:
        raise OutputError(f"out={out} was created by another process while this one was writing; it was not replaced (pass overwrite=true to replace it)")
    if not overwrite:
        raise OutputError(f"out={out} was filled by another process while this one was writing; it was not replaced (pass overwrite=true to replace it)")
    foreign = foreign_files(out)
    if foreign:
        raise OutputError(f"out={out} was changed by another process while this one was writing (it now holds files knots did not write: {_some(foreign)}); it was not replaced")
    if not existed:
        notify(f"out={out} was created by another process while this one was writing; replaced it (overwrite=true)")
    try:
        previous = _swap(staging, out)
    except OSError as error:
        raise OutputError(f"could not replace out={out} ({error.strerror}); it was left as it was") from None
    shutil.rmtree(previous, ignore_errors=True)


def _make_parents(directory: Path) -> list[Path]:
    """Create ``directory`` and its missing ancestors; returns those created, outermost first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    created = []
    for path in reversed(missing):
        try:
            path.mkdir()
        except FileExistsError:
            continue
        created.append(path)
    return created


def _remove_empty(directories: list[Path]) -> None:
    for path in reversed(directories):
        with contextlib.suppress(OSError):
            path.rmdir()


@contextlib.contextmanager
def atomic_directory(
    out: str | Path,
    overwrite: bool = False,
    *,
    protect: Iterable[str | Path] = (),
    notify: Notify | None = None,
    writer: str = "knots",
    checksums: bool = False,
    durable: bool = True,
) -> Iterator[Path]:
    """Yield an empty staging directory that becomes ``out`` only if the block completes.

    On entry ``out`` is checked (:func:`check_output_dir`) and the staging directory is created, so
    an ``out`` that cannot be written fails before any work. On success a manifest is written
    (``checksums`` adds each file's sha256), then the staging directory is renamed onto ``out``:
    an ``out`` that appeared meanwhile is replaced only with ``overwrite`` (and never if it holds
    files this project did not write). On any exception, Ctrl-C and SIGTERM included (under
    :func:`interrupts_as_exceptions`), the staging directory and any parent directory created for
    ``out`` are removed and ``out`` is left as it was. ``notify`` receives one-line notices.
    """
    notify = notify or log.warning
    out = check_output_dir(out, overwrite, protect=protect, notify=notify)
    existed = out.exists()
    try:
        created = _make_parents(out.parent)
    except OSError as error:
        raise OutputError(f"out={out} cannot be created: {error.strerror}") from None
    try:
        staging = _new_leftover(out, "partial")
    except OSError as error:
        _remove_empty(created)
        raise OutputError(f"out={out} cannot be written: {error.strerror} in {out.parent}") from None
    try:
        yield staging
        with deferred_signals():
            _seal(staging, writer, checksums, durable)
            _commit(staging, out, overwrite, existed, notify)
            if durable:
                _fsync_directory(out.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
