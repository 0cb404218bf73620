"""Drills with files a user can be handed (checkpoints, .bin sets, images): none runs code,
none takes more memory or CPU than its budget, every refusal names the file and the limit."""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ffc_ray.cli import main
from ffc_ray.data.pairs import load_bin, safe_unpickle
from ffc_ray.data.store import DataError
from ffc_ray.engine.checkpoint import STATE_FILE, CheckpointError, load_checkpoint_state


class _WritesMarker:
    """A hostile object: unpickling it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (str(self.marker),))


class _Evil:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_checkpoint_that_would_run_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save({"step": 1, "trainer": {"x": _WritesMarker(marker)}}, ckpt / STATE_FILE)
    with pytest.raises(CheckpointError, match=str(ckpt / STATE_FILE)):
        load_checkpoint_state(ckpt)
    assert not marker.exists()
    # the CLI: one line naming the file, exit code 2, still nothing run
    assert main(["eval", str(ckpt), "--pairs", "synthetic"]) == 2
    assert not marker.exists()


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
