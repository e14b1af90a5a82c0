"""What every entry point sets up in JAX before its first computation, and what it reports.

Persistent compilation cache, on by default: each compiled program is written to a cache folder
and a later process that compiles the same program for the same devices reads it back instead
(the demo's sampler: ~20 s -> well under a second). The folder is, in order:
`--compilation_cache_dir=DIR`, `$CID_JAX_COMPILATION_CACHE`, `$XDG_CACHE_HOME/cid_jax/xla`,
`~/.cache/cid_jax/xla`. `--no_compilation_cache` (or `CID_JAX_COMPILATION_CACHE=off`) turns it off.
The cache is safe to delete at any time; JAX keys entries by program, devices, flags and version.

`CompileStats` (a context manager) counts, through `jax.monitoring`, the programs compiled and
those read from the cache, for the tools' "loaded in / compiled in / sampled in" lines.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Optional

log = logging.getLogger(__name__)

CACHE_ENV = "CID_JAX_COMPILATION_CACHE"
_OFF = ("off", "0", "false", "no", "none")


def default_cache_dir() -> Optional[str]:
    """The cache folder the environment chooses, or None when it turns the cache off."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF or not env.strip() else env
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(root, "cid_jax", "xla")


def enable_compilation_cache(cache_dir: Optional[str]) -> Optional[pathlib.Path]:
    """Points JAX's persistent compilation cache at `cache_dir` (None: leaves it off). Every
    program is cached, however fast it compiled, so a repeated command compiles nothing."""
    import jax

    if not cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)  # also one JAX_COMPILATION_CACHE_DIR set
        log.info("persistent compilation cache off")
        return None

    path = pathlib.Path(cache_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        log.warning("compilation cache %s is not writable (%s); compiling without it", path, e.strerror or e)
        return enable_compilation_cache(None)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("persistent compilation cache: %s", path)
    return path


def add_cache_flags(parser) -> None:
    """`--compilation_cache_dir` and `--no_compilation_cache` on an argparse tool."""
    default = default_cache_dir()
    parser.add_argument("--compilation_cache_dir", default=default,
                        help=f"persistent XLA compilation cache folder (default: {default or 'off'}; "
                             f"${CACHE_ENV} sets it, =off disables)")
    parser.add_argument("--no_compilation_cache", action="store_true",
                        help="compile everything afresh, reading and writing no cache")


def cache_from_args(args) -> Optional[pathlib.Path]:
    return enable_compilation_cache(None if args.no_compilation_cache else args.compilation_cache_dir)


def define_absl_cache_flags():
    """The same flags for the absl tools (train, aot); returns (dir flag, on/off flag)."""
    from absl import flags

    directory = flags.DEFINE_string("compilation_cache_dir", default_cache_dir(),
                                    f"Persistent XLA compilation cache folder (${CACHE_ENV} sets it, =off disables).")
    on = flags.DEFINE_bool("compilation_cache", True, "Use the persistent compilation cache "
                                                      "(--nocompilation_cache or --no_compilation_cache: off).")
    return directory, on


def absl_argv(argv):
    """absl spells a false boolean `--noflag`; accept the argparse tools' `--no_compilation_cache` too."""
    return ["--nocompilation_cache" if a in ("--no_compilation_cache", "--no-compilation-cache") else a
            for a in argv]


def seconds_since_process_start() -> float:
    """Wall time since this process started (Linux: from /proc; elsewhere: since this module loaded)."""
    import time

    try:
        ticks = os.sysconf("SC_CLK_TCK")
        start = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / ticks
        uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - start)
    except (OSError, ValueError, IndexError):
        return time.monotonic() - _LOADED


_LOADED = __import__("time").monotonic()


@dataclasses.dataclass
class CompileStats:
    """Programs compiled and programs read from the persistent cache inside a `with` block."""
    requested: int = 0     # compilations asked of XLA (each a cache lookup when the cache is on)
    cache_hits: int = 0
    seconds: float = 0.0   # wall time in compilation (cache reads included)

    @property
    def compiled(self) -> int:
        return self.requested - self.cache_hits

    def _on_event(self, event, **kwargs):
        if event == "/jax/compilation_cache/cache_hits":
            self.cache_hits += 1

    def _on_duration(self, event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            self.requested += 1
            self.seconds += duration

    def __enter__(self) -> "CompileStats":
        import jax

        jax.monitoring.register_event_listener(self._on_event)
        jax.monitoring.register_event_duration_secs_listener(self._on_duration)
        return self

    def __exit__(self, *exc) -> None:
        import jax

        jax.monitoring.unregister_event_listener(self._on_event)
        jax.monitoring.unregister_event_duration_listener(self._on_duration)

    def describe(self) -> str:
        return f"{self.compiled} program(s) compiled, {self.cache_hits} read from the persistent cache"
