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


def test_lfw_seeds_summary_pairs_heads_by_seed():
    """benchmarks/lfw_seeds.py: per-head mean / sample std and the FFC - FC gap paired by
    seed, against values worked out by hand."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lfw_seeds", bench.BENCH_DIR / "lfw_seeds.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [
        {"head": "ffc", "seed": 0, "accuracy": 0.80, "auc": 0.9},
        {"head": "fc", "seed": 0, "accuracy": 0.83, "auc": 0.9},
        {"head": "ffc", "seed": 1, "accuracy": 0.82, "auc": 0.9},
        {"head": "fc", "seed": 1, "accuracy": 0.82, "auc": 0.9},
        {"head": "fc", "seed": 2, "accuracy": 0.90, "auc": 0.9},  # no ffc partner: not paired
    ]
    out = mod.summarise(rows)
    assert out["heads"]["ffc"]["accuracy_mean"] == 0.81
    assert out["heads"]["ffc"]["accuracy_std"] == round(0.02 / 2**0.5, 4)  # ddof = 1
    assert out["heads"]["fc"]["seeds"] == [0, 1, 2]
    assert out["ffc_minus_fc_points"] == [-3.0, 0.0]
    assert out["ffc_minus_fc_points_mean"] == -1.5
    assert out["ffc_minus_fc_points_sem"] == round(3.0 / 2**0.5 / 2**0.5, 2)
    assert out["meets_target"] is False
    assert "ffc_minus_pfc_points" not in out


def test_lfw_compare_rerun_of_one_head_keeps_the_others(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lfw_cmp", bench.BENCH_DIR / "lfw_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "cmp.json"
    assert mod.keep_other_heads(out, [{"head": "ffc", "accuracy": 0.8}]) == [
        {"head": "ffc", "accuracy": 0.8}
    ]
    old = [{"head": h, "accuracy": a} for h, a in (("ffc", 0.7), ("fc", 0.85), ("partial_fc", 0.8))]
    out.write_text(json.dumps({"rows": old}))
    rows = mod.keep_other_heads(out, [{"head": "ffc", "accuracy": 0.84}])
    assert [(r["head"], r["accuracy"]) for r in rows] == [
        ("ffc", 0.84),
        ("fc", 0.85),
        ("partial_fc", 0.8),
    ]
    assert "kept_from_earlier_run" not in rows[0] and rows[1]["kept_from_earlier_run"] is True


def test_lfw_compare_writes_run_folders_without_machine_paths(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("lfw_cmp", bench.BENCH_DIR / "lfw_compare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.chdir(tmp_path)
    assert mod._shown_path(tmp_path / "runs" / "lfw-ffc-x") == "runs/lfw-ffc-x"
    assert mod._shown_path(mod.REPO / "runs" / "a") == "runs/a"
    elsewhere = mod._shown_path(tmp_path.parent / "other" / "r")
    assert not elsewhere.startswith("/") and elsewhere.endswith("other/r")
