"""Small configs and readers shared by the Ray Train tests."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from ffc_ray.config import Config
from ffc_ray.engine.checkpoint import load_checkpoint_state
from ffc_ray.engine.loop import Callback


class SlowSteps(Callback):
    """A worker-loop callback: every step sleeps ``seconds`` (so that a test can kill a worker
    mid-run); with ``pid_dir``, each rank writes ``rank<r>.pid`` there at its first step."""

    def __init__(self, seconds: float, pid_dir: Path | None = None) -> None:
        self.seconds, self.pid_dir, self.written = seconds, pid_dir, False

    def after_step(self, trainer: Any, metrics: dict[str, Any], loop: Any) -> None:
        if self.pid_dir is not None and not self.written:
            import ray.train

            rank = ray.train.get_context().get_world_rank()
            self.pid_dir.mkdir(parents=True, exist_ok=True)
            (self.pid_dir / f"rank{rank}.pid").write_text(str(os.getpid()))
            self.written = True
        time.sleep(self.seconds)


BASE = {
    "data.num_identities": 64,
    "data.images_per_identity": 4,
    "data.holdout_identities": 24,
    "data.num_pairs": 120,
    "data.image_size": 32,
    "data.instance_batch": 8,
    "data.identity_batch": 4,
    "model.backbone": "tiny",
    "model.embedding_dim": 32,
    "pool.capacity": 20,  # >= 2 workers x 8 gallery identities; 64 identities -> evictions
    "optim.lr": 0.05,
    "optim.schedule": "constant",
    "optim.weight_decay": 0.0005,
    "train.steps": 12,
    "train.log_interval": 1,
    "train.eval_interval": 12,
    "train.checkpoint_interval": 4,
    "train.keep_checkpoints": 10,
    "eval.folds": 5,
    "ray.num_workers": 2,
    "ray.cpus_per_worker": 0.5,
    "ray.max_failures": 2,
}


def small_cfg(tmp_path: Path, **over: Any) -> Config:
    d = dict(BASE)
    d["train.output_dir"] = str(tmp_path)
    d.update({k.replace("__", "."): v for k, v in over.items()})
    return Config().with_overrides(d)


def progress(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """All step records (in file order) and all events of a run."""
    steps, events = [], []
    for line in (run_dir / "progress.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        (events if "event" in rec else steps).append(rec)
    return steps, events


def last_per_step(steps: list[dict]) -> dict[int, dict]:
    out: dict[int, dict] = {}
    for r in steps:
        out[r["step"]] = r
    return out


def checkpoints_by_step(run_dir: Path) -> dict[int, Path]:
    out = {}
    for d in run_dir.glob("checkpoint_*"):
        if (d / "meta.json").is_file():
            out[json.loads((d / "meta.json").read_text())["step"]] = d
    return out


def pool_sum_from_state(state: dict) -> str:
    """Pool checksum recomputed here, independently of ffc_ray.engine.checkpoint.tensor_checksum."""
    h = hashlib.sha256()
    head = state["trainer"]["head"]
    for key in ("pool", "ring_pos", "row_count"):
        t = head[key].contiguous()
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def load_state(ckpt_dir: Path) -> dict:
    return load_checkpoint_state(ckpt_dir)


def assert_index_equal(state: dict, ref_state: dict) -> None:
    assert state["capacity"] == ref_state["capacity"]
    np.testing.assert_array_equal(state["labels"], ref_state["labels"])
    np.testing.assert_array_equal(state["order"], ref_state["order"])


class Background:
    """Run ``fn`` in a thread; ``join()`` returns its result or re-raises its error."""

    def __init__(self, fn, *args, **kwargs) -> None:
        self.result: Any = None
        self.error: BaseException | None = None

        def body() -> None:
            try:
                self.result = fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001
                self.error = exc

        self.thread = threading.Thread(target=body, daemon=True)
        self.thread.start()

    def join(self, timeout: float = 600) -> Any:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "background run did not finish"
        if self.error is not None:
            raise self.error
        return self.result


def wait_for(pred, timeout: float = 300, every: float = 0.2, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")
