"""The one training loop and its callbacks, with a stand-in trainer (no model)."""

from __future__ import annotations

import math

import pytest

from ffc_ray.config import Config
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
        self.calls.append((self.name, "before", trainer.step, batch[0]))

    def after_step(self, trainer, metrics, loop):
        self.calls.append((self.name, "after", loop.step, loop.stop))


def batches(n: int = 100):
    return (([i, i], None, [i], None) for i in range(n))


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
