"""What every entry point sets up in JAX before its first computation, and what it reports.

Persistent compilation cache, on by default: each compiled program is written to a cache folder
and a later process that compiles the same program for the same devices reads it back instead
(the demo's sampler: ~20 s -> well under a second). The folder is, in order:
`--compilation_cache_dir=DIR`, `$CID_JAX_COMPILATION_CACHE`, `$XDG_CACHE_HOME/cid_jax/xla`,
`~/.cache/cid_jax/xla`. `--no_compilation_cache` (or `CID_JAX_COMPILATION_CACHE=off`) turns it off.
The cache is safe to delete at any time; JAX keys entries by program, devices, flags and version.

A cache hit still pays for tracing and lowering the program in Python, which for the sampler
(UNet, VAE, CLIP traced through flax) costs seconds on every start. `compile_cached` therefore
also keeps, beside the XLA cache, the traced program itself (`jax.export`'s serialized StableHLO),
keyed by what defines it: the model's description, the argument tree and shapes, cid_jax's source,
the JAX version and the device. A later process deserializes it and compiles it (an XLA cache
hit) without tracing anything.

`CompileStats` (a context manager) counts, through `jax.monitoring`, the programs compiled and
those read from the cache, for the tools' "loaded in / compiled in / sampled in" lines.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import pathlib
from typing import Any, Callable, Optional

from cid_jax import paths

log = logging.getLogger(__name__)

CACHE_ENV = "CID_JAX_COMPILATION_CACHE"
_OFF = ("off", "0", "false", "no", "none")
_cache_path = None  # the folder enable_compilation_cache chose (None: off)


def default_cache_dir() -> Optional[str]:
    """The cache folder the environment chooses, or None when it turns the cache off."""
    env = os.environ.get(CACHE_ENV)
    if env is not None:
        return None if env.strip().lower() in _OFF or not env.strip() else env
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return os.path.join(root, "cid_jax", "xla")


def enable_compilation_cache(cache_dir: Optional[str]):
    """Points JAX's persistent compilation cache at `cache_dir` (None: leaves it off). Every
    program is cached, however fast it compiled, so a repeated command compiles nothing."""
    import jax

    global _cache_path
    _cache_path = None
    if not cache_dir:
        jax.config.update("jax_enable_compilation_cache", False)  # also one JAX_COMPILATION_CACHE_DIR set
        log.info("persistent compilation cache off")
        return None

    path = paths.path(cache_dir)  # local, or gs://: a pod's restarted job then compiles nothing
    try:
        path.mkdir(parents=True, exist_ok=True)
    except Exception as e:  # noqa: BLE001 - OSError locally, the store's own error remotely
        log.warning("compilation cache %s is not writable (%s); compiling without it", path, paths.describe_error(e))
        return enable_compilation_cache(None)
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    log.info("persistent compilation cache: %s", path)
    _cache_path = path
    return path


# ---------------------------------------------------------------------- traced-program cache


@functools.lru_cache(maxsize=1)
def _source_digest() -> str:
    """A digest of cid_jax's own source: any change to the code retires every stored program."""
    root = pathlib.Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _program_key(name: str, signature: str, treedef, leaves) -> str:
    import jax

    device = jax.devices()[0]
    parts = [name, signature, str(treedef), jax.__version__, device.platform, device.device_kind,
             _source_digest(), *(f"{x.shape}{x.dtype}" for x in leaves)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def compile_cached(name: str, fn: Callable, args: tuple, signature: str) -> Callable:
    """`jax.jit(fn).lower(*args).compile()`, callable with arguments of the same tree and shapes;
    with the persistent cache on, the traced program is stored/read too (see the module doc).

    `signature` must describe everything `fn` closes over that shapes its program (the model's
    configuration); arguments on one device only (a sharded caller compiles directly)."""
    import jax

    leaves, treedef = jax.tree.flatten(args)
    if _cache_path is None or any(len(getattr(x, "devices", lambda: ())()) > 1 for x in leaves):
        return jax.jit(fn).lower(*args).compile()
    path = _cache_path / "exported" / f"{name}-{_program_key(name, signature, treedef, leaves)}.bin"
    if path.exists():
        try:
            exported = jax.export.deserialize(bytearray(_checked_payload(path.read_bytes())))
            compiled = jax.jit(exported.call).lower(*leaves).compile()
            return lambda *call_args: compiled(*jax.tree.leaves(call_args))
        except Exception as e:  # noqa: BLE001 (a damaged entry: trace again and replace it)
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            log.warning("stored program %s is unreadable (%s); tracing it again and replacing it", path, reason)

    def flat(*xs):
        return fn(*jax.tree.unflatten(treedef, xs))
    try:
        exported = jax.export.export(jax.jit(flat))(*(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves))
    except Exception as e:  # noqa: BLE001 (e.g. a custom call export does not allow: compile directly)
        log.debug("%s: not stored (%s: %s)", name, type(e).__name__, e)
        return jax.jit(fn).lower(*args).compile()
    try:
        data = exported.serialize()
        paths.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_bytes(hashlib.sha256(data).digest() + data))
    except Exception as e:  # noqa: BLE001 - a full disk, an unreachable bucket: the cache is optional
        log.warning("could not store the traced program in %s (%s)", path, paths.describe_error(e))
    compiled = jax.jit(exported.call).lower(*leaves).compile()
    return lambda *call_args: compiled(*jax.tree.leaves(call_args))


def _checked_payload(stored: bytes) -> bytes:
    """The serialized program of a stored entry (sha256 of the payload, then the payload). A flipped
    byte can leave a program that still deserializes, even one that compiles to other numbers: the
    digest is what tells a damaged entry, whatever the damage."""
    digest, payload = stored[:32], stored[32:]
    if len(stored) <= 32 or hashlib.sha256(payload).digest() != digest:
        raise ValueError("its checksum does not match: damaged or truncated")
    return payload


def cached_shapes(name: str, signature: str, fn: Callable[[], Any]) -> Any:
    """`fn()`, a tree (dicts, lists, tuples) of `jax.ShapeDtypeStruct` (a module's unboxed param
    shapes, which flax can only give by tracing the module), kept beside the compilation cache as
    JSON under a key of `signature` (the module's description) and cid_jax's source: a later process
    reads it back instead of tracing."""
    import jax

    if _cache_path is None:
        return fn()
    key = hashlib.sha256("\n".join([name, signature, jax.__version__, _source_digest()]).encode()).hexdigest()[:32]
    path = _cache_path / "shapes" / f"{name}-{key}.json"
    if path.exists():
        try:
            return _decode_shapes(json.loads(path.read_text()))
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as e:
            log.warning("stored shapes %s are unreadable (%s); tracing again", path, e)
    tree = fn()
    try:
        text = json.dumps(_encode_shapes(tree))
    except TypeError:  # not a plain tree of shapes: nothing to keep
        return tree
    try:
        paths.write_text_atomic(path, text)
    except Exception as e:  # noqa: BLE001 - the cache is optional
        log.warning("could not store shapes in %s (%s)", path, paths.describe_error(e))
    return tree


def _encode_shapes(tree: Any) -> Any:
    import jax
    import numpy as np

    if isinstance(tree, dict):
        return {"dict": {str(k): _encode_shapes(v) for k, v in tree.items()}}
    if isinstance(tree, (list, tuple)):
        return {type(tree).__name__: [_encode_shapes(v) for v in tree]}
    if isinstance(tree, jax.ShapeDtypeStruct):
        return {"shape": list(tree.shape), "dtype": np.dtype(tree.dtype).name}
    raise TypeError(f"not a shape tree leaf: {type(tree).__name__}")


def _decode_shapes(node: Any) -> Any:
    import jax
    import numpy as np

    if "dict" in node:
        return {k: _decode_shapes(v) for k, v in node["dict"].items()}
    if "list" in node or "tuple" in node:
        kind = list if "list" in node else tuple
        return kind(_decode_shapes(v) for v in node.get("list", node.get("tuple")))
    return jax.ShapeDtypeStruct(tuple(node["shape"]), np.dtype(node["dtype"]))


def describe(obj: Any) -> str:
    """A process-independent description of a module definition for `compile_cached`: its repr,
    with the values a function field (a processor plan) closes over spelled out."""
    import inspect

    text = repr(obj)
    for value in _fields(obj):
        if inspect.isfunction(value):
            cells = [_canonical(c.cell_contents) for c in (value.__closure__ or ())]
            text += f"\n{value.__module__}.{value.__qualname__}{value.__defaults__}{cells}"
    return text


def _canonical(value: Any) -> str:
    """repr with sets and dicts in sorted order (a set's order changes with the hash seed)."""
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(_canonical(v) for v in value)) + "}"
    if isinstance(value, dict):
        return "{" + ", ".join(sorted(f"{_canonical(k)}: {_canonical(v)}" for k, v in value.items())) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_canonical(v) for v in value) + "]"
    return repr(value)


def _fields(obj: Any, depth: int = 0):
    """Every attribute value of a (nested) dataclass or flax module, a few levels deep."""
    if depth > 3 or not dataclasses.is_dataclass(obj):
        return
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name, None)
        yield value
        for v in value if isinstance(value, tuple) else (value,):
            yield from _fields(v, depth + 1)


def add_cache_flags(parser) -> None:
    """`--compilation_cache_dir` and `--no_compilation_cache` on an argparse tool."""
    default = default_cache_dir()
    parser.add_argument("--compilation_cache_dir", default=default,
                        help=f"persistent XLA compilation cache folder (default: {default or 'off'}; "
                             f"${CACHE_ENV} sets it, =off disables)")
    parser.add_argument("--no_compilation_cache", action="store_true",
                        help="compile everything afresh, reading and writing no cache")


def cache_from_args(args):
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
