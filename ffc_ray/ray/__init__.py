"""Everything that touches Ray: Ray Train (``train``), the distributed hooks (``dist``), run
logging (``tb``) and the ``ffc-ray train`` command (``train_cli``).

Nothing is imported here, so ``import ffc_ray.ray`` stays cheap and Ray-free; import the
submodules (``from ffc_ray.ray.train import run_training``).
"""
