"""Failures mid-run: a killed worker, a killed pool actor, a stopped driver.

After each, the run must finish, continue from the last checkpoint (step numbers resume there),
restore pool buffers and index exactly as checkpointed, and end with the index an uninterrupted
run would have (a PoolIndex replayed on the same labels): no step lost, none applied twice.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest

from ffc_ray.data.source import replay_pool_index
from ffc_ray.engine.loop import StopAfter
from ffc_ray.pool.actor import actor_name, index_checksum, kill_pool_actor
from ffc_ray.ray.train import run_training
from tests.ray.helpers import (
    Background,
    SlowSteps,
    assert_index_equal,
    checkpoints_by_step,
    last_per_step,
    load_state,
    pool_sum_from_state,
    progress,
    small_cfg,
    wait_for,
)

pytestmark = [pytest.mark.ray, pytest.mark.slow]

STEPS = 16


def _cfg(tmp_path: Path):
    return small_cfg(tmp_path, **{"train.steps": STEPS, "train.eval_interval": STEPS})


def _checkpointed_and_running(run_dir: Path, min_step: int):
    """Ray has registered a checkpoint (its snapshot lists one) and training goes on."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"

    def pred():
        if not snapshot.is_file() or '"checkpoint_dir_name"' not in snapshot.read_text():
            return False
        steps, _ = progress(run_dir)
        return bool(steps) and min_step <= steps[-1]["step"] < STEPS

    return pred


def _check_recovery(ray, run, cfg, world: int) -> None:
    """The shared guarantees after one failure."""
    assert run.result.error is None
    assert run.summary["final_step"] == STEPS
    steps, events = progress(run.run_dir)
    restores = [e for e in events if e["event"] == "restore"]
    assert restores, "the run was not restored from a checkpoint"
    r = restores[-1]
    ckpts = checkpoints_by_step(run.run_dir)
    assert r["from_step"] in ckpts and r["from_step"] % cfg.train.checkpoint_interval == 0
    # pool and index after the restore equal the checkpoint's (recomputed from its files)
    state = load_state(ckpts[r["from_step"]])
    assert r["pool_checksums"] == [pool_sum_from_state(state)] * world
    assert r["index_checksum"] == index_checksum(state["index"]) == r["ckpt_index_checksum"]
    # step numbers continue from the checkpoint
    after = [s["step"] for s in steps if s["attempt"] == r["attempt"]]
    assert after[0] == r["from_step"] + 1 and after == list(range(after[0], STEPS + 1))
    assert sorted(last_per_step(steps)) == list(range(1, STEPS + 1))
    # nothing lost, nothing applied twice: the index of an uninterrupted run
    assert_index_equal(
        ray.get(run.actor.get_state.remote())[0],
        replay_pool_index(cfg, STEPS, world=world).state_dict(),
    )
    sums = run.summary["pool_checksums"]
    assert len(set(sums)) == 1


def test_killed_worker_restarts_group_from_last_checkpoint(ray_session, tmp_path: Path) -> None:
    cfg = _cfg(tmp_path)
    name = "ft-worker"
    job = Background(
        run_training,
        cfg,
        name=name,
        keep_actor=True,
        loop_callbacks=[SlowSteps(0.4, pid_dir=tmp_path / "pids")],
    )
    run_dir = tmp_path / name
    wait_for(_checkpointed_and_running(run_dir, 6), what="a checkpoint and step 6")
    pid = int((tmp_path / "pids" / "rank1.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    run = job.join()
    try:
        _check_recovery(ray_session, run, cfg, world=2)
        assert int((tmp_path / "pids" / "rank1.pid").read_text()) != pid  # a new process
    finally:
        kill_pool_actor(run.actor)


def test_killed_actor_is_restored_from_last_checkpoint(ray_session, tmp_path: Path) -> None:
    ray = ray_session
    cfg = _cfg(tmp_path)
    name = "ft-actor"
    job = Background(run_training, cfg, name=name, keep_actor=True, loop_callbacks=[SlowSteps(0.4)])
    run_dir = tmp_path / name
    wait_for(_checkpointed_and_running(run_dir, 6), what="a checkpoint and step 6")
    ray.kill(ray.get_actor(actor_name(name)), no_restart=False)  # it restarts, empty
    run = job.join()
    try:
        info = ray.get(run.actor.info.remote())
        assert info["restarted"] is True and info["step"] == STEPS
        assert info["plans"] > 0  # the restarted instance planned the steps after the reload
        _check_recovery(ray, run, cfg, world=2)
    finally:
        kill_pool_actor(run.actor)


def test_resume_after_driver_stop_matches_uninterrupted_run(ray_session, tmp_path: Path) -> None:
    ray = ray_session
    cfg = small_cfg(
        tmp_path,
        **{
            "ray.num_workers": 1,
            "train.steps": 10,
            "train.eval_interval": 10,
            "train.checkpoint_interval": 4,
            "model.dropout": 0.1,
        },
    )
    full = run_training(cfg, name="rs-full", keep_actor=True)
    first = run_training(cfg, name="rs-split", loop_callbacks=[StopAfter(6)])
    assert first.summary["final_step"] == 6 and first.summary["stopped_at"] == 6
    second = run_training(cfg, name="rs-split", keep_actor=True)  # the same command again
    try:
        assert second.summary["start_step"] == 6 and second.summary["final_step"] == 10
        a = last_per_step(progress(full.run_dir)[0])
        b = last_per_step(progress(second.run_dir)[0])
        assert sorted(a) == sorted(b) == list(range(1, 11))
        la = np.array([a[k]["loss"] for k in sorted(a)])
        lb = np.array([b[k]["loss"] for k in sorted(b)])
        np.testing.assert_allclose(lb, la, rtol=1e-5, atol=1e-6)
        assert full.summary["pool_checksums"] == second.summary["pool_checksums"]
        assert_index_equal(
            ray.get(second.actor.get_state.remote())[0], ray.get(full.actor.get_state.remote())[0]
        )
        # and the final checkpoints carry the same model
        ca = load_state(checkpoints_by_step(full.run_dir)[10])
        cb = load_state(checkpoints_by_step(second.run_dir)[10])
        for k, v in ca["trainer"]["pnet"].items():
            np.testing.assert_allclose(
                cb["trainer"]["pnet"][k].numpy(), v.numpy(), rtol=1e-5, atol=1e-6, err_msg=k
            )
    finally:
        kill_pool_actor(full.actor)
        kill_pool_actor(second.actor)
