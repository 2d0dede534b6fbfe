"""Shared command-line behaviour: one line per user error, exit status 2, no traceback.

Every problem with the user's input (a setting, a file, an output location) is reported as
``<program>: error: <one line>`` with exit status 2; ``HYDRA_FULL_ERROR=1`` shows the traceback
instead. Ctrl-C and SIGTERM clean up (outputs are atomic, :mod:`knots.atomic`) and end with one line
and status 130 / 143. In a Hydra multirun a failing job is reported on one line and the sweep goes on;
the command then ends with one more line counting the failed jobs (status 2), or, for programs whose
jobs may run in other processes (Hydra launchers such as submitit's), the failure is raised to the
launcher so that it marks the job failed, and Hydra ends the sweep with it (status 1).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import itertools
import logging
import os
import re
import sys
import typing
from typing import Any, Callable, Iterator, NoReturn, TypeVar

from hydra.errors import CompactHydraException
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, MissingMandatoryValue, OmegaConfBaseException

from knots.atomic import Interrupted, interrupts_as_exceptions
from knots.errors import KnotsError

T = TypeVar("T")
MULTIRUN_FLAGS = ("-m", "--multirun")
#: A multirun is composed job by job before it starts; above this many jobs, value by value.
MAX_JOBS_COMPOSED = 64


#: One line per job of the current multirun that failed on a user error (reported as it happened).
FAILED_JOBS: list[str] = []


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def one_line(message: object) -> str:
    return " ".join(str(message).split())


def fail(program: str, message: object, status: int = 2) -> NoReturn:
    """Print ``program: error: message`` on one line and exit."""
    print(f"{program}: error: {one_line(message)}", file=sys.stderr)
    sys.exit(status)


def warn(program: str, message: object) -> None:
    """Print ``program: warning: message`` on one line."""
    print(f"{program}: warning: {one_line(message)}", file=sys.stderr, flush=True)


def notifier(program: str) -> Callable[[str], None]:
    """A ``notify`` callback for :mod:`knots.atomic` that prints ``program: message`` on one line."""
    return lambda message: print(f"{program}: {one_line(message)}", file=sys.stderr, flush=True)


def _multirun_job() -> int | None:
    """The number of the running job of a Hydra multirun; None outside one."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return int(HydraConfig.get().job.num)


# ---------------------------------------------------------------------------------- config errors
def _expected(hint: Any) -> str:
    """How a type hint reads in an error message: ``an integer``, ``a list``, ``true or false``..."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union:
        kinds = [_expected(arg) for arg in args if arg is not type(None)]
        return " or ".join(kinds) + (" or null" if type(None) in args else "")
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", list: "a list", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _field_type(owner: Any, key: Any) -> Any:
    if not (isinstance(owner, type) and dataclasses.is_dataclass(owner)):
        return None
    try:
        return typing.get_type_hints(owner).get(str(key))
    except Exception:  # unresolved forward references: no hint, a plainer message
        return None


def _chain(error: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def describe_config_error(error: BaseException) -> str:
    """One line naming the setting and the problem, for errors raised while composing a config."""
    override = next((m[1] for e in _chain(error) if (m := re.match(r"Error merging override (\S+)", str(e)))), None)
    for cause in _chain(error):
        if not isinstance(cause, OmegaConfBaseException) or not getattr(cause, "full_key", None):
            continue
        key, first = cause.full_key, str(cause).splitlines()[0]
        if isinstance(cause, MissingMandatoryValue):
            return f"missing required setting {key!r} (set it on the command line, e.g. {key}=...)"
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)):
            owner = getattr(cause, "object_type", None)
            known = [f.name for f in dataclasses.fields(owner)] if isinstance(owner, type) and dataclasses.is_dataclass(owner) else []
            close = difflib.get_close_matches(str(cause.key), known, n=1)
            prefix = key.rsplit(".", 1)[0] + "." if "." in key else ""
            return f"unknown setting {key!r}" + (f"; did you mean {prefix}{close[0]}?" if close else "")
        hint = _field_type(getattr(cause, "object_type", None), getattr(cause, "key", None))
        value = re.match(r"Value '(.*)' (?:of type|is not)", first)
        got = value[1] if value else (override.split("=", 1)[1] if override and "=" in override else None)
        if "is not Optional" in first:
            got = "null"
        if hint is not None:
            return f"{key} must be {_expected(hint)}, got {got}" if got is not None else f"{key} must be {_expected(hint)}"
        return f"{key}: {first}"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " ".join(lines[:3]) or error.__class__.__name__


# ---------------------------------------------------------------------------------- entry points
class JobFailed(CompactHydraException):
    """A job of a multirun that failed on a user error (already reported on one line).

    Hydra's launchers record it as the job's result and its sweeper raises it once every job of the
    batch has run; being compact, Hydra prints its one-line message, without a traceback.
    """


def _log_to_files(message: str) -> None:
    """Write ``message`` to the log files open in this process (a sweep job's ``<job>.log``), so that
    the job's own log says why it failed; the console already has the line."""
    record = logging.LogRecord("knots", logging.ERROR, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def one_line_errors(program: str, raise_in_sweep: bool = False) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn user errors raised by the wrapped function into one line and exit status 2.

    In a Hydra multirun the job prints its line and the other jobs still run: the job returns None and
    :func:`run_cli` ends with status 2 (see :data:`FAILED_JOBS`), or, with ``raise_in_sweep``, the job
    raises :class:`JobFailed`, which reaches launchers that run jobs in other processes.
    """

    def decorator(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> T:
            try:
                return function(*args, **kwargs)
            except (KnotsError, OmegaConfBaseException) as error:
                if full_errors():
                    raise
                message = str(error) if isinstance(error, KnotsError) else describe_config_error(error)
                job = _multirun_job()
                if job is None:
                    fail(program, message)
                FAILED_JOBS.append(f"job {job}: {one_line(message)}")
                print(f"{program}: error: {FAILED_JOBS[-1]}", file=sys.stderr, flush=True)
                _log_to_files(f"{program}: error: {one_line(message)}")
                if raise_in_sweep:
                    raise JobFailed(f"{program}: error: {one_line(message)} (job {job} of the sweep)") from None
                return None  # type: ignore[return-value]

        return wrapper

    return decorator


def run_cli(program: str, main: Callable[[], None]) -> None:
    """Run ``main`` with SIGTERM handled like Ctrl-C, user errors on one line, interrupts on one line."""
    FAILED_JOBS.clear()
    try:
        with interrupts_as_exceptions():
            main()
        if FAILED_JOBS:
            fail(program, f"{len(FAILED_JOBS)} job(s) of the sweep failed (listed above); the others finished")
    except KnotsError as error:
        if full_errors():
            raise
        fail(program, error)
    except KeyboardInterrupt as error:
        if full_errors():
            raise
        signum = error.signum if isinstance(error, Interrupted) else 2
        name = "SIGTERM" if signum == 15 else "Ctrl-C" if signum == 2 else f"signal {signum}"
        fail(program, f"interrupted by {name}; partial outputs were removed", 128 + signum)


def _split_flags(argv: list[str]) -> tuple[list[str], bool] | None:
    """The overrides of ``argv`` and whether it asks for a multirun; None for other Hydra flags."""
    multirun = any(argument in MULTIRUN_FLAGS for argument in argv)
    overrides = [argument for argument in argv if argument not in MULTIRUN_FLAGS]
    if any(argument.startswith("-") for argument in overrides):
        return None
    return overrides, multirun


def check_arguments(argv: list[str], example: str = "'out=my dir/merged' or 'adapters=[\"my dir/a\",\"my dir/b\"]'") -> str | None:
    """The problem with an argument that is no ``key=value`` override (often an unquoted space).

    The message quotes the setting it probably belongs to (the argument before it), else ``example``.
    """
    for i, argument in enumerate(argv):
        if argument.startswith("~") or "=" in argument:
            continue
        previous = argv[i - 1] if i > 0 and "=" in argv[i - 1] else None
        quoted = f"'{previous} {argument}'" if previous else example
        return f"argument {argument!r} is not a key=value setting; a path with spaces must be quoted, e.g. {quoted}"
    return None


def _jobs(overrides: list[str]) -> list[list[str]]:
    """The override lists of a multirun's jobs (every job up to a cap, else each swept value once)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    choices = []
    for override in parsed:
        key = override.get_key_element()
        if override.is_sweep_override() and override.is_discrete_sweep():
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        elif override.is_sweep_override():
            return [overrides]  # range/interval sweeps belong to sweeper plugins: Hydra checks them
        else:
            choices.append([override.input_line or f"{key}={override.get_value_element_as_str()}"])
    total = 1
    for values in choices:
        total *= len(values)
    if total <= MAX_JOBS_COMPOSED:
        return [list(job) for job in itertools.product(*choices)]
    first = [values[0] for values in choices]
    return [first[:i] + [value] + first[i + 1:] for i, values in enumerate(choices) for value in values]


def check_composition(program: str, config_dir: str, config_name: str, argv: list[str], register: Callable[[], None] | None = None) -> None:
    """Compose the config with the command-line overrides first, failing on one line if they are bad.

    Hydra reports bad overrides over several lines; composing first keeps every error to one line.
    With ``-m`` every job of the sweep is composed before any starts, so a wrongly typed value fails
    the sweep at once instead of halfway. Other Hydra flags (``--help``, ``--cfg``...) go straight
    to Hydra. ``register`` stores the config schemas (Hydra's ConfigStore) before composing.
    """
    split = _split_flags(argv)
    if split is None:
        return
    overrides, multirun = split
    problem = check_arguments(overrides)
    if problem:
        fail(program, problem)
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if register is not None:
        register()
    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name=program):
            for job in _jobs(overrides) if multirun else [overrides]:
                compose(config_name=config_name, overrides=job)
    except Exception as error:  # Hydra raises several types for bad overrides
        if full_errors():
            raise
        where = " (in a job of the -m sweep; no job was started)" if multirun else ""
        fail(program, describe_config_error(error) + where)
    finally:
        GlobalHydra.instance().clear()
