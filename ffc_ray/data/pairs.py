"""Verification pairs: LFW pairs lists, InsightFace ``.bin`` files, and the ``.npz`` we save.

* LFW pairs text (``pairsDevTrain.txt`` / ``pairsDevTest.txt``, View 1): no header; a line
  ``name i j`` is a same-person pair, ``name1 i name2 j`` a different-person pair, images
  ``<images>/<name>/<name>_<i:04d>.jpg`` (1-based). The 10-fold ``pairs.txt`` (View 2) starts
  with a ``10 300`` header: 10 folds, each 300 same then 300 different pairs.
* InsightFace ``.bin`` (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``): a pickle of
  ``(bins, issame_list)``, ``bins`` the encoded images of pair ``k`` at ``2k`` and ``2k + 1``.
  Pickle can run arbitrary code when it loads, so :class:`RestrictedUnpickler` refuses every
  global (``find_class``): only the opcodes for bytes, bytearray, str, int, bool, None, lists and
  tuples work, which is all a ``.bin`` needs.
* Fold ids: View 1 lists put all same pairs before all different pairs, so consecutive
  blocks would give folds of one kind; we split the same pairs and the different pairs each
  into ``folds`` consecutive blocks (every fold then holds both kinds, as in View 2).
  ``.bin`` files use InsightFace's ``KFold(shuffle=False)`` consecutive blocks.
* :func:`save_verification_set` / :func:`load_verification_set`: the ``.npz`` (left, right,
  issame, folds, name) that ``ffc-ray data pairs`` writes and evaluation reads; it loads with
  ``allow_pickle=False``.
"""

from __future__ import annotations

import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ffc_ray.data.store import DataError, progress_bar
from ffc_ray.data.transforms import (
    LFW_CROP_BOX,
    ImageDecodeError,
    crop_resize,
    load_face,
    open_image,
)
from ffc_ray.data.types import VerificationSet
from ffc_ray.storage import write_error

log = logging.getLogger(__name__)


class PairsError(DataError):
    """A pairs file that is malformed or names images that do not exist."""


@dataclass(frozen=True)
class PairLine:
    """One pair of a pairs list: names, 1-based image numbers, source line, fold."""

    name1: str
    n1: int
    name2: str
    n2: int
    line: int
    fold: int

    @property
    def issame(self) -> bool:
        return self.name1 == self.name2


def _int(tok: str, path: Path, line: int, what: str) -> int:
    try:
        v = int(tok)
    except ValueError as exc:
        raise PairsError(f"{path}:{line}: {what} {tok!r} is not an integer") from exc
    if v < 1:
        raise PairsError(f"{path}:{line}: {what} {v} must be >= 1 (image numbers are 1-based)")
    return v


def parse_pairs(path: str | Path, folds: int = 10) -> list[PairLine]:
    """Parse an LFW pairs list (View 1 without header, or View 2 with its ``folds n`` header)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pairs file {path} does not exist")
    rows: list[tuple[int, list[str]]] = [
        (n, ln.split()) for n, ln in enumerate(path.read_text().splitlines(), 1) if ln.strip()
    ]
    if not rows:
        raise PairsError(f"{path}: empty pairs file")
    header: tuple[int, int] | None = None
    first = rows[0][1]
    if len(first) == 2 and all(t.isdigit() for t in first):
        header = (int(first[0]), int(first[1]))
        rows = rows[1:]
        expected = header[0] * 2 * header[1]
        if len(rows) != expected:
            raise PairsError(
                f"{path}: header '{first[0]} {first[1]}' announces {header[0]} folds x "
                f"2 x {header[1]} = {expected} pairs, the file has {len(rows)}"
            )
    out: list[PairLine] = []
    for n, tok in rows:
        if len(tok) == 3:
            out.append(
                PairLine(
                    tok[0],
                    _int(tok[1], path, n, "image number"),
                    tok[0],
                    _int(tok[2], path, n, "image number"),
                    n,
                    -1,
                )
            )
        elif len(tok) == 4:
            out.append(
                PairLine(
                    tok[0],
                    _int(tok[1], path, n, "image number"),
                    tok[2],
                    _int(tok[3], path, n, "image number"),
                    n,
                    -1,
                )
            )
        else:
            raise PairsError(
                f"{path}:{n}: expected 'name i j' or 'name1 i name2 j', got {len(tok)} fields"
            )
    if header is not None:
        per = 2 * header[1]
        return [_with_fold(p, i // per) for i, p in enumerate(out)]
    return _assign_folds(out, folds)


def _with_fold(p: PairLine, fold: int) -> PairLine:
    return PairLine(p.name1, p.n1, p.name2, p.n2, p.line, fold)


def _assign_folds(pairs: list[PairLine], folds: int) -> list[PairLine]:
    """Same pairs and different pairs each cut into ``folds`` consecutive blocks."""
    out = list(pairs)
    for same in (True, False):
        idx = [i for i, p in enumerate(pairs) if p.issame == same]
        for r, i in enumerate(idx):
            out[i] = _with_fold(pairs[i], r * folds // max(len(idx), 1))
    return out


def pair_names(path: str | Path) -> set[str]:
    """Every identity named in a pairs list (for ``--exclude-pairs``)."""
    names: set[str] = set()
    for p in parse_pairs(path):
        names.add(p.name1)
        names.add(p.name2)
    return names


def lfw_image_path(images_dir: str | Path, name: str, n: int) -> Path:
    """``<images>/<name>/<name>_<nnnn>.<ext>``: the .jpg LFW ships, or the one file of that
    stem with any other extension (PNG re-encodes, say); none or several is an error."""
    folder = Path(images_dir) / name
    stem = f"{name}_{n:04d}"
    jpg = folder / f"{stem}.jpg"
    if jpg.is_file():
        return jpg
    found = sorted(p for p in folder.glob(f"{stem}.*") if p.is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise FileNotFoundError(f"image {folder / stem}.* does not exist (no file of that name)")
    raise FileNotFoundError(
        f"image {folder / stem}.* is ambiguous: {', '.join(p.name for p in found)}"
    )


def load_lfw_pairs(
    pairs_path: str | Path,
    images_dir: str | Path,
    image_size: int = 112,
    crop: tuple[int, int, int, int] | None = LFW_CROP_BOX,
    name: str | None = None,
    folds: int = 10,
    progress: bool = False,
) -> VerificationSet:
    """An LFW pairs list as a :class:`VerificationSet` at the network size.

    Every image is cropped (``crop``, the LFW 112 px face box by default) and resized exactly
    as the importer does, so verification sees what training saw. An image that the list
    names but the folder lacks is an error naming the line and the path.
    """
    pairs_path = Path(pairs_path)
    pairs = parse_pairs(pairs_path, folds)
    paths: list[tuple[Path, Path]] = []
    for p in pairs:
        try:
            a = lfw_image_path(images_dir, p.name1, p.n1)
            b = lfw_image_path(images_dir, p.name2, p.n2)
        except FileNotFoundError as exc:
            raise PairsError(f"{pairs_path}:{p.line}: {exc}") from None
        paths.append((a, b))
    cache: dict[Path, np.ndarray] = {}
    bar = progress_bar(len(paths), f"pairs {pairs_path.name}", enabled=progress)

    def get(q: Path) -> np.ndarray:
        if q not in cache:
            cache[q] = load_face(str(q), crop, image_size)
        return cache[q]

    left = np.empty((len(paths), image_size, image_size, 3), dtype=np.uint8)
    right = np.empty_like(left)
    for i, (a, b) in enumerate(paths):
        try:
            left[i], right[i] = get(a), get(b)
        except ImageDecodeError as exc:
            raise PairsError(f"{pairs_path}:{pairs[i].line}: {exc}") from exc
        bar.update()
    bar.close()
    return VerificationSet(
        name=name or pairs_path.stem,
        left=left,
        right=right,
        issame=np.array([p.issame for p in pairs], dtype=bool),
        folds=np.array([p.fold for p in pairs], dtype=np.int64),
    )


# ------------------------------------------------------------------------------------------
# InsightFace .bin


def _latin1_bytes(text: object, encoding: object = "latin1") -> bytes:
    """What Python 3 pickles at protocol 2 call to rebuild ``bytes``:
    ``_codecs.encode(text, 'latin1')``; any other use is refused."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise DataError(f"refusing _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that refuses every global but one pure function, so loading cannot run code.

    Pickle's code-execution paths (REDUCE, BUILD, INST, OBJ, NEWOBJ) all need a callable,
    which only ``find_class`` can supply; it gives only a stand-in for ``_codecs.encode`` that
    turns a str into latin-1 bytes (how Python 3 writes ``bytes`` at protocol 2), which leaves
    the plain-data opcodes (bytes, bytearray, str, ints, bools, None, lists, tuples, dicts,
    floats). ``persistent_load`` is not defined, so persistent ids raise too.
    """

    source = "<pickle>"

    def find_class(self, module: str, name: str):  # noqa: D102 - see class docstring
        if (module, name) == ("_codecs", "encode"):
            return _latin1_bytes
        raise DataError(
            f"{self.source}: refusing to load global '{module}.{name}' (a .bin file holds "
            "only bytes, lists, tuples and booleans; this pickle could run code)"
        )


def safe_unpickle(data: bytes, source: str = "<pickle>"):
    """Unpickle plain data only (see :class:`RestrictedUnpickler`); Python 2 ``str`` -> bytes."""
    up = RestrictedUnpickler(io.BytesIO(data), encoding="bytes")
    up.source = source
    try:
        return up.load()
    except DataError:
        raise
    except Exception as exc:  # UnpicklingError, EOFError, ValueError ...
        raise DataError(f"{source}: not a readable pickle ({type(exc).__name__}: {exc})") from exc


@dataclass(frozen=True)
class BinBudget:
    """Limits on what a ``.bin`` may make this process do. ``max_pairs``: pairs in the file
    (2M: a million-pair set twice over); ``max_image_pixels``: one image's decoded size;
    ``max_total_pixels``: the pixels of the set as loaded (after the resize to the network
    size, counted once per pair slot, whatever the file's pickle shares), 32 Gpx: a 1M-pair set
    at 112 px is 25 Gpx, LFW / CFP-FP / AgeDB-30 at 112 px are 0.15-0.18 Gpx."""

    max_pairs: int = 2_000_000
    max_image_pixels: int = 16_777_216  # 4096 x 4096: aligned faces are 112 x 112
    max_total_pixels: int = 32_000_000_000


def load_bin(
    path: str | Path,
    image_size: int | None = None,
    name: str | None = None,
    budget: BinBudget = BinBudget(),
) -> VerificationSet:
    """An InsightFace ``.bin`` verification file as a :class:`VerificationSet`.

    Images are decoded and, when ``image_size`` is given and differs, resized (no crop: the
    images are already aligned faces). Folds: consecutive blocks (InsightFace's KFold). Each
    encoded image is decoded once however often the pickle refers to it, and ``budget`` bounds
    the pairs, one image's pixels and the whole set's (an error names the file and the limit).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    obj = safe_unpickle(path.read_bytes(), str(path))
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pickled (bins, issame_list), got {type(obj).__name__}")
    bins, issame = obj
    if not isinstance(bins, (list, tuple)) or not all(
        isinstance(b, (bytes, bytearray)) for b in bins
    ):
        raise DataError(f"{path}: field 'bins' must be a list of encoded images (bytes)")
    if not isinstance(issame, (list, tuple)) or not all(
        isinstance(s, (bool, int)) and s in (0, 1) for s in issame
    ):
        raise DataError(f"{path}: field 'issame_list' must be a list of booleans")
    if len(bins) != 2 * len(issame):
        raise DataError(
            f"{path}: {len(bins)} images for {len(issame)} pairs (field 'bins' needs 2 per pair)"
        )
    if len(issame) > budget.max_pairs:
        raise DataError(f"{path}: {len(issame)} pairs exceed the budget of {budget.max_pairs}")
    images: list[np.ndarray] = []
    decoded: dict[int, np.ndarray] = {}  # id of the bytes object -> its image (decoded once)
    total = 0
    for k, b in enumerate(bins):
        arr = decoded.get(id(b))
        if arr is None:
            try:
                img = open_image(bytes(b), f"{path} image {k}", budget.max_image_pixels)
            except ImageDecodeError as exc:
                raise DataError(str(exc)) from exc
            if image_size is not None:
                img = crop_resize(img, None, image_size)
            arr = decoded[id(b)] = np.asarray(img, dtype=np.uint8)
        total += arr.shape[0] * arr.shape[1]
        if total > budget.max_total_pixels:
            raise DataError(
                f"{path}: the set's images exceed the budget of {budget.max_total_pixels} "
                f"pixels in total (at image {k} of {len(bins)})"
            )
        if images and arr.shape != images[0].shape:
            raise DataError(
                f"{path} image {k}: size {arr.shape[1]}x{arr.shape[0]} differs from image 0 "
                f"({images[0].shape[1]}x{images[0].shape[0]}); pass an image size to resize"
            )
        images.append(arr)
    stack = (
        np.stack(images)
        if images
        else np.zeros((0, image_size or 1, image_size or 1, 3), dtype=np.uint8)
    )
    return VerificationSet(
        name=name or path.stem,
        left=stack[0::2],
        right=stack[1::2],
        issame=np.asarray(issame, dtype=bool),
    )


# ------------------------------------------------------------------------------------------
# our own file: .npz


def save_verification_set(vset: VerificationSet, path: str | Path) -> Path:
    """Write ``vset`` as an ``.npz`` (left, right, issame, folds, name); returns the path."""
    path = Path(path)
    if path.suffix != ".npz":
        path = path.with_suffix(path.suffix + ".npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with open(tmp, "wb") as f:
            np.savez(
                f,
                left=vset.left,
                right=vset.right,
                issame=np.asarray(vset.issame, dtype=bool),
                folds=np.asarray(vset.folds, dtype=np.int64),
                name=np.array(vset.name),
            )
        tmp.replace(path)
    except OSError as exc:  # disk full: no .part left to keep the disk full
        tmp.unlink(missing_ok=True)
        raise DataError(write_error(path, exc)) from None
    return path


def load_verification_set(path: str | Path, image_size: int | None = None) -> VerificationSet:
    """Load a verification set saved by :func:`save_verification_set` (no pickle).

    ``image_size``: resize the images when they are stored at another size (a model trained
    at 64 px evaluated on a 112 px set), with the importer's bilinear resize.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"verification set {path} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("left", "right", "issame", "folds", "name") if k not in z]
            if missing:
                raise DataError(f"{path}: field(s) {', '.join(missing)} missing")
            left, right = z["left"], z["right"]
            issame, folds, name = z["issame"], z["folds"], str(z["name"])
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"{path}: not a verification set .npz ({exc})") from exc
    for fld, arr in (("left", left), ("right", right)):
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise DataError(
                f"{path}: field '{fld}' must be uint8 [P, H, W, 3], got {arr.dtype} {arr.shape}"
            )
    if image_size is not None and left.shape[1:3] != (image_size, image_size):
        left, right = resize_images(left, image_size), resize_images(right, image_size)
    try:
        return VerificationSet(name=name, left=left, right=right, issame=issame, folds=folds)
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from exc


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [N, H, W, 3] -> [N, size, size, 3], bilinear (antialiased when shrinking)."""
    from PIL import Image

    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        out[i] = np.asarray(crop_resize(Image.fromarray(img, "RGB"), None, size))
    return out


def load_pairs(
    path: str | Path,
    images_dir: str | Path | None = None,
    image_size: int = 112,
    crop: tuple[int, int, int, int] | None = LFW_CROP_BOX,
    name: str | None = None,
    progress: bool = False,
    budget: BinBudget = BinBudget(),
) -> VerificationSet:
    """Any supported pairs source by its extension: ``.npz``, ``.bin`` (within ``budget``), or
    an LFW list."""
    path = Path(path)
    if path.suffix == ".npz":
        return load_verification_set(path, image_size)
    if path.suffix == ".bin":
        return load_bin(path, image_size, name, budget)
    if images_dir is None:
        images_dir = path.parent / "images"
    return load_lfw_pairs(path, images_dir, image_size, crop, name, progress=progress)
