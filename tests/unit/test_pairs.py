"""Verification pairs: LFW lists (View 1 and the 10-fold header), .bin (safe pickle), .npz."""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ffc_ray.data.pairs import (
    PairsError,
    load_bin,
    load_lfw_pairs,
    load_pairs,
    load_verification_set,
    pair_names,
    parse_pairs,
    safe_unpickle,
    save_verification_set,
)
from ffc_ray.data.store import DataError
from ffc_ray.data.transforms import load_face
from ffc_ray.data.types import VerificationSet
from tests.unit.test_store import smooth_images, write_folder


@pytest.fixture
def lfw_like(tmp_path) -> Path:
    write_folder(
        tmp_path / "images", {"Al_A": 3, "Bo_B": 2, "Cy_C": 2, "Di_D": 1}, size=40, ext="jpg"
    )
    return tmp_path


VIEW1 = """Al_A\t1\t2
Al_A\t2\t3
Bo_B\t1\t2
Cy_C\t2\t1
Al_A\t1\tBo_B\t2
Bo_B\t1\tCy_C\t1
Cy_C\t2\tDi_D\t1
Di_D\t1\tAl_A\t3
"""


def test_view1_list_pixels_flags_and_balanced_folds(lfw_like):
    (lfw_like / "pairs.txt").write_text(VIEW1)
    box = (4, 4, 36, 36)
    v = load_lfw_pairs(
        lfw_like / "pairs.txt", lfw_like / "images", image_size=16, crop=box, folds=2
    )
    assert len(v) == 8 and v.left.shape == (8, 16, 16, 3)
    assert v.issame.tolist() == [True] * 4 + [False] * 4
    # each fold holds both kinds: same pairs 0,1 | 2,3 and different pairs 4,5 | 6,7
    assert v.folds.tolist() == [0, 0, 1, 1, 0, 0, 1, 1]
    img = lfw_like / "images"
    np.testing.assert_array_equal(v.left[3], load_face(str(img / "Cy_C/Cy_C_0002.jpg"), box, 16))
    np.testing.assert_array_equal(v.right[3], load_face(str(img / "Cy_C/Cy_C_0001.jpg"), box, 16))
    ref = (
        Image.open(img / "Di_D/Di_D_0001.jpg")
        .convert("RGB")
        .crop(box)
        .resize((16, 16), Image.BILINEAR)
    )
    np.testing.assert_array_equal(v.right[6], np.asarray(ref))
    assert pair_names(lfw_like / "pairs.txt") == {"Al_A", "Bo_B", "Cy_C", "Di_D"}


def test_ten_fold_header_layout(lfw_like):
    lines = VIEW1.splitlines()
    text = "2 2\n" + "\n".join(lines[0:2] + lines[4:6] + lines[2:4] + lines[6:8]) + "\n"
    (lfw_like / "pairs10.txt").write_text(text)
    pairs = parse_pairs(lfw_like / "pairs10.txt")
    assert [p.fold for p in pairs] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [p.issame for p in pairs] == [True, True, False, False] * 2
    assert [p.line for p in pairs] == list(range(2, 10))
    (lfw_like / "bad10.txt").write_text("10 300\n" + VIEW1)
    with pytest.raises(PairsError, match=r"announces 10 folds x 2 x 300 = 6000 pairs.* has 8"):
        parse_pairs(lfw_like / "bad10.txt")


def test_pairs_naming_missing_images_name_line_and_path(lfw_like):
    (lfw_like / "pairs.txt").write_text(VIEW1 + "Bo_B\t1\t7\n")
    missing = lfw_like / "images" / "Bo_B" / "Bo_B_0007"
    with pytest.raises(PairsError, match=rf"pairs.txt:9: image {missing}\.\* does not exist"):
        load_lfw_pairs(lfw_like / "pairs.txt", lfw_like / "images", image_size=16)


def test_pairs_images_resolve_by_name_whatever_the_extension(lfw_like):
    """A list names images without caring how they are encoded: Bo_B_0001 as a PNG resolves;
    two files of one name are ambiguous and named."""
    from PIL import Image

    (lfw_like / "pairs.txt").write_text(VIEW1)
    ref = load_lfw_pairs(lfw_like / "pairs.txt", lfw_like / "images", image_size=16, crop=None)
    jpgs = sorted((lfw_like / "images").rglob("*.jpg"))
    for p in jpgs:  # lossless re-encode: the same pixels under another extension
        Image.open(p).save(p.with_suffix(".png"))
        p.unlink()
    got = load_lfw_pairs(lfw_like / "pairs.txt", lfw_like / "images", image_size=16, crop=None)
    np.testing.assert_array_equal(got.left, ref.left)
    dup = jpgs[0].with_suffix(".bmp")
    Image.open(jpgs[0].with_suffix(".png")).save(dup)
    with pytest.raises(PairsError, match=rf"{jpgs[0].stem}\.\* is ambiguous: .*\.bmp, .*\.png"):
        load_lfw_pairs(lfw_like / "pairs.txt", lfw_like / "images", image_size=16, crop=None)


@pytest.mark.parametrize(
    "line, msg",
    [
        ("Al_A\t1\n", "got 2 fields"),
        ("Al_A\tx\t2\n", "'x' is not an integer"),
        ("Al_A\t0\t2\n", "must be >= 1"),
    ],
)
def test_malformed_lines(lfw_like, line, msg):
    (lfw_like / "p.txt").write_text(VIEW1 + line)
    with pytest.raises(PairsError, match=rf"p.txt:9: .*{msg}"):
        parse_pairs(lfw_like / "p.txt")


def test_corrupt_image_in_pairs_is_an_error(lfw_like):
    (lfw_like / "images" / "Bo_B" / "Bo_B_0002.jpg").write_bytes(b"\xff\xd8\xff junk")
    (lfw_like / "pairs.txt").write_text(VIEW1)
    with pytest.raises(PairsError, match=r"pairs.txt:3: .*Bo_B_0002.jpg: cannot decode"):
        load_lfw_pairs(lfw_like / "pairs.txt", lfw_like / "images", image_size=16, crop=None)


# ---- InsightFace .bin ----------------------------------------------------------------------


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _py2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """(bins, issame) as Python 2's cPickle protocol 2 writes it: bins are py2 ``str``."""
    out = bytearray(b"\x80\x02")  # PROTO 2
    out += b"]("  # EMPTY_LIST, MARK
    for b in bins:
        out += b"T" + struct.pack("<I", len(b)) + b  # BINSTRING (py2 str)
    out += b"e"  # APPENDS
    out += b"]("
    for s in issame:
        out += b"\x88" if s else b"\x89"  # NEWTRUE / NEWFALSE
    out += b"e"
    out += b"\x86."  # TUPLE2, STOP
    return bytes(out)


@pytest.fixture
def bin_images() -> tuple[list[bytes], list[bool], np.ndarray]:
    imgs = smooth_images(8, 24, seed=9)
    bins = [_jpeg(i) for i in imgs]
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in bins])
    return bins, [True, False, True, False], decoded


@pytest.mark.parametrize("layout", ["py3", "py2"])
def test_bin_real_layout_loads(tmp_path, bin_images, layout):
    bins, issame, decoded = bin_images
    data = (
        pickle.dumps((bins, issame), protocol=pickle.HIGHEST_PROTOCOL)
        if layout == "py3"
        else _py2_pickle(bins, issame)
    )
    (tmp_path / "lfw.bin").write_bytes(data)
    v = load_bin(tmp_path / "lfw.bin")
    assert v.name == "lfw" and v.issame.tolist() == issame
    np.testing.assert_array_equal(v.left, decoded[0::2])
    np.testing.assert_array_equal(v.right, decoded[1::2])
    small = load_bin(tmp_path / "lfw.bin", image_size=12)
    ref = Image.open(io.BytesIO(bins[3])).convert("RGB").resize((12, 12), Image.BILINEAR)
    np.testing.assert_array_equal(small.right[1], np.asarray(ref))


def test_restricted_unpickler_refuses_any_global():
    with pytest.raises(DataError, match="numpy"):
        safe_unpickle(pickle.dumps(np.zeros(3)))
    with pytest.raises(DataError, match=r"(__builtin__|builtins)\.set"):
        safe_unpickle(pickle.dumps({1, 2}, protocol=2))
    # plain data loads (bytearray has its own opcode from protocol 5 on)
    assert safe_unpickle(pickle.dumps(([b"a", bytearray(b"b")], (1, True)), protocol=5)) == (
        [b"a", bytearray(b"b")],
        (1, True),
    )


def test_bin_with_wrong_structure(tmp_path, bin_images):
    bins, issame, _ = bin_images
    cases = {
        "a.bin": (bins[:7], issame),
        "b.bin": (bins, ["yes"] * 4),
        "c.bin": [bins],
        "d.bin": (["text"] * 8, issame),
    }
    msgs = {
        "a.bin": "7 images for 4 pairs",
        "b.bin": "'issame_list'",
        "c.bin": r"expected a pickled \(bins, issame_list\)",
        "d.bin": "'bins'",
    }
    for name, obj in cases.items():
        (tmp_path / name).write_bytes(pickle.dumps(obj))
        with pytest.raises(DataError, match=msgs[name]):
            load_bin(tmp_path / name)
    (tmp_path / "e.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="e.bin: not a readable pickle"):
        load_bin(tmp_path / "e.bin")


# ---- our .npz ------------------------------------------------------------------------------


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    v = VerificationSet(
        "set-x",
        rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
        rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8),
        np.array([1, 0, 1, 0, 1, 0], bool),
        np.array([0, 0, 1, 1, 2, 2]),
    )
    path = save_verification_set(v, tmp_path / "v.npz")
    w = load_verification_set(path)
    assert w.name == "set-x"
    for f in ("left", "right", "issame", "folds"):
        np.testing.assert_array_equal(getattr(w, f), getattr(v, f))
    assert load_pairs(path).name == "set-x"
    w16 = load_verification_set(path, image_size=16)
    assert w16.left.shape == (6, 16, 16, 3)
    np.savez(tmp_path / "bad.npz", left=v.left, right=v.right)
    with pytest.raises(DataError, match="issame, folds, name missing"):
        load_verification_set(tmp_path / "bad.npz")


# ---- real LFW (skipped when absent) --------------------------------------------------------


@pytest.mark.lfw
def test_lfw_dev_test_pairs_subset(lfw_dir, tmp_path):
    lines = (lfw_dir / "pairsDevTest.txt").read_text().splitlines()
    sub = lines[:6] + lines[500:506]  # same pairs come first, then different pairs
    (tmp_path / "sub.txt").write_text("\n".join(sub) + "\n")
    v = load_lfw_pairs(tmp_path / "sub.txt", lfw_dir / "images", image_size=112, folds=2)
    assert len(v) == 12 and v.left.shape == (12, 112, 112, 3)
    assert v.issame.tolist() == [True] * 6 + [False] * 6
    name, i, j = sub[0].split()
    np.testing.assert_array_equal(
        v.right[0],
        load_face(
            str(lfw_dir / "images" / name / f"{name}_{int(j):04d}.jpg"), (69, 69, 181, 181), 112
        ),
    )
