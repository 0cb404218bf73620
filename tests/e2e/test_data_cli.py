"""`ffc-ray data import | pairs | verify | info` end to end on generated (and real LFW) data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lmdb
import numpy as np
import pytest

from ffc_ray.cli import main
from ffc_ray.data.pairs import load_verification_set
from ffc_ray.data.store import close_cached_envs, open_store, shard_dir
from tests.unit.test_importers import jpeg, rec_pack, write_rec
from tests.unit.test_store import smooth_images, write_folder

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _close_envs():
    yield
    close_cached_envs()


def run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(["data", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_import_info_verify_and_a_corrupted_record(tmp_path, capsys):
    src = write_folder(tmp_path / "faces", {"ann": 3, "bob": 2, "cat": 1})
    st = str(tmp_path / "st")
    rc, out, _ = run(
        capsys,
        "import",
        str(tmp_path / "faces"),
        st,
        "--image-size",
        "24",
        "--lossless",
        "--shards",
        "2",
        "--no-progress",
    )
    assert rc == 0
    assert "6 images of 3 identities at 24x24" in out
    assert "identities with one image (instance stream only): 1" in out
    rc, out, _ = run(capsys, "info", st, "--json")
    info = json.loads(out)
    assert rc == 0 and info["num_images"] == 6 and info["encoding"] == "png"
    assert info["identities_with_one_image"] == 1 and sum(info["shard_counts"]) == 6
    store = open_store(st)
    for i, p in enumerate(store.sources):
        np.testing.assert_array_equal(store.images([i])[0], src[p])
    rc, out, _ = run(capsys, "verify", st, "--no-progress")
    assert rc == 0 and "OK, 6 records decoded" in out
    key = store.keys[store.shards == 1][0]
    close_cached_envs()
    env = lmdb.open(str(shard_dir(st, 1)))
    with env.begin(write=True) as txn:
        txn.put(key, b"\x89PNG\r\n\x1a\n broken")
    env.close()
    rc, _, err = run(capsys, "verify", st, "--no-progress")
    assert rc == 1 and f"{key.decode()}: " in err and "cannot decode" in err


def test_import_with_bad_files_lists_them_and_strict_fails(tmp_path, capsys):
    write_folder(tmp_path / "faces", {"ann": 2, "bob": 2})
    (tmp_path / "faces" / "bob" / "bob_0003.png").write_bytes(b"nope")
    (tmp_path / "faces" / "ann" / "Thumbs.db").write_bytes(b"\0")
    (tmp_path / "faces" / "empty").mkdir()
    st = str(tmp_path / "st")
    rc, out, err = run(
        capsys, "import", str(tmp_path / "faces"), st, "--image-size", "24", "--no-progress"
    )
    assert rc == 0 and "4 images of 2 identities" in out
    assert "skipped inputs: 3" in err
    assert "bob_0003.png: cannot decode" in err and "Thumbs.db: not an image file" in err
    assert "empty: empty identity folder" in err
    meta = json.loads((tmp_path / "st" / "meta.json").read_text())
    assert meta["num_skipped"] == 3
    rc, _, err = run(
        capsys,
        "import",
        str(tmp_path / "faces"),
        str(tmp_path / "st2"),
        "--strict",
        "--no-progress",
    )
    assert rc == 2 and "error:" in err and not (tmp_path / "st2").exists()
    rc, _, err = run(capsys, "import", str(tmp_path / "faces"), st, "--no-progress")
    assert rc == 2 and "already exists" in err


def test_exclude_pairs_min_images_and_pairs_npz(tmp_path, capsys):
    write_folder(
        tmp_path / "images",
        {"Al_A": 3, "Bo_B": 2, "Cy_C": 2, "Di_D": 1, "Ed_E": 4},
        size=40,
        ext="jpg",
    )
    (tmp_path / "test_pairs.txt").write_text("Al_A\t1\t2\nAl_A\t1\tBo_B\t2\n")
    st = str(tmp_path / "st")
    rc, out, _ = run(
        capsys,
        "import",
        str(tmp_path / "images"),
        st,
        "--crop",
        "4,4,36,36",
        "--image-size",
        "16",
        "--exclude-pairs",
        str(tmp_path / "test_pairs.txt"),
        "--min-images",
        "2",
        "--no-progress",
    )
    assert rc == 0 and "2 names" in out
    assert open_store(st).names == ["Cy_C", "Ed_E"]  # Al_A, Bo_B excluded; Di_D < 2 images
    out_npz = tmp_path / "v.npz"
    rc, out, _ = run(
        capsys,
        "pairs",
        str(tmp_path / "test_pairs.txt"),
        str(out_npz),
        "--image-size",
        "16",
        "--crop",
        "4,4,36,36",
        "--no-progress",
    )
    assert rc == 0 and "2 pairs (1 same)" in out
    v = load_verification_set(out_npz)
    assert v.left.shape == (2, 16, 16, 3) and v.issame.tolist() == [True, False]
    (tmp_path / "bad_pairs.txt").write_text("Al_A\t1\t9\n")
    rc, _, err = run(
        capsys, "pairs", str(tmp_path / "bad_pairs.txt"), str(tmp_path / "b.npz"), "--no-progress"
    )
    assert rc == 2 and "bad_pairs.txt:1: image" in err and "Al_A_0009.* does not exist" in err


def test_import_recordio_and_synthetic(tmp_path, capsys):
    imgs = smooth_images(4, 24)
    write_rec(
        tmp_path / "train",
        {
            0: rec_pack(2, [5, 7], 0, 0, b""),
            **{k: rec_pack(0, [3, 8, 3, 8][k - 1], 0, 0, jpeg(imgs[k - 1])) for k in range(1, 5)},
        },
    )
    rc, out, _ = run(
        capsys, "import", str(tmp_path), str(tmp_path / "st"), "--image-size", "24", "--no-progress"
    )
    assert rc == 0 and "4 images of 2 identities" in out
    assert open_store(tmp_path / "st").names == ["3", "8"]
    pytest.importorskip("ffc_ray.data.synthetic")
    rc, out, _ = run(
        capsys,
        "import",
        "synthetic",
        str(tmp_path / "syn"),
        "--image-size",
        "32",
        "--num-identities",
        "5",
        "--images-per-identity",
        "3",
        "--no-progress",
    )
    assert rc == 0 and "15 images of 5 identities at 32x32" in out


def test_missing_store_is_a_clean_error(tmp_path, capsys):
    rc, _, err = run(capsys, "info", str(tmp_path / "nothing"))
    assert rc == 2 and "does not exist" in err
    rc, _, err = run(capsys, "verify", str(tmp_path / "nothing"), "--no-progress")
    assert rc == 2 and "does not exist" in err  # bad input; 1 is for a store with problems


@pytest.mark.slow  # a fresh interpreter: about 3 s idle, 10 s on a busy 2-core machine
def test_entry_point_subprocess(tmp_path):
    write_folder(tmp_path / "faces", {"a": 2, "b": 2})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [
        sys.executable,
        "-m",
        "ffc_ray.cli",
        "data",
        "import",
        str(tmp_path / "faces"),
        str(tmp_path / "st"),
        "--image-size",
        "24",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr
    assert "import: 100%" in res.stderr and "4/4" in res.stderr  # the progress bar (tqdm)
    assert "4 images of 2 identities" in res.stdout


@pytest.mark.lfw
def test_lfw_subset_identity_disjoint_import_and_dev_pairs(lfw_dir, tmp_path, capsys):
    test_pairs = lfw_dir / "pairsDevTest.txt"
    lines = test_pairs.read_text().splitlines()
    in_test = {lines[0].split()[0], lines[1].split()[0]}
    others = [
        n
        for n in ("George_W_Bush", "Colin_Powell", "Tony_Blair", "Aaron_Peirsol")
        if (lfw_dir / "images" / n).is_dir()
    ]
    sub = tmp_path / "lfw_subset"  # symlinks only: LFW itself is never copied
    sub.mkdir()
    for n in sorted(in_test) + others[:2]:
        os.symlink(lfw_dir / "images" / n, sub / n)
    # a small slice of the big identities keeps the test fast
    for n in others[:2]:
        (sub / n).unlink()
        (sub / n).mkdir()
        for f in sorted((lfw_dir / "images" / n).iterdir())[:4]:
            os.symlink(f, sub / n / f.name)
    st = tmp_path / "st"
    rc, out, _ = run(
        capsys,
        "import",
        str(sub),
        str(st),
        "--crop",
        "lfw",
        "--exclude-pairs",
        str(test_pairs),
        "--min-images",
        "2",
        "--no-progress",
    )
    assert rc == 0
    store = open_store(st)
    names_in_test = set()
    for ln in lines:
        t = ln.split()
        names_in_test |= {t[0]} if len(t) == 3 else {t[0], t[2]}
    assert store.names == sorted(others[:2]) and not set(store.names) & names_in_test
    assert store.image_size == 112 and store.num_images == 8
    rc, out, _ = run(capsys, "verify", str(st), "--no-progress")
    assert rc == 0


@pytest.mark.parametrize(
    "option,value",
    [("--image-size", "0"), ("--num-identities", "0"), ("--images-per-identity", "0"),
     ("--shards", "0"), ("--workers", "x")],
)  # fmt: skip
def test_import_refuses_impossible_numbers_with_exit_2_naming_the_option(
    tmp_path, capsys, option, value
):
    with pytest.raises(SystemExit) as exc:
        main(["data", "import", "synthetic", str(tmp_path / "st"), option, value])
    assert exc.value.code == 2
    assert f"argument {option}:" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing written


def test_pairs_cli_applies_the_bin_budget(tmp_path, capsys):
    import io
    import pickle

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, "PNG")
    (tmp_path / "t.bin").write_bytes(pickle.dumps(([buf.getvalue()] * 4, [True, False])))
    rc, _, err = run(capsys, "pairs", str(tmp_path / "t.bin"), str(tmp_path / "t.npz"),
                     "--max-pairs", "1")  # fmt: skip
    assert rc == 2 and "t.bin: 2 pairs exceed the budget of 1" in err
    assert not (tmp_path / "t.npz").exists()
    rc, out, _ = run(capsys, "pairs", str(tmp_path / "t.bin"), str(tmp_path / "t.npz"))
    assert rc == 0 and "2 pairs" in out


def test_a_dead_imports_folders_are_named_and_the_next_import_removes_them(tmp_path, capsys):
    import subprocess

    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid whose process is gone
    st = tmp_path / "st"
    rc, _, _ = run(capsys, "import", "synthetic", str(st), "--num-identities", "4",
                   "--images-per-identity", "2", "--image-size", "16", "--no-progress")  # fmt: skip
    assert rc == 0
    (tmp_path / f"st.tmp-{dead.pid}" / "shards").mkdir(parents=True)  # a killed import
    (tmp_path / f"st.tmp-{os.getpid()}-x").mkdir()  # not ours to judge: another name
    live = tmp_path / f"st.tmp-{os.getppid()}"  # a running process's import: left alone
    live.mkdir()
    rc, out, _ = run(capsys, "info", str(st))
    assert rc == 0 and f"debris: {tmp_path / f'st.tmp-{dead.pid}'}" in out
    assert str(live) not in out
    rc, _, _ = run(capsys, "import", "synthetic", str(st), "--num-identities", "4",
                   "--images-per-identity", "2", "--image-size", "16", "--no-progress",
                   "--overwrite")  # fmt: skip
    assert rc == 0 and not (tmp_path / f"st.tmp-{dead.pid}").exists() and live.exists()
