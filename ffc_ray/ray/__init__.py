"""Everything that touches Ray: Ray Train (``train``), the distributed hooks (``dist``), run
logging (``tb``) and the ``ffc-ray train`` command (``train_cli``).

Nothing is imported here, so ``import ffc_ray.ray`` stays cheap and Ray-free; import the
submodules (``from ffc_ray.ray.train import run_training``).
"""

#: Ray system settings for the Ray instances ffc_ray starts itself (``ray.init`` of a local
#: cluster; the cluster files export the same as ``RAY_<name>`` before ``ray start``). Idle task
#: workers are otherwise killed after 1 s once a node runs more workers than CPUs, which is
#: always the case on small nodes with training workers and actors: every Ray Data read task
#: then starts a fresh Python process and pays the torch import again (measured: 41 worker
#: starts in 4 minutes of two LFW trainings on 2 CPUs, 0.45 -> 0.60 steps/s with this setting).
LOCAL_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 300_000}
