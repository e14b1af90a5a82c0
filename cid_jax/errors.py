"""The problems a user can fix, and the exit code each one ends a tool with.

A leaf module (standard library only): every layer raises these — a tokenizer's missing vocabulary
as much as a tool's bad flag — while `cid_jax.cli` presents them (one line, the exit code, no
traceback). Exit codes, the same for every tool:

    0  done
    1  the job ran and failed (`cid_jax.aot`: the step does not fit the chip)
    2  bad input: a flag, config field, file format or photo that cannot work (argparse's own code),
       or a place that cannot be written (read-only, full, already taken)
    3  something named does not exist: a file, folder or weights
    4  the run directory is in use by another training process
"""
from __future__ import annotations

from typing import Optional

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_MISSING = 3
EXIT_BUSY = 4
EXIT_NO_FACE = EXIT_USAGE  # a photo without a usable face is bad input


class UserError(Exception):
    """A problem the user can fix (missing file, bad option): printed without a traceback."""
    code = EXIT_USAGE

    def __init__(self, message: str, code: Optional[int] = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class InputError(UserError, ValueError):
    """A value the user gave (a flag, a config field, a file's content) cannot work."""


class MissingError(UserError, FileNotFoundError):
    """A file, folder or weights that the user named (or a config needs) does not exist."""
    code = EXIT_MISSING

    def __str__(self) -> str:  # FileNotFoundError would format (errno, strerror)
        return str(self.args[0]) if self.args else ""


class BusyError(UserError):
    """The run directory is held by another training process."""
    code = EXIT_BUSY
