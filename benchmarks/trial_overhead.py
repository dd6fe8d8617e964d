"""What a trial of the platform costs beyond its training: plain `model.fit` against one trial.

    python benchmarks/trial_overhead.py [--epochs 5] [--repeats 3] [--workdir DIR]

Both sides train the same default CNN on the same built-in data for the same epochs, in one
process that has already run one of each (a reused sweep worker, warm imports):

- plain: the data built by the platform's builder, the model built, compiled and fitted with
  `model.fit(train, validation_data=val, class_weight=...)`, as a notebook would, in the
  precision the trial resolves (`trainer.precision`) with the fused batch-norm;
- platform: `search.training.trainer.train(cfg)` as a sweep worker runs it (the sweeper's
  trial variables set, for a trial asked from a SQLite Optuna study): tracking, per-epoch
  MLflow metrics and pruner reports, the resumable state (the sweep's default
  `hydra.sweeper.retry`: every epoch), best-only checkpoint, early stopping, evaluation of val
  and test with intervals and calibration, the logged MLflow model with its metadata, in two
  cases side by side:
  - *outside top k*, the common case: the study already holds more better COMPLETE trials
    than `evaluation.figures_top_k`, so the trial renders no figures (its JSONs and metrics
    are all logged);
  - *inside top k*: the study holds none, so the trial renders every figure (confusion,
    ROC/PR, calibration, curves), as a single run and every registry candidate do.

Each side's wall time splits at its first and last epoch end (a Keras callback for plain,
the timestamps of the per-epoch `val_loss` MLflow records for the platform): *before* is the
start to the first epoch's end minus one epoch, *per epoch* the mean between epoch ends,
*after* the last epoch's end to the return. The last line is the headline ratio: the common
case (a sweep trial outside the running top k) over plain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

from common import compose, private_store  # noqa: E402 - benchmarks/common.py


def split(started: float, ends: list[float], finished: float) -> dict[str, float]:
    """before / per_epoch / after / total seconds from the epoch-end times."""
    per_epoch = (ends[-1] - ends[0]) / (len(ends) - 1) if len(ends) > 1 else ends[0] - started
    return {"before": ends[0] - started - per_epoch, "per_epoch": per_epoch,
            "after": finished - ends[-1], "total": finished - started}


def plain(cfg: object) -> dict[str, float]:
    """The notebook's way: build, compile, fit; nothing tracked."""
    import keras
    from hydra.utils import instantiate

    from models.fused_batch_norm import fuse_batch_norm
    from models.precision import dtype_policy, resolve_precision

    ends: list[float] = []
    started = time.time()
    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    keras.backend.clear_session()
    keras.utils.set_random_seed(int(cfg.seed))
    # the same arithmetic as the trial (precision, fused batch-norm): only the overhead differs
    policy = resolve_precision(str(cfg.trainer.precision), False, int(data.input_shape[0]))
    with dtype_policy(policy):
        model = instantiate(cfg.model, input_shape=tuple(data.input_shape), num_classes=2)
    fuse_batch_norm(model)
    model.compile(optimizer=keras.optimizers.Adam(float(cfg.optimizer.learning_rate)),
                  loss="binary_crossentropy", metrics=["accuracy", keras.metrics.AUC()])
    model.fit(data.train, steps_per_epoch=int(data.steps_per_epoch),
              epochs=int(cfg.trainer.max_epochs), validation_data=data.val,
              class_weight=data.class_weight, verbose=0,
              callbacks=[keras.callbacks.LambdaCallback(
                  on_epoch_end=lambda *_: ends.append(time.time()))])
    return split(started, ends, time.time())


# Better COMPLETE trials in the "outside top k" study: more than any figures_top_k in use.
OUTSIDE = 50


def study(workdir: Path, name: str, better: int) -> object:
    """A SQLite study with `better` COMPLETE trials of a perfect val_loss (0.0)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    made = optuna.create_study(study_name=name, storage=f"sqlite:///{workdir / 'optuna.db'}",
                               load_if_exists=True)
    dist = {"x": optuna.distributions.FloatDistribution(0, 1e6)}
    for i in range(better):
        made.add_trial(optuna.trial.create_trial(params={"x": float(i)}, distributions=dist,
                                                 value=0.0))
    return made


def platform(cfg: object, workdir: Path, i: int, sweep: object) -> dict[str, float]:
    """One trial as the sweeper's worker runs it: `search.training.trainer.train` with the
    sweeper's trial variables for a trial asked from `sweep` (an Optuna study)."""
    import mlflow

    from hydra_plugins.optuna_pruning_sweeper.config import RetryConf
    from search.training.trainer import train

    asked = sweep.ask()
    # the sweep's default hydra.sweeper.retry: a sweep trial writes its resumable state
    # every epoch, so this side pays for it as a sweep worker does
    retry = json.dumps(dataclasses.asdict(RetryConf()))
    trial_env = {"OPTUNA_SWEEPER_RETRY": retry,
                 "OPTUNA_SWEEPER_STORAGE": f"sqlite:///{workdir / 'optuna.db'}",
                 "OPTUNA_SWEEPER_STUDY": sweep.study_name,
                 "OPTUNA_SWEEPER_TRIAL_ID": str(asked._trial_id),
                 "OPTUNA_SWEEPER_TRIAL_NUMBER": str(asked.number)}
    os.environ.update(trial_env)
    try:
        started = time.time()
        train(cfg, output_dir=workdir / f"{sweep.study_name}{i}")
        finished = time.time()
    finally:
        for key in trial_env:
            os.environ.pop(key)
    client = mlflow.MlflowClient()
    run = client.search_runs(
        [mlflow.get_experiment_by_name("trial-overhead").experiment_id],
        order_by=["attributes.start_time DESC"], max_results=1)[0]
    ends = sorted(m.timestamp / 1000 for m in client.get_metric_history(run.info.run_id,
                                                                          "val_loss"))
    return split(started, ends, finished)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = private_store(args.workdir, "trial-overhead-")

    # Every epoch trains (no early stop); a constant learning rate and Adam on both sides.
    cfg = compose([f"trainer.max_epochs={args.epochs}", "trainer.patience=1000",
                   "trainer.verbose=0", "optimizer=adam", "lr_schedule=constant",
                   "tracking.experiment=trial-overhead"])
    studies = {"trial, outside top k": study(workdir, "outside", OUTSIDE),
               "trial, inside top k": study(workdir, "inside", 0)}
    plain(cfg)  # warm-up: imports, TF's first graph, MLflow's store
    for sweep in studies.values():
        platform(cfg, workdir, 0, sweep)
    rows: dict[str, list[dict[str, float]]] = {"plain model.fit": [],
                                               **{name: [] for name in studies}}
    for i in range(1, args.repeats + 1):  # alternate, so drift hits all alike
        rows["plain model.fit"].append(plain(cfg))
        for name, sweep in studies.items():
            rows[name].append(platform(cfg, workdir, i, sweep))

    med = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
           for name, runs in rows.items()}
    print(f"{args.epochs} epochs of the default CNN on the built-in data, median of "
          f"{args.repeats} runs each after a warm-up, one process")
    print(f"{'':22s} {'before s':>9s} {'per epoch s':>12s} {'after s':>8s} {'total s':>8s}"
          f" {'fixed s':>8s} {'/ plain':>8s}")
    p = med["plain model.fit"]
    for name, m in med.items():
        fixed = (m["before"] - p["before"]) + (m["after"] - p["after"])
        print(f"{name:22s} {m['before']:9.2f} {m['per_epoch']:12.2f} {m['after']:8.2f} "
              f"{m['total']:8.2f} {fixed:8.2f} {m['total'] / p['total']:8.3f}")
    for name in studies:
        q = med[name]
        print(f"{name}: per epoch {q['per_epoch'] / p['per_epoch']:.3f}x plain")
    q = med["trial, outside top k"]  # the common case: most of a sweep's trials
    print(f"headline: platform trial (outside top k) / plain total = "
          f"{q['total'] / p['total']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
