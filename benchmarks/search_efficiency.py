"""Search efficiency at equal compute: who finds the better model per epoch spent.

    python benchmarks/search_efficiency.py [--seeds 1 2 3] [--budget 60] [--max-epochs 9]
        [--subset 0.3] [--workdir DIR] [--memory-trials 31]

Five contenders, each run through `search/run.py -m` with the default search space, on the
same data and split, with the same budget of training epochs
(`hydra.sweeper.max_epochs_total`: every epoch a trial trains counts; running trials finish,
so the epochs actually used are printed too). `n_jobs=2`, no registry:
- default: TPE (conditional) + Hyperband pruning, what `python search/run.py -m` runs;
- tpe: TPE without pruning;
- random: Optuna's random search without pruning;
- kt-hyperband, kt-bayesian: keras-tuner's oracles through `hydra.sweeper.engine=keras_tuner`.
Each search seed gives each contender one sweep; the data seed stays fixed, so the
contenders compare on the same split. For each one it prints mean ± sd over seeds of: the
best val_loss; that trial's val ROC AUC; its test ROC AUC and accuracy (the test split carved
from train, never used for selection); the epochs it needed to reach unpruned TPE's final
best of the same seed ("-" where it never did); the epochs used; trials by state; wall time.

`--memory-trials N` also runs N two-epoch keras-tuner random trials twice: in our recycled
workers (`trials_per_worker=3`, the search spaces' default) and in one process for all of
them (`trials_per_worker=null`, like keras-tuner's own loop). It prints the worker RSS after
trials 5 and N.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = {
    "default": [],
    "tpe": ["hydra/sweeper/pruner=nop"],
    "random": ["hydra/sweeper/sampler=random", "hydra/sweeper/pruner=nop"],
    "kt-hyperband": ["hydra.sweeper.engine=keras_tuner",
                     "hydra.sweeper.keras_tuner.algorithm=hyperband"],
    "kt-bayesian": ["hydra.sweeper.engine=keras_tuner",
                    "hydra.sweeper.keras_tuner.algorithm=bayesian"],
}


def sweep(work: Path, name: str, overrides: list[str]) -> float:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3", "XRAY_PLAIN_PROGRESS": "1"}
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m", *overrides,
           f"hydra.sweeper.study_name={name}", f"hydra.sweep.dir={work / 'sweeps' / name}",
           f"hydra.sweeper.storage=sqlite:///{work / 'optuna.db'}", "registry.enabled=false",
           "tracking.experiment=search-efficiency", "hydra.sweeper.n_jobs=2",
           "tracking.artifact_root=" + (work / "artifacts").as_uri()]
    start = time.perf_counter()
    with open(work / f"{name}.log", "w") as out:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - start


def study_of(work: Path, name: str):
    import optuna

    storage = f"sqlite:///{work / 'optuna.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)
             if s.study_name == name or s.study_name.startswith(f"{name}-kt-")]
    return optuna.load_study(study_name=names[-1], storage=storage)


def trajectory(study) -> list[tuple[int, float]]:
    """(cumulative epochs, best val_loss so far) after each finished trial, in order."""
    from optuna.trial import TrialState

    done = sorted((t for t in study.trials if t.datetime_complete),
                  key=lambda t: t.datetime_complete)
    points, epochs, best = [], 0, float("inf")
    for t in done:
        epochs += len(t.intermediate_values)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = min(best, t.value)
        points.append((epochs, best))
    return points


def best_run_metrics(work: Path, study) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("search-efficiency").experiment_id
    (run,) = client.search_runs(
        [experiment], f"tags.`optuna.study` = '{study.study_name}' and "
        f"tags.`optuna.trial_number` = '{study.best_trial.number}'")
    return run.data.metrics


def mean_sd(values: list[float], digits: int = 4) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {sd:.{digits}f}"


def memory(work: Path, trials: int, subset: float) -> list[str]:
    """Worker RSS after trials 5 and N, recycled workers against one process."""
    import optuna

    rows = []
    for label, per_worker in (("recycled every 3 trials", "3"), ("one process", "null")):
        name = f"memory-{per_worker}"
        sweep(work, name, ["hydra.sweeper.engine=keras_tuner",
                           "hydra.sweeper.keras_tuner.algorithm=random",
                           # 2: a 1-epoch trial leaves the cosine schedule's warm-up nothing
                           "hydra.sweeper.keras_tuner.max_epochs=2", "trainer.max_epochs=2",
                           f"hydra.sweeper.n_trials={trials}", f"data.subset_fraction={subset}",
                           f"hydra.sweeper.trials_per_worker={per_worker}",
                           "hydra.sweeper.keras_tuner.seed=1"])
        study = optuna.load_study(study_name=study_of(work, name).study_name,
                                  storage=f"sqlite:///{work / 'optuna.db'}")
        # with n_jobs 2, trial k is the k-th of the sweep; the index is its worker's count
        by_number = {t.number: (t.user_attrs.get("worker_rss_mb"),
                                t.user_attrs.get("worker_trial_index")) for t in study.trials}
        cells = [f"{rss} (worker's trial {index})" for rss, index in
                 (by_number.get(4, (None, None)), by_number.get(trials - 1, (None, None)))]
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=int, default=60, help="training epochs per sweep")
    parser.add_argument("--max-epochs", type=int, default=9, help="most epochs of one trial")
    parser.add_argument("--subset", type=float, default=0.3, help="data.subset_fraction")
    parser.add_argument("--memory-trials", type=int, default=0)
    parser.add_argument("--memory-only", action="store_true", help="only the RSS comparison")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="search-efficiency-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.memory_only:
        print("| workers | after trial 5 | after the last trial |\n|---|---|---|")
        print("\n".join(memory(work, args.memory_trials or 31, args.subset)))
        return
    common = [f"data.subset_fraction={args.subset}", f"trainer.max_epochs={args.max_epochs}",
              f"hydra.sweeper.max_epochs_total={args.budget}", "hydra.sweeper.n_trials=200",
              "hydra.sweeper.timeout=null",
              f"hydra.sweeper.keras_tuner.max_epochs={args.max_epochs}"]
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    for seed in args.seeds:
        for contender, extra in CONTENDERS.items():
            name = f"{contender}-s{seed}"
            seeded = [f"hydra.sweeper.keras_tuner.seed={seed}"] if contender.startswith("kt") \
                else [f"hydra.sweeper.sampler.seed={seed}"]
            print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
            if contender == "default":  # Hyperband's largest rung: the trials' epochs
                seeded.append(f"hydra.sweeper.pruner.max_resource={args.max_epochs}")
            wall = sweep(work, name, [*common, *extra, *seeded])
            study = study_of(work, name)
            metrics = best_run_metrics(work, study)
            states = [t.state.name for t in study.trials]
            results[contender].append({
                "seed": seed, "wall": wall, "best": study.best_value,
                "trajectory": trajectory(study), "val_auc": metrics.get("eval_val_roc_auc"),
                "test_auc": metrics.get("eval_test_roc_auc"),
                "test_acc": metrics.get("eval_test_accuracy"),
                "states": {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")},
            })
            print(f"    best val_loss {study.best_value:.4f}, {len(states)} trials, "
                  f"{trajectory(study)[-1][0]} epochs, {wall:.0f} s", flush=True)

    targets = {r["seed"]: r["best"] for r in results["tpe"]}
    header = ["contender", "best val_loss", "its val ROC AUC", "its test ROC AUC",
              "its test accuracy", "epochs to TPE's best (per seed)", "epochs used",
              "complete/pruned/failed", "wall s"]
    print(f"\nbudget {args.budget} epochs per sweep, trials of at most {args.max_epochs} "
          f"epochs, data.subset_fraction={args.subset}, seeds {args.seeds}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    reach: dict[str, list[int | None]] = {}
    for contender, rows in results.items():
        reach[contender] = [next((e for e, b in r["trajectory"] if b <= targets[r["seed"]]),
                                 None) for r in rows]
        states = [r["states"] for r in rows]
        print("| " + " | ".join([
            contender, mean_sd([r["best"] for r in rows]), mean_sd([r["val_auc"] for r in rows]),
            mean_sd([r["test_auc"] for r in rows]), mean_sd([r["test_acc"] for r in rows]),
            ", ".join("-" if e is None else str(e) for e in reach[contender]),
            mean_sd([r["trajectory"][-1][0] for r in rows], 0),
            " ".join(f"{s['COMPLETE']}/{s['PRUNED']}/{s['FAIL']}" for s in states),
            mean_sd([r["wall"] for r in rows], 0)]) + " |")
    if args.memory_trials:
        print(f"\nworker RSS (MB) of keras-tuner random trials, {args.memory_trials} trials of "
              "2 epochs\n\n| workers | after trial 5 | after the last trial |\n|---|---|---|")
        print("\n".join(memory(work, args.memory_trials, args.subset)))
    mean = {c: statistics.mean(r["best"] for r in rows) for c, rows in results.items()}
    peer = min((c for c in mean if c != "default"), key=mean.get)
    tpe_used = [r["trajectory"][-1][0] for r in results["tpe"]]
    ratios = [e / u for e, u in zip(reach["default"], tpe_used, strict=True) if e is not None]
    print(f"\nstores under {work}")
    print(f"default mean best val_loss {mean['default']:.4f} vs best peer {peer} "
          f"{mean[peer]:.4f} (ratio {mean['default'] / mean[peer]:.3f}); default reached "
          f"TPE's best in {len(ratios)}/{len(tpe_used)} seeds with "
          + (f"{statistics.mean(ratios):.0%} of TPE's epochs" if ratios else "no seed"))


if __name__ == "__main__":
    main()
