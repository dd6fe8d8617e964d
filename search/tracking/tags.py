"""Every MLflow tag key the project writes or reads, defined once (as MLflow's own
``mlflow.utils.mlflow_tags`` does).

Tags are output for people and the UI (filters, grouping, the run and version pages); values
pass between the sweep's steps as arguments, not through tags. A key written here is never
spelt again as a string literal elsewhere (``tests/search/test_tags.py`` checks it). Keys
MLflow itself defines are taken from MLflow.
"""

from __future__ import annotations

from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NOTE

from search.sweep_context import KERAS_TUNER_ATTR_PREFIX

# ---------------------------------------------------------------------------------------------
# MLflow's own keys

# A run's Markdown description, shown on its page (MLflow's key).
MLFLOW_NOTE = MLFLOW_RUN_NOTE
# The run a nested run belongs to (MLflow's key; read in search filters).
PARENT_RUN_ID = MLFLOW_PARENT_RUN_ID
# The repo's HEAD commit when the run started (MLflow's key).
GIT_COMMIT = MLFLOW_GIT_COMMIT
# Experiment tag MLflow 3's UI reads to choose its GenAI or model-training view.
EXPERIMENT_KIND = "mlflow.experimentKind"

# ---------------------------------------------------------------------------------------------
# Every training run

# The model builder's function name (build_cnn, build_ensemble, ...).
MODEL_BUILDER = "model.builder"
# The runs:/ or models:/ URI of the run's logged (best-checkpoint) model.
BEST_MODEL_URI = "best_model_uri"
# The fitted calibration map, e.g. "temperature T=1.2345" (a run tag; see VERSION_CALIBRATION).
CALIBRATION = "calibration"
# Set on a sweep trial whose evaluation figures (confusion, ROC/PR, calibration, curve PNGs)
# were not rendered: why (outside the study's running top k, `evaluation.figures_top_k`); its
# JSON artifacts and metrics are all there.
FIGURES_SKIPPED = "evaluation.figures_skipped"
# Prefix of the package-version tags: version.tensorflow, version.keras, ...
PACKAGE_VERSION_PREFIX = "version."
# Host (and PID namespace) of the process that owns a run.
PROCESS_HOST = "process.host"
# PID of the process that owns a run (a later command closes runs of dead processes).
PROCESS_PID = "process.pid"
# Why a run was closed by another process ("killed: its process died").
PROCESS_ENDED = "process.ended"
# The epoch a resumed run continued from.
RESUME_FROM_EPOCH = "resume.from_epoch"
# The run id of the interrupted run a resumed run continues.
RESUME_PREVIOUS_RUN_ID = "resume.previous_run_id"

# ---------------------------------------------------------------------------------------------
# A trial's run (written from the sweeper's trial context)

# The Optuna study name (also on the sweep's parent run).
OPTUNA_STUDY = "optuna.study"
# The trial's number in its study.
OPTUNA_TRIAL_NUMBER = "optuna.trial_number"
# The sampler that chose the trial, e.g. "TPESampler".
OPTUNA_SAMPLER = "optuna.sampler"
# The pruner in use, e.g. "MedianPruner".
OPTUNA_PRUNER = "optuna.pruner"
# RUNNING, then COMPLETE / PRUNED / FAIL / INTERRUPTED as the trial ends.
OPTUNA_TRIAL_STATE = "optuna.trial_state"
# Prefix of keras-tuner's facts about a trial (bracket, round, epochs): the sweeper plugin's own
# prefix for its trial user attributes, read through the seam (search/sweep_context.py).
KERAS_TUNER_PREFIX = KERAS_TUNER_ATTR_PREFIX

# ---------------------------------------------------------------------------------------------
# The sweep's parent run

# "true" on the sweep's parent run.
SWEEP_PARENT = "sweep.parent"
# The sweep's output folder (hydra.sweep.dir).
SWEEP_DIR = "sweep.dir"
# Set when the sweep stopped before its end (why, in words).
SWEEP_ENDED = "sweep.ended"
# The sweep-end step running now (report, final_stage, registration, floor, ensemble,
# cross_validation, next_steps), "done" once all ran: after a SIGKILL it still names the step.
SWEEP_END_STEP = "sweep.end_step"
# The step an interrupt or a failure stopped the sweep in (a sweep-end step, or "trials" when
# it stopped before its end); absent when the sweep's end ran to the last step.
SWEEP_STOPPED_IN = "sweep.stopped_in"
# The run id of the sweep's best trial (after the final stage: its best mean repeat).
BEST_RUN_ID = "best_run_id"

# ---------------------------------------------------------------------------------------------
# Final stage (re-trained top trials)

# On a repeat's run: the trial number it re-trains.
FINAL_STAGE_ORIGIN_TRIAL = "final_stage.origin_trial"
# On a repeat's run: the run id of the trial it re-trains.
FINAL_STAGE_ORIGIN_RUN = "final_stage.origin_run"
# On a repeat's run: which repeat (1, 2, ...).
FINAL_STAGE_REPEAT = "final_stage.repeat"
# On the parent: why the final stage did not run.
FINAL_STAGE_SKIPPED = "final_stage.skipped"
# On the parent: the error that stopped the final stage.
FINAL_STAGE_ERROR = "final_stage.error"
# On the parent: the search's own best run before the final stage re-ranked it.
FINAL_STAGE_SEARCH_BEST_RUN_ID = "final_stage.search_best_run_id"

# ---------------------------------------------------------------------------------------------
# Top-k ensemble

# On the ensemble's run: the member runs' ids, comma-separated.
ENSEMBLE_MEMBERS = "ensemble.members"
# On the ensemble's run: how many members (also a param of that run).
ENSEMBLE_K = "ensemble.k"
# On the ensemble's run: the members' trial numbers, comma-separated.
ENSEMBLE_TRIALS = "ensemble.trials"
# On the parent: why no ensemble was built.
ENSEMBLE_SKIPPED = "ensemble.skipped"
# On the parent: the error that stopped the ensemble.
ENSEMBLE_ERROR = "ensemble.error"
# On the parent: the ensemble's run id.
ENSEMBLE_RUN_ID = "ensemble.run_id"
# On the parent: the ensemble's registered version.
ENSEMBLE_VERSION = "ensemble.version"
# On the parent: the alias the ensemble's version received (champion / challenger).
ENSEMBLE_ALIAS = "ensemble.alias"
# On the parent: why the ensemble's version got that alias.
ENSEMBLE_REASON = "ensemble.reason"

# ---------------------------------------------------------------------------------------------
# Cross-validation of the champion

# On a fold's run: the fold index (0-based).
CV_FOLD = "cv.fold"
# On a fold's run: the champion run it re-trains.
CV_OF_RUN = "cv.of_run"
# On the parent: the error that stopped cross-validation.
CV_ERROR = "cv.error"
# Prefix of the champion version's "mean ± std over k folds" tags: cv.val_roc_auc, ...
CV_METRIC_PREFIX = "cv."

# ---------------------------------------------------------------------------------------------
# Promotion (registration and the gate)

# Prefix of every promotion tag (the model card lists them).
PROMOTION_PREFIX = "promotion."
# Run: the registered model's name.
PROMOTION_MODEL_NAME = "promotion.model_name"
# Run: the new version's number.
PROMOTION_VERSION = "promotion.version"
# Run: the alias the new version received (champion / challenger; none under the floor).
PROMOTION_ALIAS = "promotion.alias"
# Run: "true" when the new version became champion.
PROMOTION_PROMOTED = "promotion.promoted"
# Run and version: why (in words).
PROMOTION_REASON = "promotion.reason"
# Run and version: the held-out metric that ranked (also a param of the run).
PROMOTION_METRIC = "promotion.metric"
# Run and version: the champion compared with ("v3", or "none").
PROMOTION_COMPARED_WITH = "promotion.compared_with"
# Run: models:/<name>/<version> of the new version.
PROMOTION_MODEL_URI = "promotion.model_uri"
# Run and version: warnings joined by " | " (fingerprint mismatch, no held-out split, ...).
PROMOTION_WARNING = "promotion.warning"
# Run: why nothing was registered.
PROMOTION_SKIPPED = "promotion.skipped"
# Run: the error that stopped registration or the gate.
PROMOTION_ERROR = "promotion.error"
# Version: the alias decided (champion / challenger), or below_floor (registered, no alias).
PROMOTION_DECISION = "promotion.decision"
# Run and version: the quality floor (registry.floor) the version was held to.
PROMOTION_FLOOR = "promotion.floor"
# Version: the new version's held-out score on the metric.
PROMOTION_SCORE = "promotion.score"
# Version: the champion's held-out score on the metric.
PROMOTION_CHAMPION_SCORE = "promotion.champion_score"
# Version: which split the comparison used, in words.
PROMOTION_EVAL_SPLIT = "promotion.eval_split"
# Version: the paired difference with its interval, in words.
PROMOTION_DIFFERENCE = "promotion.difference"

# ---------------------------------------------------------------------------------------------
# Model-version tags: what a version needs to be used and traced without its run. The first
# six share their names with the fields of the model's metadata (model_metadata.json).

# JSON list of class names, in output order.
VERSION_CLASS_NAMES = "class_names"
# JSON of the input preprocessing (image size, channels, scaling).
VERSION_PREPROCESSING = "preprocessing"
# JSON of the stored decision threshold (null for multi-class).
VERSION_THRESHOLD = "threshold"
# The rule that chose the threshold (evaluation.threshold_rule).
VERSION_THRESHOLD_RULE = "threshold_rule"
# The split the threshold was chosen on ("val").
VERSION_THRESHOLD_CHOSEN_ON = "threshold_chosen_on"
# Fingerprint of the training data.
VERSION_DATA_FINGERPRINT = "data_fingerprint"
# Hash of the run's composed config.
VERSION_CONFIG_HASH = "config_hash"
# JSON of the calibration map folded into the model.
VERSION_CALIBRATION = "calibration"
# runs:/<run>/config/config.yaml: the run's composed config.
VERSION_CONFIG_URI = "config_uri"
# runs:/<run>: the run the version came from.
VERSION_RUN_URI = "run_uri"
# The run id the version came from.
VERSION_RUN_ID = "run_id"
# Version tags whose values are JSON (decoded when read back).
VERSION_JSON_TAGS = (VERSION_CLASS_NAMES, VERSION_PREPROCESSING, VERSION_THRESHOLD,
                     VERSION_CALIBRATION)
