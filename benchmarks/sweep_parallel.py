"""Parallel-slot benchmark: the same sweep with hydra.sweeper.n_jobs=1 and =2, side by side.

    python benchmarks/sweep_parallel.py [--trials 6] [--epochs 3] [--subset 0.3] [--per-worker 3]

Both sweeps run `search/run.py -m` on the built-in data with the same seeded RandomSampler and
no pruner, so they train the same trials (checked below); only the number of slots differs.
Each uses its own temporary Optuna storage and MLflow store. Runs both slot counts with a fresh
worker process per trial and with workers reused for a few trials, and prints the wall times,
how busy the slots were, the ratios n_jobs=2 / n_jobs=1 (target <= 0.65) and what recycling a
process per trial costs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]


def run_sweep(
    workdir: Path, n_jobs: int, per_worker: int, args: argparse.Namespace
) -> tuple[float, optuna.Study]:
    tag = f"{n_jobs}-{per_worker}"
    storage = f"sqlite:///{workdir / f'optuna-{tag}.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / f'mlflow-{tag}.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    cmd = [
        sys.executable, str(REPO / "search" / "run.py"), "-m",
        f"hydra.sweep.dir={workdir / f'sweep-{tag}'}", f"hydra.sweeper.storage={storage}",
        f"hydra.sweeper.trials_per_worker={per_worker}",
        "hydra.sweeper.study_name=bench", f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.n_jobs={n_jobs}", "hydra/sweeper/sampler=random",
        "hydra.sweeper.sampler.seed=0", "hydra/sweeper/pruner=nop", "hydra.sweeper.timeout=null",
        f"data.subset_fraction={args.subset}", f"trainer.max_epochs={args.epochs}",
        "trainer.patience=100", "tracking.artifact_root=" + (workdir / f"art-{tag}").as_uri(),
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"sweep n_jobs={n_jobs} trials_per_worker={per_worker} failed:\n"
                 f"{proc.stderr[-4000:]}")
    return wall, optuna.load_study(study_name="bench", storage=storage)


def busy_fraction(study: optuna.Study, wall: float, slots: int) -> float:
    """Trial-seconds over slot-seconds of the whole command (start-up included)."""
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in study.trials
               if t.datetime_complete and t.datetime_start)
    return busy / (wall * slots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=float, default=0.3)
    parser.add_argument("--per-worker", type=int, default=3,
                        help="trials_per_worker of the recycled-worker variant")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        results = {}
        # (n_jobs, trials_per_worker): 1 = a fresh worker process per trial (the default).
        k = args.per_worker
        for n_jobs, per_worker in ((1, 1), (2, 1), (1, k), (2, k)):
            print(f"running {args.trials} trials, n_jobs={n_jobs}, "
                  f"trials_per_worker={per_worker} ...", flush=True)
            results[n_jobs, per_worker] = run_sweep(Path(tmp), n_jobs, per_worker, args)
        params = {k: sorted(repr(sorted(t.params.items())) for t in s.trials)
                  for k, (_, s) in results.items()}
        same = len({tuple(p) for p in params.values()}) == 1
        for (n_jobs, per_worker), (wall, study) in results.items():
            states = [t.state.name for t in study.trials]
            print(f"n_jobs={n_jobs} trials_per_worker={per_worker}: wall {wall:7.1f} s | "
                  f"trials {len(states)} ({states.count('COMPLETE')} complete) | slots busy "
                  f"{busy_fraction(study, wall, n_jobs):.0%}")
        print(f"same trials in every sweep: {same}")
        for per_worker in (1, k):
            print(f"wall ratio n_jobs=2 / n_jobs=1, trials_per_worker={per_worker}: "
                  f"{results[2, per_worker][0] / results[1, per_worker][0]:.2f} (target <= 0.65)")
        for n_jobs in (1, 2):
            print(f"wall ratio trials_per_worker={k} / 1, n_jobs={n_jobs}: "
                  f"{results[n_jobs, k][0] / results[n_jobs, 1][0]:.2f} (recycling cost)")


if __name__ == "__main__":
    main()
