"""keras-tuner as the sweep's decision engine: its oracle chooses, our slots run and track.

``hydra.sweeper.engine=keras_tuner`` hands the choice of every trial's values (and, for
Hyperband, of its epoch budget) to one of keras-tuner's own oracles: ``HyperbandOracle``,
``BayesianOptimizationOracle`` or ``RandomSearchOracle``, over the search space of
``hydra.sweeper.params`` translated into ``hp.Choice`` / ``hp.Int`` / ``hp.Float`` with the
same conditional rule (``hp.conditional_scope``: a group option's keys only under that
option, ``when:`` conditions as written).

Each keras-tuner trial becomes one trial of the sweep's Optuna study, with the oracle's values
enqueued (``Study.enqueue_trial``). It therefore runs in the same recycled worker processes
and is tracked like any trial: a child run with curves and confusion matrices, the sweep
report, the registry gate. Only keras-tuner's oracle runs here, never its ``Tuner`` loop.
That loop imports ``tensorboard`` in every trial (TF 2.21 no longer installs it, so every
trial fails while the search "finishes"), and its memory grows across trials in one process.
A failed trial is FAIL in Optuna, in MLflow and in keras-tuner (``TrialStatus.FAILED``). So it
is never anybody's best.

Hyperband continues a model from the previous round as keras-tuner does: the new trial loads
the earlier trial's best checkpoint (``trainer.init_weights``) and trains from
``tuner/initial_epoch`` to ``tuner/epochs`` (``trainer.initial_epoch``, ``trainer.max_epochs``).
"""

import dataclasses
import datetime as dt
import json
import logging
import math
from pathlib import Path
from typing import Any

from ._conditions import ConditionResolver
from ._distributions import Param, format_value

# Named as before the module went private, so its log lines read as they did.
log = logging.getLogger(__name__.replace("._", "."))

ALGORITHMS = ("hyperband", "bayesian", "random")
PROJECT_FILE = "sweep_project.json"  # our record of the project: study name and space
TAG = "keras_tuner."  # user-attr (and run-tag) prefix of a trial's keras-tuner facts


@dataclasses.dataclass(frozen=True)
class Proposal:
    """What the oracle asks for next: values, extra override lines and tags."""

    trial_id: str
    params: dict[str, Any]
    lines: list[str]
    attrs: dict[str, Any]


def _kt() -> Any:
    try:
        import keras_tuner
    except ImportError as e:  # a declared dependency; say how to get it back
        raise ImportError(
            "hydra.sweeper.engine=keras_tuner needs keras-tuner: pip install -e . "
            f"(it is a dependency of this project): {e}"
        ) from e
    return keras_tuner


def _whole(value: Any, low: int) -> bool:
    """An int (not a bool) of at least ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def check_settings(conf: Any, default_epochs: int | None = None) -> None:
    """Refuse ``hydra.sweeper.keras_tuner.*`` values the oracles would misread, before any
    trial: keras-tuner takes ``max_epochs=0`` / ``num_initial_points=0`` as "unset" and
    ``hyperband_iterations=0`` as "forever", says "factor needs to be a int larger than 1"
    without the key, and a Hyperband over fewer epochs than ``factor`` stops after a trial
    or two. Imports nothing heavy: the engine calls it first; the sweeper's ``validate`` can
    call it too.

    Args:
        conf: ``hydra.sweeper.keras_tuner``.
        default_epochs: The composed ``trainer.max_epochs`` (what a null max_epochs means);
            None when not known yet.

    Raises:
        ValueError: naming the key, the value and what is allowed.
    """
    key = "hydra.sweeper.keras_tuner"
    algorithm = str(conf.algorithm)
    if algorithm not in ALGORITHMS:
        raise ValueError(f"{key}.algorithm={algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    rules = [("max_epochs", conf.max_epochs, 1, "the composed trainer.max_epochs"),
             ("factor", conf.factor, 2, None),
             ("hyperband_iterations", conf.hyperband_iterations, 1, None),
             ("num_initial_points", conf.num_initial_points, 1, "3 per searched key")]
    for name, value, low, null_means in rules:
        if (value is None and null_means) or _whole(value, low):
            continue
        raise ValueError(f"{key}.{name}={value!r} must be an integer >= {low}"
                         + (f", or null for {null_means}" if null_means else ""))
    if conf.seed is not None and not (_whole(conf.seed, 0) and conf.seed < 2**32):
        # the Bayesian oracle's NumPy generator takes 0 .. 2**32 - 1 only
        raise ValueError(f"{key}.seed={conf.seed!r} must be an integer in 0 .. 2**32 - 1, or "
                         "null for a seed keras-tuner draws")
    epochs = conf.max_epochs or default_epochs
    if algorithm == "hyperband" and epochs is not None and int(epochs) < conf.factor:
        source = f"{key}.max_epochs" if conf.max_epochs else "trainer.max_epochs"
        # keras-tuner's one bracket then holds ceil(1 + log_factor(max_epochs)) models
        models = math.ceil(1 + math.log(int(epochs), conf.factor)) * conf.hyperband_iterations
        raise ValueError(
            f"{source}={epochs} is below {key}.factor={conf.factor}: Hyperband has no round "
            f"to halve and would run {models} trial(s) of {epochs} epoch(s), then stop. Give "
            f"{key}.max_epochs >= {conf.factor}, or {key}.algorithm=random")


def _choice_values(choices: list[Any]) -> tuple[list[Any], dict[Any, Any]]:
    """keras-tuner wants one scalar type per Choice: mixed choices travel as their text."""
    kinds = {type(c) for c in choices}
    if len(kinds) == 1 and kinds <= {int, float, str, bool}:
        return list(choices), {c: c for c in choices}
    texts = [format_value(c) for c in choices]
    return texts, dict(zip(texts, choices, strict=True))


def build_hyperparameters(resolver: ConditionResolver) -> tuple[Any, dict[str, dict]]:
    """The search space as keras-tuner ``HyperParameters``; returns (hp, value maps).

    Raises:
        ValueError: a distribution keras-tuner cannot express (a log-scaled int with a step).
    """
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    kt = _kt()
    hp = kt.HyperParameters()
    maps: dict[str, dict] = {}
    params = {p.name: p for p in resolver.order()}
    for p in resolver.order():
        scopes = _scopes(p, resolver, params, maps)
        if scopes is None:  # never active (its fixed group lacks it)
            continue
        with _nested(hp, scopes):
            d = p.distribution
            if isinstance(d, CategoricalDistribution):
                values, maps[p.name] = _choice_values(list(d.choices))
                hp.Choice(p.name, values, ordered=False)
            elif isinstance(d, FloatDistribution):
                hp.Float(p.name, d.low, d.high, step=d.step,
                         sampling="log" if d.log else "linear")
            else:
                if d.log and d.step != 1:
                    raise ValueError(f"{p.name}: keras-tuner has no log-scaled int with a step")
                hp.Int(p.name, d.low, d.high, step=None if d.log else d.step,
                       sampling="log" if d.log else "linear")
    return hp, maps


def _scopes(p: Param, resolver: ConditionResolver, params: dict[str, Param],
            maps: dict[str, dict]) -> list[tuple[str, list[Any]]] | None:
    """The (parent, values) conditions of a param, as keras-tuner scopes; None: inactive."""
    if p.when is not None:
        scopes = []
        for key, allowed in p.when.items():
            parent = params.get(key)
            if parent is None:  # a fixed key: decided now
                if not resolver.is_active(p.key, {key: allowed}, {}):
                    return None
                continue
            kt_values = [v for v, native in maps[parent.name].items()
                         if format_value(native) in allowed]
            scopes.append((parent.name, kt_values))
        return scopes
    group = resolver.parent(p.key)
    if group is None:
        return [] if resolver.is_active(p.key, None, {}) else None
    options = [v for v, native in maps[group.name].items()
               if resolver.option_has_key(group, native, p.key)]
    return [(group.name, options)] if options else None


class _nested:
    """``hp.conditional_scope`` for each condition, innermost last."""

    def __init__(self, hp: Any, scopes: list[tuple[str, list[Any]]]) -> None:
        self.scopes = [hp.conditional_scope(name, values) for name, values in scopes]

    def __enter__(self) -> None:
        for scope in self.scopes:
            scope.__enter__()

    def __exit__(self, *exc: Any) -> None:
        for scope in reversed(self.scopes):
            scope.__exit__(*exc)


class KerasTunerEngine:
    """One keras-tuner oracle for one search; all calls come from the sweeper's loop."""

    def __init__(self, conf: Any, resolver: ConditionResolver, objective: str, direction: str,
                 fingerprint: dict[str, Any], base_name: str, sweep_dir: Path,
                 n_trials: int, default_epochs: int) -> None:
        check_settings(conf, default_epochs)
        kt = _kt()
        self.algorithm = algorithm = str(conf.algorithm)
        self.objective = objective
        self.sweep_dir = sweep_dir
        self.max_epochs = int(conf.max_epochs or default_epochs)
        self.hp, self.maps = build_hyperparameters(resolver)
        self.names = {h.name for h in self.hp.space}  # `in hp` is False for inactive ones
        self.project_dir, self.study_name, resumed = self._project(conf, base_name, fingerprint)
        common = {
            "objective": kt.Objective(objective, "min" if direction == "minimize" else "max"),
            "hyperparameters": self.hp, "allow_new_entries": False, "tune_new_entries": False,
            "seed": conf.seed,
            # our max_failure_rate decides when failures stop a sweep, not a streak of 3
            "max_consecutive_failed_trials": n_trials + 1,
        }
        if algorithm == "hyperband":
            self.oracle = kt.oracles.HyperbandOracle(
                max_epochs=self.max_epochs, factor=int(conf.factor),
                hyperband_iterations=int(conf.hyperband_iterations), **common)
        elif algorithm == "bayesian":
            self.oracle = kt.oracles.BayesianOptimizationOracle(
                max_trials=n_trials, num_initial_points=conf.num_initial_points, **common)
        else:
            self.oracle = kt.oracles.RandomSearchOracle(max_trials=n_trials, **common)
        self.oracle.verbose = 0  # the sweeper prints one line per trial itself
        self.oracle._set_project_dir(str(self.project_dir.parent), self.project_dir.name)
        if resumed:
            self.oracle.reload()
            log.info("keras-tuner: resuming project %s (%d trials so far)", self.project_dir,
                     len(self.oracle.trials))
        self.numbers: dict[str, int] = {}  # keras-tuner trial id -> Optuna trial number
        self.running: dict[int, Any] = {}  # Optuna trial number -> keras-tuner Trial
        self._load_numbers()

    @property
    def label(self) -> str:
        """The sampler name tagged on runs: `keras-tuner HyperbandOracle`."""
        return f"keras-tuner {type(self.oracle).__name__}"

    def _project(self, conf: Any, base_name: str,
                 fingerprint: dict[str, Any]) -> tuple[Path, str, bool]:
        """(project folder, Optuna study name, resumed?): a new project unless resume names
        one, whose stored search space must equal this one."""
        if conf.resume:
            folder = Path(str(conf.resume)).expanduser().resolve()
            record = folder / PROJECT_FILE
            if not record.is_file():
                raise FileNotFoundError(
                    f"hydra.sweeper.keras_tuner.resume={conf.resume}: no keras-tuner project of "
                    f"this sweeper there ({record} missing); give the folder an earlier search "
                    "printed, or drop resume for a new project")
            stored = json.loads(record.read_text())
            if stored.get("fingerprint") != json.loads(json.dumps(fingerprint)) or \
                    stored.get("algorithm") != self.algorithm:
                raise ValueError(
                    f"hydra.sweeper.keras_tuner.resume={folder}: that project searched another "
                    f"space or algorithm ({stored.get('algorithm')}); resume only with the "
                    "same params and algorithm, or drop resume for a new project")
            return folder, str(stored["study_name"]), True
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        name = f"{base_name}-kt-{self.algorithm}-{stamp}"
        root = Path(str(conf.directory)) if conf.directory else self.sweep_dir / "keras_tuner"
        folder = (root / name).resolve()
        folder.mkdir(parents=True, exist_ok=False)  # never an old project, silently
        (folder / PROJECT_FILE).write_text(json.dumps(
            {"study_name": name, "algorithm": self.algorithm, "fingerprint": fingerprint},
            indent=1, default=str))
        return folder, name, False

    def _load_numbers(self) -> None:
        record = self.project_dir / "optuna_numbers.json"
        if record.is_file():
            self.numbers = {str(k): int(v) for k, v in json.loads(record.read_text()).items()}

    def _save_numbers(self) -> None:
        (self.project_dir / "optuna_numbers.json").write_text(json.dumps(self.numbers))

    def propose(self, slot: int) -> "Proposal | str":
        """The next trial for ``slot``; "idle" (wait for a running trial) or "stopped"."""
        kt = _kt()
        trial = self.oracle.create_trial(f"slot-{slot}")
        if trial.status == kt.engine.trial.TrialStatus.IDLE:
            return "idle"
        if trial.status != kt.engine.trial.TrialStatus.RUNNING:
            return "stopped"
        hps = trial.hyperparameters
        params = {name: self.maps.get(name, {}).get(value, value)
                  for name, value in hps.values.items()
                  if name in self.names and hps.is_active(name)}
        attrs = {f"{TAG}trial_id": trial.trial_id, f"{TAG}algorithm": self.algorithm}
        lines = []
        if self.algorithm == "hyperband":
            epochs = int(hps.values["tuner/epochs"])
            initial = int(hps.values["tuner/initial_epoch"])
            attrs.update({f"{TAG}bracket": int(hps.values["tuner/bracket"]),
                          f"{TAG}round": int(hps.values["tuner/round"]),
                          f"{TAG}epochs": epochs, f"{TAG}initial_epoch": initial})
            # the schedule spans the whole budget: a later round may continue this model
            lines += [f"trainer.max_epochs={epochs}", f"trainer.schedule_epochs={self.max_epochs}"]
            previous = hps.values.get("tuner/trial_id")
            checkpoint = self._checkpoint(previous) if previous else None
            if checkpoint is not None:  # continue the earlier round's model
                attrs[f"{TAG}continues_trial"] = self.numbers[previous]
                lines += [f"trainer.initial_epoch={initial}", f"trainer.init_weights={checkpoint}"]
            elif previous:
                log.warning("keras-tuner trial %s: no checkpoint of trial %s to continue; "
                            "training from scratch", trial.trial_id, previous)
        else:
            lines.append(f"trainer.max_epochs={self.max_epochs}")
        return Proposal(trial.trial_id, params, lines, attrs)

    def _checkpoint(self, kt_trial_id: str) -> Path | None:
        number = self.numbers.get(kt_trial_id)
        if number is None:
            return None
        path = self.sweep_dir / str(number) / "checkpoints" / "best.keras"
        return path if path.is_file() else None

    def started(self, proposal: Proposal, number: int) -> None:
        self.numbers[proposal.trial_id] = number
        self.running[number] = self.oracle.trials[proposal.trial_id]
        self._save_numbers()

    def finish(self, number: int, state: str, values: list[float] | None,
               reason: str | None) -> None:
        """Tell the oracle: COMPLETE -> COMPLETED with the objective; anything else FAILED
        (a pruned trial does not happen: the engine runs without a pruner)."""
        kt = _kt()
        trial = self.running.pop(number, None)
        if trial is None:
            return
        if state == "COMPLETE" and values:
            self.oracle.update_trial(trial.trial_id, {self.objective: float(values[0])})
            trial.status = kt.engine.trial.TrialStatus.COMPLETED
        else:
            trial.status = kt.engine.trial.TrialStatus.FAILED
            trial.message = reason or state
        self.oracle.end_trial(trial)

    def abandon(self, proposal: Proposal, reason: str) -> None:
        """End a trial the oracle proposed but the sweep did not run."""
        trial = self.oracle.trials[proposal.trial_id]
        trial.status = _kt().engine.trial.TrialStatus.FAILED
        trial.message = reason
        self.oracle.end_trial(trial)

    def summary(self) -> dict[str, Any]:
        """keras-tuner's own view: its best trial (never a failed one) and its counts."""
        # With no COMPLETED trial keras-tuner returns a FAILED one (score None): never best.
        completed = _kt().engine.trial.TrialStatus.COMPLETED
        best = [t for t in self.oracle.get_best_trials(1) if t.status == completed]
        states: dict[str, int] = {}
        for t in self.oracle.trials.values():
            states[str(t.status)] = states.get(str(t.status), 0) + 1
        return {
            "algorithm": self.algorithm, "oracle": type(self.oracle).__name__,
            "project": str(self.project_dir), "states": states,
            "best_trial": best[0].trial_id if best else None,
            "best_optuna_trial": self.numbers.get(best[0].trial_id) if best else None,
            "best_score": float(best[0].score) if best else None,
        }
