"""Every path a user gives or a run writes, local or on an object store (`gs://`, `s3://`).

One layer: etils `epath` (pathlib's interface over local files, and over object stores through
fsspec: gcsfs for `gs://`, s3fs for `s3://` where installed). cid_jax never puts a user path
through `pathlib`, which folds `gs://b/x` into a local folder `gs:/b/x`.

epath would pick TensorFlow's own GCS filesystem when TensorFlow is installed; cid_jax asks for
fsspec's instead (`EPATH_USE_TF=false`, set in `cid_jax/__init__.py` unless the user set it): one
client for the run directory, the dataset and the weights, one that honours the standard
`STORAGE_EMULATOR_HOST` (TensorFlow's ignores it) and Application Default Credentials on a pod.
Orbax writes checkpoints through tensorstore, which has its own GCS driver
(`TENSORSTORE_GCS_HTTP_URL` points it at an emulator).

What a format needs as a local file (safetensors memory maps, torch.load, a tokenizer folder, ONNX)
comes through `local_copy`: downloaded into a cache once per version of the remote content, with a
progress bar.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import pathlib
import shutil
import tempfile
from typing import Callable, Iterator, Union

from etils import epath

log = logging.getLogger(__name__)


def _no_stale_listings() -> None:
    """fsspec keeps directory listings of object stores by default; the hosts of a run write into
    the same folders (checkpoints), and a stale listing would hide a step another host committed."""
    import fsspec.config

    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {}).setdefault("use_listings_cache", False)


_no_stale_listings()

REMOTE_SCHEMES = ("gs://", "s3://")
PathLike = Union[str, os.PathLike]
_CHUNK = 16 << 20


def is_remote(p: PathLike) -> bool:
    return os.fspath(p).startswith(REMOTE_SCHEMES)


def describe_error(error: BaseException) -> str:
    """One line for a storage error, whichever client raised it (OSError's strerror, an HTTP status
    and message from gcsfs / google-cloud-storage, else the first line of the message)."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror + (f": {error.filename}" if error.filename else "")
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def path(p: PathLike) -> epath.Path:
    """A user's path as an epath.Path: `~` expanded for a local one, a URL kept whole."""
    text = os.fspath(p)
    return epath.Path(text if is_remote(text) else os.path.expanduser(text))


def check_writable(folder: PathLike, flag: str) -> None:
    """`folder` can be created and written: tried (a probe file written and removed), not inferred
    from permission bits, which root ignores, or from a bucket's policy. Tools call it before their
    work, so a read-only disk or an unknown bucket is one line naming `flag`, not work lost after."""
    import uuid

    from cid_jax import errors

    folder = path(folder)
    probe = folder / f".write-test-{uuid.uuid4().hex}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except Exception as e:  # noqa: BLE001 - OSError locally; each object store client has its own
        raise errors.InputError(f"{flag}={folder} cannot be written ({describe_error(e)}); pick a place you "
                                "can write to") from None


@contextlib.contextmanager
def reading(flag: str, value: PathLike) -> Iterator[None]:
    """A store's refusal while reading a user's path (a 403, an unreachable endpoint, a local
    permission) becomes one line naming the flag and the path; user errors pass as they are."""
    from cid_jax import errors

    try:
        yield
    except errors.UserError:
        raise
    except OSError as e:
        raise errors.InputError(f"{flag}={value} cannot be read ({describe_error(e)})") from None


def copy_file(src: PathLike, dst: PathLike) -> None:
    """Streams one file between any two places (local or remote), without holding it in memory."""
    src, dst = path(src), path(dst)
    with src.open("rb") as fin, dst.open("wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)


def write_atomic(target: PathLike, write: Callable[[str], None]) -> None:
    """`write(local_tmp)` then the file appears whole at `target`, or not at all: a local rename,
    or one upload (an object store publishes an object only when its upload completes).

    Locally the temporary file sits beside the target and one a killed process left behind is
    removed by the next write of the same file; the result gets 0666 less the umask."""
    target = path(target)
    try:
        _write_atomic(target, write)
    except OSError as e:
        if e.errno is not None and e.filename != os.fspath(target):  # name the file the user asked for, not a temporary
            # OSError(errno, ...) is the errno's own subclass (FileNotFoundError ...); a client's
            # subclass (aiohttp's connection error) has another constructor.
            raise OSError(e.errno, e.strerror, os.fspath(target)) from e
        raise


def _write_atomic(target: epath.Path, write: Callable[[str], None]) -> None:
    if is_remote(target):
        with tempfile.TemporaryDirectory(prefix="cid_jax-upload-") as tmp_dir:
            tmp = os.path.join(tmp_dir, target.name)
            write(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_file(tmp, target)
        return
    local = pathlib.Path(target)
    local.parent.mkdir(parents=True, exist_ok=True)
    for stale in local.parent.glob(f".{local.name}.*.tmp"):
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(dir=local.parent, prefix=f".{local.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(target: PathLike, text: str) -> None:
    write_atomic(target, lambda tmp: pathlib.Path(tmp).write_text(text))


def copy_tree(src: PathLike, dst: PathLike) -> None:
    """Copies every file under `src` to the same place under `dst` (local or remote, either way)."""
    src, dst = path(src), path(dst)
    for rel in files_under(src):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        copy_file(src / rel, dst / rel)


def files_under(folder: PathLike) -> list[str]:
    """The files below `folder`, as paths relative to it ('a/b.png'), sorted. (epath's `walk` gives
    an object store's folders without their `gs://`, and its glob refuses '**'.)"""
    folder = path(folder)
    out = []
    for child in folder.iterdir():
        if child.is_dir():
            out += [f"{child.name}/{rel}" for rel in files_under(child)]
        else:
            out.append(child.name)
    return sorted(out)


def move_tree(src: PathLike, dst: PathLike) -> None:
    """Moves a folder (an object store has no folder rename: every object is copied, then deleted)."""
    src, dst = path(src), path(dst)
    if not is_remote(src):
        pathlib.Path(dst).parent.mkdir(parents=True, exist_ok=True)
        shutil.move(os.fspath(src), os.fspath(dst))
        return
    copy_tree(src, dst)
    src.rmtree()


@contextlib.contextmanager
def local_folder(p: PathLike) -> Iterator[pathlib.Path]:
    """A local folder holding what `p` holds: `p` itself, or for a remote folder a fresh download
    (a tool's inputs, such as photos to score, are read once, so nothing is kept)."""
    if not is_remote(p):
        yield pathlib.Path(os.path.expanduser(os.fspath(p)))
        return
    if not path(p).is_dir():
        from cid_jax import errors

        raise errors.MissingError(f"{p} is not a folder")
    with tempfile.TemporaryDirectory(prefix="cid_jax-download-") as tmp:
        copy_tree(p, tmp)
        yield pathlib.Path(tmp)


@contextlib.contextmanager
def staged_folder(p: PathLike) -> Iterator[pathlib.Path]:
    """A local folder to write a tool's outputs in: `p` itself, or for a remote `p` a temporary
    folder uploaded to `p` when the block ends without an error."""
    if not is_remote(p):
        local = pathlib.Path(os.path.expanduser(os.fspath(p)))
        local.mkdir(parents=True, exist_ok=True)
        yield local
        return
    with tempfile.TemporaryDirectory(prefix="cid_jax-upload-") as tmp:
        yield pathlib.Path(tmp)
        log.info("uploading to %s", p)
        copy_tree(tmp, p)


def cache_root() -> pathlib.Path:
    """Where remote inputs are copied: `$CID_JAX_REMOTE_CACHE`, else `~/.cache/cid_jax/remote`."""
    default = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cid_jax", "remote")
    return pathlib.Path(os.environ.get("CID_JAX_REMOTE_CACHE", default))


def remote_listing(p: PathLike) -> dict[str, tuple[int, str]]:
    """Every object at or below the remote `p`, one listing call: {name relative to `p` ('' for `p`
    itself): (size, version)}; the version is the store's own (a GCS generation, an S3 ETag), so a
    rewritten object, even one of the same size, has a new one."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(os.fspath(p))
    root = root.rstrip("/")
    out = {}
    for name, info in fs.find(root, detail=True).items():
        version = next((str(info[k]) for k in ("generation", "ETag", "etag", "md5Hash", "mtime", "LastModified")
                        if info.get(k) is not None), "")
        rel = name[len(root):].lstrip("/")
        if not name.endswith("/"):  # a folder marker some tools write is not a file
            out[rel] = (int(info.get("size") or 0), version)
    return out


def local_copy(p: PathLike) -> pathlib.Path:
    """A local path for `p`: itself when local; for a remote file or folder, a copy in `cache_root()`.

    The copy is keyed by the URL and by what the store holds there now (every object's name, size
    and version), so a folder rewritten in place is fetched again, not served stale; a marker says
    a copy is complete (an interrupted one is redone); older copies of the same URL are removed."""
    if not is_remote(p):
        return pathlib.Path(os.path.expanduser(os.fspath(p)))
    src = path(p)
    listing = remote_listing(src)
    if not listing:
        raise FileNotFoundError(f"{src} does not exist")
    url_key = hashlib.sha256(os.fspath(src).encode()).hexdigest()[:16]
    content_key = hashlib.sha256(repr(sorted(listing.items())).encode()).hexdigest()[:16]
    dst = cache_root() / url_key / content_key / src.name
    done = dst.parent / ".complete"
    if done.exists():
        return dst
    for old in (cache_root() / url_key).glob("*"):
        shutil.rmtree(old, ignore_errors=True)
    total = sum(size for size, _ in listing.values())
    from tqdm import tqdm

    log.info("copying %s (%d file(s), %.1f MiB) to %s", src, len(listing), total / 2**20, dst)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"copying {src.name}", leave=False) as bar:
        for rel in sorted(listing):
            out = dst / rel if rel else dst
            out.parent.mkdir(parents=True, exist_ok=True)
            with (src / rel if rel else src).open("rb") as fin, open(out, "wb") as fout:
                while chunk := fin.read(_CHUNK):
                    fout.write(chunk)
                    bar.update(len(chunk))
    done.touch()
    return dst
