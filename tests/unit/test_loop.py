"""The one training loop and its callbacks, with a stand-in trainer (no model)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ffc_ray.config import Config
from ffc_ray.data.batch import StepBatch
from ffc_ray.engine.loop import Callback, FiniteLoss, History, StopAfter, train_loop


class CountingTrainer:
    """train_step advances ``step`` and returns a loss read from ``losses``."""

    def __init__(self, step: int = 0, losses: dict[int, float] | None = None) -> None:
        self.step, self.losses, self.batches = step, losses or {}, []

    def train_step(self, x, lx, y, ly):
        self.batches.append(x)
        self.step += 1
        return {
            "loss": self.losses.get(self.step, 1.0),
            "lr": 0.1,
            "step_time": 0.5,
            "images_per_s": 4.0,
        }


class Recorder(Callback):
    def __init__(self, name: str, calls: list) -> None:
        self.name, self.calls = name, calls

    def before_step(self, trainer, batch):
        self.calls.append((self.name, "before", trainer.step, batch.lx.tolist()))

    def after_step(self, trainer, metrics, loop):
        self.calls.append((self.name, "after", loop.step, loop.stop))


def batches(n: int = 100):
    """Step batches of 2 + 1 one-pixel images (the loop only counts and forwards them)."""
    img = torch.zeros
    empty = np.empty(0, np.int64)
    return (
        StepBatch(
            img(2, 3, 1, 1),
            torch.tensor([i, i]),
            img(1, 3, 1, 1),
            torch.tensor([i]),
            0,
            i,
            empty,
            empty,
        )
        for i in range(n)
    )


def test_loop_runs_from_the_trainers_step_to_steps_calling_callbacks_in_order():
    calls: list = []
    trainer = CountingTrainer(step=3)  # a restored trainer: steps 4 .. 5 remain
    loop = train_loop(trainer, batches(), 5, [Recorder("a", calls), Recorder("b", calls)])
    assert (loop.step, loop.final, loop.stop) == (5, True, False)
    assert calls == [
        ("a", "before", 3, [0, 0]), ("b", "before", 3, [0, 0]),
        ("a", "after", 4, False), ("b", "after", 4, False),
        ("a", "before", 4, [1, 1]), ("b", "before", 4, [1, 1]),
        ("a", "after", 5, False), ("b", "after", 5, False),
    ]  # fmt: skip


def test_stop_after_ends_the_loop_and_later_callbacks_see_the_stop():
    calls: list = []
    loop = train_loop(CountingTrainer(), batches(), 10, [StopAfter(2), Recorder("r", calls)])
    assert (loop.step, loop.stop, loop.final) == (2, True, False)
    assert [c for c in calls if c[1] == "after"] == [
        ("r", "after", 1, False),
        ("r", "after", 2, True),
    ]
    # stopping at the last step is the normal end, not a stop
    loop = train_loop(CountingTrainer(), batches(), 2, [StopAfter(2)])
    assert (loop.step, loop.stop, loop.final) == (2, False, True)


def test_loop_names_a_short_iterator_and_a_non_finite_loss():
    with pytest.raises(RuntimeError, match="ran out at step 3 of 5"):
        train_loop(CountingTrainer(), batches(3), 5)
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 2"):
        train_loop(CountingTrainer(losses={2: math.nan}), batches(), 5, [FiniteLoss()])


def test_history_windows_evals_and_throughput():
    cfg = Config().with_overrides({"train.log_interval": 2, "train.eval_interval": 3})
    logged, evals = [], []
    record = History(
        cfg, eval_fn=lambda s: evals.append(s) or {"acc": s}, log_fn=lambda s, m: logged.append(s)
    )
    train_loop(CountingTrainer(), batches(), 5, [record])
    out = record.summary()
    assert logged == [2, 4, 5] and evals == [3, 5]  # windows end at 2, 4 and the last step
    assert [h["step"] for h in out["history"]] == [2.0, 4.0, 5.0]
    assert out["evals"] == [(3, {"acc": 3}), (5, {"acc": 5})]
    assert out["mean_step_time"] == 0.5  # steps 2 .. 5; the first is left out
    assert out["images_per_s"] == pytest.approx(4 * 3 / (4 * 0.5))  # 3 images a step


def test_the_single_process_run_trains_from_arrays_in_memory():
    """run_single_process end to end on a few steps (the full learning test is slow): the
    arrays it is handed feed the loop, and History counts the images of every step."""
    from ffc_ray.data.synthetic import synthetic_split
    from ffc_ray.engine.loop import run_single_process

    over = {
        "data.num_identities": 40,
        "data.images_per_identity": 4,
        "data.holdout_identities": 10,
        "data.num_pairs": 40,
        "data.image_size": 16,
        "data.instance_batch": 8,
        "data.identity_batch": 4,
        "model.backbone": "tiny",
        "model.embedding_dim": 16,
        "pool.capacity": 20,
        "train.steps": 4,
        "train.eval_interval": 4,
        "train.device": "cpu",
        "eval.folds": 2,
    }
    cfg = Config().with_overrides(over)
    res = run_single_process(cfg, data=synthetic_split(cfg.data))
    assert res["train"]["final"]["step"] == 4.0 and math.isfinite(res["train"]["final"]["loss"])
    assert res["train"]["images_per_s"] > 0 and "accuracy" in res["after"]
