"""Shared command-line behaviour: one-line errors, no traceback unless ``HYDRA_FULL_ERROR=1``."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, NoReturn, TypeVar

from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from knots.errors import KnotsError

T = TypeVar("T")


def full_errors() -> bool:
    return os.environ.get("HYDRA_FULL_ERROR") == "1"


def fail(program: str, message: str, status: int = 2) -> NoReturn:
    """Print ``program: error: message`` on one line and exit."""
    first_line = " ".join(str(message).split())
    print(f"{program}: error: {first_line}", file=sys.stderr)
    sys.exit(status)


def one_line_errors(program: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn user errors raised by the wrapped function into a one-line message and exit status 2."""

    def decorator(function: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(function)
        def wrapper(*args, **kwargs) -> T:
            try:
                return function(*args, **kwargs)
            except MissingMandatoryValue as error:
                if full_errors():
                    raise
                fail(program, f"missing required setting {error.full_key!r} (set it on the command line, e.g. {error.full_key}=...)")
            except (KnotsError, OmegaConfBaseException) as error:
                if full_errors():
                    raise
                fail(program, str(error))

        return wrapper

    return decorator


def check_composition(program: str, config_dir: str, config_name: str, argv: list[str]) -> None:
    """Compose the config once with the command-line overrides, failing on one line if they are bad.

    Hydra reports bad overrides over several lines; composing first keeps every error to one line.
    Runs only for plain override lists (flags such as ``--help`` or ``-m`` go straight to Hydra).
    """
    if any(argument.startswith("-") for argument in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    try:
        with initialize_config_dir(config_dir=config_dir, version_base="1.3", job_name=program):
            compose(config_name=config_name, overrides=argv)
    except Exception as error:  # Hydra raises several types for bad overrides
        if full_errors():
            raise
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        fail(program, " ".join(lines[:3]) or error.__class__.__name__)
    finally:
        GlobalHydra.instance().clear()
