"""Search efficiency at equal compute: who finds the better model per epoch spent.

    python benchmarks/search_efficiency.py [--seeds 1 2 3] [--budget 60] [--max-epochs 9]
        [--subset 0.3] [--contenders default tpe ...] [--workdir DIR] [--report-only]
        [--memory-trials 31]

Contenders, each run through `search/run.py -m` with the default search space, on the same
data and split, with the same budget of training epochs (`hydra.sweeper.max_epochs_total`:
every epoch a trial trains counts; running trials finish, so the epochs actually used are
printed too). `n_jobs=2`, no registry:
- default: TPE (conditional) + Hyperband pruning, what `python search/run.py -m` runs;
- tpe: TPE without pruning;
- random: Optuna's random search without pruning;
- kt-hyperband, kt-bayesian: keras-tuner's oracles through `hydra.sweeper.engine=keras_tuner`;
- warm (only when named): the default, warm-started (`hydra.sweeper.warm_start`) from the
  default sweep of the previous seed in `--seeds` (the first from the last), its "last
  night"; `--seeds 2 3 --contenders warm` warm-starts seed 3 from seed 2's default.
Each search seed gives each contender one sweep; the data seed stays fixed, so the
contenders compare on the same split. For each one it prints mean ± sd over seeds of: the
best val_loss; that trial's val ROC AUC; its test ROC AUC and accuracy (the test split carved
from train, never used for selection); the epochs it needed to reach unpruned TPE's final
best of the same seed ("-" where it never did); the epochs used; the epochs of trials pruned
after their last epoch (trained in full, then thrown away); trials by state; wall time. With
warm sweeps it also prints cold against warm: the epochs each needed to reach the source
study's best.

Each finished sweep's figures are kept in `<workdir>/results.json`, so a later call with the
same workdir only runs what is missing (another seed, budget or contender) and the table is
printed from everything asked for; `--report-only` prints it without running anything.

`--memory-trials N` also runs N two-epoch keras-tuner random trials twice: in our recycled
workers (`trials_per_worker=3`, the search spaces' default) and in one process for all of
them (`trials_per_worker=null`, like keras-tuner's own loop). It prints the worker RSS after
trials 5 and N.
"""

from __future__ import annotations

import argparse
import json
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
    "warm": [],  # + hydra.sweeper.warm_start.studies=[<the previous seed's default>]
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
    """(cumulative epochs, best val_loss so far) after each finished trial of this study's own
    (warm-start copies ran elsewhere), in order."""
    from optuna.trial import TrialState

    from hydra_plugins.optuna_pruning_sweeper._warm_start import own_trials

    done = sorted((t for t in own_trials(study.trials) if t.datetime_complete),
                  key=lambda t: t.datetime_complete)
    points, epochs, best = [], 0, float("inf")
    for t in done:
        epochs += len(t.intermediate_values)
        if t.state == TrialState.COMPLETE and t.value is not None:
            best = min(best, t.value)
        points.append((epochs, best))
    return points


def own_best(study):
    """The best COMPLETE trial this study ran itself (not a warm-start copy)."""
    from hydra_plugins.optuna_pruning_sweeper._warm_start import own_best as best

    return best(study.trials, study.directions)[0]


def wasted_epochs(study, max_epochs: int) -> int:
    """Epochs of trials pruned after their last epoch: trained in full, then thrown away."""
    from optuna.trial import TrialState

    return sum(len(t.intermediate_values) for t in study.trials
               if t.state == TrialState.PRUNED and len(t.intermediate_values) >= max_epochs)


def best_run_metrics(work: Path, study, number: int) -> dict[str, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("search-efficiency").experiment_id
    (run,) = client.search_runs(
        [experiment], f"tags.`optuna.study` = '{study.study_name}' and "
        f"tags.`optuna.trial_number` = '{number}'")
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


def sweep_name(contender: str, budget: int, seed: int) -> str:
    return f"{contender}-b{budget}-s{seed}"


def overrides(args, contender: str, seed: int) -> list[str]:
    """The sweep's command-line overrides: the common budget, the contender's, its seed."""
    common = [f"data.subset_fraction={args.subset}", f"trainer.max_epochs={args.max_epochs}",
              f"hydra.sweeper.max_epochs_total={args.budget}", "hydra.sweeper.n_trials=400",
              "hydra.sweeper.timeout=null",
              f"hydra.sweeper.keras_tuner.max_epochs={args.max_epochs}"]
    if contender.startswith("kt"):
        # keras-tuner's Hyperband stops after hyperband_iterations (1: about 100 epochs of
        # 10-epoch trials) whatever the budget; enough iterations to spend it, as a user
        # with that budget would set (the epoch budget ends the last one)
        rounds = [f"hydra.sweeper.keras_tuner.hyperband_iterations={args.budget // 50 + 1}"]
        return [*common, *CONTENDERS[contender], *(rounds if contender == "kt-hyperband" else []),
                f"hydra.sweeper.keras_tuner.seed={keras_tuner_seed(seed)}"]
    extra = [*CONTENDERS[contender], f"hydra.sweeper.sampler.seed={seed}"]
    if contender in ("default", "warm"):  # Hyperband's largest rung: the trials' epochs
        extra.append(f"hydra.sweeper.pruner.max_resource={args.max_epochs}")
    if contender == "warm":
        extra.append(f"hydra.sweeper.warm_start.studies=[{warm_source(args, seed)}]")
    return [*common, *extra]


def keras_tuner_seed(seed: int) -> int:
    """keras-tuner draws its n-th configuration with `seed + n`, so adjacent seeds share most
    draws (seeds 1 and 2 found the same trial); 1, 1001, 2001, ... keep its runs apart."""
    return 1 + 1000 * (seed - 1)


def warm_source(args, seed: int) -> str:
    """The default sweep a warm sweep starts from: the previous seed's (cyclically)."""
    seeds = list(args.seeds)
    return sweep_name("default", args.budget, seeds[seeds.index(seed) - 1])


def run_one(args, work: Path, contender: str, seed: int) -> dict:
    """Run one sweep and read back what the table needs."""
    name = sweep_name(contender, args.budget, seed)
    print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
    wall = sweep(work, name, overrides(args, contender, seed))
    study = study_of(work, name)
    best = own_best(study)
    metrics = best_run_metrics(work, study, best.number)
    states = [t.state.name for t in study.trials if t.user_attrs.get("warm_start_from") is None]
    row = {"seed": seed, "wall": wall, "best": best.value, "trajectory": trajectory(study),
           "val_auc": metrics.get("eval_val_roc_auc"),
           "test_auc": metrics.get("eval_test_roc_auc"),
           "test_acc": metrics.get("eval_test_accuracy"),
           "wasted": wasted_epochs(study, args.max_epochs),
           "source": warm_source(args, seed) if contender == "warm" else None,
           "states": {s: states.count(s) for s in ("COMPLETE", "PRUNED", "FAIL")}}
    print(f"    best val_loss {best.value:.4f}, {len(states)} trials, "
          f"{row['trajectory'][-1][0]} epochs, {wall:.0f} s", flush=True)
    return row


def reach(rows: list[dict], targets: dict[int, float]) -> list[int | None]:
    """Per row, the epochs its sweep had used when its best first reached the seed's target
    (within a relative 1e-6: the same model's val_loss read through Keras' evaluate or from
    its predictions differs in the 9th digit)."""
    return [next((e for e, b in r["trajectory"] if b <= targets[r["seed"]] * (1 + 1e-6)), None)
            if r["seed"] in targets else None for r in rows]


def print_table(args, results: dict[str, list[dict]]) -> None:
    targets = {r["seed"]: r["best"] for r in results.get("tpe", [])}
    header = ["contender", "seeds", "best val_loss", "its val ROC AUC", "its test ROC AUC",
              "its test accuracy", "epochs to TPE's best (per seed)", "epochs used",
              "epochs pruned after their last", "complete/pruned/failed", "wall s"]
    print(f"\nbudget {args.budget} epochs per sweep, trials of at most {args.max_epochs} "
          f"epochs, data.subset_fraction={args.subset}\n")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for contender, rows in results.items():
        states = [r["states"] for r in rows]
        print("| " + " | ".join([
            contender, " ".join(str(r["seed"]) for r in rows),
            mean_sd([r["best"] for r in rows]), mean_sd([r["val_auc"] for r in rows]),
            mean_sd([r["test_auc"] for r in rows]), mean_sd([r["test_acc"] for r in rows]),
            ", ".join("-" if e is None else str(e) for e in reach(rows, targets)),
            mean_sd([r["trajectory"][-1][0] for r in rows], 0),
            " ".join(str(r["wasted"]) for r in rows),
            " ".join(f"{s['COMPLETE']}/{s['PRUNED']}/{s['FAIL']}" for s in states),
            mean_sd([r["wall"] for r in rows], 0)]) + " |")
    means = {c: statistics.mean(r["best"] for r in rows) for c, rows in results.items() if rows}
    peers = [c for c in means if c.startswith("kt")]
    if "default" in means and peers:
        peer = min(peers, key=means.get)
        print(f"\ndefault mean best val_loss {means['default']:.4f} vs keras-tuner's best mean "
              f"({peer}) {means[peer]:.4f}: "
              + ("default leads" if means["default"] < means[peer] else "default does not lead"))


def print_warm(args, results: dict[str, list[dict]]) -> None:
    """Cold against warm: epochs to reach the source study's best (the previous seed's)."""
    cold = {r["seed"]: r for r in results.get("default", [])}
    warm = {r["seed"]: r for r in results.get("warm", [])}
    seeds = [s for s in args.seeds if s in cold and s in warm
             and int(warm[s]["source"].rsplit("-s", 1)[1]) in cold]
    if not seeds:
        return
    print("\n| seed | previous best (source) | cold: epochs to reach it | warm: epochs to reach "
          "it | cold best | warm best |\n|---|---|---|---|---|---|")
    for seed in seeds:
        source = int(warm[seed]["source"].rsplit("-s", 1)[1])  # the default it started from
        target = {seed: cold[source]["best"]}
        (c,), (w,) = reach([cold[seed]], target), reach([warm[seed]], target)
        print(f"| {seed} | {target[seed]:.4f} (default s{source}) | {'-' if c is None else c} | "
              f"{'-' if w is None else w} | {cold[seed]['best']:.4f} | {warm[seed]['best']:.4f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--budget", type=int, default=60, help="training epochs per sweep")
    parser.add_argument("--max-epochs", type=int, default=9, help="most epochs of one trial")
    parser.add_argument("--subset", type=float, default=0.3, help="data.subset_fraction")
    parser.add_argument("--contenders", nargs="+", choices=list(CONTENDERS),
                        default=[c for c in CONTENDERS if c != "warm"])
    parser.add_argument("--report-only", action="store_true", help="run nothing, print the table")
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
    saved = work / "results.json"
    done = json.loads(saved.read_text()) if saved.exists() else {}
    key = f"subset {args.subset}, max epochs {args.max_epochs}"  # runs compare only alike
    for seed in args.seeds:
        for contender in args.contenders:
            name = sweep_name(contender, args.budget, seed)
            if name in done.get(key, {}) or args.report_only:
                continue
            done.setdefault(key, {})[name] = run_one(args, work, contender, seed)
            saved.write_text(json.dumps(done, indent=1))
    results = {c: [done[key][sweep_name(c, args.budget, s)] for s in args.seeds
                   if sweep_name(c, args.budget, s) in done.get(key, {})]
               for c in args.contenders}
    print_table(args, results)
    print_warm(args, results)
    if args.memory_trials:
        print(f"\nworker RSS (MB) of keras-tuner random trials, {args.memory_trials} trials of "
              "2 epochs\n\n| workers | after trial 5 | after the last trial |\n|---|---|---|")
        print("\n".join(memory(work, args.memory_trials, args.subset)))
    print(f"\nstores and results under {work}")


if __name__ == "__main__":
    main()
