"""Real sweeps: ``python app.py -m ...`` of the tiny test app on a SQLite study in tmp_path."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from sqlalchemy.exc import OperationalError

APP = Path(__file__).parent / "app" / "app.py"
REPO = Path(__file__).resolve().parents[2]


def sweep_env() -> dict[str, str]:
    env = dict(os.environ)
    # The plugin is found from the repo even without `pip install -e .`.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


class Sweep:
    """Runs the test app as a multirun on one SQLite storage in ``tmp_path``."""

    def __init__(self, tmp_path: Path, study: str = "s") -> None:
        self.tmp = tmp_path
        self.db = tmp_path / "optuna.db"
        self.url = f"sqlite:///{self.db}"
        self.study = study
        self.runs = 0
        self.extra_env: dict[str, str] = {}

    def command(self, *overrides: str, study: str | None = None) -> list[str]:
        self.runs += 1
        return [
            sys.executable,
            str(APP),
            "-m",
            f"hydra.sweeper.storage={self.url}",
            f"hydra.sweeper.study_name={study or self.study}",
            f"hydra.sweep.dir={self.tmp}/sweep{self.runs}",
            *overrides,
        ]

    def env(self) -> dict[str, str]:
        return {**sweep_env(), **self.extra_env}

    def run(self, *overrides: str, ok: bool = True, study: str | None = None):
        proc = subprocess.run(
            self.command(*overrides, study=study),
            cwd=self.tmp,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=120,
        )
        if ok and proc.returncode != 0:
            pytest.fail(f"sweep failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    def start(self, *overrides: str) -> subprocess.Popen:
        return subprocess.Popen(
            self.command(*overrides),
            cwd=self.tmp,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # its own process group, like a terminal job
            # A shell that starts us in the background (`cmd &`, as a CI runner may) sets
            # SIGINT to "ignore", and children inherit that: give the sweep a real Ctrl-C.
            preexec_fn=_default_sigint,
        )

    def trials(self, study: str | None = None) -> list[optuna.trial.FrozenTrial]:
        s = optuna.load_study(study_name=study or self.study, storage=self.url)
        return sorted(s.get_trials(deepcopy=False), key=lambda t: t.number)

    def summary(self, run: int | None = None) -> dict:
        return yaml.safe_load(
            (self.tmp / f"sweep{run or self.runs}" / "optuna_summary.yaml").read_text()
        )


@pytest.fixture
def sweep(tmp_path):
    return Sweep(tmp_path)


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie awaiting its reaper counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def states(trials):
    return [t.state.name for t in trials]


def test_conditional_space_samples_group_keys_only_where_they_exist(tmp_path):
    """schedule.decay_rate exists only in schedule=exponential; y has an explicit `when`."""
    (tmp_path / "run").mkdir()
    events = tmp_path / "events.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            str(APP),
            "-m",
            "+search_space=conditional",
            "hydra.sweeper.n_trials=6",
            "+hydra.callbacks.rec._target_=recording_callback.RecordingCallback",
            f"+hydra.callbacks.rec.path={events}",
        ],
        cwd=tmp_path / "run",
        env=sweep_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    # Defaults: storage null = a study private to the sweep folder (issue 15; the official
    # plugin's is in memory), study named after the job and the search space.
    (db,) = (tmp_path / "run" / "multirun").glob("*/*/optuna.db")
    study = optuna.load_study(study_name="app-conditional", storage=f"sqlite:///{db}")
    trials = study.trials
    assert states(trials) == ["COMPLETE"] * 6  # a wrong override would fail the job
    options = {t.params["schedule"] for t in trials}
    assert options == {"constant", "exponential"}
    for t in trials:
        exponential = t.params["schedule"] == "exponential"
        assert ("schedule.decay_rate" in t.params) == exponential
        assert ("y" in t.params) == exponential
        assert "x" in t.params
        assert ("schedule.decay_rate" in " ".join(t.user_attrs["overrides"])) == exponential

    # Callbacks: multirun events in the sweeper (which knows the study), job events in the
    # worker (which knows its trial).
    lines = [json.loads(x) for x in events.read_text().splitlines()]
    by_event = {e: [x for x in lines if x["event"] == e] for e in {x["event"] for x in lines}}
    start, end = by_event["multirun_start"], by_event["multirun_end"]
    assert len(start) == len(end) == 1 and start[0]["pid"] == end[0]["pid"]
    assert end[0]["study"] == "app-conditional" and end[0]["summary"] is True
    jobs = by_event["job_end"]
    assert sorted(j["trial"]["trial_number"] for j in jobs) == list(range(6))
    assert {j["status"] for j in jobs} == {"COMPLETED"}
    assert {j["pid"] for j in jobs} != {end[0]["pid"]}
    assert jobs[0]["trial"]["sampler"] == "RandomSampler"


def test_pruning_fail_and_nan(sweep):
    """Bad curves are pruned by the median pruner; exceptions and NaN fail with a reason."""
    sweep.run(
        "hydra.sweeper.n_trials=6",
        "hydra/sweeper/pruner=median",
        "hydra.sweeper.pruner.n_startup_trials=2",
        "hydra.sweeper.max_failure_rate=1.0",
        "bad_from=4",
        "fail_on=[2]",
        "nan_on=[3]",
    )
    trials = sweep.trials()
    assert states(trials) == ["COMPLETE", "COMPLETE", "FAIL", "FAIL", "PRUNED", "PRUNED"]
    assert trials[2].user_attrs["fail_reason"] == "ValueError: boom on trial 2"
    assert "non-finite" in trials[3].user_attrs["fail_reason"]
    for t in trials[4:]:
        assert t.value == 100.0  # the last reported value is kept
        assert t.intermediate_values == {0: 100.0}  # pruned at the first report
    summary = sweep.summary()
    assert summary["states"]["PRUNED"] == 2 and summary["counted"] == 6
    assert summary["best"]["number"] in (0, 1)


def test_resume_continues_to_n_trials(sweep):
    sweep.run("hydra.sweeper.n_trials=3")
    first = [(t.number, t.params, t.value) for t in sweep.trials()]
    sweep.run("hydra.sweeper.n_trials=5")
    trials = sweep.trials()
    assert states(trials) == ["COMPLETE"] * 5
    assert [(t.number, t.params, t.value) for t in trials[:3]] == first
    # The second session draws with seed + 1: no replay of the first session's params.
    assert len({t.params["x"] for t in trials}) == 5
    sweep.run("hydra.sweeper.n_trials=5")  # nothing left to do
    assert len(sweep.trials()) == 5


def test_changed_space_is_refused_unless_new_study(sweep):
    sweep.run("hydra.sweeper.n_trials=1")
    proc = sweep.run("hydra.sweeper.n_trials=1", "x=interval(-3.0, 3.0)", ok=False)
    assert proc.returncode != 0
    err = proc.stderr
    assert "another search space" in err and "'x' changed" in err
    assert "hydra.sweeper.new_study=true" in err
    assert len(sweep.trials()) == 1
    sweep.run("hydra.sweeper.n_trials=1", "x=interval(-3.0, 3.0)", "hydra.sweeper.new_study=true")
    assert sweep.summary()["study"] == "s-2"
    assert len(sweep.trials("s-2")) == 1
    # Same command again resumes s-2 instead of creating s-3.
    sweep.run("hydra.sweeper.n_trials=2", "x=interval(-3.0, 3.0)", "hydra.sweeper.new_study=true")
    assert len(sweep.trials("s-2")) == 2
    assert len(sweep.trials("s")) == 1


def test_a_group_fixed_on_the_command_line_narrows_the_search(sweep):
    """schedule is swept by the space; fixing it resolves its children against the option."""
    proc = sweep.run("+search_space=conditional", "schedule=constant", "hydra.sweeper.n_trials=3")
    assert "Fixed on the command line: schedule=constant" in proc.stderr + proc.stdout
    assert "it has no schedule.decay_rate" in proc.stderr + proc.stdout
    trials = sweep.trials()
    assert states(trials) == ["COMPLETE"] * 3
    assert all("schedule.decay_rate" not in t.params and "schedule" not in t.params
               for t in trials)
    assert all("schedule=constant" in t.user_attrs["overrides"] for t in trials)

    sweep.run("+search_space=conditional", "schedule=exponential", "hydra.sweeper.n_trials=2",
              "hydra.sweeper.study_name=exp")
    # kept: the option has the key; `y` (when: schedule=exponential) follows the fixed value
    assert all("schedule.decay_rate" in t.params and "y" in t.params for t in sweep.trials("exp"))


def test_bad_sweep_settings_are_refused_before_any_trial(sweep):
    """A typo in a swept key, reversed bounds, a bad timeout or storage: named, no trial run."""
    cases = [
        (("nosuchkey=interval(0.0, 1.0)",), "no key 'nosuchkey'"),
        (("x=interval(3.0, 1.0)",), "low bound 3.0 above its high bound 1.0"),
        (("hydra.sweeper.timeout=-5",), "hydra.sweeper.timeout must be > 0"),
        (("hydra.sweeper.n_trials=0",), "n_trials and hydra.sweeper.n_jobs must be >= 1"),
        (("hydra.sweeper.storage=foo://x",), "hydra.sweeper.storage='foo://x' is not a usable"),
        (("hydra/sweeper/sampler=nope",), "hydra/sweeper/sampler"),  # Hydra lists the options
        (("hydra/sweeper/pruner=nope",), "hydra/sweeper/pruner"),
    ]
    for overrides, message in cases:
        proc = sweep.run(*overrides, ok=False)
        assert proc.returncode != 0 and message in proc.stderr, (overrides, proc.stderr[-2000:])
    assert not (sweep.tmp / "optuna.db").exists() or not optuna.get_all_study_names(sweep.url)
    # More slots than cores: a warning, not an error (one trial: one worker is started).
    proc = sweep.run("hydra.sweeper.n_trials=1", "hydra.sweeper.n_jobs=64")
    assert "hydra.sweeper.n_jobs=64 is more than the" in proc.stderr + proc.stdout


def test_failure_rate_stops_the_sweep(sweep):
    proc = sweep.run(
        "hydra.sweeper.n_trials=10",
        "hydra.sweeper.failure_rate_min_trials=3",
        "fail_on=[0,1,2,3,4,5,6,7,8,9]",
        ok=False,
    )
    assert proc.returncode != 0
    assert "3 of 3 finished trials failed" in proc.stderr
    assert "boom on trial" in proc.stderr
    assert states(sweep.trials()) == ["FAIL"] * 3
    assert sweep.summary()["stop_reason"] == "failure_rate"


@pytest.mark.slow  # deliberate sleeps / grace periods
def test_slots_stay_busy_without_batch_barrier(sweep):
    """n_jobs=2: while trial 0 runs long, the other slot runs trials 1, 2, 3 back to back.

    Each slot's worker gets its own GPU (from CUDA_VISIBLE_DEVICES: no GPU needed to check
    the pinning) and its thread budget.
    """
    sweep.extra_env["CUDA_VISIBLE_DEVICES"] = "3,5"
    sweep.run(
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.n_jobs=2",
        "hydra.sweeper.threads_per_worker=1",
        "sleep_first=4",
        "sleep=0.2",
    )
    t = sweep.trials()
    assert states(t) == ["COMPLETE"] * 4
    assert t[2].datetime_start < t[0].datetime_complete
    assert t[3].datetime_start < t[0].datetime_complete
    assert len({x.user_attrs["worker_pid"] for x in t}) == 2  # trials_per_worker=null: reused
    assert t[0].user_attrs["env"]["CUDA_VISIBLE_DEVICES"] == "3"  # slot 0
    assert {x.user_attrs["env"]["CUDA_VISIBLE_DEVICES"] for x in t[1:]} == {"5"}  # slot 1
    for x in t:
        env = x.user_attrs["env"]
        assert env["OMP_NUM_THREADS"] == env["SWEEPER_THREADS_PER_WORKER"] == "1"
        assert env["TF_NUM_INTRAOP_THREADS"] == "1"


@pytest.mark.slow  # deliberate sleeps / grace periods
def test_timeout_and_fresh_worker_per_trial(sweep):
    """timeout: no new trial after it, running ones finish; trials_per_worker=1: new pids."""
    proc = sweep.run(
        "hydra.sweeper.n_trials=50",
        "hydra.sweeper.timeout=3",
        "hydra.sweeper.trials_per_worker=1",
        "sleep=0.5",
    )
    assert "n_trials 50 | no new trial after 3 s |" in proc.stdout + proc.stderr  # the banner
    trials = sweep.trials()
    assert 1 <= len(trials) < 50
    assert set(states(trials)) == {"COMPLETE"}
    assert sweep.summary()["stop_reason"] == "timeout"
    pids = [t.user_attrs["worker_pid"] for t in trials]
    assert len(set(pids)) == len(trials)


def test_epoch_budget_stops_asking_and_counts_reported_epochs(sweep):
    """max_epochs_total: no new trial once the trials reported that many epochs in total;
    the running one finishes. Every trial records its worker's memory."""
    proc = sweep.run("hydra.sweeper.n_trials=50", "hydra.sweeper.max_epochs_total=7",
                     "hydra/sweeper/pruner=nop", "epochs=3")
    trials = sweep.trials()
    assert len(trials) == 3  # 3 + 3 < 7 epochs after two trials: a third starts, none more
    assert sum(len(t.intermediate_values) for t in trials) == 9
    assert sweep.summary()["stop_reason"] == "epoch_budget"
    assert "Epoch budget of 7 reached" in proc.stdout + proc.stderr
    assert all(t.user_attrs["worker_rss_mb"] > 10 for t in trials)
    assert [t.user_attrs["worker_trial_index"] for t in trials] == [1, 2, 3]


def test_two_sweepers_share_one_study(sweep):
    procs = [sweep.start("hydra.sweeper.n_trials=6") for _ in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    trials = sweep.trials()
    assert [t.number for t in trials] == list(range(6))
    assert states(trials) == ["COMPLETE"] * 6
    assert len({(t.params["x"], t.params["y"]) for t in trials}) == 6  # seeds 0 and 1
    study = optuna.load_study(study_name="s", storage=sweep.url)
    assert len(study.user_attrs["sweeper_sessions"]) == 2


def wait_for_running_trial(sweep: Sweep, proc: subprocess.Popen, number: int) -> int:
    """Wait until trial ``number`` runs in a worker; returns the worker's pid."""
    storage = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.3)
        try:
            storage = storage or optuna.storages.RDBStorage(sweep.url)
            study_id = storage.get_study_id_from_name(sweep.study)
            trials = storage.get_all_trials(study_id, states=(TrialState.RUNNING,))
        except (KeyError, OperationalError):  # study or tables not created yet
            continue
        running = [t for t in trials if t.number == number and "worker_pid" in t.user_attrs]
        if running:
            return running[0].user_attrs["worker_pid"]
    proc.kill()
    pytest.fail(f"trial {number} never ran:\n{proc.communicate(timeout=10)[0]}")


@pytest.mark.slow  # deliberate sleeps / grace periods
def test_killed_sweep_is_resumed_with_the_stale_trial_retried(sweep):
    """SIGKILL the sweeper mid-trial: its worker dies too; a re-run retries that trial."""
    overrides = ("hydra.sweeper.n_trials=3", "hydra.sweeper.grace_period=2", "hang_on=1")
    proc = sweep.start(*overrides)
    worker_pid = wait_for_running_trial(sweep, proc, number=1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    for _ in range(50):  # PR_SET_PDEATHSIG: the worker follows its sweeper
        if not alive(worker_pid):
            break
        time.sleep(0.1)
    else:
        os.kill(worker_pid, signal.SIGKILL)
        pytest.fail("the worker survived its killed sweeper")
    before = sweep.trials()
    assert states(before) == ["COMPLETE", "RUNNING"]

    sweep.run(*overrides)
    trials = sweep.trials()
    assert trials[0].params == before[0].params and trials[0].value == before[0].value
    assert states(trials) == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 1]
    assert len(retry) == 1 and retry[0].params == before[1].params
    assert retry[0].state == TrialState.COMPLETE
    assert sweep.summary()["counted"] == 3


@pytest.mark.slow  # deliberate sleeps
def test_ctrl_c_requeues_running_trials(sweep):
    """SIGINT to the process group (Ctrl-C): running trials are FAIL + re-queued, not lost."""
    overrides = ("hydra.sweeper.n_trials=2", "hang_on=0")  # the retry has another number
    proc = sweep.start(*overrides)
    wait_for_running_trial(sweep, proc, number=0)
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    interrupted = sweep.trials()
    assert states(interrupted) == ["FAIL", "WAITING"]
    assert interrupted[0].user_attrs["fail_reason"] == "interrupted (KeyboardInterrupt)"
    assert "fail_reason" not in interrupted[1].user_attrs
    sweep.run(*overrides)
    trials = sweep.trials()
    assert states(trials) == ["FAIL", "COMPLETE", "COMPLETE"]
    assert trials[1].params == interrupted[0].params
    assert sweep.summary()["counted"] == 2


def test_multi_objective_pareto_front(sweep):
    sweep.run(
        "hydra.sweeper.n_trials=4",
        "hydra/sweeper/sampler=nsgaii",
        "hydra.sweeper.direction=[minimize,minimize]",
        "multi=true",
    )
    summary = sweep.summary()
    assert summary["directions"] == ["minimize", "minimize"]
    assert summary["pareto_front"] and all(len(p["values"]) == 2 for p in summary["pareto_front"])
    assert all(len(t.values) == 2 for t in sweep.trials())


def test_grid_sampler_caps_n_trials_at_the_grid(sweep):
    sweep.run(
        "hydra.sweeper.n_trials=10",
        "hydra/sweeper/sampler=grid",
        "x=choice(0.0,1.0)",
        "y=range(0,2)",
    )
    trials = sweep.trials()
    assert sorted((t.params["x"], t.params["y"]) for t in trials) == [
        (0.0, 0),
        (0.0, 1),
        (1.0, 0),
        (1.0, 1),
    ]


def test_suggest_inside_the_task_uses_the_configured_sampler(sweep):
    """Define-by-run: trial.suggest_* in the task works (it failed with a KeyError from
    Optuna's storage cache) and samples with the sweep's seeded sampler."""
    sweep.run("hydra.sweeper.n_trials=3", "suggest_z=true")
    trials = sweep.trials()
    assert states(trials) == ["COMPLETE"] * 3
    for t in trials:  # the task used the value the trial stored
        assert t.value == pytest.approx((t.params["x"] - 1) ** 2 + t.params["y"] ** 2
                                        + t.params["z"])
    # The configured RandomSampler(seed=0), offset by the trial number: reproducible.
    sweep.run("hydra.sweeper.n_trials=3", "suggest_z=true", study="again")
    assert [t.params["z"] for t in sweep.trials("again")] == [t.params["z"] for t in trials]
