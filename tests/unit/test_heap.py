"""ffc_ray.heap: freed step-sized blocks are reused (no fresh pages each step) under glibc."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from ffc_ray import heap

# A data consumer's steps at glibc's level: three view-sized blocks (64 x 3 x 112 x 112 float32,
# 9.6 MB) taken with malloc, written, freed. (Which of torch's or numpy's frees reach the top of
# the heap depends on what else the process holds; plain malloc / free shows glibc's rule alone.)
CHILD = textwrap.dedent(
    """
    import ctypes, json, resource, sys
    from ffc_ray import heap

    applied = heap.reuse_freed_memory() if sys.argv[1] == "1" else None
    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    size = 64 * 3 * 112 * 112 * 4

    def step():
        blocks = [libc.malloc(size) for _ in range(3)]
        for b in blocks:
            ctypes.memset(b, 1, size)
        for b in blocks:
            libc.free(b)

    for _ in range(2):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    print(json.dumps({"applied": applied, "faults": faults}))
    """
)
PAGES_PER_STEP = 3 * 64 * 3 * 112 * 112 * 4 // 4096  # 7056: what fresh memory faults per step


def run_child(apply: bool, env: dict[str, str] | None = None) -> dict:
    full = {k: v for k, v in os.environ.items() if k not in heap.USER_MALLOC_ENV}
    full.pop("GLIBC_TUNABLES", None)
    full.update(env or {})
    out = subprocess.run(
        [sys.executable, "-c", CHILD, "1" if apply else "0"],
        capture_output=True,
        text=True,
        env=full,
        check=True,
        timeout=120,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


glibc_only = pytest.mark.skipif(heap._glibc() is None, reason="mallopt is glibc's")


@glibc_only
def test_freed_step_blocks_are_reused():
    with_it = run_child(True)
    without = run_child(False)
    assert with_it["applied"] is True
    # reused memory faults (almost) never; fresh pages would be 10 * 7056 faults
    assert with_it["faults"] < PAGES_PER_STEP // 10, with_it
    # glibc's default thresholds hand the blocks back to the kernel after every step (the
    # reason for the module): faults on every page of every step
    assert without["faults"] >= 9 * PAGES_PER_STEP, without


@glibc_only
@pytest.mark.parametrize(
    "env",
    [{"MALLOC_TRIM_THRESHOLD_": "131072"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=4096"}],
)
def test_user_malloc_settings_win(env):
    out = run_child(True, env)
    assert out["applied"] is False
    # the user's small trim threshold is in force, not ours: the blocks go back every step
    assert out["faults"] >= 9 * PAGES_PER_STEP, out


def test_user_malloc_settings_detection():
    assert heap.user_malloc_settings({}) is None
    assert heap.user_malloc_settings({"PATH": "/bin"}) is None
    assert heap.user_malloc_settings({"MALLOC_MMAP_THRESHOLD_": "1"}) == "MALLOC_MMAP_THRESHOLD_"
    assert heap.user_malloc_settings({"GLIBC_TUNABLES": "glibc.malloc.tcache_count=0"}) == (
        "GLIBC_TUNABLES"
    )
    # tunables of other glibc parts are not malloc settings
    assert heap.user_malloc_settings({"GLIBC_TUNABLES": "glibc.rtld.nns=2"}) is None


def test_data_consumers_apply_it(monkeypatch, tmp_path):
    """The reader and the Ray Data stream's consumer call it before their first batch."""
    from ffc_ray.data import reader, stream
    from ffc_ray.data.importers import ImportOptions, import_synthetic

    calls = []
    monkeypatch.setattr(reader, "reuse_freed_memory", lambda: calls.append("reader"))
    monkeypatch.setattr(stream, "reuse_freed_memory", lambda: calls.append("stream"))
    store = tmp_path / "store"
    import_synthetic(store, ImportOptions(image_size=16, progress=False), 4, 3)
    spec = reader.StreamSpec(str(store), 4, 2)
    reader.StoreDualReader(spec)
    assert calls == ["reader"]

    class NoBlocks:  # a Ray DataIterator with nothing to give
        def iter_batches(self, **kw):
            return iter(())

    assert list(stream.iter_step_batches(spec, NoBlocks())) == []
    assert calls == ["reader", "stream"]
