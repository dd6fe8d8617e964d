"""The default sweep, as a user types it: wall time, trials, best val_loss and memory, back to back.

    python benchmarks/sweep_throughput.py [--baseline REF] [--workdir DIR] [-- overrides...]

Runs `python search/run.py -m` with no arguments (each sweep in its own Optuna storage,
MLflow store and sweep folder under the work folder, nothing else changed) for this checkout
and, with `--baseline REF`, first for that commit in a git worktree, one after the other.
While each sweep runs, the sweeper process's resident memory is sampled every second next to
the number of finished trials in its study; each worker records its own after every trial
(the trial's `worker_rss_mb`). Prints per sweep: the search's wall time (start to the last
trial's end), trials complete/pruned/failed, best val_loss, and the memory at trial 5 and
trial 30 with the growth, and for the trials both sweeps sampled alike (TPE's seeded startup
trials) the ratio of their seconds per epoch: after those, the two searches diverge and their
wall times compare different trials. The last line: this checkout's wall time over the
baseline's and the two best val_loss values.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
STUDY = "pneumonia-cnn-default"


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def finished(storage: str) -> int:
    try:
        study = optuna.load_study(study_name=STUDY, storage=storage)
    except (KeyError, Exception):  # noqa: BLE001 - not created yet
        return 0
    return sum(t.state.is_finished() for t in study.get_trials(deepcopy=False))


def run_sweep(checkout: Path, workdir: Path, overrides: list[str]) -> dict:
    """One default sweep in `checkout`; its study, wall time and the sweeper's RSS samples."""
    workdir.mkdir(parents=True, exist_ok=True)
    storage = f"sqlite:///{workdir / 'optuna.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}",
           "PYTHONPATH": str(checkout), "OPTUNA_STORAGE": storage}
    command = [sys.executable, "search/run.py", "-m", f"hydra.sweep.dir={workdir / 'sweep'}",
               *overrides]
    samples: list[tuple[int, float]] = []
    log = (workdir / "sweep.log").open("w")
    started = time.time()
    process = subprocess.Popen(command, cwd=checkout, env=env, stdout=log,
                               stderr=subprocess.STDOUT)

    def sample() -> None:
        while process.poll() is None:
            rss = rss_mb(process.pid)
            if rss is not None:
                samples.append((finished(storage), rss))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    sampler.join()
    if code != 0:
        raise SystemExit(f"the sweep in {checkout} failed ({code}); see {workdir / 'sweep.log'}")
    study = optuna.load_study(study_name=STUDY, storage=storage)
    trials = study.get_trials(deepcopy=False)
    last_end = max(t.datetime_complete.timestamp() for t in trials if t.datetime_complete)
    return {"study": study, "trials": trials, "wall": last_end - started,
            "total": time.time() - started, "samples": samples}


def memory_at(result: dict, n: int) -> tuple[float | None, float | None]:
    """(sweeper RSS when n trials had finished, largest worker RSS after trial n) in MB."""
    sweeper = next((rss for done, rss in result["samples"] if done >= n), None)
    done = sorted((t for t in result["trials"] if t.datetime_complete),
                  key=lambda t: t.datetime_complete)[:n]
    workers = [t.user_attrs.get("worker_rss_mb") for t in done[-3:]]
    workers = [w for w in workers if w is not None]
    return sweeper, max(workers) if workers else None


def report(name: str, result: dict) -> None:
    states = [t.state.name for t in result["trials"]]
    best = result["study"].best_value
    (s5, w5), (s30, w30) = memory_at(result, 5), memory_at(result, 30)

    def growth(a: float | None, b: float | None) -> str:
        return f"{(b / a - 1) * 100:+.1f} %" if a and b else "-"

    print(f"| {name} | {result['wall']:.0f} s | {result['total']:.0f} s | {len(states)} "
          f"({states.count('COMPLETE')}/{states.count('PRUNED')}/{states.count('FAIL')}) | "
          f"{best:.4f} | {s5 or 0:.0f} → {s30 or 0:.0f} MB ({growth(s5, s30)}) | "
          f"{w5 or 0:.0f} → {w30 or 0:.0f} MB ({growth(w5, w30)}) |", flush=True)


def epoch_seconds(trials: list) -> dict[tuple, float]:
    """Seconds per epoch of each trial that trained 2+ epochs, by its sampled parameters."""
    out = {}
    for t in trials:
        steps = sorted(t.intermediate_values)
        if len(steps) > 1 and t.datetime_start and t.datetime_complete:
            span = (t.datetime_complete - t.datetime_start).total_seconds()
            out[tuple(sorted(t.params.items()))] = span / len(steps)
    return out


def same_trials(base: dict, head: dict) -> str:
    """Median over the trials both sweeps sampled alike (TPE's seeded startup trials)."""
    base_s, head_s = epoch_seconds(base["trials"]), epoch_seconds(head["trials"])
    ratios = [head_s[k] / base_s[k] for k in base_s.keys() & head_s.keys()]
    if not ratios:
        return "no trial was sampled alike in both sweeps"
    ratios.sort()
    return (f"{len(ratios)} trials sampled alike in both: seconds per epoch (trial wall / "
            f"epochs) this checkout / baseline, median {ratios[len(ratios) // 2]:.3f} "
            f"(range {ratios[0]:.2f}-{ratios[-1]:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--baseline", help="a git commit to sweep first, in a worktree")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("overrides", nargs="*", help="extra overrides for both sweeps")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="sweep-throughput-"))
    results = {}
    if args.baseline:
        tree = workdir / "baseline-tree"
        if not tree.exists():
            subprocess.run(["git", "worktree", "add", "--detach", str(tree), args.baseline],
                           cwd=REPO, check=True, capture_output=True)
        results[f"baseline {args.baseline}"] = run_sweep(tree, workdir / "baseline",
                                                         args.overrides)
    results["this checkout"] = run_sweep(REPO, workdir / "head", args.overrides)
    print("| sweep | search wall | whole command | trials (complete/pruned/failed) | best "
          "val_loss | sweeper RSS trial 5 → 30 | worker RSS trial 5 → 30 |\n"
          "|---|---|---|---|---|---|---|")
    for name, result in results.items():
        report(name, result)
    head = results["this checkout"]
    line = f"this checkout: {len(head['trials'])} trials in {head['wall'] / 60:.1f} min, best " \
           f"val_loss {head['study'].best_value:.4f}"
    if args.baseline:
        base = results[f"baseline {args.baseline}"]
        print(same_trials(base, head))
        line += (f"; wall / baseline {head['wall'] / base['wall']:.3f} (baseline best val_loss "
                 f"{base['study'].best_value:.4f})")
    print(line)


if __name__ == "__main__":
    main()
