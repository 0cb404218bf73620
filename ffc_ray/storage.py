"""Storage at a URI (S3, GCS, HDFS, ``file://``...) through pyarrow filesystems; no Ray here.

Runs, checkpoints and sweeps can live in a bucket (``ray.storage_path: s3://bucket/runs``,
``ffc-ray sweep --storage gs://bucket/sweeps``): Ray Train / Tune write their own files there
natively, and the files this project writes itself (progress, TensorBoard, tables) are written
to a local staging folder and copied up with :func:`upload_dir`.

LMDB stores and verification sets need local files: :func:`cached_store` and
:func:`cached_file` copy them once per node into :func:`local_cache_dir` (default
``~/.cache/ffc_ray/<sha1 of the URI>``, root overridable with ``FFC_RAY_CACHE``), under a file
lock so that concurrent processes on one node download once, with a completeness marker written
last so that a half-downloaded copy is never used, and again when the remote ``meta.json``
(store) or size / modification time (file) changes.

Plain paths (no ``scheme://``) go through the same functions as a pyarrow ``LocalFileSystem``.
``file://`` URIs are URIs (they take the remote code paths, which is how the tests exercise
them without a cloud).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import pyarrow
import pyarrow.fs as pafs
from filelock import FileLock

log = logging.getLogger(__name__)

CACHE_ENV = "FFC_RAY_CACHE"
DEFAULT_CACHE = "~/.cache/ffc_ray"
STORE_META = "meta.json"  # a store's metadata file (ffc_ray.data.store.META_FILE), written last
COMPLETE = "COMPLETE"  # completeness marker of a cache entry (holds the remote fingerprint)
#: seconds a process trusts its last check of a cached store before asking the remote again
RECHECK_S = 60.0

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_CUSTOM: dict[str, Callable[[str], tuple[pafs.FileSystem, str]]] = {}


class StorageError(OSError):
    """A URI that cannot be reached, read or written; the message names the URI."""


# ------------------------------------------------------------------------------------------
# URIs


def scheme(s: str | os.PathLike) -> str | None:
    """The URI scheme (``s3``, ``gs``, ``file``...) or None for a plain path."""
    if isinstance(s, os.PathLike):
        return None
    m = _SCHEME.match(str(s))
    if m is None or len(m.group(1)) == 1:  # "C://x" is a Windows drive, not a scheme
        return None
    return m.group(1).lower()


def is_uri(s: str | os.PathLike | None) -> bool:
    """True for ``scheme://...`` (``file://`` included), False for plain paths and None."""
    return s is not None and scheme(s) is not None


def register_filesystem(name: str, factory: Callable[[str], tuple[pafs.FileSystem, str]]) -> None:
    """Resolve ``name://...`` with ``factory(uri) -> (filesystem, path)`` (tests, plug-ins:
    e.g. a ``pyarrow.fs.PyFileSystem(FSSpecHandler(...))``). Ray does not see these."""
    _CUSTOM[name.lower()] = factory
    _resolve_cached.cache_clear()


def _split_query(uri: str) -> tuple[str, str]:
    base, sep, query = uri.partition("?")
    return base, sep + query


def join(uri: str | os.PathLike, *parts: str) -> str:
    """``uri`` / ``parts``: a URI stays a URI (query string kept at the end); a path a path."""
    if not is_uri(uri):
        return str(Path(uri).joinpath(*parts))
    base, query = _split_query(str(uri))
    tail = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not tail:
        return base + query
    return base.rstrip("/") + "/" + tail + query


def basename(uri: str | os.PathLike) -> str:
    base, _ = _split_query(str(uri))
    return base.rstrip("/").rsplit("/", 1)[-1]


@lru_cache(maxsize=256)
def _resolve_cached(uri: str) -> tuple[pafs.FileSystem, str]:
    sch = scheme(uri)
    if sch in _CUSTOM:
        return _CUSTOM[sch](uri)
    return pafs.FileSystem.from_uri(uri)


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """``(pyarrow filesystem, path on it)`` for a URI or a local path."""
    if not is_uri(uri):
        return pafs.LocalFileSystem(), str(Path(uri).expanduser().absolute())
    try:
        return _resolve_cached(str(uri))
    except (pyarrow.ArrowException, ValueError, OSError, ImportError) as exc:
        raise StorageError(
            f"{uri}: cannot open its filesystem ({exc}); supported are the URIs "
            "pyarrow.fs.FileSystem.from_uri accepts (s3://, gs://, hdfs://, file://...)"
            + _hint(str(exc))
        ) from exc


def _hint(message: str) -> str:
    m = message.lower()
    if any(
        k in m
        for k in ("credential", "accessdenied", "access denied", "forbidden", "403", "401", "auth")
    ):
        return (
            " -- check the cloud credentials on this node (AWS_ACCESS_KEY_ID / AWS_PROFILE / an "
            "instance role for s3://; GOOGLE_APPLICATION_CREDENTIALS or a service account for "
            "gs://) and that they may access the bucket"
        )
    if "nosuchbucket" in m or "bucket" in m and ("not exist" in m or "not found" in m):
        return " -- the bucket does not exist (or is in another project / account)"
    return ""


@contextlib.contextmanager
def _errors(what: str, uri: str | os.PathLike) -> Iterator[None]:
    """pyarrow / OS errors -> :class:`StorageError` naming ``uri`` and what was being done."""
    try:
        yield
    except StorageError:
        raise
    except FileNotFoundError as exc:
        raise StorageError(f"{what} {uri}: not found ({exc})") from exc
    except (pyarrow.ArrowException, OSError) as exc:
        raise StorageError(f"{what} {uri}: {exc}{_hint(str(exc))}") from exc


def _info(uri: str | os.PathLike) -> pafs.FileInfo:
    fs, path = resolve(uri)
    with _errors("cannot look up", uri):
        return fs.get_file_info(path)


def exists(uri: str | os.PathLike) -> bool:
    """A file or folder at ``uri``."""
    return _info(uri).type != pafs.FileType.NotFound


def is_dir(uri: str | os.PathLike) -> bool:
    return _info(uri).type == pafs.FileType.Directory


def is_file(uri: str | os.PathLike) -> bool:
    return _info(uri).type == pafs.FileType.File


def file_size(uri: str | os.PathLike) -> int | None:
    """Size in bytes of the file at ``uri``; None when there is no file there."""
    info = _info(uri)
    return int(info.size or 0) if info.type == pafs.FileType.File else None


def is_empty_dir(uri: str | os.PathLike) -> bool:
    """True when nothing is at ``uri`` or it is a folder without entries."""
    info = _info(uri)
    if info.type == pafs.FileType.NotFound:
        return True
    if info.type != pafs.FileType.Directory:
        return False
    fs, path = resolve(uri)
    with _errors("cannot list", uri):
        return not fs.get_file_info(pafs.FileSelector(path, recursive=False))


# ------------------------------------------------------------------------------------------
# files


def read_bytes(uri: str | os.PathLike) -> bytes:
    fs, path = resolve(uri)
    with _errors("cannot read", uri), fs.open_input_stream(path) as fh:
        return fh.read()


def read_text(uri: str | os.PathLike, encoding: str = "utf-8") -> str:
    return read_bytes(uri).decode(encoding)


def _make_parent(fs: pafs.FileSystem, path: str) -> None:
    """Create the parent folder where folders exist (local, HDFS, fsspec); object stores (S3,
    GCS) have none, and creating markers would cost a request per file."""
    if fs.type_name in ("s3", "gcs"):
        return
    parent = path.rstrip("/").rsplit("/", 1)[0]
    if parent and parent != path:
        fs.create_dir(parent, recursive=True)


def write_bytes(uri: str | os.PathLike, data: bytes) -> None:
    fs, path = resolve(uri)
    with _errors("cannot write", uri):
        _make_parent(fs, path)
        with fs.open_output_stream(path) as fh:
            fh.write(data)


def write_text(uri: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding))


def free_space(path: str | os.PathLike) -> str:
    """Free space of the file system holding ``path`` (or its nearest existing parent), in
    words: what a disk-full error message shows."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "unknown free space"
    return f"{free / 2**30:.2f} GiB free on {p}"


def write_error(path: str | os.PathLike, exc: BaseException) -> str:
    """``<path>: cannot write (<error>); <free space>``."""
    return f"{path}: cannot write ({exc}); {free_space(path)}"


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a local file whole or not at all: ``<name>.part`` beside it, then an atomic
    rename; the part file is removed when the write fails (a full disk, say)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def upload_file(local: str | os.PathLike, uri: str | os.PathLike) -> None:
    """Copy one local file to ``uri`` (the full file name, not a folder)."""
    fs, path = resolve(uri)
    with _errors("cannot upload to", uri):
        _make_parent(fs, path)
        pafs.copy_files(
            str(Path(local).absolute()),
            path,
            source_filesystem=pafs.LocalFileSystem(),
            destination_filesystem=fs,
        )


def download_file(uri: str | os.PathLike, local: str | os.PathLike) -> Path:
    """Copy the file at ``uri`` to the local path ``local``."""
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise StorageError(f"cannot download {uri}: " + _missing(info, "file"))
    fs, path = resolve(uri)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    with _errors("cannot download", uri):
        pafs.copy_files(
            path,
            str(local.absolute()),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
        )
    return local


def _missing(info: pafs.FileInfo, kind: str) -> str:
    if info.type == pafs.FileType.NotFound:
        return f"no such {kind} (or no permission to see it: check the bucket and credentials)"
    return f"not a {kind}"


def _local_files(local_dir: Path) -> list[Path]:
    return sorted(p for p in local_dir.rglob("*") if p.is_file())


def upload_dir(
    local_dir: str | os.PathLike,
    uri: str | os.PathLike,
    last: Sequence[str] = (STORE_META,),
    exclude: Callable[[str], bool] | None = None,
    threads: int = 8,
) -> int:
    """Copy every file under ``local_dir`` to ``uri`` (same relative names); returns the number
    of files. Files named in ``last`` (a store's ``meta.json``) are copied after all others,
    so a reader never sees a complete-looking folder whose data is still on its way.
    ``exclude(relative_posix_name)`` skips files."""
    local_dir = Path(local_dir)
    if not local_dir.is_dir():
        raise StorageError(f"cannot upload {local_dir} to {uri}: {local_dir} is not a folder")
    fs, root = resolve(uri)
    if fs.type_name not in ("s3", "gcs"):
        with _errors("cannot create", uri):
            fs.create_dir(root, recursive=True)
    files = [
        (p, p.relative_to(local_dir).as_posix())
        for p in _local_files(local_dir)
        if exclude is None or not exclude(p.relative_to(local_dir).as_posix())
    ]
    first = [f for f in files if f[0].name not in last]
    final = [f for f in files if f[0].name in last]

    def put(item: tuple[Path, str]) -> None:
        upload_file(item[0], join(uri, item[1]))

    if threads > 1 and len(first) > 1:
        with ThreadPoolExecutor(min(threads, len(first))) as pool:
            list(pool.map(put, first))
    else:
        for item in first:
            put(item)
    for item in final:
        put(item)
    return len(files)


def download_dir(uri: str | os.PathLike, local_dir: str | os.PathLike) -> Path:
    """Copy the folder at ``uri`` (recursively) into ``local_dir``; StorageError when it is
    missing."""
    info = _info(uri)
    if info.type != pafs.FileType.Directory:
        raise StorageError(f"cannot download {uri}: " + _missing(info, "folder"))
    fs, path = resolve(uri)
    local_dir = Path(local_dir)
    local_dir.mkdir(parents=True, exist_ok=True)
    with _errors("cannot download", uri):
        pafs.copy_files(
            path,
            str(local_dir.absolute()),
            source_filesystem=fs,
            destination_filesystem=pafs.LocalFileSystem(),
            use_threads=True,
        )
    return local_dir


# ------------------------------------------------------------------------------------------
# the node-local cache


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


def local_cache_dir(uri: str | os.PathLike) -> Path:
    """This node's cache folder for ``uri``: ``<FFC_RAY_CACHE or ~/.cache/ffc_ray>/<sha1>``."""
    key = str(uri).rstrip("/")
    return cache_root() / hashlib.sha1(key.encode()).hexdigest()


def _read_marker(entry: Path) -> str | None:
    try:
        return (entry / COMPLETE).read_text()
    except OSError:
        return None


def _write_marker(entry: Path, fingerprint: str) -> None:
    tmp = entry / f"{COMPLETE}.tmp-{os.getpid()}"
    tmp.write_text(fingerprint)
    os.replace(tmp, entry / COMPLETE)


def _clear_partial(entry: Path) -> None:
    for p in entry.glob("data.tmp-*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _sync_entry(
    uri: str,
    fingerprint: str,
    fetch: Callable[[Path], None],
    target: str,
) -> Path:
    """The cache entry of ``uri`` holding ``target`` for ``fingerprint``: returned at once when
    complete; else downloaded (``fetch(tmp)``) under the entry's lock, moved into place, and
    the marker written last."""
    entry = local_cache_dir(uri)
    data = entry / target
    if _read_marker(entry) == fingerprint and data.exists():
        return data
    entry.mkdir(parents=True, exist_ok=True)
    # other processes of this node wait; the OS releases the lock if the process dies
    with FileLock(entry / ".lock"):
        if _read_marker(entry) == fingerprint and data.exists():
            return data  # another process finished it while this one waited
        (entry / COMPLETE).unlink(missing_ok=True)
        _clear_partial(entry)  # left by a killed download
        tmp = entry / f"data.tmp-{os.getpid()}"
        t0 = time.perf_counter()
        log.info("%s: downloading to the node cache %s", uri, entry)
        try:
            fetch(tmp)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
            raise
        if data.is_dir():
            shutil.rmtree(data)
        elif data.exists():
            data.unlink()
        os.replace(tmp, data)
        (entry / "uri").write_text(str(uri))
        _write_marker(entry, fingerprint)
        log.info("%s: cached in %.1f s", uri, time.perf_counter() - t0)
    return data


_CHECKED: dict[str, tuple[float, Path]] = {}


def cached_store(uri: str) -> Path:
    """A local copy of the store folder at ``uri`` (LMDB needs local files), synced once per
    node; downloaded again when the remote ``meta.json`` differs from the cached one."""
    hit = _CHECKED.get(uri)
    if hit is not None and time.monotonic() - hit[0] < RECHECK_S and hit[1].is_dir():
        return hit[1]
    meta_uri = join(uri, STORE_META)
    info = _info(meta_uri)
    if info.type != pafs.FileType.File:
        where = _info(uri).type
        if where == pafs.FileType.NotFound:
            raise StorageError(
                f"store {uri} does not exist (nothing at that URI; or no permission to list "
                "it: check the bucket name and this node's credentials)"
            )
        raise StorageError(
            f"store {uri}: {STORE_META} missing: not a complete store (upload the store "
            f"folder with {STORE_META} last, e.g. ffc_ray.storage.upload_dir)"
        )
    meta = read_bytes(meta_uri)
    fingerprint = hashlib.sha256(meta).hexdigest()

    def fetch(tmp: Path) -> None:
        download_dir(uri, tmp)
        got = (tmp / STORE_META).read_bytes() if (tmp / STORE_META).is_file() else b""
        if hashlib.sha256(got).hexdigest() != fingerprint:
            raise StorageError(
                f"store {uri}: {STORE_META} changed while it was being downloaded "
                "(an upload in progress?); try again when the upload has finished"
            )

    path = _sync_entry(uri, fingerprint, fetch, "data")
    _CHECKED[uri] = (time.monotonic(), path)
    return path


def cached_file(uri: str) -> Path:
    """A local copy of the file at ``uri`` (same file name), synced once per node; fetched
    again when the remote size or modification time changes."""
    info = _info(uri)
    if info.type != pafs.FileType.File:
        raise StorageError(f"{uri}: " + _missing(info, "file"))
    mtime = info.mtime_ns if info.mtime_ns is not None else ""
    fingerprint = f"{info.size}:{mtime}"
    name = basename(uri) or "file"

    def fetch(tmp: Path) -> None:
        tmp.mkdir(parents=True)
        download_file(uri, tmp / name)

    return _sync_entry(uri, fingerprint, fetch, "data") / name
