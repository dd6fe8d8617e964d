"""What each honest-estimate feature adds to a trial, side by side with the trial's training.

    python benchmarks/feature_costs.py [--epochs 10] [--repeats 3] [--workdir DIR]

The default CNN is trained once by the platform (`search.training.trainer.train`, built-in
data). Its
best checkpoint is then evaluated and logged (`evaluation_logging.evaluate_and_log`, into a
private MLflow store, as every finished trial is) with the features switched on one at a
time: bootstrap intervals (`evaluation.bootstrap.resamples=1000`), calibration
(`evaluation.calibration=temperature`) and an external set (the 16 real full-size X-rays,
`evaluation.external`; loaded once per worker process, so the timed calls reuse it, as a
worker's later trials do). Each variant runs `--repeats` times on a fresh copy of the
checkpoint; the table gives the median seconds, the cost over the plain evaluation, and that
cost as a share of the measured training time. The last line is the headline: all features
together as a share of one trial.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import REPO, compose, private_store  # noqa: E402 - benchmarks/common.py

XRAY16 = REPO.parent / "shared" / "data" / "chest_xray_sample" / "val"

PLAIN = ["evaluation.bootstrap.resamples=0", "evaluation.calibration=none"]
VARIANTS = [
    ("plain evaluation", []),
    ("+ intervals (1000 resamples)", ["evaluation.bootstrap.resamples=1000"]),
    ("+ calibration (temperature)", ["evaluation.calibration=temperature"]),
    ("+ external set (16 X-rays)", [f"evaluation.external=[{{name: xray16, path: '{XRAY16}'}}]"]),
    ("all three", ["evaluation.bootstrap.resamples=1000", "evaluation.calibration=temperature",
                   f"evaluation.external=[{{name: xray16, path: '{XRAY16}'}}]"]),
]



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args(argv)
    workdir = private_store(args.workdir, "feature-costs-")

    import keras
    import mlflow
    from hydra.utils import instantiate

    from search.evaluation.evaluate_run import evaluate_and_log
    from search.training.trainer import train

    base = [f"seed={args.seed}", f"trainer.max_epochs={args.epochs}", "trainer.verbose=0",
            "tracking.log_model=false", "tracking.experiment=feature-costs",
            "trainer.patience=100"]  # every epoch trains: a fixed training time to compare with
    started = time.perf_counter()
    train(compose([*base, *PLAIN]), output_dir=workdir / "trial")
    train_s = time.perf_counter() - started
    checkpoint = workdir / "trial" / "checkpoints" / "best.keras"
    cfg0 = compose([*base, *PLAIN])
    data = instantiate(cfg0.data, seed=args.seed, _convert_="all")
    mlflow.set_experiment("feature-costs")

    rows = []
    for name, extra in VARIANTS:
        cfg = compose([*base, *PLAIN, *extra])
        times = []
        for i in range(args.repeats + 1):  # the first call warms caches (external set, TF)
            model = keras.models.load_model(checkpoint, safe_mode=True, compile=False)
            model.compile(loss="binary_crossentropy")
            with mlflow.start_run(run_name=f"{name} #{i}"):
                t0 = time.perf_counter()
                evaluate_and_log(cfg, model, data, binary=True)
                elapsed = time.perf_counter() - t0
            if i:
                times.append(elapsed)
        rows.append((name, statistics.median(times)))

    plain = rows[0][1]
    print(f"training: {args.epochs} epochs of the default CNN on the built-in data, "
          f"{train_s:.1f} s (the whole train() call)")
    print(f"{'variant':32s} {'median s':>9s} {'cost s':>8s} {'% of training':>14s}")
    for name, seconds in rows:
        cost = seconds - plain
        print(f"{name:32s} {seconds:9.3f} {cost:8.3f} {100 * cost / train_s:13.1f}%")
    total = rows[-1][1] - plain
    print(f"headline: intervals + calibration + external set cost {total:.2f} s per trial, "
          f"{100 * total / train_s:.1f} % of a {args.epochs}-epoch trial")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
