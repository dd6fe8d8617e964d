"""How many concurrent workers one study database serves: a toy objective at 1 to 64 workers.

    python benchmarks/scale_workers.py [--workers 1 4 16 64] [--trials-per-worker 4]
                                       [--steps 5] [--sleep 0.02] [--storage URL]

Each worker is its own process doing what a sweep's worker does per trial, with no training
in between: count-and-ask under the sweeper's ask lock (`ask_within_budget`), `--steps`
intermediate values reported (each followed by `should_prune`, a `--sleep` apart), then
tell. Two storage paths, side by side for every worker count:

- `rdb`: every worker talks to PostgreSQL through Optuna's RDBStorage (the platform's
  default for a team), asks under the PostgreSQL advisory lock;
- `grpc`: reports and tells go through one Optuna gRPC storage proxy
  (`run_grpc_proxy_server` in front of the same database); the ask still takes the database
  lock, as the sweeper process does (the proxy has no lock of its own).

Printed per run: trials/s once every worker is ready, ask / report / tell latency p50 and
p99, PostgreSQL connections at the peak, duplicate trial numbers (must be 0) and the study
total against its budget (must be equal). PostgreSQL is a throw-away cluster on 127.0.0.1
(Debian's server, as the team-stack tests start it) unless `--storage` names one.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def worker(url: str, study_name: str, n_trials: int, steps: int, sleep: float,
           proxy_port: int | None, ready: mp.Barrier, out: mp.Queue) -> None:
    """One worker: trials until the study's budget is used; latencies to ``out``."""
    import warnings

    import optuna

    from hydra_plugins.optuna_pruning_sweeper import _storage as st
    from hydra_plugins.optuna_pruning_sweeper._study import ask_within_budget

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
    rdb = st.make_storage(url, None, None, None)
    asker = optuna.load_study(study_name=study_name, storage=rdb)
    lock = st.AskLock(url, study_name)
    if proxy_port is None:
        teller = asker
    else:
        proxy = optuna.storages.GrpcStorageProxy(host="127.0.0.1", port=proxy_port)
        teller = optuna.load_study(study_name=study_name, storage=proxy)
    ready.wait()
    asks, reports, tells, numbers = [], [], [], []
    while True:
        t0 = time.perf_counter()
        trial = ask_within_budget(asker, rdb, lock, n_trials, None)
        asks.append(time.perf_counter() - t0)
        if trial is None:
            break
        numbers.append(trial.number)
        mine = optuna.trial.Trial(teller, trial._trial_id)
        for step in range(steps):
            time.sleep(sleep)
            t0 = time.perf_counter()
            mine.report(1.0 / (step + 1 + trial.number), step)
            mine.should_prune()
            reports.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        teller.tell(trial.number, 1.0 / (1 + trial.number))
        tells.append(time.perf_counter() - t0)
    lock.close()
    out.put((asks, reports, tells, numbers))


def serve_proxy(url: str, port: int) -> None:
    import optuna

    from hydra_plugins.optuna_pruning_sweeper import _storage as st

    optuna.storages.run_grpc_proxy_server(st.make_storage(url, None, None, None),
                                          host="127.0.0.1", port=port)


def connections(url: str) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
    with engine.connect() as conn:
        return int(conn.execute(sqlalchemy.text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"))
            .scalar())


def one_run(url: str, mode: str, n_workers: int, args: argparse.Namespace,
            proxy_port: int | None) -> dict:
    import optuna

    name = f"scale-{mode}-{n_workers}-{time.time_ns()}"
    optuna.create_study(study_name=name, storage=url)
    n_trials = n_workers * args.trials_per_worker
    ctx = mp.get_context("spawn")
    ready, out = ctx.Barrier(n_workers + 1), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(url, name, n_trials, args.steps, args.sleep,
                                              proxy_port, ready, out)) for _ in range(n_workers)]
    for p in procs:
        p.start()
    ready.wait()  # every worker imported and connected: the clock starts now
    started = time.perf_counter()
    peak = [0]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], connections(url))
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    results = [out.get(timeout=1800) for _ in procs]
    elapsed = time.perf_counter() - started
    stop.set()
    for p in procs:
        p.join(timeout=60)
    asks = [a for r in results for a in r[0]]
    reports = [a for r in results for a in r[1]]
    tells = [a for r in results for a in r[2]]
    numbers = [n for r in results for n in r[3]]
    stored = optuna.load_study(study_name=name, storage=url).get_trials()
    return {"trials/s": len(numbers) / elapsed, "ask": asks, "report": reports, "tell": tells,
            "duplicates": len(numbers) - len(set(numbers)), "total": len(stored),
            "budget": n_trials, "complete": sum(t.state.name == "COMPLETE" for t in stored),
            "connections": peak[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--trials-per-worker", type=int, default=4)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sleep", type=float, default=0.02)
    parser.add_argument("--storage", help="a PostgreSQL URL; default: a throw-away cluster")
    parser.add_argument("--modes", nargs="+", default=["rdb", "grpc"])
    args = parser.parse_args()

    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    cleanup = None
    url = args.storage
    if url is None:
        url, cleanup = throwaway_postgres(max_connections=4 * max(args.workers) + 50)
    from tests.stack.conftest import free_port

    proxy = None
    port = free_port()
    if "grpc" in args.modes:
        proxy = mp.get_context("spawn").Process(target=serve_proxy, args=(url, port),
                                                daemon=True)
        proxy.start()
        time.sleep(3)  # the proxy binds its port
    print(f"{'workers':>7} {'path':>5} {'trials/s':>9} {'ask p50/p99 ms':>16} "
          f"{'report p50/p99 ms':>18} {'tell p50/p99 ms':>16} {'pg conns':>8} "
          f"{'dup':>4} {'total/budget':>13}")
    try:
        for n in args.workers:
            for mode in args.modes:
                r = one_run(url, mode, n, args, port if mode == "grpc" else None)

                def ms(key: str, r: dict = r) -> str:
                    return (f"{1e3 * statistics.median(r[key]):.1f}/"
                            f"{1e3 * percentile(r[key], 0.99):.1f}")

                print(f"{n:>7} {mode:>5} {r['trials/s']:>9.1f} {ms('ask'):>16} "
                      f"{ms('report'):>18} {ms('tell'):>16} {r['connections']:>8} "
                      f"{r['duplicates']:>4} {r['total']:>6}/{r['budget']:<6}", flush=True)
                last = r
        print(f"{max(args.workers)} workers: {last['trials/s']:.1f} trials/s, duplicates "
              f"{last['duplicates']}, study total {last['total']} of {last['budget']}")
    finally:
        if proxy is not None:
            proxy.terminate()
        if cleanup is not None:
            cleanup()


def throwaway_postgres(max_connections: int) -> tuple[str, object]:
    """A PostgreSQL cluster in a temp folder on a free port (the team-stack tests' own)."""
    from tests.stack.conftest import start_postgres

    pg, stop = start_postgres(("optuna",), max_connections)
    return pg.url("optuna"), stop


if __name__ == "__main__":
    main()
