"""Sweeps as people type them: command-line mixes of `search/run.py -m` as real tiny sweeps.

Every mix either completes its trials or stops before any trial with a named error; none
ends with every trial FAIL. The dry run proves the shipped sweeps and the example sweeps of
the README and of docs/*.md, and catches the failing mixes in seconds. The mixes run two at
a time (one per core), each on its own Optuna and MLflow SQLite store, once per module.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest

from tests.conftest import write_cause_tree, write_digits_tree

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

TINY = ("data.subset_fraction=0.05", "trainer.max_epochs=2", "hydra.sweeper.n_jobs=1",
        "hydra.sweeper.n_trials=1", "registry.enabled=false", "tracking.experiment=mixes")
# The transfer space on CPU in seconds: the smallest backbone at its smallest size.
SMALL_TRANSFER = ("model.backbone=mobilenetv2", "data.image_size=32", "data.batch_size=32")


@dataclass(frozen=True)
class Mix:
    name: str
    args: tuple[str, ...]
    refused: str | None = None  # the named error when the sweep must stop before any trial
    absent: tuple[str, ...] = ()  # params the fixed choice takes out of the search
    present: tuple[str, ...] = ()  # params still searched
    override: str | None = None  # an override every trial gets
    distribution: tuple[str, str] | None = None  # (param, repr fragment of its distribution)
    n_values: int = 1


MIXES = [
    Mix("fixed optimizer", ("optimizer=adam",), absent=("optimizer", "optimizer.momentum"),
        present=("optimizer.learning_rate",), override="optimizer=adam"),
    Mix("fixed schedule", ("lr_schedule=cosine",),
        absent=("lr_schedule", "lr_schedule.decay_rate"), override="lr_schedule=cosine"),
    Mix("fixed model, wrong space", ("model=transfer",), refused="use search_space=transfer"),
    Mix("transfer space, weights none", ("search_space=transfer", "model.weights=none",
                                         *SMALL_TRANSFER),
        absent=("model.weights", "model.backbone"), present=("model.trainable_layers",),
        override="model.weights=none"),
    Mix("transfer space, imagenet air-gapped",
        ("search_space=transfer", "model.allow_download=false", *SMALL_TRANSFER),
        refused="model.allow_download=false"),
    Mix("fixed key", ("model.depth=3",), absent=("model.depth",), override="model.depth=3"),
    Mix("comma sweep", ("model.depth=2,3",), distribution=("model.depth", "choices=(2, 3)")),
    Mix("choice and fixed group", ("model.depth=choice(2,3)", "optimizer=sgd"),
        present=("optimizer.momentum",), absent=("optimizer",),
        distribution=("model.depth", "choices=(2, 3)")),
    Mix("interval", ("optimizer.learning_rate=interval(0.001,0.01)",),
        distribution=("optimizer.learning_rate", "high=0.01")),
    Mix("range", ("data.batch_size=range(32,97,32)",),
        distribution=("data.batch_size", "step=32")),
    Mix("narrowed group", ("optimizer=choice(adam,sgd)", "lr_schedule=constant"),
        absent=("lr_schedule.decay_rate",), distribution=("optimizer", "'adam', 'sgd'")),
    Mix("several objectives", ("objective=[val_loss,n_params]", "hydra/sweeper/pruner=nop",
                               "hydra/sweeper/sampler=nsgaii"), n_values=2),
    Mix("typo", ("model.detph=3",), refused="model.detph"),
    Mix("one epoch, cosine in the space", ("trainer.max_epochs=1",),
        refused="search without it: 'lr_schedule=choice("),
]


@dataclass
class Outcome:
    proc: subprocess.CompletedProcess
    seconds: float
    trials: list = field(default_factory=list)
    study: optuna.Study | None = None


def sweep_command(root: Path, *args: str) -> tuple[list[str], dict[str, str]]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "TF_CPP_MIN_LOG_LEVEL": "3", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
    cmd = [sys.executable, str(REPO / "search" / "run.py"), "-m",
           f"hydra.sweep.dir={root / 'sweep'}",
           f"hydra.sweeper.storage=sqlite:///{root / 'optuna.db'}",
           "hydra.sweeper.study_name=mix", "tracking.artifact_root=" + (root / "a").as_uri(),
           *args]
    return cmd, env


def run(root: Path, *args: str) -> Outcome:
    root.mkdir(parents=True)
    cmd, env = sweep_command(root, *args)
    start = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    outcome = Outcome(proc, time.monotonic() - start)
    db = root / "optuna.db"
    if db.exists() and "mix" in optuna.get_all_study_names(f"sqlite:///{db}"):
        outcome.study = optuna.load_study(study_name="mix", storage=f"sqlite:///{db}")
        outcome.trials = outcome.study.get_trials()
    return outcome


DOC_PAGES = ("README.md", *sorted(p.relative_to(REPO).as_posix()
                                   for p in (REPO / "docs").glob("*.md")))


def doc_sweeps() -> list[tuple[str, list[str]]]:
    """(page, override list) of every `python search/run.py -m ...` example in the docs.

    The README first, then docs/*.md. Commands that need a cluster or a database (Ray,
    PostgreSQL) begin with their environment (`OPTUNA_STORAGE=... python ...`) and are not
    matched: only lines that start with the command are.
    """
    found = []
    for page in DOC_PAGES:
        text = re.sub(r"\\\n\s*", " ", (REPO / page).read_text())  # join `\` lines
        for line in re.findall(r"^python search/run\.py -m(.*)$", text, flags=re.MULTILINE):
            # Only this command's words: not a comment, nor what follows a shell operator.
            words = re.split(r"\s(?:&&?|\|\|?|;)(?:\s|$)", line.split("#", 1)[0] + " ",
                             maxsplit=1)[0]
            found.append((page, shlex.split(words)))
    return found


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory,
             chest_xray_sample_files: list[Path]) -> dict[str, Outcome]:
    """Every mix as a real tiny sweep, then the dry runs, two at a time."""
    root = tmp_path_factory.mktemp("mixes")
    # the README's multi-class recipes name placeholder folders: real trees stand in
    placeholders = {
        "data.root=/path/to/chest_xray":
            write_cause_tree(root / "cause" / "chest_xray", chest_xray_sample_files),
        "data.root=/path/to/folders": write_digits_tree(root / "digits", 4),
    }
    jobs = {m.name: (root / f"mix{i}", (*TINY, *m.args)) for i, m in enumerate(MIXES)}
    dry = {  # the shipped spaces, the failing mixes of the issue, then the docs' sweeps
        "dry: default": (),
        "dry: transfer, weights none": ("search_space=transfer", "model.weights=none"),
        "dry: model=transfer": ("model=transfer",),
        "dry: search_space=transfer": ("search_space=transfer", "model.allow_download=false"),
        "dry: nightly recipe": ("+experiment=nightly",),
    }
    for page, args in doc_sweeps():
        args = [f"data.root={placeholders[a]}" if a in placeholders else a for a in args]
        if any(a.startswith("data.root=/") and not a.startswith(f"data.root={root}")
               for a in args):  # a placeholder path without a stand-in: the built-in data
            args = [a for a in args if not a.startswith(("data=", "data.root="))]
            args.append("model.weights=none")  # tests never download
        if tuple(args) not in dry.values():
            source = "README" if page == "README.md" else page
            dry[f"dry: {source} {' '.join(args)}"] = tuple(args)
    for i, (name, args) in enumerate(dry.items()):
        jobs[name] = (root / f"dry{i}", ("hydra.sweeper.dry_run=3", *args))
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run, path, *args) for name, (path, args) in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@pytest.mark.parametrize("mix", MIXES, ids=[m.name for m in MIXES])
def test_mix_completes_or_stops_before_any_trial(mix: Mix, outcomes: dict[str, Outcome]) -> None:
    out = outcomes[mix.name]
    log = out.proc.stdout[-3000:] + out.proc.stderr[-6000:]
    if mix.refused:
        assert out.proc.returncode != 0, log
        assert mix.refused in out.proc.stderr, log
        assert not out.trials, "refused mixes must not start a trial"
        return
    assert out.proc.returncode == 0, log
    assert [t.state.name for t in out.trials] == ["COMPLETE"], log
    trial = out.trials[0]
    assert len(trial.values) == mix.n_values
    for name in mix.absent:
        assert name not in trial.params, (name, trial.params)
    for name in mix.present:
        assert name in trial.params, (name, trial.params)
    if mix.override:
        assert mix.override in trial.user_attrs["overrides"]
    if mix.distribution:
        name, fragment = mix.distribution
        assert fragment in repr(trial.distributions[name]), trial.distributions[name]
    full = out.proc.stdout + out.proc.stderr
    if mix.n_values == 1:
        assert "Fixed on the command line" in full or "Searched as the command line" in full


def test_dry_run_passes_shipped_and_docs_sweeps(outcomes: dict[str, Outcome]) -> None:
    dry = {n: o for n, o in outcomes.items() if n.startswith("dry:")}
    assert sum(n.startswith("dry: README") for n in dry) >= 6  # the README's examples
    for name, out in dry.items():
        if name in ("dry: model=transfer", "dry: search_space=transfer"):
            continue
        log = out.proc.stdout[-2000:] + out.proc.stderr[-4000:]
        assert out.proc.returncode == 0, (name, log)
        passed = re.search(r"Dry run passed: (\d+) of (\d+)", out.proc.stdout + out.proc.stderr)
        assert passed and passed[1] == passed[2], (name, log)
        assert out.study is None, "a dry run must not touch the study"


def test_dry_run_catches_the_failing_mixes_in_seconds(outcomes: dict[str, Outcome]) -> None:
    for name, message in (("dry: model=transfer", "use search_space=transfer"),
                          ("dry: search_space=transfer", "model.allow_download=false")):
        out = outcomes[name]
        assert out.proc.returncode != 0 and message in out.proc.stderr, out.proc.stderr[-3000:]
        assert out.seconds < 30, (name, out.seconds)
        assert out.study is None
