"""Write a new store atomically (:class:`StoreWriter`): sharded LMDB records, then the
Parquet index, then ``meta.json``, built in ``<store>.tmp-<pid>`` and renamed into place (the
layout is described in :mod:`ffc_ray.data.store`)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ffc_ray.data.store import (
    DEFAULT_MAP_SIZE,
    ENCODINGS,
    FORMAT_VERSION,
    INDEX_FILE,
    META_FILE,
    SHARDS_DIR,
    DataError,
    StoreError,
    forget_store,
    make_key,
    sha256_file,
    shard_dir,
)
from ffc_ray.storage import write_error

log = logging.getLogger(__name__)


def import_debris(store: str | Path) -> list[Path]:
    """``<store>.tmp-<pid>`` / ``<store>.old-<pid>`` folders whose import process is gone (a
    killed import leaves them; one still running is never listed)."""
    store = Path(store)
    out = []
    for p in sorted(store.parent.glob(f"{store.name}.*-*")):
        kind, _, pid = p.name[len(store.name) + 1 :].partition("-")
        if kind in ("tmp", "old") and pid.isdigit() and p.is_dir() and not _alive(int(pid)):
            out.append(p)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


@dataclass
class Skipped:
    """A source item left out of the store, and why (listed in meta.json and the CLI summary)."""

    path: str
    reason: str


@dataclass
class ImportSummary:
    """What an import wrote and what it left out."""

    path: str
    num_images: int
    num_identities: int
    image_size: int
    shard_counts: list[int]
    skipped: list[Skipped] = field(default_factory=list)
    dropped_identities: dict[str, str] = field(default_factory=dict)  # name -> reason
    single_image_identities: int = 0
    map_growths: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "num_images": self.num_images,
            "num_identities": self.num_identities,
            "image_size": self.image_size,
            "shard_counts": self.shard_counts,
            "num_skipped": len(self.skipped),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "num_dropped_identities": len(self.dropped_identities),
            "single_image_identities": self.single_image_identities,
            "map_growths": self.map_growths,
            "seconds": round(self.seconds, 3),
        }


class StoreWriter:
    """Write records into a new store, atomically.

    Use as a context manager; records are added with :meth:`add` (already encoded at the
    network size), left-out inputs with :meth:`skip`; :meth:`finish` writes the index and
    ``meta.json`` and renames the store into place. Leaving the ``with`` block by an
    exception removes the temporary folder.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        image_size: int,
        encoding: str = "jpeg",
        quality: int | None = 95,
        num_shards: int = 4,
        seed: int = 0,
        map_size: int = DEFAULT_MAP_SIZE,
        commit_every: int = 512,
        overwrite: bool = False,
    ) -> None:
        import lmdb

        self._lmdb = lmdb
        self.path = Path(path).absolute()
        if encoding not in ENCODINGS:
            raise DataError(f"encoding {encoding!r} is not one of {ENCODINGS}")
        if num_shards < 1:
            raise DataError(f"num_shards must be >= 1, got {num_shards}")
        if image_size < 1:
            raise DataError(f"image_size must be >= 1, got {image_size}")
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path} already exists (pass overwrite / --overwrite)")
        self.image_size = image_size
        self.encoding = encoding
        self.quality = quality if encoding == "jpeg" else None
        self.num_shards = num_shards
        self.seed = seed
        self.commit_every = commit_every
        self.overwrite = overwrite
        self.tmp = self.path.parent / f"{self.path.name}.tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        for old in import_debris(self.path):  # a dead import's folders: its process is gone
            log.warning("removing %s, left by an import that did not finish", old)
            shutil.rmtree(old, ignore_errors=True)
        (self.tmp / SHARDS_DIR).mkdir(parents=True)
        self._envs = [
            lmdb.open(
                str(shard_dir(self.tmp, s)),
                map_size=map_size,
                subdir=True,
                readahead=False,
                meminit=False,
                max_dbs=0,
            )
            for s in range(num_shards)
        ]
        self._pending: list[list[tuple[bytes, bytes]]] = [[] for _ in range(num_shards)]
        self._rng = np.random.default_rng(seed)
        self._order: np.ndarray = np.empty(0, dtype=np.int64)
        self._keys: list[str] = []
        self._shards: list[int] = []
        self._labels: list[int] = []
        self._sources: list[str] = []
        self._per_label: dict[int, int] = {}
        self.shard_counts = [0] * num_shards
        self.skipped: list[Skipped] = []
        self.map_growths = 0
        self._t0 = time.monotonic()
        self._closed = False

    # -- context manager -------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        """Drop everything written so far (the final path is never touched)."""
        self._close_envs()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- writing ---------------------------------------------------------------------------
    def _next_shard(self) -> int:
        # Round-robin over a shuffled order, a block of num_shards records at a time: counts
        # never differ by more than one, and no shard collects one identity's images.
        i = len(self._keys)
        pos = i % self.num_shards
        if pos == 0:
            self._order = self._rng.permutation(self.num_shards)
        return int(self._order[pos])

    def add(self, label: int, blob: bytes, source: str) -> str:
        """Add one encoded record of identity ``label``; returns its key."""
        if label < 0:
            raise DataError(f"{source}: label {label} out of range (must be >= 0)")
        j = self._per_label.get(label, 0)
        self._per_label[label] = j + 1
        key = make_key(label, j)
        shard = self._next_shard()
        self._keys.append(key)
        self._shards.append(shard)
        self._labels.append(int(label))
        self._sources.append(str(source))
        self._pending[shard].append((key.encode("ascii"), bytes(blob)))
        self.shard_counts[shard] += 1
        if len(self._pending[shard]) >= self.commit_every:
            self._flush(shard)
        return key

    def skip(self, path: str, reason: str) -> None:
        """Record an input left out of the store (never silent)."""
        self.skipped.append(Skipped(str(path), reason))
        log.warning("skipped %s: %s", path, reason)

    def _flush(self, shard: int) -> None:
        items = self._pending[shard]
        if not items:
            return
        env = self._envs[shard]
        while True:
            try:
                with env.begin(write=True) as txn:
                    for k, v in items:
                        if not txn.put(k, v, overwrite=False):
                            raise StoreError(f"duplicate key {k.decode()} in shard {shard}")
                break
            except self._lmdb.MapFullError:
                # The transaction was aborted by the `with`; grow and write it again.
                new = env.info()["map_size"] * 2
                env.set_mapsize(new)
                self.map_growths += 1
                log.debug("shard %d: map size grown to %d bytes", shard, new)
            except (self._lmdb.Error, OSError) as exc:  # disk full, I/O error: nothing kept
                self.abort()
                raise StoreError(write_error(self.path, exc)) from None
        self._pending[shard] = []

    def _close_envs(self) -> None:
        if self._closed:
            return
        for env in self._envs:
            env.close()
        self._closed = True

    def finish(
        self,
        names: Sequence[str],
        source: dict[str, Any] | None = None,
        dropped_identities: dict[str, str] | None = None,
    ) -> ImportSummary:
        """Flush, write ``index.parquet`` then ``meta.json``, rename into place.

        ``names[label]`` is the identity name of each label; every label used must have one.
        """

        for s in range(self.num_shards):
            self._flush(s)
        try:
            for env in self._envs:
                env.sync(True)
        except (self._lmdb.Error, OSError) as exc:
            self.abort()
            raise StoreError(write_error(self.path, exc)) from None
        self._close_envs()
        num_ids = len(names)
        labels = np.asarray(self._labels, dtype=np.int64)
        if len(labels) == 0:
            self.abort()
            raise DataError("nothing to write: no image was imported")
        if labels.max() >= num_ids:
            bad = int(np.argmax(labels >= num_ids))
            self.abort()
            raise DataError(
                f"{self._sources[bad]}: label {labels[bad]} out of range (only {num_ids} names)"
            )
        counts = np.bincount(labels, minlength=num_ids)
        dropped = dict(dropped_identities or {})
        try:
            self._write_index(labels)
            self._write_meta(labels, names, counts, dropped, source)
            self._move_into_place()
        except OSError as exc:  # disk full while writing the index or meta.json
            self.abort()
            raise StoreError(write_error(self.path, exc)) from None
        return ImportSummary(
            path=str(self.path),
            num_images=int(len(labels)),
            num_identities=num_ids,
            image_size=self.image_size,
            shard_counts=list(self.shard_counts),
            skipped=list(self.skipped),
            dropped_identities=dropped,
            single_image_identities=int((counts == 1).sum()),
            map_growths=self.map_growths,
            seconds=time.monotonic() - self._t0,
        )

    def _write_index(self, labels: np.ndarray) -> None:
        """``index.parquet``: one row per image, sorted by key = (label, j)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        keys = np.asarray(self._keys)
        order = np.argsort(keys, kind="stable")
        table = pa.table(
            {
                "key": pa.array(keys[order].tolist(), pa.string()),
                "shard": pa.array(np.asarray(self._shards, dtype=np.int32)[order]),
                "label": pa.array(labels[order]),
                "source": pa.array(
                    np.asarray(self._sources, dtype=object)[order].tolist(), pa.string()
                ),
            }
        )
        pq.write_table(table, self.tmp / INDEX_FILE)

    def _write_meta(
        self,
        labels: np.ndarray,
        names: Sequence[str],
        counts: np.ndarray,
        dropped: dict[str, str],
        source: dict[str, Any] | None,
    ) -> None:
        """``meta.json``, the file that makes the folder a store: written last, fsynced."""
        meta = {
            "format_version": FORMAT_VERSION,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "image_size": self.image_size,
            "encoding": self.encoding,
            "quality": self.quality,
            "num_images": int(len(labels)),
            "num_identities": len(names),
            "num_shards": self.num_shards,
            "shard_counts": [int(c) for c in self.shard_counts],
            "identities_with_one_image": int((counts == 1).sum()),
            "identities_without_images": int((counts == 0).sum()),
            "names": [str(n) for n in names],
            "checksum": {INDEX_FILE: sha256_file(self.tmp / INDEX_FILE)},
            "num_skipped": len(self.skipped),
            "skipped": [{"path": s.path, "reason": s.reason} for s in self.skipped],
            "num_dropped_identities": len(dropped),
            "dropped_identities": dropped,
            "source": source or {},
            "seed": self.seed,
        }
        meta_tmp = self.tmp / (META_FILE + ".part")
        with open(meta_tmp, "w") as f:
            json.dump(meta, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(meta_tmp, self.tmp / META_FILE)

    def _move_into_place(self) -> None:
        """Rename the finished folder to the store's path (a store there is replaced only with
        ``overwrite``, and removed after the rename)."""
        old = None
        if self.path.exists():
            if not self.overwrite:
                self.abort()
                raise StoreError(f"{self.path} appeared during the import; not overwriting it")
            old = self.path.parent / f"{self.path.name}.old-{os.getpid()}"
            os.rename(self.path, old)
        os.rename(self.tmp, self.path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        forget_store(self.path)
