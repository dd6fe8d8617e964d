"""The project's ``hydra.sweeper.dry_run_check``: what a trial does before ``fit()``, for real.

``python search/run.py -m hydra.sweeper.dry_run=5`` samples five trials and calls
``check_trial`` on each composed config: the run checks (``check_run_config``), the data
built as the trial would build it (cached per data config: a sweep samples few of them) and
its val split against what evaluation fits on it (``check_val_split``),
then the model, the learning-rate schedule and the optimizer, compiled and thrown away.
ImageNet weights are resolved like a trial resolves them (the local Keras cache, or Keras'
own download where ``model.allow_download`` lets it).
"""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from search.config_checks import (
    check_run_config,
    check_task_metrics,
    check_threshold_rule,
    check_val_split,
)

log = logging.getLogger(__name__)

_DATA: dict[str, Any] = {}  # data config (JSON) -> built data, for this process


def _data(cfg: DictConfig) -> Any:
    """The trial's data; batch sizes share one build (only steps_per_epoch depends on it)."""
    spec = OmegaConf.to_container(cfg.data, resolve=True)
    assert isinstance(spec, dict)
    spec.pop("batch_size", None)
    key = json.dumps(spec, sort_keys=True, default=str) + f"|seed={cfg.seed}"
    if key not in _DATA:
        _DATA[key] = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    return _DATA[key]


def check_trial(cfg: DictConfig) -> None:
    """Raise what the trial would raise before its first epoch; build nothing that stays."""
    from search.quiet_start import start_tensorflow

    # TF's native start-up lines, the first device query's cuInit included, once per dry run
    start_tensorflow()
    import keras

    from search.evaluation.evaluate_run import bootstrap_spec
    from search.training.model_setup import check_label_smoothing, compile_model

    check_run_config(cfg)
    bootstrap_spec(cfg)
    data = _data(cfg)
    n_classes = len(data.class_names)
    check_threshold_rule(cfg, list(data.class_names))
    check_task_metrics(cfg, list(data.class_names))
    check_val_split(cfg, data)  # what evaluation fits on val needs images of every class
    check_label_smoothing(cfg.trainer.get("label_smoothing") or 0.0, n_classes)
    keras.backend.clear_session()
    try:
        model = instantiate(cfg.model, input_shape=tuple(data.input_shape), num_classes=n_classes)
        schedule = instantiate(
            cfg.lr_schedule,
            initial_learning_rate=float(cfg.optimizer.learning_rate),
            steps_per_epoch=math.ceil(data.n_train / int(cfg.data.batch_size)),
            epochs=int(cfg.trainer.get("schedule_epochs") or cfg.trainer.max_epochs),
        )
        optimizer = instantiate(cfg.optimizer, learning_rate=schedule.learning_rate)
        compile_model(model, optimizer, n_classes == 2, list(data.class_names))
        log.debug("dry run: %s with %d params", model.name, model.count_params())
    finally:
        keras.backend.clear_session()
