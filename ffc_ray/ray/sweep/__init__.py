"""Hyperparameter sweeps: Ray Tune + Optuna (TPE, seeded) + ASHA over Ray Train (V2) trials.

Why this shape (docs/reference.md 3.1, 3.3):

* Each Tune trial is a small *driver* (a function trainable, ``tune.trial_cpus`` CPU) that builds
  the run's TorchTrainer through :mod:`ffc_ray.ray.train` and calls ``fit()``. Train V2 reports
  reach Tune only through a ``TuneReportCallback`` on the Train controller; ours
  (:class:`SweepReportCallback`) first renames the trainer's metrics to the sweep's names
  (:func:`tune_metrics`) and forwards one Tune result per *evaluation*, so one Tune
  ``training_iteration`` = one evaluation (ASHA's unit).
* OptunaSearch keeps its study in an RDB storage (SQLite file ``optuna.db`` in the experiment
  folder by default, or ``tune.storage``: any SQLAlchemy URL, e.g. PostgreSQL on a cluster), so
  the study outlives the driver and can be read with Optuna's own tools. The paper's defaults are
  enqueued first (``points_to_evaluate``).
* ASHA stops bad trials early on the verification metric. In multi-objective mode (``tune.
  objectives``) it is disabled: it ranks trials on one number and would cut the Pareto front.
* Outputs (experiment folder ``<storage>/<name>``): ``results.csv`` / ``results.md`` (one row per
  trial, rewritten whenever a trial reports or ends, so progress is visible while it runs),
  ``best_config.yaml`` (a ready ``ffc-ray train`` config), ``pareto.csv`` / ``pareto.md`` in
  multi-objective mode, ``tb/`` (one TensorBoard run per trial with curves and an hparams session;
  the experiment summary at ``tb/`` itself), ``optuna.db``, ``train/train-<trial>/`` (the Ray
  Train runs: checkpoints, their own TensorBoard logs, progress files) and Tune's own files.
* ``storage`` may be a bucket URI (``s3://``, ``gs://``, any pyarrow filesystem URI): Tune and
  the trials' Train runs (``ray.storage_path = <exp URI>/train``) write there natively; the
  sweep's own files are staged in ``<train.output_dir>/sweeps/<name>`` and uploaded
  (:func:`push_sweep`) whenever a trial ends and at the end. The SQLite study cannot live in a
  bucket: unless ``tune.storage`` names a database, it stays in the staging folder and a
  consistent copy (SQLite backup API) is uploaded with the rest; ``--resume`` fetches it when
  the staging folder lacks it (:func:`pull_sweep`).
* ``resume=True`` restores the Tuner from the experiment folder: finished trials are kept,
  unfinished and errored ones continue (their Train runs resume from their checkpoints, Train V2
  restores by run name), the Optuna study continues.

A sweep needs ``ray[default]`` (dashboard + State API): without it, the placement groups of
trials that ASHA stops leak and the next trial waits forever (docs/reference.md 3.3, found by
experiment). :func:`run_sweep` starts local Ray with the dashboard on and refuses to start one
when the dashboard's dependencies are missing.
"""
