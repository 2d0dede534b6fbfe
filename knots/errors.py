"""User-facing errors: one line that names the problem, no traceback unless asked for."""

from __future__ import annotations


class KnotsError(Exception):
    """An error caused by the user's input (a file, a config value, a name).

    Command-line entry points print ``str(error)`` on one line and exit with status 2.
    """


class ConfigError(KnotsError):
    """A configuration value that is unknown, out of range or inconsistent."""


class AdapterError(KnotsError):
    """An adapter directory that is missing, unreadable, corrupt or incompatible."""


class OutputError(KnotsError):
    """An output location that cannot be written without losing data or clashing with another writer."""
