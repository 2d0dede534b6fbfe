"""``knots-merge`` never loses a user's data: typed settings, guarded outputs, atomic replacement,
interruptions and concurrent writers, inputs that cannot be merged as they are."""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import knots.cli.merge as merge_cli

from .helpers import write_peft_adapter

FAULTS = Path(__file__).with_name("faults.py")


@pytest.fixture
def cli(monkeypatch, capsys):
    """``knots-merge`` in this process (its ``main``, exit status and output): fast, and patchable.

    Hydra configures logging for the run (knots-merge's config disables every existing logger); the
    loggers' state is put back afterwards so that later tests still see their records.
    """
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    loggers = [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)]
    state = [(logger, logger.disabled, logger.level) for logger in loggers] + [(logging.root, False, logging.root.level)]
    handlers = list(logging.root.handlers)

    def run(*arguments: str) -> subprocess.CompletedProcess:
        monkeypatch.setattr(sys, "argv", ["knots-merge", *arguments, "progress=false"])
        capsys.readouterr()
        try:
            merge_cli.main()
            status = 0
        except SystemExit as exit:
            status = exit.code
        captured = capsys.readouterr()
        return subprocess.CompletedProcess(arguments, status, captured.out, captured.err)

    yield run
    for logger, disabled, level in state:
        logger.disabled = disabled
        logger.setLevel(level)
    for logger in (logging.getLogger(name) for name in list(logging.root.manager.loggerDict)):
        if logger not in loggers:
            logger.disabled = False
    logging.root.handlers[:] = handlers


@pytest.fixture
def unloaded(monkeypatch):
    """Fails the test if the adapters are read (for errors that must come before any work)."""

    def load(*args, **kwargs):
        raise AssertionError("the adapters were read before the error")

    monkeypatch.setattr(merge_cli, "load_adapter", load)


def knots_merge(*arguments: str, faults: str | None = None, env: dict | None = None, wait: bool = True):
    """``knots-merge`` in a new process, optionally with faults injected (``faults.py``)."""
    environment = {key: value for key, value in os.environ.items() if key != "HYDRA_FULL_ERROR"}
    environment.update(env or {})
    command = [sys.executable, *([str(FAULTS), faults] if faults else ["-m", "knots.cli.merge"]), *arguments, "progress=false"]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment)
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=300)


def one_line_error(done, *fragments: str, status: int = 2) -> str:
    lines = done.stderr.strip().splitlines()
    assert done.returncode == status and len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def method_of(out: Path) -> str:
    return json.loads((out / "merge.json").read_text())["method"]["name"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    for index in range(2):
        write_peft_adapter(root / f"a{index}", seed=index + 1, r=2, alpha=4)
    return root


@pytest.fixture
def inputs(adapters):
    return f"adapters=[{adapters / 'a0'},{adapters / 'a1'}]"


@pytest.fixture(scope="module")
def earlier_result(adapters, tmp_path_factory):
    out = tmp_path_factory.mktemp("earlier") / "out"
    done = knots_merge(f"adapters=[{adapters / 'a0'},{adapters / 'a1'}]", f"out={out}", "method=ta")
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture
def earlier(earlier_result, tmp_path):
    """An ``out`` holding an earlier TA result of knots-merge."""
    shutil.copytree(earlier_result, tmp_path / "out")
    return tmp_path / "out"


def siblings(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name != out.name)


# ----------------------------------------------------------------------------- typed settings
@pytest.mark.parametrize("value", ["no", "'false'", "off", "0"])
def test_overwrite_false_spelled_any_way_keeps_the_earlier_result(cli, inputs, earlier, value):
    done = cli(inputs, f"out={earlier}", f"overwrite={value}", "method=ties")
    one_line_error(done, "pass overwrite=true")
    assert method_of(earlier) == "ta"


@pytest.mark.parametrize(
    "setting, message",
    [
        ("save_delta=maybe", "save_delta must be true or false, got maybe"),
        ("progress=abc", "progress must be true or false, got abc"),
        ("alignment.save=x", "alignment.save must be true or false"),
        ("export_rank=abc", "export_rank must be an integer or null"),
        ("names=abc", "names must be a list or null"),
        ("max_shard_size_mb=abc", "max_shard_size_mb must be a number, got abc"),
        ("method.top_k=abc", "method.top_k must be a number, got abc"),
        ("method.top_k=null", "method.top_k must be a number, got null"),
        ("method.top_k=[1,2]", "method.top_k must be a number"),
        ("method.p=abc", "method.p must be a number, got abc"),
        ("method.seed=abc", "method.seed must be an integer, got abc"),
        ("method.seed=1.5", "method.seed must be an integer, got 1.5"),
        ("method.topk=20", "unknown setting 'method.topk'; did you mean method.top_k?"),
    ],
)
def test_wrongly_typed_setting_fails_on_one_line(cli, unloaded, inputs, tmp_path, setting, message):
    out = tmp_path / "out"
    one_line_error(cli(inputs, f"out={out}", "method=knots_dare_ties", setting), message)
    assert not out.exists() and siblings(out) == []


def test_wrong_type_in_a_new_process_prints_one_line(inputs, tmp_path):
    one_line_error(knots_merge(inputs, f"out={tmp_path / 'out'}", "save_delta=maybe"), "knots-merge: error: save_delta must be true or false")


def test_method_files_may_carry_pipeline_keys(inputs, tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(Path(__file__).resolve().parents[2] / "conf", conf)
    method = conf / "method" / "knots_ties.yaml"
    own = [line for line in method.read_text().splitlines() if not line.startswith(("search:", "repeat:", "ranges:", "_target_:"))]
    method.write_text("\n".join(own) + "\nsearch: [scaling, top_k]\nrepeat: [seed]\nranges: {top_k: [10, 100]}\n_target_: knots.merging.methods.ties\n")
    done = knots_merge(inputs, f"out={tmp_path / 'out'}", env={"KNOTS_CONFIG_DIR": str(conf)})
    assert done.returncode == 0, done.stderr
    assert set(json.loads((tmp_path / "out" / "merge.json").read_text())["hyperparameters"]) == {"scaling", "top_k", "trim_scope", "sign_vote", "merge_func"}


def test_multirun_with_a_wrongly_typed_value_fails_before_any_job(cli, unloaded, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = cli("-m", inputs, f"out={tmp_path}/k${{method.top_k}}", "method.top_k=20,abc,30")
    one_line_error(done, "method.top_k must be a number, got abc", "no job was started")
    assert list(tmp_path.iterdir()) == []


def test_multirun_runs_every_job(cli, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    done = cli("-m", inputs, f"out={tmp_path}/k${{method.top_k}}", "method.top_k=20,30", "hydra.sweep.dir=sweep")
    assert done.returncode == 0, done.stderr
    assert [json.loads((tmp_path / k / "merge.json").read_text())["hyperparameters"]["top_k"] for k in ("k20.0", "k30.0")] == [20, 30]


def test_multirun_job_failing_on_bad_input_lets_the_others_run(cli, inputs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli(inputs, f"out={tmp_path / 'k20.0'}").returncode == 0
    done = cli("-m", inputs, f"out={tmp_path}/k${{method.top_k}}", "method.top_k=20,30,40")
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 2 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("knots-merge: error: job 0: out=") and "holds an earlier result" in lines[0]
    assert "1 job(s) of the sweep failed" in lines[1]
    assert (tmp_path / "k30.0" / "merge.json").exists() and (tmp_path / "k40.0" / "merge.json").exists()


# ------------------------------------------------------------------------------- guarded outputs
@pytest.fixture
def user_tree(adapters, tmp_path):
    """A user's directory: two adapters and an unrelated file beside them."""
    root = tmp_path / "mine"
    shutil.copytree(adapters / "a0", root / "a0")
    shutil.copytree(adapters / "a1", root / "a1")
    (root / "notes.txt").write_text("unrelated")
    return root


def intact(root: Path) -> bool:
    return (root / "notes.txt").exists() and all((root / a / name).is_file() for a in ("a0", "a1") for name in ("adapter_config.json", "adapter_model.safetensors"))


@pytest.mark.parametrize("target, message", [("a0", "is the input"), (".", "contains the input")])
def test_out_that_is_or_contains_an_input_is_refused(cli, unloaded, user_tree, target, message):
    done = cli(f"adapters=[{user_tree / 'a0'},{user_tree / 'a1'}]", f"out={user_tree / target}", "overwrite=true")
    one_line_error(done, message)
    assert intact(user_tree)


def test_out_inside_an_input_only_if_fresh(cli, user_tree):
    arguments = f"adapters=[{user_tree / 'a0'},{user_tree / 'a1'}]"
    fresh = cli(arguments, f"out={user_tree / 'a0' / 'merged'}")
    assert fresh.returncode == 0, fresh.stderr
    again = cli(arguments, f"out={user_tree / 'a0' / 'merged'}", "overwrite=true", "method=ta")
    assert again.returncode == 0 and method_of(user_tree / "a0" / "merged") == "ta", again.stderr
    (user_tree / "a1" / "logs").mkdir()
    (user_tree / "a1" / "logs" / "train.log").write_text("mine")
    done = cli(arguments, f"out={user_tree / 'a1' / 'logs'}", "overwrite=true")
    one_line_error(done, "inside the input", "train.log")
    assert (user_tree / "a1" / "logs" / "train.log").read_text() == "mine" and intact(user_tree)


def test_overwrite_replaces_only_what_knots_wrote(cli, inputs, earlier):
    (earlier / "my_notes.txt").write_text("mine")
    done = cli(inputs, f"out={earlier}", "overwrite=true", "method=ties")
    one_line_error(done, "did not write", "my_notes.txt")
    assert (earlier / "my_notes.txt").read_text() == "mine" and method_of(earlier) == "ta"
    (earlier / "my_notes.txt").unlink()
    done = cli(inputs, f"out={earlier}", "overwrite=true", "method=ties")
    assert done.returncode == 0 and method_of(earlier) == "ties" and siblings(earlier) == [], done.stderr


def test_out_under_a_file_fails_before_the_merge(cli, unloaded, inputs, tmp_path):
    (tmp_path / "file.txt").write_text("x")
    one_line_error(cli(inputs, f"out={tmp_path / 'file.txt' / 'merged'}"), "file.txt is a file")


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody may create entries in (root included, via the immutable attribute)."""
    directory = tmp_path / "read-only"
    directory.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a read-only directory")
    else:
        directory.chmod(0o555)
    yield directory
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(directory)])
    directory.chmod(0o755)


@pytest.mark.parametrize("where", ["out", "out/sub"])
def test_out_in_a_read_only_directory_fails_before_the_merge(cli, unloaded, inputs, read_only_dir, where):
    one_line_error(cli(inputs, f"out={read_only_dir / where}"), "cannot be")
    assert list(read_only_dir.iterdir()) == []


def test_unquoted_path_with_spaces_says_to_quote(cli, adapters, tmp_path):
    spaced = tmp_path / "my adapters"
    shutil.copytree(adapters, spaced)
    done = cli(*f"adapters=[{spaced}/a0,{spaced}/a1]".split(" "), f"out={tmp_path / 'out'}")  # as the shell splits it
    one_line_error(done, "must be quoted")
    quoted = cli(f"adapters=[{spaced}/a0,{spaced}/a1]", f"out={tmp_path / 'my out'}")
    assert quoted.returncode == 0 and (tmp_path / "my out" / "merge.json").exists(), quoted.stderr


# ------------------------------------------------------------------------- concurrent writers
@pytest.mark.parametrize("overwrite", ["false", "true"])
def test_out_appearing_meanwhile_is_not_replaced(cli, inputs, tmp_path, monkeypatch, overwrite):
    out, write = tmp_path / "out", merge_cli.write_merge_outputs

    def another_writer_meanwhile(*args, **kwargs):
        out.mkdir()
        (out / "other.txt").write_text("theirs")
        return write(*args, **kwargs)

    monkeypatch.setattr(merge_cli, "write_merge_outputs", another_writer_meanwhile)
    one_line_error(cli(inputs, f"out={out}", f"overwrite={overwrite}"), "another process", "not replaced")
    assert (out / "other.txt").read_text() == "theirs" and not (out / "merge.json").exists() and siblings(out) == []


def test_two_concurrent_merges_into_one_out(inputs, tmp_path):
    """Both pass the entry check; the first to finish wins, the second says so and leaves it."""
    out, second_writing = tmp_path / "out", tmp_path / "second-writing"
    first = knots_merge(inputs, f"out={out}", "method=ta", faults="wait", env={"FAULT_WAIT": str(second_writing)}, wait=False)
    second = knots_merge(inputs, f"out={out}", "method=ties", faults="wait", env={"FAULT_SIGNAL": str(second_writing), "FAULT_WAIT": str(out / "merge.json")}, wait=False)
    _, first_err = first.communicate(timeout=300)
    _, second_err = second.communicate(timeout=300)
    assert first.returncode == 0, first_err
    one_line_error(subprocess.CompletedProcess([], second.returncode, "", second_err), "created by another process", "not replaced")
    assert method_of(out) == "ta" and siblings(out) == ["second-writing"]


# ------------------------------------------------------------------------ interrupted replaces
@pytest.mark.parametrize("path", ["exchange", "two-rename"])
def test_failed_final_rename_keeps_the_previous_result(cli, inputs, earlier, monkeypatch, path):
    import knots.atomic as atomic

    def io_error(*args):
        raise OSError(errno.EIO, "injected I/O error")

    real_rename = os.rename

    def rename(source, destination):
        if Path(source).name.startswith(".out.partial-") and not Path(destination).exists():
            io_error()
        real_rename(source, destination)

    if path == "exchange":
        if atomic._exchange is None:
            pytest.skip("no renameat2(RENAME_EXCHANGE) on this platform")
        monkeypatch.setattr(atomic, "_exchange", io_error)
    else:
        monkeypatch.setattr(atomic, "_exchange", None)
        monkeypatch.setattr(os, "rename", rename)
    done = cli(inputs, f"out={earlier}", "overwrite=true", "method=ties")
    one_line_error(done, "could not replace", "left as it was")
    assert method_of(earlier) == "ta" and siblings(earlier) == []


def test_crash_between_the_two_renames_is_restored_by_the_next_run(cli, inputs, earlier):
    done = knots_merge(inputs, f"out={earlier}", "overwrite=true", "method=ties", faults="crash-swap,two-rename")
    assert done.returncode == 9 and not earlier.exists()  # the state a killed process leaves
    assert [name.split("-")[0] for name in siblings(earlier)] == [".out.old", ".out.partial"]
    again = cli(inputs, f"out={earlier}", "method=ties")
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 2 and "cleaned up after an interrupted run" in lines[0] and "restored out" in lines[0], again.stderr
    assert again.returncode == 2 and "pass overwrite=true" in lines[1]
    assert method_of(earlier) == "ta" and siblings(earlier) == []


@pytest.mark.parametrize("path", ["exchange", "two-rename"])
def test_crash_after_the_swap_leaves_the_new_result_and_is_tidied(cli, inputs, earlier, path):
    faults = "crash-after" + (",two-rename" if path == "two-rename" else "")
    done = knots_merge(inputs, f"out={earlier}", "overwrite=true", "method=ties", faults=faults)
    assert done.returncode == 9 and method_of(earlier) == "ties" and len(siblings(earlier)) == 1
    again = cli(inputs, f"out={earlier}", "overwrite=true", "method=dare")
    assert again.returncode == 0 and "removed .out." in again.stderr and method_of(earlier) == "dare" and siblings(earlier) == [], again.stderr


def test_leftovers_of_dead_processes_are_cleaned_and_reported(cli, inputs, tmp_path):
    out = tmp_path / "out"
    finished = subprocess.Popen(["true"])
    finished.wait()
    stale = tmp_path / f".out.partial-{finished.pid}-0123abcd"
    stale.mkdir()
    (stale / ".knots-manifest.json").write_text(json.dumps({"complete": False, "pid": finished.pid, "host": socket.gethostname()}))
    (stale / "delta_weights.safetensors").write_bytes(b"half")
    running = tmp_path / f".out.partial-{os.getppid()}-89abcdef"  # a process that is still running
    running.mkdir()
    (running / ".knots-manifest.json").write_text(json.dumps({"complete": False, "pid": os.getppid(), "host": socket.gethostname()}))
    unmarked = tmp_path / f".out.partial-{finished.pid}-fedcba98"  # not written by knots: no manifest
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("mine")
    done = cli(inputs, f"out={out}")
    assert done.returncode == 0, done.stderr
    notices = done.stderr.strip().splitlines()
    assert len(notices) == 1 and f"removed {stale.name}" in notices[0] and "has exited" in notices[0], done.stderr
    assert not stale.exists() and running.exists() and (unmarked / "notes.txt").exists()


@pytest.mark.parametrize("sig, status, name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_sigterm_and_ctrl_c_clean_up_without_a_traceback(inputs, earlier, sig, status, name):
    process = knots_merge(inputs, f"out={earlier}", "overwrite=true", "method=ties", faults="sleep", wait=False)
    assert process.stderr.readline().strip() == "WRITING"
    process.send_signal(sig)
    _, rest = process.communicate(timeout=60)
    one_line_error(subprocess.CompletedProcess([], process.returncode, "", rest), f"interrupted by {name}", status=status)
    assert method_of(earlier) == "ta" and siblings(earlier) == []


# ----------------------------------------------------------------------------------- inputs
def edit_config(directory: Path, **values) -> None:
    config = json.loads((directory / "adapter_config.json").read_text())
    config.update(values)
    (directory / "adapter_config.json").write_text(json.dumps(config))


@pytest.fixture
def second(adapters, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(adapters / "a1", copy)
    return copy


def test_config_rank_disagreeing_with_the_weights_is_refused(cli, adapters, second, tmp_path):
    edit_config(second, r=8)
    done = cli(f"adapters=[{adapters / 'a0'},{second}]", f"out={tmp_path / 'out'}")
    one_line_error(done, "rank 2 in its weights but 8 in adapter_config.json")
    assert siblings(tmp_path / "out") == ["b"]


def test_two_adapters_in_one_file_need_a_choice(cli, adapters, second, tmp_path):
    weights = load_file(str(second / "adapter_model.safetensors"))
    both = {}
    for key, value in weights.items():
        both[key.replace(".weight", ".default.weight")] = value
        both[key.replace(".weight", ".other.weight")] = 2 * value
    save_file(both, str(second / "adapter_model.safetensors"))
    pair = f"adapters=[{adapters / 'a0'},{second}]"
    one_line_error(cli(pair, f"out={tmp_path / 'out'}"), "hold 2 adapters (default, other)", "adapter_name=")
    one_line_error(cli(pair, f"out={tmp_path / 'out'}", "adapter_name=third"), "no adapter named 'third'")
    chosen = {}
    for name in ("default", "other"):
        done = cli(pair, f"out={tmp_path / name}", "method=ta", f"adapter_name={name}")
        assert done.returncode == 0, done.stderr
        chosen[name] = load_file(str(tmp_path / name / "delta_weights.safetensors"))
    assert cli(f"adapters=[{adapters / 'a0'},{adapters / 'a1'}]", f"out={tmp_path / 'plain'}", "method=ta").returncode == 0
    reference = load_file(str(tmp_path / "plain" / "delta_weights.safetensors"))
    assert all(chosen["default"][key].equal(reference[key]) for key in reference)
    assert not any(chosen["other"][key].equal(reference[key]) for key in reference)


def test_different_base_models_warn_naming_both(cli, adapters, second, tmp_path):
    first = tmp_path / "a"
    shutil.copytree(adapters / "a0", first)
    edit_config(first, base_model_name_or_path="org/model-a")
    edit_config(second, base_model_name_or_path="org/model-b")
    done = cli(f"adapters=[{first},{second}]", f"out={tmp_path / 'out'}")
    assert done.returncode == 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "warning" in lines[0] and "a: org/model-a" in lines[0] and "b: org/model-b" in lines[0], done.stderr


@pytest.mark.parametrize(
    "values, message",
    [
        ({"lora_alpha": "x"}, "lora_alpha must be a number, got 'x'"),
        ({"r": "4"}, "r must be a positive integer"),
        ({"use_rslora": "yes"}, "use_rslora must be true or false"),
        ({"alpha_pattern": {"q_proj": "big"}}, "alpha_pattern['q_proj'] must be a number"),
    ],
)
def test_wrongly_typed_adapter_config_fails_on_one_line(cli, adapters, second, tmp_path, values, message):
    edit_config(second, **values)
    one_line_error(cli(f"adapters=[{adapters / 'a0'},{second}]", f"out={tmp_path / 'out'}"), "adapter_config.json", message)
