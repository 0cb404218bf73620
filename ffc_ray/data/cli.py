"""``ffc-ray data``: import face stores, convert verification pairs, verify and describe stores.

::

    ffc-ray data import SRC STORE [--crop lfw] [--image-size 112] [--quality 95 | --lossless]
                                  [--min-images N] [--exclude-pairs FILE ...] [--shards N]
    ffc-ray data pairs SRC OUT.npz [--images DIR] [--image-size 112] [--crop lfw]
    ffc-ray data verify STORE
    ffc-ray data info STORE [--json]

``SRC`` of an import is an image folder (one sub-folder per identity), an InsightFace
RecordIO (a folder holding ``train.rec`` / ``train.idx``, or the ``.rec`` path), or the word
``synthetic``. Exit codes: 0 success, 1 ``verify`` found problems, 2 bad input or arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

LFW_BOX = "69,69,181,181"


def _crop(text: str) -> tuple[int, int, int, int] | None:
    if text in ("", "none"):
        return None
    if text == "lfw":
        text = LFW_BOX
    try:
        box = tuple(int(v) for v in text.split(","))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--crop {text!r}: expected l,t,r,b or 'lfw'") from exc
    if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
        raise argparse.ArgumentTypeError(f"--crop {text!r}: expected l,t,r,b with l<r and t<b")
    return box  # type: ignore[return-value]


def _at_least(minimum: int):
    """argparse type: an integer >= ``minimum`` (argparse names the option and exits 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} must be >= {minimum}")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    p = sub.add_parser("import", help="image folder / RecordIO / synthetic -> sharded LMDB store")
    p.add_argument("src", help="image folder, RecordIO folder or .rec, or 'synthetic'")
    p.add_argument("store", help="output store folder (must not exist unless --overwrite)")
    p.add_argument("--format", choices=("auto", "folder", "rec", "synthetic"), default="auto")
    p.add_argument("--image-size", type=_at_least(8), default=112, help="stored size, px")
    p.add_argument(
        "--crop",
        type=_crop,
        default=None,
        help="crop box l,t,r,b before resizing, or 'lfw' (69,69,181,181)",
    )
    p.add_argument("--quality", type=_at_least(1), default=95, help="JPEG quality (1-100)")
    p.add_argument("--lossless", action="store_true", help="store PNG instead of JPEG")
    p.add_argument("--min-images", type=int, default=1, help="drop identities with fewer images")
    p.add_argument(
        "--exclude-pairs",
        action="append",
        default=[],
        metavar="FILE",
        help="drop every identity named in this pairs list (repeatable)",
    )
    p.add_argument("--shards", type=_at_least(1), default=4, help="LMDB environments")
    p.add_argument("--seed", type=int, default=0, help="shard assignment (and synthetic) seed")
    p.add_argument("--workers", type=_at_least(1), default=1, help="decode processes (folders)")
    p.add_argument("--strict", action="store_true", help="fail on the first bad input file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--num-identities", type=_at_least(1), default=100, help="synthetic: ids")
    p.add_argument(
        "--images-per-identity", type=_at_least(1), default=8, help="synthetic: images each"
    )

    p = sub.add_parser("pairs", help="LFW pairs list / InsightFace .bin -> verification .npz")
    p.add_argument("src", help="pairs .txt (LFW View 1 or 10-fold pairs.txt) or .bin")
    p.add_argument("out", help="output .npz")
    p.add_argument("--images", default=None, help="LFW images folder (default: SRC's images/)")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument(
        "--crop",
        type=_crop,
        default=_crop("lfw"),
        help="crop box for LFW lists (default 'lfw'; 'none' to resize only)",
    )
    p.add_argument("--name", default=None, help="set name (default: file stem)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--max-pairs", type=_at_least(1), default=None, help=".bin: pairs budget")
    p.add_argument(
        "--max-image-pixels", type=_at_least(1), default=None, help=".bin: pixels per image"
    )
    p.add_argument(
        "--max-total-pixels", type=_at_least(1), default=None, help=".bin: pixels of the set"
    )

    p = sub.add_parser("verify", help="decode every record and check the index")
    p.add_argument("store")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("store")
    p.add_argument("--json", action="store_true", help="print JSON")


def _print_summary(summary) -> None:
    d = summary.to_dict()
    print(
        f"store {d['path']}: {d['num_images']} images of {d['num_identities']} identities "
        f"at {d['image_size']}x{d['image_size']}, shards {d['shard_counts']}, "
        f"{d['seconds']:.1f} s"
    )
    print(f"identities with one image (instance stream only): {d['single_image_identities']}")
    if d["num_dropped_identities"]:
        print(f"dropped identities: {d['num_dropped_identities']} (listed in meta.json)")
    if d["num_skipped"]:
        print(f"skipped inputs: {d['num_skipped']} (listed in meta.json)", file=sys.stderr)
        for s in d["skipped"][:20]:
            print(f"  {s['path']}: {s['reason']}", file=sys.stderr)
        if d["num_skipped"] > 20:
            print(f"  ... and {d['num_skipped'] - 20} more", file=sys.stderr)


def _run_import(args: argparse.Namespace) -> int:
    from ffc_ray.data import importers as im

    exclude = im.exclude_from_pairs(args.exclude_pairs) if args.exclude_pairs else frozenset()
    opts = im.ImportOptions(
        image_size=args.image_size,
        crop=args.crop,
        encoding="png" if args.lossless else "jpeg",
        quality=args.quality,
        min_images=args.min_images,
        exclude=exclude,
        num_shards=args.shards,
        seed=args.seed,
        strict=args.strict,
        overwrite=args.overwrite,
        workers=args.workers,
        progress=not args.no_progress,
    )
    fmt = args.format
    src = Path(args.src)
    if fmt == "auto":
        if args.src == "synthetic":
            fmt = "synthetic"
        elif src.suffix == ".rec" or (src / "train.rec").is_file():
            fmt = "rec"
        else:
            fmt = "folder"
    if fmt == "synthetic":
        summary = im.import_synthetic(
            args.store, opts, args.num_identities, args.images_per_identity, args.seed
        )
    elif fmt == "rec":
        summary = im.import_recordio(src, args.store, opts)
    else:
        summary = im.import_folder(src, args.store, opts)
    if exclude:
        print(f"excluded identities named in {', '.join(args.exclude_pairs)}: {len(exclude)} names")
    _print_summary(summary)
    return 0


def _run_pairs(args: argparse.Namespace) -> int:
    from ffc_ray.data.pairs import BinBudget, load_pairs, save_verification_set

    limits = {
        k: getattr(args, k)
        for k in ("max_pairs", "max_image_pixels", "max_total_pixels")
        if getattr(args, k) is not None
    }
    vset = load_pairs(
        args.src,
        args.images,
        args.image_size,
        args.crop,
        args.name,
        progress=not args.no_progress,
        budget=BinBudget(**limits),
    )
    out = save_verification_set(vset, args.out)
    print(
        f"{out}: {len(vset)} pairs ({int(vset.issame.sum())} same), "
        f"{len(set(vset.folds.tolist()))} folds, images {vset.left.shape[1]}px"
    )
    return 0


def _run_verify(args: argparse.Namespace) -> int:
    from ffc_ray.data.store import StoreError, verify_store

    if not Path(args.store).exists():  # bad input (exit 2), not a damaged store (exit 1)
        raise StoreError(f"store {args.store} does not exist")
    rep = verify_store(args.store, progress=not args.no_progress)
    if rep.ok:
        print(f"{rep.path}: OK, {rep.checked} records decoded, index and shards agree")
        return 0
    print(
        f"{rep.path}: {len(rep.problems)} problem(s) in {rep.checked} records checked",
        file=sys.stderr,
    )
    for where, msg in rep.problems[:50]:
        print(f"  {where}: {msg}", file=sys.stderr)
    return 1


def _run_info(args: argparse.Namespace) -> int:
    from ffc_ray.data.store import open_store
    from ffc_ray.data.writer import import_debris

    info = open_store(args.store).info()
    debris = [str(p) for p in import_debris(args.store)]
    if args.json:
        print(json.dumps({**info, "debris": debris}, indent=1))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
        for p in debris:
            print(f"debris: {p} (left by a dead import; the next import of this store removes it)")
    return 0


def run(args: argparse.Namespace) -> int:
    from ffc_ray.data.store import DataError
    from ffc_ray.data.transforms import ImageDecodeError

    handlers = {
        "import": _run_import,
        "pairs": _run_pairs,
        "verify": _run_verify,
        "info": _run_info,
    }
    try:
        return handlers[args.data_command](args)
    except (DataError, ImageDecodeError, FileNotFoundError) as exc:
        print(f"ffc-ray data {args.data_command}: error: {exc}", file=sys.stderr)
        return 2
