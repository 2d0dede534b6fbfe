"""Run ``knots-merge`` with faults injected, for the reliability tests.

    python faults.py MODE[,MODE...] override...

Modes:
    sleep         sleep ``FAULT_SLEEP`` seconds (default 60) before writing the outputs
    wait          before writing the outputs, create the file ``FAULT_SIGNAL`` (if set), then wait
                  until the path ``FAULT_WAIT`` exists
    appear        another writer creates ``out`` (with ``other.txt``) while this one writes
    loaded        print ``ADAPTERS LOADED`` when the adapters are read
    two-rename    no atomic exchange: replace ``out`` with two renames
    fail-swap     the step that puts the new result at ``out`` fails with an I/O error
    crash-swap    the process dies (``os._exit``) at that step
    crash-after   the process dies right after it (before the previous version is removed)
"""

from __future__ import annotations

import errno
import os
import sys
import time

import knots.cli.merge as merge

try:
    import knots.atomic as atomic
except ImportError:  # a version without it: nothing to patch there
    atomic = None

modes = set(sys.argv[1].split(","))
sys.argv = ["knots-merge", *sys.argv[2:]]


def out_setting() -> str:
    return next(argument.split("=", 1)[1] for argument in sys.argv if argument.startswith("out="))


def staged(path) -> bool:
    """Whether ``path`` is the staging directory of ``out`` (not a temporary file inside it)."""
    return os.path.basename(str(path)).startswith(f".{os.path.basename(out_setting().rstrip('/'))}.partial-")


real_write = merge.write_merge_outputs


def write(*args, **kwargs):
    if "sleep" in modes:
        print("WRITING", file=sys.stderr, flush=True)
        time.sleep(float(os.environ.get("FAULT_SLEEP", "60")))
    if "wait" in modes:
        if os.environ.get("FAULT_SIGNAL"):
            open(os.environ["FAULT_SIGNAL"], "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(os.environ["FAULT_WAIT"]) and time.monotonic() < deadline:
            time.sleep(0.05)
    if "appear" in modes:
        os.makedirs(out_setting(), exist_ok=True)
        with open(os.path.join(out_setting(), "other.txt"), "w") as handle:
            handle.write("theirs")
    return real_write(*args, **kwargs)


merge.write_merge_outputs = write

if "loaded" in modes:
    real_load = merge.load_adapter

    def load(*args, **kwargs):
        print("ADAPTERS LOADED", file=sys.stderr, flush=True)
        return real_load(*args, **kwargs)

    merge.load_adapter = load

if "two-rename" in modes and atomic is not None:
    atomic._exchange = None


def fault(destination) -> None:
    if "crash-swap" in modes:
        os._exit(9)
    raise OSError(errno.EIO, "injected I/O error", str(destination))


if modes & {"fail-swap", "crash-swap", "crash-after"}:
    real_rename = os.rename

    def rename(source, destination, *args, **kwargs):
        # The step that puts the result in place; a rename onto a non-empty directory fails anyway.
        final = staged(source) and not (os.path.isdir(destination) and os.listdir(destination))
        if final and modes & {"fail-swap", "crash-swap"}:
            fault(destination)
        real_rename(source, destination, *args, **kwargs)
        if final and "crash-after" in modes:
            os._exit(9)

    os.rename = rename
    if atomic is not None and atomic._exchange is not None:
        real_exchange = atomic._exchange

        def exchange(a, b):
            if staged(a) and modes & {"fail-swap", "crash-swap"}:
                fault(b)
            real_exchange(a, b)
            if "crash-after" in modes:
                os._exit(9)

        atomic._exchange = exchange

merge.main()
