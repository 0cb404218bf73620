"""Sharded LMDB face store: the format, the reader, ``meta.json`` and verification (the
writer is :mod:`ffc_ray.data.writer`).

Layout of a store folder (format version 1)::

    <store>/
      meta.json              written last: counts, image size, encoding, identity names
                             (label -> name), shard counts, sha256 of the index, skipped files
      index.parquet          one row per image: key (ascii), shard, label, source
      shards/shard-00000/    one LMDB environment per shard (data.mdb, lock.mdb)

Why this shape: large face sets are millions of small JPEGs, which file systems and object
stores serve slowly; an LMDB environment is one memory-mapped file read with zero seeks per
record (the official FFC code stores JPEGs in LMDB too, REFERENCE 1.5). Several shards let
readers on several nodes and processes open only what they read and keep files of a sane
size; records are spread round-robin over a shuffled order so shards stay balanced (sizes
differ by at most one) whatever the identity order of the source. The Parquet index lets any
reader (the sampler, the Ray Datasource) know every key, shard and label without touching
LMDB.

Safety: the writer builds the store in ``<store>.tmp-<pid>`` and renames it into place only
after ``meta.json`` (the last file) is written, so an interrupted import never leaves a
folder that opens as a store. The map size of an environment starts small and doubles on
``lmdb.MapFullError`` (the failed transaction is retried), instead of guessing a size.
Opening checks the index checksum, the label range, the shard record counts and that no
``data.mdb`` is shorter than LMDB's own last page (a truncated file would otherwise crash the
reader with SIGBUS on first touch).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ffc_ray.data.transforms import ImageDecodeError, decode_record, decode_records

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
META_FILE = "meta.json"
INDEX_FILE = "index.parquet"
SHARDS_DIR = "shards"
DEFAULT_MAP_SIZE = 32 << 20  # bytes per shard to start with; doubles on MapFullError
ENCODINGS = ("jpeg", "png")


class DataError(ValueError):
    """Bad input data; the message names the file, key or field."""


class StoreError(DataError):
    """A missing, incomplete, truncated or inconsistent store."""


def shard_dir(store: str | Path, shard: int) -> Path:
    return Path(store) / SHARDS_DIR / f"shard-{shard:05d}"


def make_key(label: int, j: int) -> str:
    """The ascii record key of image ``j`` of identity ``label`` (sorts as (label, j))."""
    return f"{label:08d}/{j:06d}"


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------
# progress bar


def progress_bar(total: int | None, desc: str, enabled: bool = True) -> tqdm:
    """tqdm on stderr: redrawn in place on a terminal, refreshed every 10 s in logs (CI)."""
    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        desc=desc,
        disable=not enabled,
        file=sys.stderr,
        mininterval=0.1 if tty else 10.0,
        dynamic_ncols=tty,
    )


# ------------------------------------------------------------------------------------------
# reader

# Per-process caches: an LMDB environment must be opened once per process (several opens of
# one file in a process break LMDB's locking rules) and never used across fork(); keys carry
# the pid so a forked child opens its own.
_ENVS: dict[tuple[int, str], Any] = {}
_STORES: dict[tuple[int, str, int], FaceStore] = {}


def _open_env(path: Path):
    import lmdb

    key = (os.getpid(), str(path))
    env = _ENVS.get(key)
    if env is None:
        if not (path / "data.mdb").is_file():
            raise StoreError(f"{path}: data.mdb missing (truncated or incomplete store)")
        try:
            env = lmdb.open(
                str(path), readonly=True, lock=False, readahead=False, subdir=True, max_readers=512
            )
        except lmdb.Error as exc:
            raise StoreError(f"{path}: cannot open LMDB environment ({exc})") from exc
        _check_env_size(env, path)
        _ENVS[key] = env
    return env


def _check_env_size(env, path: Path) -> None:
    """Refuse a data.mdb shorter than its last used page (reading it would SIGBUS)."""
    info, stat = env.info(), env.stat()
    need = (int(info["last_pgno"]) + 1) * int(stat["psize"])
    have = (path / "data.mdb").stat().st_size
    if have < need:
        env.close()
        raise StoreError(
            f"{path / 'data.mdb'} is truncated: {have} bytes, LMDB needs {need} (copy it again)"
        )


def _forget_envs(store: Path) -> None:
    """Close this process's cached environments under ``store`` (it was rewritten)."""
    prefix = str(store) + os.sep
    for key in [k for k in _ENVS if k[0] == os.getpid() and k[1].startswith(prefix)]:
        _ENVS.pop(key).close()


def forget_store(path: Path) -> None:
    """Drop this process's cached handles of the store at ``path`` (it was just replaced)."""
    _STORES.clear()
    _forget_envs(path)


def close_cached_envs() -> None:
    """Close this process's cached environments (tests, or before deleting a store)."""
    pid = os.getpid()
    for key in [k for k in _ENVS if k[0] == pid]:
        _ENVS.pop(key).close()
    _STORES.clear()


@dataclass
class FaceStore:
    """An opened, checked store: the index in memory, LMDB environments opened on demand.

    ``keys`` (ascii bytes), ``shards`` (int32), ``labels`` (int64) and ``sources`` are in index
    order; a sampler's image index ``i`` means row ``i`` of these arrays.
    """

    path: Path
    meta: dict[str, Any]
    keys: np.ndarray
    shards: np.ndarray
    labels: np.ndarray
    sources: np.ndarray

    # -- properties ------------------------------------------------------------------------
    @property
    def image_size(self) -> int:
        return int(self.meta["image_size"])

    @property
    def num_images(self) -> int:
        return len(self.keys)

    @property
    def num_identities(self) -> int:
        return int(self.meta["num_identities"])

    @property
    def num_shards(self) -> int:
        return int(self.meta["num_shards"])

    @property
    def names(self) -> list[str]:
        return list(self.meta["names"])

    def __len__(self) -> int:
        return self.num_images

    # -- reading ---------------------------------------------------------------------------
    def env(self, shard: int):
        return _open_env(shard_dir(self.path, shard))

    def check_readable(self) -> None:
        """Walk every shard's keys (not the records): a damaged B-tree page or a shard whose
        key count differs from the index is a :class:`StoreError` naming the shard. About a
        second per million keys; ``ffc-ray data verify`` decodes every record as well."""
        import lmdb

        for s in range(self.num_shards):
            want = int((self.shards == s).sum())
            try:
                with self.env(s).begin(buffers=True) as txn:
                    n = sum(1 for _ in txn.cursor().iternext(keys=True, values=False))
            except lmdb.Error as exc:
                raise StoreError(
                    f"{shard_dir(self.path, s)}: LMDB reports damage ({exc}); run "
                    f"`ffc-ray data verify {self.path}`"
                ) from None
            if n != want:
                raise StoreError(
                    f"{shard_dir(self.path, s)}: {n} records but the index lists {want}"
                )

    def read(self, indices: Iterable[int] | np.ndarray) -> list[bytes]:
        """Raw records of index rows ``indices``, in that order (one read txn per shard)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.num_images):
            bad = int(idx[(idx < 0) | (idx >= self.num_images)][0])
            raise StoreError(
                f"{self.path}: image index {bad} out of range 0..{self.num_images - 1}"
            )
        return read_records(self.path, self.keys[idx], self.shards[idx])

    def images(self, indices: Iterable[int] | np.ndarray) -> np.ndarray:
        """Decoded uint8 [B, S, S, 3] images of index rows ``indices``."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        return decode_records(
            self.read(idx), self.image_size, [self.describe_key(k) for k in self.keys[idx]]
        )

    def describe_key(self, key: bytes) -> str:
        return f"{self.path} key {key.decode('ascii', 'replace')}"

    def to_arrays(self):
        """The whole store decoded in memory as :class:`FaceArrays` (small stores only)."""
        from ffc_ray.data.types import FaceArrays

        return FaceArrays(self.images(np.arange(self.num_images)), self.labels.copy(), self.names)

    def info(self) -> dict[str, Any]:
        """Summary for ``ffc-ray data info``."""
        counts = np.bincount(self.labels, minlength=self.num_identities)
        sizes = {
            str(s): (shard_dir(self.path, s) / "data.mdb").stat().st_size
            for s in range(self.num_shards)
        }
        return {
            "path": str(self.path),
            "format_version": self.meta["format_version"],
            "image_size": self.image_size,
            "encoding": self.meta.get("encoding"),
            "quality": self.meta.get("quality"),
            "num_images": self.num_images,
            "num_identities": self.num_identities,
            "identities_with_two_or_more_images": int((counts >= 2).sum()),
            "identities_with_one_image": int((counts == 1).sum()),
            "images_per_identity": {
                "min": int(counts.min()) if len(counts) else 0,
                "mean": float(counts.mean()) if len(counts) else 0.0,
                "max": int(counts.max()) if len(counts) else 0,
            },
            "num_shards": self.num_shards,
            "shard_counts": self.meta["shard_counts"],
            "shard_bytes": sizes,
            "num_skipped": self.meta.get("num_skipped", 0),
            "num_dropped_identities": self.meta.get("num_dropped_identities", 0),
            "source": self.meta.get("source", {}),
            "created": self.meta.get("created"),
        }


def read_records(store_path: str | Path, keys: np.ndarray, shards: np.ndarray) -> list[bytes]:
    """Fetch the records ``keys`` (bytes) from their ``shards``, order kept.

    The hot path of both loaders: one read transaction per shard touched, environments from
    the per-process cache. A key the shard lacks means the index and the store are out of step.
    """
    import lmdb

    out: list[bytes | None] = [None] * len(keys)
    shards = np.asarray(shards)
    for s in np.unique(shards):
        rows = np.flatnonzero(shards == s)
        env = _open_env(shard_dir(store_path, int(s)))
        with env.begin(buffers=False) as txn:
            for r in rows:
                try:
                    v = txn.get(keys[r])
                except lmdb.Error as exc:
                    raise StoreError(
                        f"{shard_dir(store_path, int(s))}: LMDB cannot read key "
                        f"{bytes(keys[r]).decode('ascii', 'replace')} ({exc}); run "
                        f"`ffc-ray data verify {store_path}`"
                    ) from None
                if v is None:
                    raise StoreError(
                        f"{store_path}: key {bytes(keys[r]).decode('ascii', 'replace')} is in "
                        f"the index but not in shard {int(s)} (index and store out of step)"
                    )
                out[r] = v
    return out  # type: ignore[return-value]


def _read_meta(path: Path) -> dict[str, Any]:
    meta_path = path / META_FILE
    if not meta_path.is_file():
        partial = [p.name for p in path.parent.glob(f"{path.name}.tmp-*")]
        hint = f" (found unfinished imports: {', '.join(partial)})" if partial else ""
        raise StoreError(
            f"{path}: {META_FILE} missing: not a complete store (interrupted import?){hint}"
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise StoreError(f"{meta_path}: unreadable ({exc})") from exc
    if not isinstance(meta, dict):
        raise StoreError(f"{meta_path}: expected a JSON object")
    for fld in (
        "format_version",
        "image_size",
        "num_images",
        "num_identities",
        "num_shards",
        "names",
        "checksum",
        "shard_counts",
    ):
        if fld not in meta:
            raise StoreError(f"{meta_path}: field '{fld}' missing")
    if meta["format_version"] != FORMAT_VERSION:
        raise StoreError(
            f"{meta_path}: format_version {meta['format_version']} is not {FORMAT_VERSION}"
        )
    if len(meta["names"]) != meta["num_identities"]:
        raise StoreError(
            f"{meta_path}: field 'names' has {len(meta['names'])} entries, "
            f"num_identities is {meta['num_identities']}"
        )
    return meta


def open_store(path: str | Path, check_shards: bool = True) -> FaceStore:
    """Open and check a store (cached per process; re-read when ``meta.json`` changes).

    Checks: ``meta.json`` present and complete, index checksum, index columns, label and shard
    ranges, row count, and (``check_shards``) that every shard opens, is not truncated and
    holds exactly as many records as the index lists for it.

    ``path`` may be a URI (``s3://bucket/stores/x``, ``gs://...``, ``file://...``): the store is
    first copied to this node's cache (:func:`ffc_ray.storage.cached_store`: once per node,
    under a file lock, again when the remote ``meta.json`` changes) and opened from there.
    """
    from ffc_ray import storage

    if storage.is_uri(path):
        uri = str(path)
        try:
            local = storage.cached_store(uri)
        except storage.StorageError as exc:
            raise StoreError(str(exc)) from exc
        try:
            return _open_local_store(local, check_shards)
        except StoreError as exc:
            raise StoreError(f"store {uri} (node cache {local}): {exc}") from exc
    return _open_local_store(path, check_shards)


def _open_local_store(path: str | Path, check_shards: bool = True) -> FaceStore:
    import pyarrow.parquet as pq

    path = Path(path).absolute()
    if not path.is_dir():
        raise StoreError(f"store {path} does not exist")
    meta_path = path / META_FILE
    mtime = meta_path.stat().st_mtime_ns if meta_path.is_file() else -1
    ck = (os.getpid(), str(path), mtime)
    if ck in _STORES:
        return _STORES[ck]
    _forget_envs(path)  # first open in this process, or meta.json changed: reopen shards
    meta = _read_meta(path)
    index_path = path / INDEX_FILE
    if not index_path.is_file():
        raise StoreError(f"{index_path} missing (truncated store)")
    digest = sha256_file(index_path)
    if digest != meta["checksum"].get(INDEX_FILE):
        raise StoreError(
            f"{index_path}: sha256 {digest[:12]}... does not match meta.json "
            f"({str(meta['checksum'].get(INDEX_FILE))[:12]}...): index and store out of step"
        )
    try:
        table = pq.read_table(index_path)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError
        raise StoreError(f"{index_path}: unreadable Parquet ({exc})") from exc
    for col in ("key", "shard", "label", "source"):
        if col not in table.column_names:
            raise StoreError(f"{index_path}: column '{col}' missing")
    keys = np.asarray([k.encode("ascii") for k in table.column("key").to_pylist()])
    shards = table.column("shard").to_numpy().astype(np.int32)
    labels = table.column("label").to_numpy().astype(np.int64)
    sources = np.asarray(table.column("source").to_pylist(), dtype=object)
    n, c, ns = int(meta["num_images"]), int(meta["num_identities"]), int(meta["num_shards"])
    if len(keys) != n:
        raise StoreError(f"{index_path}: {len(keys)} rows, meta.json says num_images = {n}")
    bad = np.flatnonzero((labels < 0) | (labels >= c))
    if len(bad):
        r = int(bad[0])
        raise StoreError(
            f"{index_path}: key {keys[r].decode()} field 'label' = {labels[r]} out of range "
            f"0..{c - 1} ({len(bad)} rows)"
        )
    bad = np.flatnonzero((shards < 0) | (shards >= ns))
    if len(bad):
        r = int(bad[0])
        raise StoreError(
            f"{index_path}: key {keys[r].decode()} field 'shard' = {shards[r]} out of range "
            f"0..{ns - 1}"
        )
    if len(np.unique(keys)) != len(keys):
        raise StoreError(f"{index_path}: duplicate keys")
    store = FaceStore(path, meta, keys, shards, labels, sources)
    if check_shards:
        try:
            _check_shards(path, shards, ns)
        except StoreError:
            _forget_envs(path)
            raise
    _STORES[ck] = store
    return store


def _check_shards(path: Path, shards: np.ndarray, num_shards: int) -> None:
    counts = np.bincount(shards, minlength=num_shards)
    for s in range(num_shards):
        d = shard_dir(path, s)
        if not d.is_dir():
            raise StoreError(f"{d} missing (truncated store)")
        entries = int(_open_env(d).stat()["entries"])
        if entries != counts[s]:
            raise StoreError(
                f"{d}: holds {entries} records, the index lists {counts[s]} "
                "(index and store out of step)"
            )


@dataclass
class VerifyReport:
    path: str
    num_images: int
    checked: int
    problems: list[tuple[str, str]]  # (key or file, message)

    @property
    def ok(self) -> bool:
        return not self.problems


def _verify_shard(
    store: FaceStore,
    s: int,
    rows: np.ndarray,
    size: int,
    problems: list[tuple[str, str]],
    max_problems: int,
    bar: Any,
) -> int:
    """Check shard ``s`` (its index rows ``rows``); returns the records checked."""
    expected = set(store.keys[rows].tolist())
    checked = 0
    with store.env(s).begin(buffers=False) as txn:
        for r in rows:
            key = store.keys[r]
            v = txn.get(key)
            checked += 1
            bar.update()
            if v is None:
                problems.append((key.decode(), f"missing from shard {s}"))
                continue
            try:
                decode_record(v, size, store.describe_key(key))
            except ImageDecodeError as exc:
                problems.append((key.decode(), str(exc)))
            if len(problems) >= max_problems:
                return checked
        for k in txn.cursor().iternext(keys=True, values=False):
            if k not in expected:
                problems.append((k.decode("ascii", "replace"), f"in shard {s}, not in index"))
    return checked


def verify_store(
    path: str | Path, progress: bool = False, max_problems: int = 1000
) -> VerifyReport:
    """Decode every record and check it against the index (``ffc-ray data verify``).

    Problems found (a store that does not open, a key missing from its shard, a record that
    does not decode or has the wrong size, a shard holding keys the index lacks, a shard LMDB
    reports damaged) are collected, up to ``max_problems``, not raised.
    """
    import lmdb

    try:
        store = open_store(path)
    except StoreError as exc:
        return VerifyReport(str(path), 0, 0, [(str(path), str(exc))])
    problems: list[tuple[str, str]] = []
    bar = progress_bar(store.num_images, "verify", enabled=progress)
    checked = 0
    size = store.image_size
    for s in range(store.num_shards):
        rows = np.flatnonzero(store.shards == s)
        try:
            checked += _verify_shard(store, s, rows, size, problems, max_problems, bar)
        except lmdb.Error as exc:  # a damaged page: this shard stops here, the others go on
            problems.append((str(shard_dir(store.path, s)), f"LMDB reports damage: {exc}"))
        if len(problems) >= max_problems:
            break
    bar.close()
    return VerifyReport(str(store.path), store.num_images, checked, problems)
