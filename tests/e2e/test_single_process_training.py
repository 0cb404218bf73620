"""End to end, one process: FFC and FC learn the synthetic faces (held-out identities).

The budget is the single-process demo's (:data:`ffc_ray.demo.DEMO_OVERRIDES`): tiny CNN at
32 px, 800 identities, 1000 steps, about 2-2.5 minutes per head on 2 CPU cores with one torch
thread (measured: FFC 0.607 -> 0.935, FC 0.607 -> 0.930). Both heads must go from about chance
to >= 90 % pair accuracy on identities never trained on. 1000 float32 steps are chaotic, so the
final accuracy depends on round-off: with torch's AVX-512 and portable kernels and 1 or 2
threads it measured FFC 0.934-0.952 and FC 0.921-0.933 (issue 18), all above the bar (and
the test passed on the AVX2 kernels).
"""

from __future__ import annotations

import pytest
import torch

from ffc_ray.demo import demo_config
from ffc_ray.engine.loop import run_single_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data():
    from ffc_ray.data.synthetic import synthetic_split

    return synthetic_split(demo_config().data)


@pytest.fixture(autouse=True, scope="module")
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the small convolutions lose more to contention than they gain
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("head", ["ffc", "fc"])
def test_head_learns_held_out_identities(head, data):
    cfg = demo_config([f"head.type={head}"])
    res = run_single_process(cfg, data=data)
    before, after = res["before"]["accuracy"], res["after"]["accuracy"]
    tr = res["train"]
    print(
        f"\n{head}: pair accuracy {before:.3f} -> {after:.3f} (auc "
        f"{res['before']['auc']:.3f} -> {res['after']['auc']:.3f}), "
        f"{cfg.train.steps} steps, {tr['mean_step_time'] * 1e3:.0f} ms/step, "
        f"train {res['train_time_s']:.0f} s; evals "
        f"{[(s, round(e['accuracy'], 3)) for s, e in tr['evals']]}"
    )
    assert before < 0.7, "an untrained network should be near chance"
    assert after >= 0.9
    if head == "ffc":
        assert tr["final"]["occupancy"] == res["capacity"]
        assert tr["final"]["pos_fraction"] > 0.5
