"""Importers: image folder, InsightFace RecordIO, synthetic / in-memory arrays -> LMDB store.

Every importer crops and resizes once, here, so that records are stored at the network input
size (training never resizes) and encodes them as JPEG (``quality``) or PNG (lossless, for
exact round trips). Identity filters:

* ``min_images``: identities with fewer good images are dropped (listed in ``meta.json``);
* ``exclude``: names to drop, typically every identity of a verification pairs list
  (``--exclude-pairs``: the identity-disjoint protocol of the LFW README).

Labels are 0..C-1 over the kept identities in sorted-name order (folder) or sorted
source-label order (RecordIO), so an import is deterministic. Identities with one image stay
(they serve the instance stream); the sampler leaves them out of the identity stream and
``meta.json`` counts them. Bad inputs (undecodable or non-image files, empty identity
folders, files outside identity folders) are skipped and listed with the reason, never
silently; ``strict=True`` turns the first of them into an error instead.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffc_ray.data.store import DataError, progress_bar
from ffc_ray.data.transforms import (
    ImageDecodeError,
    crop_resize,
    encode_image,
    load_face,
    open_image,
)
from ffc_ray.data.writer import ImportSummary, StoreWriter

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".pgm", ".tif", ".tiff", ".gif"}
)


class SourceError(DataError):
    """A bad import source (strict mode, or nothing importable at all)."""


@dataclass(frozen=True)
class ImportOptions:
    """How records are prepared: crop box, network size, encoding, filters, sharding."""

    image_size: int = 112
    crop: tuple[int, int, int, int] | None = None
    encoding: str = "jpeg"  # jpeg | png (lossless)
    quality: int = 95
    min_images: int = 1
    exclude: frozenset[str] = frozenset()
    num_shards: int = 4
    seed: int = 0
    strict: bool = False
    overwrite: bool = False
    workers: int = 1
    progress: bool = True
    map_size: int | None = None

    def writer(self, dst: str | Path) -> StoreWriter:
        kw = {} if self.map_size is None else {"map_size": self.map_size}
        return StoreWriter(
            dst,
            image_size=self.image_size,
            encoding=self.encoding,
            quality=self.quality,
            num_shards=self.num_shards,
            seed=self.seed,
            overwrite=self.overwrite,
            **kw,
        )

    def describe(self) -> dict:
        return {
            "image_size": self.image_size,
            "crop": list(self.crop) if self.crop else None,
            "encoding": self.encoding,
            "quality": self.quality if self.encoding == "jpeg" else None,
            "min_images": self.min_images,
            "excluded_names": len(self.exclude),
        }


def _check_options(opts: ImportOptions) -> None:
    if opts.min_images < 1:
        raise DataError(f"min_images must be >= 1, got {opts.min_images}")
    if not 1 <= opts.quality <= 100:
        raise DataError(f"quality must be in 1..100, got {opts.quality}")
    if opts.workers < 1:
        raise DataError(f"workers must be >= 1, got {opts.workers}")


def _prepare_file(args: tuple[str, tuple | None, int, str, int]) -> tuple[bytes | None, str | None]:
    """Worker: file -> encoded record at the network size, or (None, reason)."""
    path, crop, size, encoding, quality = args
    try:
        img = load_face(path, crop, size)
    except ImageDecodeError as exc:
        return None, str(exc).removeprefix(f"{path}: ")
    except OSError as exc:
        return None, f"cannot read ({exc})"
    return encode_image(img, encoding, quality), None


def _map_ordered(fn, items: Sequence, workers: int) -> Iterator:
    """``map`` in order, in a process pool when ``workers > 1``."""
    if workers <= 1 or len(items) < 2:
        yield from map(fn, items)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn" if os.name != "posix" else "fork")
    with ctx.Pool(workers) as pool:
        yield from pool.imap(fn, items, chunksize=16)


# ------------------------------------------------------------------------------------------
# image folder


@dataclass
class _FolderScan:
    identities: list[tuple[str, list[Path]]]  # kept identities, sorted, with their image files
    skipped: list[tuple[str, str]]
    dropped: dict[str, str]


def scan_folder(src: Path, opts: ImportOptions) -> _FolderScan:
    """List identity folders and image files; note everything that will not be imported."""
    if not src.is_dir():
        raise FileNotFoundError(f"image folder {src} does not exist")
    skipped: list[tuple[str, str]] = []
    dropped: dict[str, str] = {}
    kept: list[tuple[str, list[Path]]] = []
    for entry in sorted(src.iterdir(), key=lambda p: p.name):
        if not entry.is_dir():
            skipped.append((str(entry), "not inside an identity folder"))
            continue
        name = entry.name
        if name in opts.exclude:
            dropped[name] = "excluded (named in a pairs file)"
            continue
        files: list[Path] = []
        for f in sorted(entry.iterdir(), key=lambda p: p.name):
            if f.is_dir():
                skipped.append((str(f), "nested folder inside an identity folder"))
            elif f.suffix.lower() not in IMAGE_EXTENSIONS:
                skipped.append((str(f), f"not an image file (extension '{f.suffix}')"))
            else:
                files.append(f)
        if not files:
            skipped.append((str(entry), "empty identity folder (no image files)"))
            dropped[name] = "no image files"
            continue
        if len(files) < opts.min_images:
            dropped[name] = f"{len(files)} image file(s) < min_images {opts.min_images}"
            continue
        kept.append((name, files))
    return _FolderScan(kept, skipped, dropped)


def import_folder(src: str | Path, dst: str | Path, opts: ImportOptions) -> ImportSummary:
    """Import ``src/<identity>/<image>`` (one folder per identity) into a store at ``dst``.

    Good images are imported even when others fail; each failure is listed in ``meta.json``
    (``skipped``) with its reason. ``strict`` raises on the first bad input instead.
    """
    _check_options(opts)
    src = Path(src)
    scan = scan_folder(src, opts)
    if opts.strict and scan.skipped:
        path, reason = scan.skipped[0]
        raise SourceError(f"{path}: {reason} ({len(scan.skipped)} bad input(s) in {src})")
    if not scan.identities:
        raise SourceError(
            f"{src}: no importable identity folder (see the listed skips)"
            if scan.skipped or scan.dropped
            else f"{src}: empty folder"
        )
    jobs = [
        (str(f), opts.crop, opts.image_size, opts.encoding, opts.quality)
        for _, files in scan.identities
        for f in files
    ]
    owner = [k for k, (_, files) in enumerate(scan.identities) for _ in files]
    bar = progress_bar(len(jobs), "import", enabled=opts.progress)
    names: list[str] = []
    dropped = dict(scan.dropped)
    with opts.writer(dst) as w:
        for path, reason in scan.skipped:
            w.skip(path, reason)
        current, good = -1, []
        results = _map_ordered(_prepare_file, jobs, opts.workers)

        def close_identity(k: int, good: list[tuple[bytes, str]]) -> None:
            name = scan.identities[k][0]
            if len(good) < opts.min_images:
                dropped[name] = (
                    f"{len(good)} decodable image(s) < min_images {opts.min_images}"
                    if good
                    else "no decodable image"
                )
                return
            label = len(names)
            names.append(name)
            for blob, p in good:
                w.add(label, blob, p)

        for (path, *_), k, (blob, reason) in zip(jobs, owner, results):
            if k != current:
                if current >= 0:
                    close_identity(current, good)
                current, good = k, []
            if blob is None:
                if opts.strict:
                    raise SourceError(f"{path}: {reason}")
                w.skip(path, reason)
            else:
                good.append((blob, path))
            bar.update()
        close_identity(current, good)
        bar.close()
        if not names:
            raise SourceError(f"{src}: no identity kept ({len(w.skipped)} skipped inputs)")
        return w.finish(
            names,
            source={"type": "folder", "path": str(src.absolute()), **opts.describe()},
            dropped_identities=dropped,
        )


# ------------------------------------------------------------------------------------------
# InsightFace RecordIO


def _resolve_rec(src: Path) -> tuple[Path, Path]:
    if src.is_dir():
        rec, idx = src / "train.rec", src / "train.idx"
    else:
        rec, idx = src, src.with_suffix(".idx")
    for p in (rec, idx):
        if not p.is_file():
            raise FileNotFoundError(f"{p} does not exist (a RecordIO import needs .rec and .idx)")
    return rec, idx


def import_recordio(src: str | Path, dst: str | Path, opts: ImportOptions) -> ImportSummary:
    """Import an InsightFace ``train.rec`` / ``train.idx`` pair (``src``: the folder or .rec).

    Identity names are the source labels as text; labels are renumbered 0..C-1 in source-label
    order. A JPEG record already at the network size without a crop is copied as is (no
    generation loss); others are decoded, cropped, resized and encoded.
    """
    from ffc_ray.data.recordio import RecordIOReader, label_of, unpack

    _check_options(opts)
    rec, idx = _resolve_rec(Path(src))
    with RecordIOReader(rec, idx) as reader:
        indices = reader.image_indices()
        # pass 1: labels only, to apply the identity filters before writing anything
        labels: dict[int, int] = {}
        for k in indices:
            src_k = f"{rec} record {k}"
            labels[k] = label_of(unpack(reader.read(k), src_k)[0], src_k)
        counts: dict[int, int] = {}
        for lab in labels.values():
            counts[lab] = counts.get(lab, 0) + 1
        dropped: dict[str, str] = {}
        kept = []
        for lab in sorted(counts):
            name = str(lab)
            if name in opts.exclude:
                dropped[name] = "excluded (named in a pairs file)"
            elif counts[lab] < opts.min_images:
                dropped[name] = f"{counts[lab]} image(s) < min_images {opts.min_images}"
            else:
                kept.append(lab)
        new_label = {lab: i for i, lab in enumerate(kept)}
        bar = progress_bar(len(indices), "import", enabled=opts.progress)
        copy_ok = opts.crop is None and opts.encoding == "jpeg"
        with opts.writer(dst) as w:
            written = np.zeros(len(kept), dtype=np.int64)
            for k in indices:
                bar.update()
                lab = labels[k]
                if lab not in new_label:
                    continue
                src_k = f"{rec} record {k}"
                _, img_bytes = unpack(reader.read(k), src_k)
                try:
                    img = open_image(img_bytes, src_k)
                    if (
                        copy_ok
                        and img.size == (opts.image_size,) * 2
                        and img_bytes[:3] == b"\xff\xd8\xff"
                    ):
                        blob = img_bytes
                    else:
                        arr = np.asarray(crop_resize(img, opts.crop, opts.image_size))
                        blob = encode_image(arr, opts.encoding, opts.quality)
                except (ImageDecodeError, ValueError) as exc:
                    if opts.strict:
                        raise SourceError(str(exc)) from exc
                    w.skip(src_k, str(exc).removeprefix(f"{src_k}: "))
                    continue
                w.add(new_label[lab], blob, src_k)
                written[new_label[lab]] += 1
            bar.close()
            empty = [str(kept[i]) for i in np.flatnonzero(written == 0)]
            if empty:
                # every record of these identities failed to decode: labels must stay dense
                raise SourceError(
                    f"{rec}: identities {', '.join(empty[:5])} lost all their images to decode "
                    "errors; fix the source or raise --min-images"
                )
            return w.finish(
                [str(lab) for lab in kept],
                source={"type": "recordio", "path": str(rec.absolute()), **opts.describe()},
                dropped_identities=dropped,
            )


# ------------------------------------------------------------------------------------------
# in-memory arrays and the synthetic generator


def import_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    dst: str | Path,
    opts: ImportOptions,
    names: Sequence[str] | None = None,
    source: dict | None = None,
) -> ImportSummary:
    """Write uint8 [N, H, W, 3] images with labels 0..C-1 into a store (resized if needed)."""
    _check_options(opts)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise DataError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
    if labels.shape != (len(images),):
        raise DataError(f"labels must have shape ({len(images)},), got {labels.shape}")
    num = int(labels.max()) + 1 if len(labels) else 0
    if len(labels) and labels.min() < 0:
        raise DataError(f"label {int(labels.min())} out of range (must be >= 0)")
    if names is None:
        names = [f"id{c:06d}" for c in range(num)]
    if len(names) < num:
        raise DataError(f"{len(names)} names for labels up to {num - 1}")
    counts = np.bincount(labels, minlength=len(names))
    kept = (counts >= opts.min_images) & np.array([n not in opts.exclude for n in names], bool)
    keep = np.flatnonzero(kept)
    dropped = {  # the set of kept labels is built once: at 1M identities this is O(N)
        names[c]: (
            "excluded (named in a pairs file)"
            if names[c] in opts.exclude
            else f"{counts[c]} image(s) < min_images {opts.min_images}"
        )
        for c in np.flatnonzero(~kept).tolist()
    }
    new = np.full(len(names), -1, dtype=np.int64)
    new[keep] = np.arange(len(keep))
    need_resize = images.shape[1:3] != (opts.image_size, opts.image_size) or opts.crop is not None
    bar = progress_bar(len(images), "import", enabled=opts.progress)
    with opts.writer(dst) as w:
        for i in np.argsort(labels, kind="stable"):
            bar.update()
            if new[labels[i]] < 0:
                continue
            img = images[i]
            if need_resize:
                from PIL import Image

                img = np.asarray(
                    crop_resize(Image.fromarray(img, "RGB"), opts.crop, opts.image_size)
                )
            w.add(
                int(new[labels[i]]), encode_image(img, opts.encoding, opts.quality), f"array[{i}]"
            )
        bar.close()
        return w.finish(
            [names[c] for c in keep],
            source=source or {"type": "arrays", **opts.describe()},
            dropped_identities=dropped,
        )


def import_synthetic(
    dst: str | Path,
    opts: ImportOptions,
    num_identities: int = 100,
    images_per_identity: int = 8,
    seed: int = 0,
) -> ImportSummary:
    """Generate procedural identities (:mod:`ffc_ray.data.synthetic`) straight into a store."""
    from ffc_ray.data.synthetic import make_identities

    faces = make_identities(num_identities, images_per_identity, opts.image_size, seed)
    return import_arrays(
        faces.images,
        faces.labels,
        dst,
        opts,
        names=faces.names,
        source={
            "type": "synthetic",
            "num_identities": num_identities,
            "images_per_identity": images_per_identity,
            "seed": seed,
            **opts.describe(),
        },
    )


def exclude_from_pairs(paths: Iterable[str | Path]) -> frozenset[str]:
    """Every identity named in the given pairs files (``--exclude-pairs``)."""
    from ffc_ray.data.pairs import pair_names

    names: set[str] = set()
    for p in paths:
        names |= pair_names(p)
    return frozenset(names)
