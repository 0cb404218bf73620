"""Storage at a URI (ffc_ray.storage): round trips, the per-node store cache, errors.

No cloud here: ``file://`` URIs (a pyarrow LocalFileSystem reached through the URI code paths)
and an fsspec in-memory filesystem registered as ``memtest://`` stand in for buckets.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from ffc_ray import storage
from ffc_ray.config import Config, ConfigError
from ffc_ray.data.importers import ImportOptions, import_synthetic
from ffc_ray.data.store import META_FILE, StoreError, close_cached_envs, open_store


def uri(p: Path) -> str:
    return p.absolute().as_uri()  # file:///...


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    """A private node cache per test; no remembered checks between tests."""
    monkeypatch.setenv(storage.CACHE_ENV, str(tmp_path / "cache"))
    storage._CHECKED.clear()
    yield
    storage._CHECKED.clear()
    close_cached_envs()


@pytest.fixture
def memfs():
    """``memtest://bucket/...`` resolved to an fsspec memory filesystem wrapped for pyarrow."""
    fsspec = pytest.importorskip("fsspec")
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    mem = fsspec.filesystem("memory")
    mem.store.clear()
    mem.pseudo_dirs.clear()
    mem.pseudo_dirs.append("")
    pyfs = PyFileSystem(FSSpecHandler(mem))
    storage.register_filesystem("memtest", lambda u: (pyfs, "/" + u.split("://", 1)[1]))
    yield mem
    storage._CUSTOM.pop("memtest", None)
    storage._resolve_cached.cache_clear()


def make_tree(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"alpha",
        "sub/b.bin": bytes(range(256)) * 4,
        "sub/deeper/c.json": b'{"x": 1}',
        META_FILE: b'{"checksum": 1}',
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ------------------------------------------------------------------------------------------
# URIs


def test_is_uri_join_and_basename():
    assert (
        storage.is_uri("s3://bucket/x")
        and storage.is_uri("gs://b")
        and storage.is_uri("file:///data/x")
    )
    assert not storage.is_uri("/data/x") and not storage.is_uri("runs/x")
    assert not storage.is_uri("C://data") and not storage.is_uri(None)
    assert not storage.is_uri(Path("s3:/bucket"))
    assert storage.join("s3://bucket/runs/", "exp", "/t1/") == "s3://bucket/runs/exp/t1"
    assert storage.join("s3://b/r?region=eu-west-1", "n") == "s3://b/r/n?region=eu-west-1"
    assert storage.join("/data/r", "n", "x") == str(Path("/data/r/n/x"))
    assert storage.basename("gs://b/sets/lfw.npz") == "lfw.npz"


def test_local_cache_dir_follows_the_env_and_is_per_uri(tmp_path, monkeypatch):
    a = storage.local_cache_dir("s3://b/stores/x")
    assert a.parent == tmp_path / "cache"
    assert a == storage.local_cache_dir("s3://b/stores/x/")
    assert a != storage.local_cache_dir("s3://b/stores/y")
    monkeypatch.delenv(storage.CACHE_ENV)
    assert storage.local_cache_dir("s3://b").parent == Path("~/.cache/ffc_ray").expanduser()


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(storage.StorageError, match=r"nosuch://b/x: cannot open its filesystem"):
        storage.exists("nosuch://b/x")


# ------------------------------------------------------------------------------------------
# round trips


def test_file_uri_round_trip(tmp_path):
    files = make_tree(tmp_path / "src")
    dest = uri(tmp_path / "remote" / "run")
    assert storage.upload_dir(tmp_path / "src", dest) == len(files)
    assert storage.is_dir(dest) and storage.exists(storage.join(dest, "sub", "b.bin"))
    assert storage.read_text(storage.join(dest, "a.txt")) == "alpha"
    storage.download_dir(dest, tmp_path / "back")
    assert read_tree(tmp_path / "back") == files
    storage.write_text(storage.join(dest, "new", "n.txt"), "hello")
    assert storage.read_text(storage.join(dest, "new", "n.txt")) == "hello"
    assert storage.file_size(storage.join(dest, "a.txt")) == 5
    assert storage.file_size(storage.join(dest, "nope")) is None
    assert storage.is_empty_dir(uri(tmp_path / "remote" / "nothing"))
    assert not storage.is_empty_dir(dest)


def test_memory_filesystem_round_trip_and_meta_last(tmp_path, memfs, monkeypatch):
    files = make_tree(tmp_path / "src")
    order: list[str] = []
    real = storage.upload_file

    def recording(local, u):
        order.append(storage.basename(u))
        real(local, u)

    monkeypatch.setattr(storage, "upload_file", recording)
    dest = "memtest://bucket/stores/s1"
    storage.upload_dir(tmp_path / "src", dest)
    assert order[-1] == META_FILE and len(order) == len(files)
    assert memfs.cat_file("/bucket/stores/s1/a.txt") == b"alpha"
    storage.download_dir(dest, tmp_path / "back")
    assert read_tree(tmp_path / "back") == files
    storage.write_text("memtest://bucket/x/y.txt", "z")
    assert storage.read_text("memtest://bucket/x/y.txt") == "z"


def test_download_of_missing_folder_names_the_uri(tmp_path):
    missing = uri(tmp_path / "nowhere")
    with pytest.raises(storage.StorageError, match=f"cannot download {missing}: no such folder"):
        storage.download_dir(missing, tmp_path / "x")
    with pytest.raises(storage.StorageError, match="no such file"):
        storage.download_file(storage.join(missing, "f"), tmp_path / "f")


def test_errors_hint_at_credentials():
    assert "credentials" in storage._hint("AWS Error ACCESS_DENIED: AccessDenied 403")
    assert "bucket does not exist" in storage._hint("NoSuchBucket: The bucket does not exist")


# ------------------------------------------------------------------------------------------
# stores at a URI: the per-node cache


def _remote_store(tmp_path: Path, seed: int = 0) -> tuple[Path, str]:
    opts = ImportOptions(image_size=16, encoding="png", num_shards=2, progress=False)
    local = tmp_path / f"made-{seed}"
    import_synthetic(local, opts, num_identities=6, images_per_identity=3, seed=seed)
    close_cached_envs()
    remote = tmp_path / "bucket" / "stores" / "faces"
    storage.upload_dir(local, uri(remote))
    return remote, uri(remote)


def test_open_store_at_a_uri_reads_from_the_node_cache(tmp_path):
    remote, u = _remote_store(tmp_path)
    store = open_store(u)
    ref = open_store(remote)
    assert store.path.is_relative_to(tmp_path / "cache")
    assert store.num_images == 18 and store.num_identities == 6
    np.testing.assert_array_equal(store.images(np.arange(4)), ref.images(np.arange(4)))
    entry = storage.local_cache_dir(u)
    assert (entry / storage.COMPLETE).is_file() and (entry / "uri").read_text() == u


def test_missing_remote_store_names_the_uri(tmp_path):
    u = uri(tmp_path / "bucket" / "stores" / "absent")
    with pytest.raises(StoreError, match=f"store {u} does not exist"):
        open_store(u)
    (tmp_path / "bucket" / "stores" / "half").mkdir(parents=True)
    (tmp_path / "bucket" / "stores" / "half" / "index.parquet").write_bytes(b"x")
    half = uri(tmp_path / "bucket" / "stores" / "half")
    with pytest.raises(StoreError, match=f"store {half}: meta.json missing"):
        open_store(half)


def _counting_download(counter: Path, delay: float):
    real = storage.download_dir

    def download(u, local):
        with open(counter, "a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(delay)
        return real(u, local)

    return download


def _sync_child(u: str, out: str) -> None:
    path = storage.cached_store(u)
    Path(out).write_text(str(path))


def test_concurrent_openers_download_once(tmp_path, monkeypatch):
    _, u = _remote_store(tmp_path)
    counter = tmp_path / "downloads.txt"
    monkeypatch.setattr(storage, "download_dir", _counting_download(counter, 1.0))
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_sync_child, args=(u, str(tmp_path / f"out{i}"))) for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert len(counter.read_text().splitlines()) == 1  # one download for both processes
    paths = {(tmp_path / f"out{i}").read_text() for i in range(2)}
    assert len(paths) == 1
    assert storage.cached_store(u) == Path(paths.pop())  # this process: cache hit
    assert len(counter.read_text().splitlines()) == 1
    assert open_store(u).num_images == 18


def _slow_child(u: str) -> None:
    storage.cached_store(u)


def test_interrupted_download_is_never_used(tmp_path, monkeypatch):
    _, u = _remote_store(tmp_path)
    entry = storage.local_cache_dir(u)
    real = storage.download_dir

    def partial_then_hang(src, local):
        real(src, local)
        (Path(local) / META_FILE).unlink()  # looks half done
        time.sleep(60)

    monkeypatch.setattr(storage, "download_dir", partial_then_hang)
    ctx = multiprocessing.get_context("fork")
    p = ctx.Process(target=_slow_child, args=(u,))
    p.start()
    deadline = time.time() + 30
    while not list(entry.glob("data.tmp-*/index.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    assert list(entry.glob("data.tmp-*")), "the child did not start downloading"
    os.kill(p.pid, signal.SIGKILL)  # killed mid-download: its lock is released by the OS
    p.join(10)
    assert not (entry / storage.COMPLETE).exists() and not (entry / "data").exists()

    counter = tmp_path / "downloads.txt"
    monkeypatch.setattr(storage, "download_dir", _wrap_real(real, counter))
    path = storage.cached_store(u)
    assert counter.read_text().count("\n") == 1  # downloaded again
    assert (path / META_FILE).is_file() and not list(entry.glob("data.tmp-*"))
    assert open_store(u).num_images == 18


def _wrap_real(real, counter: Path):
    def download(u, local):
        with open(counter, "a") as fh:
            fh.write("x\n")
        return real(u, local)

    return download


def test_changed_remote_meta_downloads_again(tmp_path, monkeypatch):
    remote, u = _remote_store(tmp_path)
    counter = tmp_path / "downloads.txt"
    monkeypatch.setattr(storage, "download_dir", _wrap_real(storage.download_dir, counter))
    first = open_store(u)
    assert first.num_identities == 6
    storage.cached_store(u)
    assert counter.read_text().count("\n") == 1  # unchanged: no second download
    close_cached_envs()

    # the remote store is replaced by another one (new meta.json checksum)
    opts = ImportOptions(image_size=16, encoding="png", num_shards=2, progress=False)
    import_synthetic(tmp_path / "v2", opts, num_identities=5, images_per_identity=3, seed=1)
    close_cached_envs()
    import shutil

    shutil.rmtree(remote)
    storage.upload_dir(tmp_path / "v2", u)
    storage._CHECKED.clear()  # (a process re-checks the remote after RECHECK_S seconds)
    second = open_store(u)
    assert counter.read_text().count("\n") == 2
    assert second.num_identities == 5 and second.num_images == 15
    meta = json.loads((storage.local_cache_dir(u) / "data" / META_FILE).read_text())
    assert meta["num_identities"] == 5


def test_store_changing_during_download_is_rejected(tmp_path, monkeypatch):
    remote, u = _remote_store(tmp_path)
    real = storage.download_dir

    def racing(src, local):
        real(src, local)
        (Path(local) / META_FILE).write_text("{}")  # a newer meta.json arrived meanwhile

    monkeypatch.setattr(storage, "download_dir", racing)
    with pytest.raises(storage.StorageError, match="changed while it was being downloaded"):
        storage.cached_store(u)
    entry = storage.local_cache_dir(u)
    assert not (entry / storage.COMPLETE).exists() and not list(entry.glob("data.tmp-*"))


def test_cached_file_and_refresh(tmp_path):
    f = tmp_path / "bucket" / "sets" / "v.npz"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"one")
    u = uri(f)
    local = storage.cached_file(u)
    assert local.name == "v.npz" and local.read_bytes() == b"one"
    f.write_bytes(b"second version")
    assert storage.cached_file(u).read_bytes() == b"second version"
    with pytest.raises(storage.StorageError, match=f"{uri(f.parent / 'w.npz')}: no such file"):
        storage.cached_file(uri(f.parent / "w.npz"))


def test_eval_pairs_at_a_uri_are_fetched(tmp_path):
    from ffc_ray.data.pairs import save_verification_set
    from ffc_ray.data.synthetic import synthetic_split
    from ffc_ray.eval.sets import check_eval_sets, load_eval_sets

    cfg = Config().with_overrides(
        {
            "data.num_identities": 20,
            "data.images_per_identity": 3,
            "data.holdout_identities": 8,
            "data.num_pairs": 20,
            "data.image_size": 16,
            "data.instance_batch": 4,
            "data.identity_batch": 4,
            "pool.capacity": 8,
        }
    )
    vset = synthetic_split(cfg.data, num_folds=cfg.eval.folds)[1]
    f = tmp_path / "bucket" / "syn.npz"
    f.parent.mkdir()
    save_verification_set(vset, f)
    store_cfg = cfg.with_overrides({"eval.pairs": [uri(f)], "data.source": "/nonexistent"})
    check_eval_sets(store_cfg)
    (got,) = load_eval_sets(store_cfg)
    np.testing.assert_array_equal(got.left, vset.left)
    bad = store_cfg.with_overrides({"eval.pairs": [uri(tmp_path / "bucket" / "no.npz")]})
    with pytest.raises(ConfigError, match=r"eval.pairs\[0\].*no.npz does not exist"):
        check_eval_sets(bad)


# ------------------------------------------------------------------------------------------
# config fields and the train / sweep locations


def test_config_accepts_uris_and_rejects_malformed_ones():
    ok = Config().with_overrides({"ray.storage_path": "s3://bucket/runs"})
    assert ok.ray.storage_path == "s3://bucket/runs"
    for value, msg in (
        ("s3://", "names no bucket"),
        ("file://relative/x", "absolute path"),
        ("://x", "malformed URI"),
    ):
        with pytest.raises(ConfigError, match=rf"ray.storage_path.*{msg}"):
            Config().with_overrides({"ray.storage_path": value})
    with pytest.raises(ConfigError, match="data.source"):
        Config().with_overrides({"data.source": "gs://"})


def test_train_locations_with_a_uri(tmp_path):
    from ffc_ray.ray import run_dir as rt

    local = Config().with_overrides({"train.output_dir": str(tmp_path / "o")})
    assert rt.remote_storage(local) is None
    assert rt.storage_location(local) == str(tmp_path / "o")
    remote = local.with_overrides({"ray.storage_path": "s3://b/runs"})
    assert rt.remote_storage(remote) == "s3://b/runs"
    assert rt.storage_location(remote) == "s3://b/runs"
    assert rt.storage_root(remote) == tmp_path / "o"  # the local staging root
    # a URI source is kept as it is (not made into a local path)
    cfg = local.with_overrides({"data.source": "s3://b/stores/x", "eval.pairs": ["s3://b/v.npz"]})
    assert rt.resolve_paths(cfg).data.source == "s3://b/stores/x"
    from ffc_ray.data.reader import StreamSpec

    assert StreamSpec.from_config(cfg).store == "s3://b/stores/x"


def test_run_files_push_and_pull(tmp_path):
    from ffc_ray.ray import run_dir as rt

    run_uri = uri(tmp_path / "bucket" / "runs" / "r1")
    staging = tmp_path / "staging" / "r1"
    staging.mkdir(parents=True)
    (staging / "progress.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (staging / "tb").mkdir()
    (staging / "tb" / "events.out.tfevents.1").write_bytes(b"ev")
    rt.push_run_dir(staging, run_uri)
    assert storage.read_text(storage.join(run_uri, "progress.jsonl")).count("\n") == 2
    assert storage.exists(storage.join(run_uri, "tb", "events.out.tfevents.1"))
    other = tmp_path / "node2" / "r1"  # another node: nothing staged there yet
    rt.pull_progress(rt.staging_dir(other, run_uri), run_uri)
    assert (other / "progress.jsonl").read_text().count("\n") == 2
    (other / "progress.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n')
    rt.pull_progress(other, run_uri)  # the local copy is longer: kept
    assert (other / "progress.jsonl").read_text().count("\n") == 3


def test_run_files_push_sends_only_what_changed(tmp_path, monkeypatch):
    """A checkpoint's push uploads the new and changed files, not the whole staging folder;
    after a failed push, the next one sends everything changed since the last success."""
    from ffc_ray.ray import run_dir as rt

    run_uri = uri(tmp_path / "bucket" / "r2")
    staging = tmp_path / "staging" / "r2"
    (staging / "tb").mkdir(parents=True)
    (staging / "config.yaml").write_text("a: 1\n")
    (staging / "progress.jsonl").write_text('{"step": 1}\n')
    (staging / "tb" / "events.1").write_bytes(b"ev1")
    sent: list[str] = []
    real_upload = storage.upload_file

    def counting(local, remote):
        sent.append(Path(local).relative_to(staging).as_posix())
        real_upload(local, remote)

    monkeypatch.setattr(storage, "upload_file", counting)
    assert rt.push_run_dir(staging, run_uri) == 3
    assert sorted(sent) == ["config.yaml", "progress.jsonl", "tb/events.1"]
    sent.clear()
    assert rt.push_run_dir(staging, run_uri) == 0 and sent == []  # nothing changed
    with (staging / "progress.jsonl").open("a") as f:
        f.write('{"step": 2}\n')
    (staging / "tb" / "events.2").write_bytes(b"ev2")
    assert rt.push_run_dir(staging, run_uri) == 2
    assert sorted(sent) == ["progress.jsonl", "tb/events.2"]
    assert storage.read_text(storage.join(run_uri, "progress.jsonl")).count("\n") == 2
    # same size, new modification time: sent again
    st = (staging / "config.yaml").stat()
    (staging / "config.yaml").write_text("a: 2\n")
    os.utime(staging / "config.yaml", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    def broken(local, remote):
        raise storage.StorageError("network down")

    monkeypatch.setattr(storage, "upload_file", broken)
    assert rt.push_run_dir(staging, run_uri) == 0  # logged, not raised
    monkeypatch.setattr(storage, "upload_file", counting)
    sent.clear()
    assert rt.push_run_dir(staging, run_uri) == 1 and sent == ["config.yaml"]
    assert storage.read_text(storage.join(run_uri, "config.yaml")) == "a: 2\n"


def test_sweep_locations_and_optuna_copy(tmp_path):
    import sqlite3

    from ffc_ray.ray.sweep import experiment as sw
    from ffc_ray.ray.sweep.results import OPTUNA_FILE, RESULTS_CSV

    assert sw.experiment_uri(_Spec(), "s3://b/sweeps") == "s3://b/sweeps/demo"
    assert sw.experiment_uri(_Spec(), str(tmp_path)) is None
    staging = sw.experiment_dir(_Spec(), "s3://b/sweeps")
    assert staging == (Path("runs") / "sweeps" / "demo").resolve()

    exp = tmp_path / "staging" / "demo"
    (exp / "train" / "train-1").mkdir(parents=True)
    (exp / "train" / "train-1" / "progress.jsonl").write_text("{}\n")
    (exp / RESULTS_CSV).write_text("trial\n1\n")
    db = sqlite3.connect(exp / OPTUNA_FILE)
    db.execute("create table t (x int)")
    db.execute("insert into t values (42)")
    db.commit()  # (left open: a live study)
    exp_uri = uri(tmp_path / "bucket" / "sweeps" / "demo")
    sw.push_sweep(exp, exp_uri)
    db.close()
    assert storage.exists(storage.join(exp_uri, RESULTS_CSV))
    assert not storage.exists(storage.join(exp_uri, "train"))  # trials upload their own
    back = tmp_path / "node2" / "demo"
    sw.pull_sweep(back, exp_uri, need_optuna=True)
    assert (back / RESULTS_CSV).read_text() == "trial\n1\n"
    copy = sqlite3.connect(back / OPTUNA_FILE)
    assert copy.execute("select x from t").fetchall() == [(42,)]
    copy.close()
    empty = uri(tmp_path / "bucket" / "sweeps" / "other")
    storage.write_text(storage.join(empty, "x"), "")
    with pytest.raises(ConfigError, match="Optuna study copy optuna.db is missing"):
        sw.pull_sweep(tmp_path / "node3" / "other", empty, need_optuna=True)


class _Spec:
    """The two fields experiment_dir / experiment_uri read."""

    name = "demo"

    class base:  # noqa: N801
        class train:  # noqa: N801
            output_dir = "runs"


def test_cli_reports_a_storage_error_without_a_traceback(monkeypatch, capsys):
    """A StorageError escaping a command (it names the URI) is a clean error, exit status 2;
    other OS errors are not swallowed."""
    import ffc_ray.data.cli as data_cli
    from ffc_ray import cli

    def fail(exc):
        def run(args):
            raise exc

        return run

    monkeypatch.setattr(data_cli, "run", fail(storage.StorageError("cannot read s3://b/x: denied")))
    assert cli.main(["data", "info", "s3://b/x"]) == 2
    assert "ffc-ray data: error: cannot read s3://b/x: denied" in capsys.readouterr().err
    monkeypatch.setattr(data_cli, "run", fail(PermissionError("local disk")))
    with pytest.raises(PermissionError):
        cli.main(["data", "info", "s3://b/x"])


def test_atomic_write_text_leaves_the_old_file_or_the_new_one(tmp_path, monkeypatch):
    from pathlib import Path

    from ffc_ray.storage import atomic_write_text

    f = tmp_path / "results.md"
    atomic_write_text(f, "first\n")
    assert f.read_text() == "first\n"

    def disk_full(self, text, *a, **k):
        Path.write_bytes(self, text[:3].encode())  # a partial write, then the error
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(f, "second, longer\n")
    monkeypatch.undo()
    assert f.read_text() == "first\n" and sorted(p.name for p in tmp_path.iterdir()) == [
        "results.md"
    ]
