"""Sharded LMDB store: round trips, index/shard agreement, map growth, atomicity, bad stores."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import lmdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ffc_ray.data.importers import ImportOptions, import_arrays, import_folder
from ffc_ray.data.store import (
    INDEX_FILE,
    META_FILE,
    StoreError,
    close_cached_envs,
    open_store,
    progress_bar,
    sha256_file,
    shard_dir,
    verify_store,
)
from ffc_ray.data.transforms import ImageDecodeError, encode_image
from ffc_ray.data.writer import StoreWriter


def smooth_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    """Low-frequency RGB images (JPEG-friendly, all distinct)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, size, size, 3), np.uint8)
    for i in range(n):
        a = rng.uniform(0, 1, (3, 4))
        for c in range(3):
            v = a[c, 0] + a[c, 1] * xx + a[c, 2] * yy + 0.3 * np.sin(6 * a[c, 3] * (xx + yy))
            out[i, :, :, c] = np.clip(40 + 150 * v, 0, 255).astype(np.uint8)
    return out


def write_folder(
    root: Path, counts: dict[str, int], size: int = 24, ext: str = "png", seed: int = 0
) -> dict[str, np.ndarray]:
    """root/<name>/<name>_NNNN.<ext>; returns path -> pixels written."""
    imgs = smooth_images(sum(counts.values()), size, seed)
    out, k = {}, 0
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for j in range(n):
            p = root / name / f"{name}_{j + 1:04d}.{ext}"
            Image.fromarray(imgs[k]).save(p, quality=95) if ext == "jpg" else Image.fromarray(
                imgs[k]
            ).save(p)
            if ext == "jpg":
                out[str(p)] = np.asarray(Image.open(p).convert("RGB"))
            else:
                out[str(p)] = imgs[k]
            k += 1
    return out


@pytest.fixture(autouse=True)
def _close_envs():
    yield
    close_cached_envs()


def opts(**kw) -> ImportOptions:
    base = {"image_size": 24, "encoding": "png", "num_shards": 3, "progress": False}
    base.update(kw)
    return ImportOptions(**base)


def test_lossless_round_trip_is_exact(tmp_path):
    src = write_folder(tmp_path / "src", {"bob": 3, "alice": 2, "carl": 4})
    summary = import_folder(tmp_path / "src", tmp_path / "st", opts())
    store = open_store(tmp_path / "st")
    assert summary.num_images == 9 == store.num_images
    assert store.names == ["alice", "bob", "carl"]  # sorted names -> labels 0, 1, 2
    images = store.images(np.arange(store.num_images))
    for i, (src_path, label) in enumerate(zip(store.sources, store.labels)):
        np.testing.assert_array_equal(images[i], src[src_path])
        assert store.names[label] == Path(src_path).parent.name
    assert np.bincount(store.labels).tolist() == [2, 3, 4]


def test_jpeg_round_trip_within_tolerance(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 3, "b": 3}, size=32)
    import_folder(
        tmp_path / "src", tmp_path / "st", opts(image_size=32, encoding="jpeg", quality=95)
    )
    store = open_store(tmp_path / "st")
    assert store.meta["encoding"] == "jpeg" and store.meta["quality"] == 95
    images = store.images(np.arange(6))
    for i, p in enumerate(store.sources):
        diff = np.abs(images[i].astype(int) - src[p].astype(int))
        assert diff.mean() < 2.0 and diff.max() < 40


def test_crop_and_resize_at_import_match_pil_reference(tmp_path):
    src = write_folder(tmp_path / "src", {"a": 2, "b": 2}, size=40)
    box = (5, 7, 33, 35)  # 28 x 28 -> 16
    import_folder(tmp_path / "src", tmp_path / "st", opts(image_size=16, crop=box))
    store = open_store(tmp_path / "st")
    assert store.image_size == 16
    for i, p in enumerate(store.sources):
        ref = Image.fromarray(src[p]).crop(box).resize((16, 16), Image.BILINEAR)
        np.testing.assert_array_equal(store.images([i])[0], np.asarray(ref))


def test_index_matches_shards_and_shards_are_balanced(tmp_path):
    images = smooth_images(23, 16)
    labels = np.repeat(np.arange(5), [7, 5, 5, 4, 2])
    import_arrays(images, labels, tmp_path / "st", opts(image_size=16, num_shards=4))
    store = open_store(tmp_path / "st")
    counts = np.bincount(store.shards, minlength=4)
    assert counts.sum() == 23 and counts.max() - counts.min() <= 1
    assert store.meta["shard_counts"] == counts.tolist()
    close_cached_envs()  # py-lmdb allows one open per process
    for s in range(4):
        env = lmdb.open(str(shard_dir(store.path, s)), readonly=True, lock=False)
        with env.begin() as txn:
            in_shard = sorted(k for k, _ in txn.cursor())
        env.close()
        assert in_shard == sorted(store.keys[store.shards == s].tolist())
    # index rows sorted by key = (label, j); every label's images are consecutive
    assert list(store.keys) == sorted(store.keys)
    assert np.all(np.diff(store.labels) >= 0)
    assert store.meta["checksum"][INDEX_FILE] == sha256_file(store.path / INDEX_FILE)
    # decoded pixels equal the source arrays (PNG) in the original order per label
    np.testing.assert_array_equal(
        store.images(np.arange(23)), images[np.argsort(labels, kind="stable")]
    )


def test_identity_with_one_image_is_kept_and_counted(tmp_path):
    images = smooth_images(7, 16)
    labels = np.array([0, 0, 0, 1, 2, 2, 3])
    summary = import_arrays(images, labels, tmp_path / "st", opts(image_size=16))
    store = open_store(tmp_path / "st")
    assert store.num_identities == 4 and store.num_images == 7
    assert summary.single_image_identities == 2
    assert store.meta["identities_with_one_image"] == 2
    assert store.info()["identities_with_two_or_more_images"] == 2


def test_map_size_grows_on_map_full(tmp_path):
    images = np.random.default_rng(3).integers(0, 256, (40, 48, 48, 3), dtype=np.uint8)
    labels = np.arange(40) % 8  # 20 incompressible 7 KB PNGs per shard > 64 KB map
    summary = import_arrays(
        images, labels, tmp_path / "st", opts(image_size=48, num_shards=2, map_size=64 << 10)
    )
    assert summary.map_growths > 0
    store = open_store(tmp_path / "st")
    np.testing.assert_array_equal(
        store.images(np.arange(40)), images[np.argsort(labels, kind="stable")]
    )


def test_failed_import_leaves_no_store_and_no_temp(tmp_path):
    w = StoreWriter(tmp_path / "st", image_size=8, encoding="png", num_shards=2)
    with pytest.raises(RuntimeError), w:
        w.add(0, encode_image(np.zeros((8, 8, 3), np.uint8), "png"), "a")
        raise RuntimeError("interrupted")
    assert not (tmp_path / "st").exists()
    assert list(tmp_path.iterdir()) == []


def test_killed_import_leaves_only_a_temp_folder_that_does_not_open(tmp_path):
    w = StoreWriter(tmp_path / "st", image_size=8, encoding="png", num_shards=2)
    for i in range(5):
        w.add(i % 2, encode_image(np.full((8, 8, 3), i, np.uint8), "png"), f"s{i}")
    w._flush(0)  # noqa: SLF001 - records on disk, as a killed process would leave them
    # no finish(): the process "died" here
    assert not (tmp_path / "st").exists()
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "st")
    with pytest.raises(StoreError, match="meta.json missing.*interrupted import"):
        open_store(w.tmp)
    w.abort()


def test_existing_store_is_not_overwritten_unless_asked(tmp_path):
    images, labels = smooth_images(4, 8), np.array([0, 0, 1, 1])
    import_arrays(images, labels, tmp_path / "st", opts(image_size=8))
    with pytest.raises(StoreError, match="already exists"):
        import_arrays(images, labels, tmp_path / "st", opts(image_size=8))
    import_arrays(images[:2], labels[:2], tmp_path / "st", opts(image_size=8, overwrite=True))
    assert open_store(tmp_path / "st").num_images == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st"]


# ---- bad stores ----------------------------------------------------------------------------


@pytest.fixture
def small_store(tmp_path) -> Path:
    images, labels = smooth_images(12, 16), np.repeat(np.arange(4), 3)
    import_arrays(images, labels, tmp_path / "st", opts(image_size=16, num_shards=2))
    close_cached_envs()
    return tmp_path / "st"


def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nope")


def test_missing_meta_or_index_or_shard(small_store):
    (small_store / INDEX_FILE).rename(small_store / "moved")
    with pytest.raises(StoreError, match="index.parquet missing"):
        open_store(small_store)
    (small_store / "moved").rename(small_store / INDEX_FILE)
    os.rename(shard_dir(small_store, 1), small_store / "gone")
    with pytest.raises(StoreError, match="shard-00001 missing"):
        open_store(small_store)
    os.rename(small_store / "gone", shard_dir(small_store, 1))
    (small_store / META_FILE).unlink()
    with pytest.raises(StoreError, match="meta.json missing"):
        open_store(small_store)


def test_truncated_shard_is_detected_before_reading(small_store):
    data = shard_dir(small_store, 0) / "data.mdb"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 8192)
    with pytest.raises(StoreError, match=r"shard-00000.*(truncated|cannot open)"):
        open_store(small_store)


def test_index_and_shard_out_of_step(small_store):
    store = open_store(small_store)
    key = store.keys[store.shards == 1][0]
    close_cached_envs()
    env = lmdb.open(str(shard_dir(small_store, 1)))
    with env.begin(write=True) as txn:
        txn.delete(key)
    env.close()
    with pytest.raises(StoreError, match="shard-00001: holds 5 records, the index lists 6"):
        open_store(small_store)
    # same count but a different key: caught when reading, naming the key, and by verify
    env = lmdb.open(str(shard_dir(small_store, 1)))
    with env.begin(write=True) as txn:
        txn.put(b"99999999/000000", b"x")
    env.close()
    close_cached_envs()
    store = open_store(small_store)
    row = int(np.flatnonzero(store.keys == key)[0])
    with pytest.raises(StoreError, match=f"key {key.decode()} is in the index but not in shard 1"):
        store.read([row])
    rep = verify_store(small_store)
    assert not rep.ok
    msgs = dict(rep.problems)
    assert "missing from shard 1" in msgs[key.decode()]
    assert "not in index" in msgs["99999999/000000"]


def _rewrite_index(store_path: Path, fix_checksum: bool, **changes) -> None:
    table = pq.read_table(store_path / INDEX_FILE).to_pydict()
    for col, (row, value) in changes.items():
        table[col][row] = value
    pq.write_table(
        pa.table(
            {
                "key": pa.array(table["key"], pa.string()),
                "shard": pa.array(table["shard"], pa.int32()),
                "label": pa.array(table["label"], pa.int64()),
                "source": pa.array(table["source"], pa.string()),
            }
        ),
        store_path / INDEX_FILE,
    )
    if fix_checksum:
        meta = json.loads((store_path / META_FILE).read_text())
        meta["checksum"][INDEX_FILE] = sha256_file(store_path / INDEX_FILE)
        (store_path / META_FILE).write_text(json.dumps(meta))


def test_index_changed_behind_metas_back(small_store):
    _rewrite_index(small_store, fix_checksum=False, label=(0, 1))
    with pytest.raises(StoreError, match="does not match meta.json"):
        open_store(small_store)


def test_label_out_of_range_names_key_and_field(small_store):
    _rewrite_index(small_store, fix_checksum=True, label=(4, 7))
    with pytest.raises(StoreError, match=r"key 00000001/000001 field 'label' = 7 out of range"):
        open_store(small_store)


def test_corrupt_record_names_the_key(tmp_path):
    good = encode_image(smooth_images(1, 16)[0], "jpeg")
    with StoreWriter(tmp_path / "st", image_size=16, num_shards=1) as w:
        w.add(0, good, "good")
        w.add(0, good[: len(good) // 2], "truncated")
        w.add(1, b"\xff\xd8\xff" + b"not a jpeg" * 20, "garbage")
        w.finish(["a", "b"])
    store = open_store(tmp_path / "st")
    assert store.images([0]).shape == (1, 16, 16, 3)
    with pytest.raises(ImageDecodeError, match="key 00000000/000001: cannot decode"):
        store.images([1])
    rep = verify_store(tmp_path / "st")
    assert [k for k, _ in rep.problems] == ["00000000/000001", "00000001/000000"]


def test_wrong_size_record_is_an_error(tmp_path):
    with StoreWriter(tmp_path / "st", image_size=16, num_shards=1) as w:
        w.add(0, encode_image(smooth_images(1, 20)[0], "png"), "big")
        w.finish(["a"])
    with pytest.raises(ImageDecodeError, match="is 20x20, store says 16"):
        open_store(tmp_path / "st").images([0])


def test_progress_bar_is_tqdm_on_stderr_and_can_be_off(capsys):
    bar = progress_bar(10, "import")
    for _ in range(10):
        bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "import" in err and "10/10" in err and "100%" in err
    quiet = progress_bar(10, "import", enabled=False)
    quiet.update(10)
    quiet.close()
    assert capsys.readouterr().err == ""


# ---- transforms shared by the loaders ------------------------------------------------------


def test_augment_depends_only_on_row_seeds():
    from ffc_ray.data.transforms import Augment, augment_batch, row_uniforms

    imgs = smooth_images(16, 20, seed=2)
    seeds = np.arange(100, 116, dtype=np.uint64)
    flip = augment_batch(imgs.copy(), seeds, Augment(flip=True))
    mirrored = row_uniforms(seeds, 8)[:, 0] < 0.5
    assert 0 < mirrored.sum() < 16
    for i in range(16):
        np.testing.assert_array_equal(flip[i], imgs[i][:, ::-1] if mirrored[i] else imgs[i])
    full = Augment(flip=True, random_resized_crop=True, color_jitter=0.3)
    a = augment_batch(imgs.copy(), seeds, full)
    b = augment_batch(imgs[[5, 2]].copy(), seeds[[5, 2]], full)  # other batch, other order
    np.testing.assert_array_equal(a[[5, 2]], b)
    assert not np.array_equal(a, flip)
    # degenerate settings are the identity
    same = Augment(
        flip=False,
        random_resized_crop=True,
        rrc_scale=(1.0, 1.0),
        rrc_ratio=(1.0, 1.0),
        color_jitter=0.0,
    )
    np.testing.assert_array_equal(augment_batch(imgs.copy(), seeds, same), imgs)


def test_augment_reads_the_data_config():
    from ffc_ray.config import Config
    from ffc_ray.data.transforms import Augment

    cfg = Config().with_overrides({"data.flip": False})
    assert Augment.from_data_config(cfg.data) == Augment(flip=False)


# ---- single-process reader -----------------------------------------------------------------


def test_reader_batches_follow_the_sampler(tmp_path):
    from ffc_ray.data.reader import StoreDualReader, StreamSpec, read_face_arrays
    from ffc_ray.data.sampling import DualSampler
    from ffc_ray.data.transforms import Augment

    images = smooth_images(30, 16, seed=4)
    labels = np.concatenate([np.repeat(np.arange(9), 3), [9, 10, 11]])  # 3 single-image ids
    import_arrays(images, labels, tmp_path / "st", opts(image_size=16))
    store = open_store(tmp_path / "st")
    decoded = store.images(np.arange(30))
    spec = StreamSpec(
        str(tmp_path / "st"), 4, 2, seed=7, world_size=2, rank=1, augment=Augment(flip=True)
    )
    reader = StoreDualReader(spec)
    sampler = DualSampler(store.labels, 4, 2, seed=7, world_size=2, rank=1)
    assert reader.steps_per_epoch() == sampler.steps_per_epoch() == 3
    flipped = 0
    for b in reader.iter_steps(0, 5):  # across the epoch boundary
        plan = sampler.epoch_plan(b.epoch)
        np.testing.assert_array_equal(b.ix, plan.x[b.step])
        np.testing.assert_array_equal(b.iy, plan.y[b.step])
        np.testing.assert_array_equal(b.lx.numpy(), store.labels[b.ix])
        np.testing.assert_array_equal(b.lx.numpy()[2:], b.ly.numpy()[2:])  # III, IV: same ids
        assert b.x.shape == (4, 3, 16, 16) and b.x.dtype == torch.uint8
        for view, idx in ((b.x, b.ix), (b.y, b.iy)):
            u8 = view.numpy().transpose(0, 2, 3, 1)
            for img, i in zip(u8, idx):
                same = np.array_equal(img, decoded[i])
                mirror = np.array_equal(img, decoded[i][:, ::-1])
                assert same or mirror
                flipped += int(mirror and not same)
    assert [(b.epoch, b.step) for b in reader.iter_steps(2, 3)] == [(0, 2), (1, 0), (1, 1)]
    assert flipped > 0
    again = StoreDualReader(spec).batch(1, 1)
    np.testing.assert_array_equal(again.x.numpy(), reader.batch(1, 1).x.numpy())
    arrays = read_face_arrays(tmp_path / "st", image_size=8)
    assert arrays.images.shape == (30, 8, 8, 3) and arrays.names == store.names


def test_single_image_identities_feed_only_the_instance_stream(tmp_path):
    from ffc_ray.data.reader import StoreDualReader, StreamSpec

    labels = np.concatenate([np.repeat(np.arange(9), 3), [9, 10, 11]])  # 3 single-image ids
    import_arrays(smooth_images(30, 8), labels, tmp_path / "st", opts(image_size=8))
    spec = StreamSpec(str(tmp_path / "st"), 6, 2, seed=0)  # 5 steps x 6 = every image once
    reader = StoreDualReader(spec)
    assert spec.sampler().num_excluded_identities == 3
    inst, pair = [], []
    for b in reader.epoch(0):
        inst += b.ix[:3].tolist() + b.iy[:3].tolist()
        pair += b.ix[3:].tolist() + b.iy[3:].tolist()
    assert sorted(inst) == list(range(30))
    singles = set(np.flatnonzero(labels >= 9).tolist())
    assert singles <= set(inst) and not singles & set(pair)


def test_decode_augment_chw_equals_decode_then_augment_then_transpose():
    """The fused decode -> CHW path (flip only) and the general path give the reference pixels:
    decode_records -> augment_batch (HWC, flip included) -> transpose."""
    from ffc_ray.data.transforms import (
        Augment,
        augment_batch,
        decode_augment_chw,
        decode_records,
    )

    imgs = np.random.default_rng(3).integers(0, 256, (9, 16, 16, 3), dtype=np.uint8)
    blobs = [encode_image(im, "png") for im in imgs]  # lossless: decode gives imgs back
    seeds = np.arange(100, 109, dtype=np.uint64)
    for aug in (
        Augment(flip=True),
        Augment(flip=False),
        Augment(flip=True, random_resized_crop=True, color_jitter=0.3),
    ):
        ref = augment_batch(decode_records(blobs, 16), seeds, aug).transpose(0, 3, 1, 2)
        got = decode_augment_chw(blobs, seeds, 16, aug)
        assert got.dtype == np.uint8 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, ref)
    flipped = decode_augment_chw(blobs, seeds, 16, Augment(flip=True))
    assert any((flipped[i] != imgs[i].transpose(2, 0, 1)).any() for i in range(9))  # some flip


def test_decode_error_names_the_record_when_names_are_built_lazily(tmp_path):
    from ffc_ray.data.reader import decode_rows
    from ffc_ray.data.transforms import Augment, decode_augment_chw

    good = encode_image(smooth_images(1, 16)[0], "jpeg")
    with StoreWriter(tmp_path / "st", image_size=16, num_shards=1) as w:
        w.add(0, good, "good")
        w.add(0, b"\xff\xd8\xff" + b"not a jpeg" * 20, "garbage")
        w.finish(["a"])
    store = open_store(tmp_path / "st")
    with pytest.raises(ImageDecodeError, match="st key 00000000/000001: cannot decode"):
        decode_rows(store, np.array([0, 1]), np.zeros(2, np.uint64), Augment(flip=True))
    blobs = [good, b"\xff\xd8\xff" + b"x" * 50]
    with pytest.raises(ImageDecodeError, match="record #1 of batch: cannot decode"):
        decode_augment_chw(
            blobs, np.zeros(2, np.uint64), 16, Augment(), lambda i: f"record #{i} of batch"
        )


def _pil_reference(blob: bytes) -> np.ndarray:
    """Pillow's full decode (Image.open + load, RGB): the reference the fast path must equal."""
    return np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))


def test_fast_jpeg_decode_is_bit_identical_to_pillow_and_decodes_in_place():
    """simplejpeg (the records' fast path) gives exactly Pillow's pixels for RGB JPEGs of every
    chroma subsampling and quality and for grayscale JPEGs (channels replicated); CMYK ones
    take Pillow's path (libjpeg's CMYK -> RGB differs from Pillow's by 1); with a buffer it
    decodes into it, and the batch decoders fill their outputs with the same pixels."""
    from ffc_ray.data.transforms import decode_record, decode_records, decode_records_chw

    imgs = smooth_images(6, 24, seed=7)
    imgs[3] = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)  # noise
    blobs = []
    for i, im in enumerate(imgs):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, "JPEG", quality=(60, 95)[i % 2], subsampling=i % 3)
        blobs.append(buf.getvalue())
    gray, cmyk = io.BytesIO(), io.BytesIO()
    Image.fromarray(imgs[0]).convert("L").save(gray, "JPEG", quality=90)
    Image.fromarray(imgs[1]).convert("CMYK").save(cmyk, "JPEG", quality=90)
    blobs += [gray.getvalue(), cmyk.getvalue()]
    ref = np.stack([_pil_reference(b) for b in blobs])
    assert (ref[6][..., 0] == ref[6][..., 2]).all()  # the gray one, replicated
    for i, b in enumerate(blobs):
        np.testing.assert_array_equal(decode_record(b, 24), ref[i])
    np.testing.assert_array_equal(decode_records(blobs, 24), ref)
    flip = np.arange(len(blobs)) % 2 == 1
    chw = decode_records_chw(blobs, 24, flip)
    want = ref.transpose(0, 3, 1, 2).copy()
    want[flip] = want[flip][..., ::-1]
    np.testing.assert_array_equal(chw, want)
    buf = np.zeros_like(want)
    assert decode_records_chw(blobs, 24, flip, out=buf) is buf  # into a given array
    np.testing.assert_array_equal(buf, want)
    for bad in (buf[1:], buf.astype(np.int16), np.broadcast_to(buf, buf.shape)):  # read-only
        with pytest.raises(ValueError, match="out: expected a writable uint8 array of shape"):
            decode_records_chw(blobs, 24, flip, out=bad)
    from ffc_ray.data.transforms import to_chw

    hwc = want.transpose(0, 2, 3, 1)
    np.testing.assert_array_equal(to_chw(hwc, None, np.zeros_like(buf)), want)
    with pytest.raises(ValueError, match="out: expected"):
        to_chw(hwc[:1], None, buf)  # would have broadcast one image into all of them

    from ffc_ray.data.transforms import _decode_view

    out = np.zeros((24, 24, 3), np.uint8)
    got = _decode_view(blobs[0], 24, "b0", out)
    assert np.shares_memory(got, out) and (out == ref[0]).all()  # decoded in place
    got = _decode_view(blobs[7], 24, "cmyk", out)  # Pillow's path: a fresh array
    assert not np.shares_memory(got, out) and (got == ref[7]).all()


def test_fast_jpeg_decode_falls_back_to_pillow_for_wrong_size_and_truncated_records():
    """A JPEG of another size, or a truncated one, never passes as a decoded record: the Pillow
    path names the record (a truncated JPEG is an error even though libjpeg could recover)."""
    from ffc_ray.data.transforms import decode_record, decode_records

    im = smooth_images(1, 32)[0]
    blob = encode_image(im, "jpeg")
    with pytest.raises(ImageDecodeError, match="rec-a: image is 32x32, store says 24"):
        decode_record(blob, 24, "rec-a")
    with pytest.raises(ImageDecodeError, match="rec-b: image is 32x32, store says 40"):
        decode_records([blob], 40, ["rec-b"])  # a buffer larger than the image
    with pytest.raises(ImageDecodeError, match="rec-c: cannot decode"):
        decode_record(blob[: len(blob) // 2], 32, "rec-c")


class _FullDisk:
    """An LMDB environment whose write transactions fail as on a full disk."""

    def begin(self, write=False, **kw):
        raise lmdb.Error("mdb_txn_commit: No space left on device")

    def close(self):
        pass
