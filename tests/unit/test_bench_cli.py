"""`ffc-ray bench`: lists the checkout's benchmarks, rejects unknown names, runs one."""

from __future__ import annotations

import json
import subprocess
import sys

from ffc_ray import bench
from ffc_ray.cli import main


def test_lists_every_benchmark_script(capsys):
    assert main(["bench"]) == 0
    out = capsys.readouterr().out
    scripts = sorted(p.stem for p in bench.BENCH_DIR.glob("*.py") if not p.stem.startswith("_"))
    assert scripts and "head_cost" in scripts and "pool_index" in scripts
    listed = [line.split()[0] for line in out.strip().splitlines()]
    assert listed == scripts
    assert "Head cost vs number of identities" in out  # the docstring's first line


def test_unknown_benchmark_names_the_available_ones(capsys):
    assert main(["bench", "no_such_bench"]) == 2
    err = capsys.readouterr().err
    assert "no_such_bench" in err and "pool_index" in err


def test_missing_benchmark_folder_is_explained(tmp_path, capsys):
    import argparse

    args = argparse.Namespace(name=None, args=[])
    assert bench.run(args, bench_dir=tmp_path / "benchmarks") == 2
    assert "pip install -e ." in capsys.readouterr().err


def test_runs_a_benchmark_and_passes_its_arguments():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ffc_ray.cli",
            "bench",
            "pool_index.py",
            "--capacity",
            "2000",
            "--batch",
            "256",
            "--batches",
            "4",
            "--naive-batches",
            "2",
            "--repeats",
            "1",
            "--warmup",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["labels_per_s"] > 0 and summary["labels_per_s_transactional"] > 0
    assert summary["capacity"] == 2000
