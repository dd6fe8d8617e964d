"""`hydra.sweeper.trial_storage=grpc://...`: trial processes report, prune and tell through a
real Optuna gRPC storage proxy in front of the study's database (the proxy runs in this test
process), while the sweeper asks on the database itself."""

from __future__ import annotations

import threading
import warnings

import optuna

from tests.hydra_plugins.test_sweeper_e2e import Sweep, states
from tests.stack.conftest import free_port


def test_trials_report_and_tell_through_a_grpc_proxy(tmp_path):
    sweep = Sweep(tmp_path)
    port = free_port()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(sweep.url)  # the tables exist before the sweep
    threading.Thread(target=optuna.storages.run_grpc_proxy_server, args=(storage,),
                     kwargs={"host": "127.0.0.1", "port": port}, daemon=True).start()
    proc = sweep.run("hydra.sweeper.n_trials=6", "hydra/sweeper/pruner=median",
                     "hydra.sweeper.pruner.n_startup_trials=2", "bad_from=4",
                     f"hydra.sweeper.trial_storage=grpc://127.0.0.1:{port}")
    trials = sweep.trials()
    # every value went through the proxy: the pruner compared the bad curves (trials 4 and
    # 5) with the completed trials' reports and stopped them at their first epoch
    assert len(trials) == 6 and states(trials)[:2] == ["COMPLETE"] * 2, proc.stdout
    assert all(t.intermediate_values for t in trials)
    for t in trials[4:]:
        assert t.state.name == "PRUNED" and t.intermediate_values == {0: 100.0}


def test_trial_storage_must_be_a_grpc_address(tmp_path):
    proc = Sweep(tmp_path).run("hydra.sweeper.trial_storage=sqlite:///x.db", ok=False)
    assert proc.returncode != 0
    assert "hydra.sweeper.trial_storage='sqlite:///x.db': use grpc://host:port" in (
        proc.stdout + proc.stderr)
