"""Shared command-line behaviour: one-line errors, no traceback unless ``HYDRA_FULL_ERROR=1``."""

from __future__ import annotations

import functools
import os
import sys
from typing import Callable, NoReturn, TypeVar

from omegaconf.errors import OmegaConfBaseException

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
            except (KnotsError, OmegaConfBaseException) as error:
                if full_errors():
                    raise
                fail(program, str(error))

        return wrapper

    return decorator
