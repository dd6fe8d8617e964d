"""`registry.final_stage`: re-train the top-k trials with other seeds; the best mean wins.

Choosing 1 of 40 trials on a few hundred val images rewards the luckiest run. After the
search, each of the k best COMPLETE trials (by the objective, distinct configs) is trained
again `repeats` times from its own logged config (`config/config.yaml`) with
`trainer.seed` = seed + 1, seed + 2, ...: the same data split and hyperparameters, other
weight initialisations and dropout masks. Each repeat is an ordinary single run of
`search/run.py` under the sweep's parent run (a subprocess, as a trial would be), tagged
`final_stage.origin_trial` / `final_stage.origin_run` / `final_stage.repeat`; it is not an
Optuna trial, so the study's totals stay exact. The candidate for the registry is the trial
with the best mean objective over its original run and its repeats; the parent run's
`best_run_id` then names that trial's run, and `final_stage/ranking.{json,md}` shows the
single-run rank against the mean rank (`final_stage_rank_changed`, Kendall's tau).
"""

from __future__ import annotations

import logging
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import yaml
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from search import sweep_context
from search.model_registry.model_store import run_config_text
from search.model_registry.registry_settings import DEFAULTS
from search.sweep.top_k_ensemble import top_runs
from search.tracking import tags as tag_keys

log = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


def options(config: DictConfig | dict | None) -> tuple[int, int]:
    """(top_k, repeats) from `registry.final_stage` (0: no final stage)."""
    section = OmegaConf.select(OmegaConf.create(config or {}), "registry.final_stage",
                               default=None) or {}
    top_k = section.get("top_k")
    top_k = int(DEFAULTS.final_stage.top_k if top_k is None else top_k)  # absent or null
    repeats = int(section.get("repeats") or 0)  # absent: no repeats (not the YAML's 2)
    if top_k < 0 or repeats < 0:
        raise ValueError(f"registry.final_stage.top_k={top_k} and .repeats={repeats} must be "
                         ">= 0 (0 = no final stage)")
    return top_k, repeats


# The single runs (repeats, folds) running now, so that an interrupt of the sweep's end stops
# them instead of waiting for them to train to the end.
_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.Lock()
_STOPPING = threading.Event()
STOP_WAIT_S = 10.0  # a Ctrl-C reached the whole group: the runs end KILLED on their own
KILL_WAIT_S = 30.0  # after our SIGINT: then SIGKILL (the next command closes the run)


def run_single(config_text: str, overrides: list[str], workdir: Path, parent_run_id: str,
               threads: int, on_started: Callable[[subprocess.Popen], None] | None = None,
               ) -> subprocess.CompletedProcess:
    """`search/run.py` on a logged config (plus overrides) as a single run under the parent:
    a subprocess, as a trial is, so its TF state and memory end with it. `on_started` is
    called with the process once it runs (the fault tests' hook)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.yaml").write_text(config_text)
    # not attached to an Optuna trial; nested under the sweep's parent run, with its threads
    env = sweep_context.single_run_env(parent_run_id, threads)
    env.update({"MLFLOW_TRACKING_URI": mlflow.get_tracking_uri(),
                "TF_CPP_MIN_LOG_LEVEL": env.get("TF_CPP_MIN_LOG_LEVEL", "2")})
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "--config-path", str(workdir),
           "--config-name", "config", f"hydra.run.dir={workdir / 'run'}", *overrides]
    with _RUNNING_LOCK:
        if _STOPPING.is_set():  # the sweep's end is being interrupted: start nothing new
            return subprocess.CompletedProcess(cmd, -signal.SIGINT, "", "not started: "
                                               "the sweep's end was interrupted")
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        _RUNNING.add(proc)
    try:
        if on_started is not None:
            on_started(proc)
        out, err = proc.communicate()
    finally:
        with _RUNNING_LOCK:
            _RUNNING.discard(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def run_all(one: Callable[[Any], Any], tasks: list[Any], jobs: int) -> list[Any]:
    """`one` on every task, `jobs` at a time, results in task order. An interrupt (or any
    error) here cancels the tasks not started and stops the single runs still running."""
    _STOPPING.clear()
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = [pool.submit(one, task) for task in tasks]
        return [future.result() for future in futures]
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        stop_running()
        raise
    finally:
        pool.shutdown(wait=True)


def stop_running() -> None:
    """Stop the single runs still running: a few seconds to end on their own (a terminal's
    Ctrl-C reached them too), then SIGINT (their run ends KILLED), then SIGKILL."""
    with _RUNNING_LOCK:
        _STOPPING.set()
        running = list(_RUNNING)
    for wait_s, signum in ((STOP_WAIT_S, signal.SIGINT), (KILL_WAIT_S, signal.SIGKILL)):
        deadline = time.monotonic() + wait_s
        while any(p.poll() is None for p in running) and time.monotonic() < deadline:
            time.sleep(0.2)
        for proc in running:
            if proc.poll() is None:
                log.warning("stopping single run pid %d (%s)", proc.pid,
                            signal.Signals(signum).name)
                proc.send_signal(signum)


def kendall_tau(a: list[str], b: list[str]) -> float:
    """Kendall's tau between two rankings of the same items (scipy's, on their positions)."""
    # inside: scipy.stats takes ~0.5 s to import and only a final stage needs it, while this
    # module is imported whenever a sweep starts (the Hydra callback's pipeline)
    from scipy.stats import kendalltau

    if len(a) < 2:
        return 1.0
    return float(kendalltau([a.index(x) for x in a], [b.index(x) for x in a]).statistic)


def run_final_stage(config: DictConfig, parent_run_id: str) -> str | None:
    """Re-train the top-k trials, pick the best mean, record it.

    Returns:
        The run id of the trial with the best mean objective (the parent run's new
        `best_run_id`), or None when no final stage ran (off, or fewer than two trials).
    """
    top_k, repeats = options(config)
    if top_k < 1 or repeats < 1:
        return None
    client = MlflowClient()
    maximize = sweep_context.maximizes(config)
    runs = top_runs(client, parent_run_id, top_k, maximize)
    if len(runs) < 2:
        log.info("final stage skipped: %d distinct COMPLETE trial(s)", len(runs))
        client.set_tag(parent_run_id, tag_keys.FINAL_STAGE_SKIPPED,
                       f"{len(runs)} distinct COMPLETE trial(s), nothing to re-rank")
        return None
    jobs, threads = sweep_context.sweep_jobs(config)
    log.info("Final stage: re-training the top %d trials %d time(s) each (%d at a time)",
             len(runs), repeats, jobs)
    work = Path(tempfile.mkdtemp(prefix="final-stage-"))
    tasks = repeat_tasks(client, runs, repeats, work)
    try:
        done = run_repeats(tasks, parent_run_id, jobs, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # the repeats' runs are in MLflow
    values: dict[str, list[float]] = {r.info.run_id: [r.data.metrics["objective"]] for r in runs}
    failed = []
    for (run, r, _, _, _), proc, objective in done:
        if proc.returncode != 0 or objective is None:
            failed.append(f"{run.info.run_id} repeat {r}: {proc.stderr.strip()[-300:]}")
            continue
        values[run.info.run_id].append(objective)
    for line in failed:
        log.warning("final stage: a repeat failed (%s)", line)
    return record(client, parent_run_id, runs, values, maximize, repeats, failed)


def repeat_tasks(client: MlflowClient, runs: list[Any], repeats: int, work: Path) -> list[tuple]:
    """(run, repeat, config text, overrides, folder) for each repeat of each top run."""
    tasks = []
    for run in runs:
        text = run_config_text(client, run.info.run_id)
        seed = int(OmegaConf.create(text).seed)
        trial = run.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER, "?")
        for r in range(1, repeats + 1):
            name = f"final · t{int(trial):03d}" if trial.isdigit() else "final"
            # ++: configs logged before trainer.seed / tracking.tags existed lack the keys;
            # tracking.uri=null: the logged config masks a password, the environment has it
            overrides = [f"++trainer.seed={seed + r}", "tracking.uri=null",
                         f"tracking.run_name='{name} · seed {seed + r}'",
                         f"++tracking.tags={{{tag_keys.FINAL_STAGE_ORIGIN_TRIAL}: '{trial}', "
                         f"{tag_keys.FINAL_STAGE_ORIGIN_RUN}: {run.info.run_id}, "
                         f"{tag_keys.FINAL_STAGE_REPEAT}: '{r}'}}"]
            tasks.append((run, r, text, overrides, work / f"{run.info.run_id}-{r}"))
    return tasks


def run_repeats(tasks: list[tuple], parent_run_id: str, jobs: int, threads: int) -> list[tuple]:
    """Run the repeats, `jobs` at a time; (task, finished process, objective) for each."""
    def one(task: tuple) -> tuple:
        run, r, text, overrides, folder = task
        proc = run_single(text, overrides, folder, parent_run_id, threads)
        log.info("final stage: trial %s repeat %d -> %s %s", run.data.tags.get(
            tag_keys.OPTUNA_TRIAL_NUMBER), r, OmegaConf.create(text).objective,
            _objective(folder, OmegaConf.create(text).objective) if proc.returncode == 0
            else f"failed (exit {proc.returncode})")
        return task, proc, _objective(folder, OmegaConf.create(text).objective)

    return run_all(one, tasks, jobs)


def metrics_of(folder: Path) -> dict[str, float]:
    """The metrics.yaml a `run_single` run wrote ({} when it wrote none)."""
    metrics = folder / "run" / "metrics.yaml"
    return (yaml.safe_load(metrics.read_text()) or {}) if metrics.is_file() else {}


def _objective(folder: Path, objective: Any) -> float | None:
    """The repeat's objective (the first one)."""
    name = objective[0] if OmegaConf.is_list(objective) else str(objective).split(",")[0]
    value = metrics_of(folder).get(name.strip())
    return None if value is None else float(value)


def record(client: MlflowClient, parent_run_id: str, runs: list[Any],
           values: dict[str, list[float]], maximize: bool, repeats: int,
           failed: list[str]) -> str:
    """Ranking table, tags and metrics on the parent; `best_run_id` moves to the best mean,
    whose run id is returned."""
    sign = -1.0 if maximize else 1.0
    single = [r.info.run_id for r in runs]  # already in single-run order
    mean_rank = sorted(single, key=lambda i: sign * float(np.mean(values[i])))
    rows = []
    for run in runs:
        v = values[run.info.run_id]
        rows.append({"trial": run.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER),
                     "run_id": run.info.run_id,
                     "single_value": v[0], "mean": float(np.mean(v)),
                     "std": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                     "single_rank": single.index(run.info.run_id) + 1,
                     "mean_rank": mean_rank.index(run.info.run_id) + 1})
    changed = mean_rank[0] != single[0]
    table = {"repeats": repeats, "rows": rows, "rank_changed": changed,
             "kendall_tau": kendall_tau(single, mean_rank), "failed": failed}
    md = ["| trial | single-run objective | mean ± std (n) | single rank | mean rank |",
          "|---|---|---|---|---|"]
    md += [f"| {r['trial']} | {r['single_value']:.4f} | {r['mean']:.4f} ± {r['std']:.4f} "
           f"({r['n']}) | {r['single_rank']} | {r['mean_rank']} |" for r in rows]
    client.log_dict(parent_run_id, table, "final_stage/ranking.json")
    client.log_text(parent_run_id, "\n".join(md) + "\n", "final_stage/ranking.md")
    client.log_metric(parent_run_id, "final_stage_rank_changed", float(changed))
    client.log_metric(parent_run_id, "final_stage_kendall_tau", table["kendall_tau"])
    client.set_tag(parent_run_id, tag_keys.FINAL_STAGE_SEARCH_BEST_RUN_ID, single[0])
    client.set_tag(parent_run_id, tag_keys.BEST_RUN_ID, mean_rank[0])
    log.info("Final stage: %s\n%s", "the best mean is another trial than the best single run"
             if changed else "the best single run also has the best mean", "\n".join(md))
    return mean_rank[0]
