"""What every command-line tool shares: presenting user errors, flag spelling, the top-level guard.

The user-error classes and exit codes live in `cid_jax.errors` (re-exported here): a `UserError`
(`InputError` for a value that cannot work, `MissingError` for something that does not exist;
`WeightsError`, `NoFaceFoundError`, ... are subclasses) is a problem the user can fix; the guard
(`entry_point`, `guarded`) prints it as one line naming the fix, with no traceback, and so it does
an OS error (a path that does not exist, cannot be written, a full disk). `--debug` (or
`CID_DEBUG=1`) shows the traceback instead.

Flags are spelled with underscores (`--image_encoder`, as absl's `--config.x.y` must be); every
long flag also answers to its dashed spelling (`--image-encoder`), the older one of some tools.

Standard library only: every layer may import it.
"""
from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import traceback
from typing import Callable, Optional, Sequence

from cid_jax.errors import (EXIT_BUSY, EXIT_FAILED, EXIT_MISSING, EXIT_NO_FACE, EXIT_OK,  # noqa: F401 - re-exported
                            EXIT_USAGE, BusyError, InputError, MissingError, UserError)

# OS errors that mean "the user pointed at the wrong place" (exit 3); any other OSError (read-only
# file system, full disk, a name already taken, a refused connection) is a place that cannot be
# used (exit 2). Both are one line: the user, not the code, has to act.
_MISSING_OS_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


def debug_requested(argv: Optional[Sequence[str]] = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return "--debug" in argv or os.environ.get("CID_DEBUG", "") not in ("", "0")


def report(name: str, error: BaseException) -> int:
    """Prints `error` as one line (plus its lines, for a multi-line message) and returns its exit code."""
    if isinstance(error, UserError):
        code = error.code
    elif isinstance(error, _MISSING_OS_ERRORS):
        code = EXIT_MISSING
    elif isinstance(error, OSError):
        code = EXIT_USAGE
    else:
        code = EXIT_FAILED
    message = str(error) or type(error).__name__
    if isinstance(error, OSError) and not isinstance(error, UserError):
        # an object store's client puts the status and the server's message on separate lines
        message = f"{error.strerror or message}: {error.filename}" if error.filename else " ".join(message.split())
    print(f"{name}: error: {message}", file=sys.stderr)
    if not isinstance(error, UserError):
        print(f"{name}: run again with --debug (or CID_DEBUG=1) for the traceback", file=sys.stderr)
    return code


class Terminated(SystemExit):
    """SIGTERM, raised in the main thread so that `finally` blocks (temporary files) run."""


def _raise_terminated(signum, frame):
    raise Terminated(128 + signum)


def guarded(name: str, fn: Callable[[], int], debug: bool = False, *, sigterm: bool = True) -> int:
    """Runs `fn`; a user error (or an OS error about a path) becomes one line and its exit code.
    Anything else is a bug: its traceback is printed. With `sigterm`, SIGTERM stops `fn` the way
    Ctrl-C does, so nothing half-written is left (training handles SIGTERM itself: preemption)."""
    import signal
    import threading

    previous = None
    if sigterm and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        return fn() or EXIT_OK
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        return 130
    except Terminated as e:
        print(f"{name}: terminated", file=sys.stderr)
        return e.code
    except (UserError, OSError) as e:
        if debug:
            traceback.print_exc()
        return report(name, e)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def entry_point(name: str):
    """Decorates `main(argv=None) -> int` of an argparse tool with the guard; `--debug` is taken
    out of argv here (so the tool's parser never sees it)."""
    def wrap(main: Callable[..., int]):
        @functools.wraps(main)
        def run(argv: Optional[Sequence[str]] = None) -> int:
            argv = list(sys.argv[1:] if argv is None else argv)
            debug = debug_requested(argv)
            argv = [a for a in argv if a != "--debug"]
            return guarded(name, lambda: main(argv), debug)
        return run
    return wrap


def setup_logging(level: int = logging.INFO) -> None:
    """Plain messages on stderr for the argparse tools (absl tools keep absl's format)."""
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help lists each flag once, by its underscored name (the dashed alias is implied)."""

    def _format_action_invocation(self, action):
        longs = [o for o in action.option_strings if o.startswith("--")]
        if len(longs) > 1:
            action = argparse.Action([o for o in action.option_strings if not o.startswith("--")] + longs[:1],
                                     action.dest, nargs=action.nargs, metavar=action.metavar)
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the project's spelling rule: each `--long_flag` also accepts `--long-flag`
    (and a dashed declaration also accepts the underscored one); help lists the underscored one."""

    def __init__(self, *args, description: Optional[str] = None, **kwargs):
        kwargs.setdefault("formatter_class", _HelpFormatter)
        kwargs.setdefault("epilog", "Flags may be written with underscores or dashes (--image_encoder = "
                                    "--image-encoder). --debug shows a traceback on errors.")
        super().__init__(*args, description=description, **kwargs)

    def add_argument(self, *names, **kwargs):
        longs = [n for n in names if n.startswith("--")]
        if not longs:
            return super().add_argument(*names, **kwargs)
        canonical = [n[:2] + n[2:].replace("-", "_") for n in longs]
        dashed = [n[:2] + n[2:].replace("_", "-") for n in canonical]
        spellings = list(dict.fromkeys(canonical + dashed))
        kwargs.setdefault("dest", canonical[0][2:])
        others = [n for n in names if not n.startswith("--")]
        return super().add_argument(*others, *spellings, **kwargs)


# ------------------------------------------------------------------------------ absl tools


def _config_override(argv: Sequence[str], error: BaseException) -> Optional[str]:
    """The `--config.x.y` flag of argv that `error` is about (ml_collections names the missing key
    in quotes), if one can be told."""
    import re

    text = _error_text(error)
    names = set(re.findall(r"'([^'\\]+)'", text)) or {text.strip("\"'")}
    for arg in argv:
        if arg.startswith("--config.") and "=" in arg:
            parts = arg[len("--config."):].split("=", 1)[0].split(".")
            for i, part in enumerate(parts):
                if part in names:
                    return ".".join(parts[:i + 1])
    return None


def _error_text(error: BaseException) -> str:
    """The message of an error, unwrapped from the KeyError ml_collections wraps in AttributeError."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if error.args else str(error)


def _dotted_fields(config, prefix: str = "") -> list[str]:
    """Every leaf field of a nested config (anything with .keys()) as a dotted path."""
    out = []
    for k in config.keys():
        v = config[k]
        out += _dotted_fields(v, f"{prefix}{k}.") if hasattr(v, "keys") and not isinstance(v, str) else [prefix + k]
    return out


def _did_you_mean(argv: Sequence[str], bad_path: str) -> str:
    """' (did you mean x.y?)' from the config file named by --config, or ''."""
    import difflib
    import importlib.util

    config_file = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if not config_file:
        return ""
    try:
        spec = importlib.util.spec_from_file_location("_cid_config", config_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        fields = _dotted_fields(module.get_config())
    except Exception:  # noqa: BLE001 - a hint only
        return ""
    depth = bad_path.count(".")
    candidates = sorted({".".join(f.split(".")[:depth + 1]) for f in fields if f.count(".") >= depth})
    close = difflib.get_close_matches(bad_path, candidates, n=1, cutoff=0.6)
    return f" (did you mean --config.{close[0]}?)" if close else ""


def absl_flags_parser(name: str):
    """A `flags_parser` for `absl.app.run`: a flag or config-override mistake becomes one line
    naming the fix (and the nearest valid config field), exit status 2."""
    def parse(argv):
        from absl import flags

        try:
            rest = flags.FLAGS(argv)
            for config_flag in ("config",):  # ml_collections reports a bad config file on first use
                if config_flag in flags.FLAGS and flags.FLAGS[config_flag].value is not None:
                    _ = flags.FLAGS[config_flag].value["seed"]
            return rest
        except flags.Error as e:
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            message = "; ".join(lines) if lines else type(e).__name__
        except (AttributeError, KeyError) as e:  # ml_collections: an override of a field that does not exist
            path = _config_override(argv, e) or _error_text(e).splitlines()[0].strip("\"'")
            message = f"--config.{path}: the config has no such field{_did_you_mean(argv, path)}"
        except (ValueError, TypeError, OSError) as e:  # the config file itself, or an override's value
            lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
            message = lines[-1] if lines else type(e).__name__
            if "failure to load" in str(e):
                message = f"cannot load the --config file: {message}"
        print(f"{name}: error: {message}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    return parse
