"""Verification pairs: LFW lists (View 1 and the 10-fold header), .bin (safe pickle), .npz."""

from __future__ import annotations

import io
import os
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
    missing = lfw_like / "images" / "Bo_B" / "Bo_B_0007.jpg"
    with pytest.raises(PairsError, match=rf"pairs.txt:9: image {missing} does not exist"):
        load_lfw_pairs(lfw_like / "pairs.txt", lfw_like / "images", image_size=16)


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


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_bin_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(([_Evil(str(marker))], [True]))
    assert b"system" in evil
    (tmp_path / "evil.bin").write_bytes(evil)
    with pytest.raises(DataError, match=r"evil.bin: refusing to load global '(posix|os)\.system'"):
        load_bin(tmp_path / "evil.bin")
    assert not marker.exists()
    # the same pickle through the standard loader would have run the command
    pickle.loads(evil)
    assert marker.exists()


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


def test_a_bin_referring_to_one_image_many_times_decodes_it_once(tmp_path, bin_images, monkeypatch):
    """The pickle memo lets a small file name one JPEG thousands of times: it is decoded once,
    and every pair slot still holds it."""
    from ffc_ray.data import pairs as pairs_mod

    bins, _, decoded = bin_images
    one = bins[0]
    data = pickle.dumps(([one] * 4000, [True] * 2000), protocol=2)  # memo: one bytes object
    assert len(data) < 2 * len(one) + 30_000  # the file stays small
    (tmp_path / "amp.bin").write_bytes(data)
    calls = []
    real = pairs_mod.open_image
    monkeypatch.setattr(pairs_mod, "open_image", lambda *a, **k: calls.append(1) or real(*a, **k))
    v = load_bin(tmp_path / "amp.bin")
    assert len(calls) == 1 and v.left.shape == (2000, 24, 24, 3)
    np.testing.assert_array_equal(v.right[1999], decoded[0])


def test_bin_budgets_name_the_file_and_the_limit(tmp_path, bin_images):
    from ffc_ray.data.pairs import BinBudget

    bins, issame, _ = bin_images
    (tmp_path / "s.bin").write_bytes(pickle.dumps((bins, issame)))
    with pytest.raises(DataError, match=r"s\.bin: 4 pairs exceed the budget of 3"):
        load_bin(tmp_path / "s.bin", budget=BinBudget(max_pairs=3))
    with pytest.raises(DataError, match=r"s\.bin image 0: 24 x 24 = 576 pixels exceed .* 500"):
        load_bin(tmp_path / "s.bin", budget=BinBudget(max_image_pixels=500))
    with pytest.raises(DataError, match=r"budget of 2000 pixels in total \(at image 3 of 8\)"):
        load_bin(tmp_path / "s.bin", budget=BinBudget(max_total_pixels=2000))  # 576 each
    assert len(load_bin(tmp_path / "s.bin", image_size=8, budget=BinBudget(max_total_pixels=512)))


def test_every_import_path_refuses_an_image_over_the_pixel_budget(tmp_path, monkeypatch):
    """The header's size is checked before decoding (a 300 KB PNG of 10k x 10k would take
    0.4 GB); a folder import skips and lists such a file."""
    from ffc_ray.data import transforms
    from ffc_ray.data.importers import ImportOptions, import_folder

    big = np.zeros((40, 30, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(big).save(buf, "PNG")
    with pytest.raises(transforms.ImageDecodeError, match="40 = 1200 pixels exceed .* 1000"):
        transforms.open_image(buf.getvalue(), "big.png", max_pixels=1000)
    monkeypatch.setattr(transforms, "MAX_IMAGE_PIXELS", 1000)
    for name, n in (("ann", 3), ("bob", 2)):
        d = tmp_path / "faces" / name
        d.mkdir(parents=True)
        for i in range(n):
            Image.fromarray(big if (name, i) == ("ann", 0) else big[:20, :20]).save(d / f"{i}.png")
    summary = import_folder(tmp_path / "faces", tmp_path / "st", ImportOptions(image_size=16))
    assert summary.num_images == 4 and len(summary.skipped) == 1
    assert "exceed the budget" in summary.skipped[0].reason


def test_python3_protocol_2_bin_loads_and_codecs_stays_narrow(tmp_path, bin_images):
    bins, issame, decoded = bin_images
    data = pickle.dumps((bins, issame), protocol=2)
    assert b"_codecs" in data  # how Python 3 writes bytes at protocol 2
    (tmp_path / "p2.bin").write_bytes(data)
    np.testing.assert_array_equal(load_bin(tmp_path / "p2.bin").left, decoded[0::2])
    # the stand-in only makes latin-1 bytes out of a str: any other use is refused
    abuse = (  # _codecs.encode("abc", "rot13")
        b"\x80\x02c_codecs\nencode\nq\x00X\x03\x00\x00\x00abcq\x01"
        b"X\x05\x00\x00\x00rot13q\x02\x86q\x03Rq\x04."
    )
    with pytest.raises(DataError, match="refusing _codecs.encode"):
        safe_unpickle(abuse)
