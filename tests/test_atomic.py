"""The atomic writer: complete or absent, never a half; replaces only what it wrote; survives being
interrupted, racing another writer, and a failing rename."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import knots.atomic as atomic
from knots.atomic import (
    MANIFEST_NAME,
    Interrupted,
    atomic_directory,
    atomic_path,
    check_output_dir,
    clean_leftovers,
    deferred_signals,
    foreign_files,
    remove_owned,
    save_safetensors,
    verify_directory,
    write_bytes,
    write_json,
    write_text,
)
from knots.errors import OutputError


def write_result(out: Path, text: str, **kwargs) -> None:
    with atomic_directory(out, **kwargs) as staging:
        (staging / "result.txt").write_text(text)
        (staging / "sub").mkdir()
        (staging / "sub" / "part.bin").write_bytes(b"\x00" * 10)


def beside(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name != out.name)


@pytest.fixture(params=["exchange", "two-rename"])
def swap_path(request, monkeypatch):
    """Run a test with the one-step exchange (where the platform has it) and with two renames."""
    if request.param == "two-rename":
        monkeypatch.setattr(atomic, "_exchange", None)
    elif atomic._exchange is None:
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform")
    return request.param


def test_commit_writes_a_manifest_of_every_file(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    write_result(out, "one", checksums=True, writer="test")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] and manifest["writer"] == "test"
    assert set(manifest["files"]) == {"result.txt", "sub/part.bin"} and manifest["files"]["sub/part.bin"]["size"] == 10
    assert verify_directory(out) == [] and foreign_files(out) == [] and beside(out) == []


def test_verify_directory_finds_altered_missing_and_extra_files(tmp_path):
    out = tmp_path / "out"
    write_result(out, "one", checksums=True)
    (out / "result.txt").write_text("two")  # same size, other content
    (out / "sub" / "part.bin").unlink()
    (out / "extra.txt").write_text("x")
    problems = " | ".join(verify_directory(out))
    assert "result.txt: content differs" in problems and "part.bin: missing" in problems and "extra.txt: not written here" in problems


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), Interrupted(signal.SIGTERM)])
def test_failure_inside_the_block_leaves_nothing(tmp_path, error):
    out = tmp_path / "new" / "deeper" / "out"
    with pytest.raises(type(error)):
        with atomic_directory(out) as staging:
            (staging / "half.txt").write_text("half")
            raise error
    assert not (tmp_path / "new").exists()  # the parents created for out are removed too


def test_earlier_result_needs_overwrite(tmp_path, swap_path):
    out = tmp_path / "out"
    write_result(out, "one")
    with pytest.raises(OutputError, match="pass overwrite=true"):
        write_result(out, "two")
    write_result(out, "two", overwrite=True)
    assert (out / "result.txt").read_text() == "two" and beside(out) == []


@pytest.mark.parametrize("overwrite", [False, True])
def test_foreign_files_are_never_replaced(tmp_path, overwrite):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("mine")
    with pytest.raises(OutputError, match=r"did not write \(mine.txt\)"):
        write_result(out, "one", overwrite=overwrite)
    assert (out / "mine.txt").read_text() == "mine" and beside(out) == []


def test_empty_out_is_used(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    write_result(out, "one")
    assert (out / "result.txt").read_text() == "one"


def test_protected_paths(tmp_path):
    inputs = tmp_path / "inputs"
    (inputs / "a").mkdir(parents=True)
    (inputs / "a" / "weights").write_text("w")
    for out, message in ((inputs / "a", "is the input"), (inputs, "contains the input"), (tmp_path, "contains the input")):
        with pytest.raises(OutputError, match=message):
            check_output_dir(out, overwrite=True, protect=[inputs / "a"])
    assert check_output_dir(inputs / "a" / "merged", protect=[inputs / "a"]) == (inputs / "a" / "merged").resolve()
    (inputs / "a" / "logs").mkdir()
    (inputs / "a" / "logs" / "log.txt").write_text("l")
    with pytest.raises(OutputError, match="inside the input"):
        check_output_dir(inputs / "a" / "logs", overwrite=True, protect=[inputs / "a"])


def test_symlinked_out_resolving_to_an_input_is_refused(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "adapter")
    with pytest.raises(OutputError, match="is the input"):
        check_output_dir(tmp_path / "link", overwrite=True, protect=[tmp_path / "adapter"])


def test_out_under_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a directory"):
        check_output_dir(tmp_path / "file" / "a" / "out")
    with pytest.raises(OutputError, match="exists and is not a directory"):
        check_output_dir(tmp_path / "file")


def test_unwritable_parent_fails_on_entry(tmp_path, monkeypatch):
    """Where permissions do not stop this user (root), creating the staging directory does."""
    out = tmp_path / "out"
    real_mkdir = Path.mkdir

    def read_only(self, *args, **kwargs):
        if self.parent == tmp_path:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only)
    entered = False
    with pytest.raises(OutputError, match="cannot be written: Read-only file system"):
        with atomic_directory(out):
            entered = True
    assert not entered


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_appearing_meanwhile_with_foreign_files_is_kept(tmp_path, overwrite):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="another process"):
        with atomic_directory(out, overwrite=overwrite) as staging:
            (staging / "result.txt").write_text("mine")
            out.mkdir()
            (out / "theirs.txt").write_text("theirs")
    assert (out / "theirs.txt").read_text() == "theirs" and beside(out) == []


def test_result_appearing_meanwhile_is_replaced_only_with_overwrite(tmp_path, swap_path):
    out = tmp_path / "out"
    with pytest.raises(OutputError, match="created by another process"):
        with atomic_directory(out) as staging:
            (staging / "result.txt").write_text("mine")
            write_result(out, "theirs")
    assert (out / "result.txt").read_text() == "theirs"
    out_2 = tmp_path / "out2"
    notices = []
    with atomic_directory(out_2, overwrite=True, notify=notices.append) as staging:
        (staging / "result.txt").write_text("mine")
        write_result(out_2, "theirs")
    assert (out_2 / "result.txt").read_text() == "mine" and beside(out_2) == ["out"]
    assert len(notices) == 1 and "created by another process" in notices[0]


def test_failed_swap_rolls_back(tmp_path, monkeypatch, swap_path):
    out = tmp_path / "out"
    write_result(out, "one")
    real_rename = os.rename

    def failing(source, destination):
        if Path(source).name.startswith(".out.partial-") and not (Path(destination).is_dir() and any(Path(destination).iterdir())):
            raise OSError(errno.EIO, "injected", str(destination))
        real_rename(source, destination)

    def failing_exchange(a, b):
        raise OSError(errno.EIO, "injected", str(b))

    monkeypatch.setattr(os, "rename", failing)
    if swap_path == "exchange":
        monkeypatch.setattr(atomic, "_exchange", failing_exchange)
    with pytest.raises(OutputError, match="could not replace .* left as it was"):
        write_result(out, "two", overwrite=True)
    assert (out / "result.txt").read_text() == "one" and beside(out) == []


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys
    import knots.atomic as atomic
    out, when = sys.argv[1], sys.argv[2]
    atomic._exchange = None if "two-rename" in when else atomic._exchange
    real = os.rename
    def rename(source, destination):
        final = os.path.basename(str(source)).startswith(".out.partial-") and not os.path.isdir(destination)
        if final and "before" in when:
            os._exit(9)
        real(source, destination)
        if final and "after" in when:
            os._exit(9)
    os.rename = rename
    if atomic._exchange is not None:
        real_exchange = atomic._exchange
        def exchange(a, b):
            real_exchange(a, b)
            os._exit(9)
        atomic._exchange = exchange
    with atomic.atomic_directory(out, overwrite=True) as staging:
        (staging / "result.txt").write_text("two")
    """
)


def killed_writer(out: Path, when: str) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out), when], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr


def test_process_killed_between_the_two_renames_is_restored(tmp_path):
    out = tmp_path / "out"
    write_result(out, "one")
    killed_writer(out, "two-rename,before")
    assert not out.exists() and len(beside(out)) == 2  # what a killed replace leaves
    done = clean_leftovers(out)
    assert (out / "result.txt").read_text() == "one" and beside(out) == []
    assert len(done) == 2 and any(line.startswith("restored out from .out.old-") for line in done)


@pytest.mark.parametrize("when", ["exchange,after", "two-rename,after"])
def test_process_killed_after_the_swap_keeps_the_new_result(tmp_path, when):
    out = tmp_path / "out"
    write_result(out, "one")
    killed_writer(out, when)
    assert (out / "result.txt").read_text() == "two" and len(beside(out)) == 1
    assert len(clean_leftovers(out)) == 1 and beside(out) == [] and (out / "result.txt").read_text() == "two"


def make_leftover(out: Path, kind: str, pid: int, host: str | None = None, marker: bool = True) -> Path:
    path = out.parent / f".{out.name}.{kind}-{pid}-0123abcd"
    path.mkdir()
    if marker:
        (path / MANIFEST_NAME).write_text(json.dumps({"complete": False, "pid": pid, "host": host or socket.gethostname()}))
    (path / "data").write_text("half")
    return path


def test_only_leftovers_of_exited_processes_of_this_host_are_removed(tmp_path):
    out = tmp_path / "out"
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = make_leftover(out, "partial", finished.pid)
    alive = make_leftover(out, "old", os.getppid())
    elsewhere = make_leftover(tmp_path / "out", "old", finished.pid + 1, host="another-node")
    unmarked = make_leftover(tmp_path / "other", "partial", finished.pid, marker=False)
    assert clean_leftovers(out) == [f"removed {dead.name} (left by process {finished.pid}, which has exited)"]
    assert not dead.exists() and alive.exists() and elsewhere.exists() and unmarked.exists()
    notices = []
    check_output_dir(tmp_path / "other", notify=notices.append)
    assert notices == [] and unmarked.exists()


def test_remove_owned_refuses_foreign_files(tmp_path):
    out = tmp_path / "out"
    write_result(out, "one")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="notes.txt"):
        remove_owned(out)
    (out / "notes.txt").unlink()
    remove_owned(out)
    assert not out.exists()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x").write_text("x")
    with pytest.raises(OutputError):
        remove_owned(plain)


def test_deferred_signals_arrive_after_the_block():
    reached = []
    with pytest.raises(Interrupted) as caught:
        with atomic.interrupts_as_exceptions():
            with deferred_signals():
                os.kill(os.getpid(), signal.SIGTERM)
                reached.append("end of block")
    assert reached == ["end of block"] and caught.value.exit_status == 143


def test_single_file_writes(tmp_path):
    write_text(tmp_path / "a" / "t.txt", "text")
    write_json(tmp_path / "j.json", {"x": 1})
    write_bytes(tmp_path / "b.bin", b"\x01\x02")
    save_safetensors(tmp_path / "w.safetensors", {"w": torch.ones(2, 3)}, metadata={"k": "v"})
    from safetensors import safe_open

    with safe_open(str(tmp_path / "w.safetensors"), "pt") as handle:
        assert handle.metadata() == {"k": "v"} and handle.get_tensor("w").equal(torch.ones(2, 3))
    assert (tmp_path / "a" / "t.txt").read_text() == "text" and json.loads((tmp_path / "j.json").read_text()) == {"x": 1}
    assert (tmp_path / "b.bin").read_bytes() == b"\x01\x02"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b.bin", "j.json", "w.safetensors"]


def test_failed_single_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "results.json"
    write_json(target, {"old": True})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as temporary:
            temporary.write_text('{"new": ')
            raise RuntimeError("crash while writing")
    assert json.loads(target.read_text()) == {"old": True} and [p.name for p in tmp_path.iterdir()] == ["results.json"]
