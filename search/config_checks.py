"""Checks of a composed config that must hold before any data is loaded or any trial trains.

`check_run_config(cfg)` runs at the start of every job (a single run and each sweep trial);
`check_sweep_config(cfg)` runs once in the sweeper's process, before the sweep's parent run
or its first trial, and also checks what only a sweep has: the direction(s) against the
objective(s). Each error names the key the user writes and the allowed values.

The objective's direction is derived, not guessed by the user: losses (and model size,
epochs) minimise, every other evaluated metric (ROC AUC, accuracy, sensitivity, ...)
maximises. Search spaces set `hydra.sweeper.direction: ${objective_direction:${objective}}`;
`register_resolvers()` (called by search/run.py) provides that resolver.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from search import REPO_ROOT

# The evaluation and registry defaults: conf/<group>/default.yaml read onto their typed schemas
# by two leaf modules that import only OmegaConf (below this one, like metric_maths).
from search.evaluation.evaluation_settings import DEFAULTS as EVALUATION_DEFAULTS

# The metric names (and the threshold rules, calibration methods) are owned by
# search/evaluation/metric_maths.py, which needs only NumPy: the sweeper's checks stay free of
# scikit-learn (2.5 s of imports in the sweeper process). Re-exported here for the checks' users.
from search.evaluation.metric_maths import (
    CALIBRATION_METHODS,
    EPOCH_COUNTERPART,
    EPOCH_METRICS,
    MACRO_NAMES,
    RANKING_METRICS,  # noqa: F401 - re-exported for the checks' users
    THRESHOLD_RULES,
    VAL_METRICS,
    check_metric,
)
from search.model_registry.registry_settings import DEFAULTS as REGISTRY_DEFAULTS

# The one rule a K-class run accepts (it predicts the most probable class): the configured default.
DEFAULT_THRESHOLD_RULE = EVALUATION_DEFAULTS.threshold_rule
# trainer.precision (models/precision.py resolves `auto` at training time).
PRECISIONS = ("auto", "float32", "mixed_bfloat16", "mixed_float16")
# What a run reports besides its val_* metrics (VAL_METRICS): facts about the model.
MODEL_FACTS = ("n_params", "epochs_trained", "best_epoch")
MINIMISED = ("loss", *MODEL_FACTS)
# Fewest val images of a class the decision threshold is chosen on: with one, that class's
# val sensitivity (or specificity) is 0 or 100 % at any threshold, so the rule has nothing to
# choose from. A calibration is one number fitted over all val images: from there to
# registry.min_per_class both run, with a warning.
MIN_THRESHOLD_PER_CLASS = 2

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A composed config that cannot run; the message names the key and the fix."""


def objective_names(objective: Any) -> list[str]:
    """`objective` (a name or a list of names) as a list of strings."""
    if isinstance(objective, ListConfig | Sequence) and not isinstance(objective, str):
        return [str(n) for n in objective]
    return [str(objective)]


def check_objective(name: str) -> str:
    """Refuse test metrics and names train() never returns; returns the name."""
    if name.startswith("test_"):
        raise ConfigError(
            f"objective={name!r}: tuning on the test split is not allowed; "
            "use a val_* metric (e.g. val_loss, val_roc_auc)"
        )
    allowed = [f"val_{m}" for m in VAL_METRICS] + list(MODEL_FACTS)
    if name not in allowed:
        raise ConfigError(f"objective={name!r} is not a metric a run reports; use one of "
                          f"{', '.join(allowed)}")
    return name


def direction_of(name: str) -> str:
    """"minimize" for losses and model size/epochs, "maximize" for quality metrics."""
    metric = check_objective(name).removeprefix("val_")
    return "minimize" if metric in MINIMISED else "maximize"


def objective_direction(objective: Any) -> str | list[str]:
    """The OmegaConf resolver: the direction(s) of `objective` (a list for a list)."""
    names = objective_names(objective)
    directions = [direction_of(n) for n in names]
    is_list = isinstance(objective, ListConfig | Sequence) and not isinstance(objective, str)
    return directions if is_list else directions[0]


def epoch_direction(monitor: str) -> str:
    """Direction of a per-epoch Keras metric: losses minimise, the rest maximise."""
    return "minimize" if monitor.removeprefix("val_") == "loss" else "maximize"


def pruning_metric(cfg: DictConfig) -> str | None:
    """The per-epoch value reported to a sweep's pruner, or None when none fits.

    `trainer.monitor` when it runs the objective's way; otherwise the objective's own
    per-epoch counterpart (objective=val_roc_auc with monitor val_loss reports val_auc), so
    a pruner never keeps the worst trials. Several objectives: None (Optuna cannot prune).
    """
    names = objective_names(cfg.objective)
    if len(names) != 1:
        return None
    monitor = str(cfg.trainer.monitor)
    if epoch_direction(monitor) == direction_of(names[0]):
        return monitor
    counterpart = EPOCH_COUNTERPART.get(names[0].removeprefix("val_"))
    return f"val_{counterpart}" if counterpart else None


def repo_root() -> str:
    """The checkout this code runs from: the search spaces anchor the Optuna study here, next
    to MLflow's store, so a resume from another folder finds the same study."""
    return str(REPO_ROOT)


def register_resolvers() -> None:
    """Register `${objective_direction:...}`, `${objective_names:...}` and `${repo_root:}`
    (idempotent)."""
    if not OmegaConf.has_resolver("objective_direction"):
        OmegaConf.register_new_resolver("objective_direction", objective_direction)
    if not OmegaConf.has_resolver("objective_names"):
        OmegaConf.register_new_resolver("objective_names", objective_names)
    if not OmegaConf.has_resolver("repo_root"):
        OmegaConf.register_new_resolver("repo_root", repo_root)


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")


def check_run_config(cfg: DictConfig) -> list[str]:
    """Everything a single job needs right, before data loading; returns the objective names."""

    names = [check_objective(n) for n in objective_names(cfg.objective)]
    rule = str(OmegaConf.select(cfg, "evaluation.threshold_rule"))
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"evaluation.threshold_rule={rule!r} is not one of "
                          f"{', '.join(THRESHOLD_RULES)}")
    min_sens = OmegaConf.select(cfg, "evaluation.min_sensitivity")
    if min_sens is not None and not 0.0 < float(min_sens) <= 1.0:
        raise ConfigError(f"evaluation.min_sensitivity must be in (0, 1], got {min_sens}")
    calibration = str(OmegaConf.select(cfg, "evaluation.calibration", default="none"))
    if calibration not in CALIBRATION_METHODS:
        raise ConfigError(f"evaluation.calibration={calibration!r} is not one of "
                          f"{', '.join(CALIBRATION_METHODS)}")
    prevalence = OmegaConf.select(cfg, "evaluation.deployment_prevalence")
    if prevalence is not None and not 0.0 < float(prevalence) < 1.0:
        raise ConfigError(f"evaluation.deployment_prevalence must be in (0, 1) (the expected "
                          f"share of positives), got {prevalence}")
    monitor = str(cfg.trainer.monitor)
    monitors = [*EPOCH_METRICS, *(f"val_{m}" for m in EPOCH_METRICS)]
    if monitor not in monitors:
        raise ConfigError(f"trainer.monitor={monitor!r} is not logged each epoch; use one of "
                          f"{', '.join(monitors)}")
    lr = OmegaConf.select(cfg, "optimizer.learning_rate")
    if lr is not None and not float(lr) > 0:
        raise ConfigError(f"optimizer.learning_rate must be > 0, got {lr}")
    _positive_int(cfg, "trainer.max_epochs")
    precision = OmegaConf.select(cfg, "trainer.precision", default="float32")
    if precision not in PRECISIONS:
        raise ConfigError(f"trainer.precision={precision!r} is not valid; allowed: "
                          f"{list(PRECISIONS)}")
    _positive_int(cfg, "trainer.patience", minimum=0)
    initial = int(OmegaConf.select(cfg, "trainer.initial_epoch", default=0) or 0)
    if not 0 <= initial < int(cfg.trainer.max_epochs):
        raise ConfigError(f"trainer.initial_epoch={initial} must be in [0, trainer.max_epochs="
                          f"{cfg.trainer.max_epochs}): fit would train no epoch")
    span = OmegaConf.select(cfg, "trainer.schedule_epochs", default=None)
    if span is not None and int(span) < int(cfg.trainer.max_epochs):
        raise ConfigError(f"trainer.schedule_epochs={span} is shorter than trainer.max_epochs="
                          f"{cfg.trainer.max_epochs}; the schedule must span every epoch (null "
                          "= max_epochs)")
    weights = OmegaConf.select(cfg, "trainer.init_weights", default=None)
    if weights and not Path(str(weights)).expanduser().is_file():
        raise ConfigError(f"trainer.init_weights={weights}: no such file; give a .keras "
                          "checkpoint of the same model, or null")
    _positive_int(cfg, "data.batch_size")
    _positive_int(cfg, "seed", minimum=0)
    registry = cfg.get("registry") or {}
    if registry.get("enabled", REGISTRY_DEFAULTS.enabled):
        for key in ("metric", "tie_break"):
            if registry.get(key) is not None:
                try:
                    check_metric(registry.get(key))
                except ValueError as error:  # names registry.metric; tie_break alike
                    raise ConfigError(
                        str(error).replace("registry.metric", f"registry.{key}")) from None
    return names


def check_sweep_config(cfg: DictConfig) -> None:
    """The run checks plus the sweep's direction(s) against the objective(s)."""
    names = check_run_config(cfg)
    sweeper = cfg.hydra.sweeper
    if "direction" not in sweeper:
        return
    given = sweeper.direction
    given_list = objective_names(given)
    if len(given_list) != len(names):
        raise ConfigError(
            f"hydra.sweeper.direction={given_list} has {len(given_list)} direction(s) for "
            f"{len(names)} objective(s) {names}; give one per objective (or leave "
            "hydra.sweeper.direction to the search space, which derives it)"
        )
    pruner = str((sweeper.get("pruner") or {}).get("_target_", "NopPruner"))
    if len(names) == 1 and not pruner.endswith("NopPruner") and pruning_metric(cfg) is None:
        raise ConfigError(
            f"objective={names[0]} has no per-epoch value a pruner could watch, and "
            f"trainer.monitor={cfg.trainer.monitor} runs the other way; choose "
            "hydra/sweeper/pruner=nop, or an objective such as val_roc_auc or val_loss"
        )
    check_imagenet_weights(cfg)
    check_schedules_fit(cfg)
    expected = [direction_of(n) for n in names]
    wrong = [f"{n} should {e}, not {g}" for n, g, e in
             zip(names, given_list, expected, strict=True) if g != e]
    if wrong:
        raise ConfigError(
            "hydra.sweeper.direction contradicts the objective: " + "; ".join(wrong)
            + f". Drop hydra.sweeper.direction (it is derived from objective) or set it to "
            f"{expected if len(expected) > 1 else expected[0]}"
        )


def sweep_values(cfg: DictConfig, key: str, composed: bool = True) -> list[Any] | None:
    """The values a sweep can give ``key``: the command line's, else the search space's,
    else (``composed``) the composed value. None when they cannot be listed (an interval)
    or, without ``composed``, when neither the command line nor the space gives the key."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import Transformer

    hydra_cfg = cfg.get("hydra") or {}
    lines = [str(o) for o in OmegaConf.select(cfg, "hydra.overrides.task", default=[]) or []]
    # The last override of a key wins, as when Hydra composes.
    text = next((line.split("=", 1)[1] for line in reversed(lines)
                 if line.split("=", 1)[0] == key), None)
    if text is None:
        params = OmegaConf.select(hydra_cfg, "sweeper.params", default=None) or {}
        value = params.get(key) if isinstance(params, DictConfig) else None
        if isinstance(value, DictConfig):
            value = value.get("values")
        text = None if value is None else str(value)
    if text is None:
        return [OmegaConf.select(cfg, key)] if composed else None
    override = OverridesParser.create().parse_override(f"{key}={text}")
    if not override.is_sweep_override():
        return [override.value()]
    if override.is_interval_sweep():
        return None
    return list(override.sweep_iterator(transformer=Transformer.encode))


def check_imagenet_weights(cfg: DictConfig) -> None:
    """Fetch the ImageNet weights a transfer sweep can ask for, once, before any worker.

    On a connected machine Keras downloads each missing file into its cache here (one
    download, not one per worker); offline, or with ``model.allow_download=false``, the
    sweep stops now with the message a trial would give, instead of once per trial.
    """
    model = cfg.get("model") or {}
    if "backbone" not in model:
        return
    weights = sweep_values(cfg, "model.weights") or []
    if "imagenet" not in [str(w) for w in weights]:
        return
    from search.quiet_start import quiet_native_start

    with quiet_native_start():  # models.transfer imports TF
        from models.transfer import imagenet_weights_path

    backbones = sweep_values(cfg, "model.backbone") or [model.get("backbone")]
    sizes = sweep_values(cfg, "data.image_size") or [OmegaConf.select(cfg, "data.image_size")]
    allow = bool(model.get("allow_download", True))
    for backbone in dict.fromkeys(str(b) for b in backbones):
        for size in dict.fromkeys(int(s) for s in sizes):
            try:
                imagenet_weights_path(backbone, size, allow_download=allow)
            except FileNotFoundError as error:
                raise ConfigError(f"{error} (checked once, before any trial)") from None
            except KeyError:
                return  # an unknown backbone: build_transfer names it in the trial


def check_schedules_fit(cfg: DictConfig) -> None:
    """Every learning-rate schedule the sweep can pick must fit its epochs.

    A cosine schedule's warm-up takes ``warmup_epochs``; with ``trainer.max_epochs`` no larger
    (a one-epoch smoke sweep), every trial that samples it would fail in its builder. Said
    once here instead.
    """
    key, epochs = _schedule_epochs(cfg)
    if not epochs or any(isinstance(e, bool) or not isinstance(e, int) for e in epochs):
        return
    fewest = min(epochs)
    options = sweep_values(cfg, "lr_schedule") or []
    warmups = sweep_values(cfg, "lr_schedule.warmup_epochs", composed=False)
    swept = [o for o in options if isinstance(o, str)]
    for option in options:
        if isinstance(option, DictConfig):  # the composed (not swept) schedule
            name, node = "the composed lr_schedule", option
        else:
            path = Path(repo_root()) / "conf" / "lr_schedule" / f"{option}.yaml"
            if not path.is_file():
                continue  # a group option Hydra will name when it composes it
            name, node = f"lr_schedule={option}", OmegaConf.load(path)
        if "warmup_epochs" not in node:
            continue
        given = [w for w in warmups or [] if isinstance(w, int)]
        warmup = min(given) if given and isinstance(option, str) else int(node.warmup_epochs)
        if warmup >= fewest:
            others = [o for o in swept if o != option]
            fix = (f"search without it: 'lr_schedule=choice({','.join(others)})'"
                   if len(swept) > 1 else "set lr_schedule.warmup_epochs=0")
            raise ConfigError(
                f"{name} warms up for lr_schedule.warmup_epochs={warmup}, which leaves nothing "
                f"to decay over in {key}={fewest}: every trial with it would fail. "
                f"Raise {key} above {warmup}, or {fix}"
            )


def _schedule_epochs(cfg: DictConfig) -> tuple[str, list[Any] | None]:
    """(the key, the values) of the epochs a trial's schedule spans.

    With ``hydra.sweeper.engine=keras_tuner`` the oracle sets them: every trial's schedule
    spans ``hydra.sweeper.keras_tuner.max_epochs`` (Hyperband's rounds train fewer epochs of
    that same schedule), or the composed ``trainer.max_epochs`` when that is null.
    """
    sweeper = OmegaConf.select(cfg, "hydra.sweeper", default=None) or {}
    if sweeper.get("engine") == "keras_tuner":
        key = "hydra.sweeper.keras_tuner.max_epochs"
        given = OmegaConf.select(cfg, key, default=None)
        if given is not None:  # one the plugin refuses (0, -1) is named there, not here
            return key, [given] if isinstance(given, int) and given >= 1 else None
    return "trainer.max_epochs", sweep_values(cfg, "trainer.max_epochs")


def check_threshold_rule(cfg: DictConfig, class_names: list[str]) -> None:
    """A threshold rule other than the default only means something for two classes; for K
    classes the prediction is the most probable class, so the rule is refused, not ignored."""
    rule = str(OmegaConf.select(cfg, "evaluation.threshold_rule"))
    if len(class_names) > 2 and rule != DEFAULT_THRESHOLD_RULE:
        raise ConfigError(
            f"evaluation.threshold_rule={rule} needs two classes; this data has "
            f"{len(class_names)} ({', '.join(class_names)}) and a K-class model predicts the "
            "most probable class: drop the override")
    if len(class_names) > 2 and OmegaConf.select(cfg, "evaluation.calibration") == "platt":
        raise ConfigError(
            f"evaluation.calibration=platt needs two classes; this data has {len(class_names)} "
            f"({', '.join(class_names)}): use evaluation.calibration=temperature")


def check_task_metrics(cfg: DictConfig, class_names: list[str]) -> None:
    """The objective and `trainer.monitor` must name metrics this task reports: K-class runs
    report `macro_recall` (never a bare `sensitivity`), binary runs the reverse."""
    k = len(class_names)
    for name in objective_names(cfg.objective):
        metric = name.removeprefix("val_")
        if k > 2 and metric in MACRO_NAMES:
            raise ConfigError(
                f"objective={name}: with {k} classes ({', '.join(class_names)}) there is no "
                f"single {metric}; use objective=val_{MACRO_NAMES[metric]} (the mean over "
                "classes) or val_roc_auc (one-vs-rest, macro)")
        if k == 2 and metric in MACRO_NAMES.values():
            binary = next(b for b, m in MACRO_NAMES.items() if m == metric)
            raise ConfigError(
                f"objective={name} is a K-class average; this data has 2 classes "
                f"({', '.join(class_names)}): use objective=val_{binary}")
    monitor = str(OmegaConf.select(cfg, "trainer.monitor", default="val_loss"))
    if k > 2 and monitor.removeprefix("val_") in ("precision", "recall"):
        raise ConfigError(
            f"trainer.monitor={monitor} is a binary per-epoch metric; a {k}-class run logs "
            "loss, accuracy, auc (one-vs-rest, macro) and recall_<class> each epoch: use "
            "trainer.monitor=val_loss or val_auc")


def check_val_split(cfg: DictConfig, data: Any) -> list[str]:
    """Refuse a val split too small for what evaluation fits on it, warn when it is small.

    A binary run chooses its decision threshold on val (`evaluation.threshold_rule`) and any
    run with `evaluation.calibration` other than none fits the calibration there. A binary
    val split with fewer than `MIN_THRESHOLD_PER_CLASS` images of a class is refused; fewer
    than `registry.min_per_class` (the fewest the registry decides on) is warned. Runs before
    training: a single run, each sweep trial and the sweep's dry run.

    Args:
        cfg: The composed config.
        data: The built ``data.build.DataBundle`` (class names, ``y_val``, ``source_info``).

    Returns:
        The warnings logged (empty when the split is large enough or nothing is fitted).

    Raises:
        ConfigError: naming the key that set the split, the class counts and the fixes.
    """
    names = [str(n) for n in data.class_names]
    fitted = _fitted_on_val(cfg, len(names))
    y_val = [int(v) for v in data.y_val]
    counts = {name: y_val.count(i) for i, name in enumerate(names)}
    wanted = int(OmegaConf.select(cfg, "registry.min_per_class",
                                  default=REGISTRY_DEFAULTS.min_per_class))
    fewest = min(counts.values())
    if not fitted or fewest >= max(wanted, MIN_THRESHOLD_PER_CLASS):
        return []
    setter, fixes = _val_setter(cfg, data.source_info)
    if len(names) > 2:  # the calibration is all a K-class run fits on val
        fixes += "; or set evaluation.calibration=none"
    text = (f"the val split ({len(y_val)} images, per class {counts}) is set by {setter}; "
            f"evaluation fits {' and '.join(fitted)} on it")
    if len(names) == 2 and fewest < MIN_THRESHOLD_PER_CLASS:
        raise ConfigError(
            f"{text}. With fewer than {MIN_THRESHOLD_PER_CLASS} val images of a class its "
            "sensitivity or specificity is 0 or 100 % at any threshold, so there is nothing "
            f"to choose from: refused before training. {fixes}.")
    message = (f"{text}, and fewer than registry.min_per_class={wanted} images of a class (the "
               f"fewest the registry's gate decides on) leave that fit noisy. {fixes}.")
    log.warning(message)
    return [message]


def _fitted_on_val(cfg: DictConfig, n_classes: int) -> list[str]:
    """What evaluation fits on the val split, as the keys that ask for it."""
    fitted = []
    if n_classes == 2:  # K classes predict the most probable one: no threshold
        rule = OmegaConf.select(cfg, "evaluation.threshold_rule",
                                default=EVALUATION_DEFAULTS.threshold_rule)
        fitted.append(f"the decision threshold (evaluation.threshold_rule={rule})")
    method = str(OmegaConf.select(cfg, "evaluation.calibration", default="none"))
    if method != "none":
        fitted.append(f"the calibration (evaluation.calibration={method})")
    return fitted


def _val_setter(cfg: DictConfig, info: Mapping[str, Any]) -> tuple[str, str]:
    """(the key or folder that decided the val split, what to change)."""
    fraction = OmegaConf.select(cfg, "data.val_fraction")
    subset = float(info.get("subset_fraction", 1.0) or 1.0)
    folds = OmegaConf.select(cfg, "data.cv_folds")  # absent or 0: no folds
    if folds:
        setter = (f"data.cv_folds={folds} (val is fold "
                  f"{OmegaConf.select(cfg, 'data.cv_fold')} of train + val)")
        fix = "Use fewer folds (registry.cv_folds / data.cv_folds) or more data"
    elif info.get("resplit"):
        setter = f"data.val_fraction={fraction} (of all images, data.resplit=true)"
        fix = "Raise data.val_fraction"
    elif "val" in (info.get("given_splits") or []):
        setter = (f"the val_images/val_labels of data.path={info.get('path')}"
                  if info.get("source") == "npz"
                  else f"the val/ folder under data.root={info.get('root')}")
        fix = (f"Add images to that split, or set data.resplit=true and "
               f"data.val_fraction (now {fraction})")
    else:
        setter = f"data.val_fraction={fraction} (carved from train)"
        fix = "Raise data.val_fraction"
    if subset < 1.0:
        setter += f", then data.subset_fraction={subset:g}"
        fix += " or data.subset_fraction"
    return setter, fix
