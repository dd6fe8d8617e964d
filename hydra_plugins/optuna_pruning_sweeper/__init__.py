"""Optuna sweeper for Hydra with pruning, worker processes, resume and shared studies.

Public (what Hydra's plugin scan imports, and what tasks import):

- ``config``: ConfigStore entries (``hydra/sweeper: optuna_pruning``, samplers, pruners);
- ``sweeper``: the thin Hydra Sweeper that wires the private parts from its typed config;
- ``trial_context``: the running trial for the task (``current_trial()``, ``trial_info()``,
  ``retry_policy()``) and the environment names of the contract with the task.

Private (``_``-prefixed: the scan skips them, so their state lives as long as the process),
in the order a sweep uses them:

- ``_distributions``: override grammar -> Optuna distributions, the conditional rule;
- ``_conditions``: the conditional-space resolver and the per-trial sampling;
- ``_hooks``: user hooks by dotpath (``custom_search_space``, ``dry_run_check``);
- ``_dry_run``: ``dry_run=N``: sample, compose and check N trials, train nothing;
- ``_samplers``: sampler and pruner builders, dependency checks, grid size;
- ``_storage``: storage URLs, SQLite paths, the ask lock, password redaction;
- ``_study``: open / resume the study, the search-space check, the counting rule, the ask;
- ``_keras_tuner_engine``: ``engine=keras_tuner``: keras-tuner's oracle chooses the trials;
- ``_loop``: the slot loop (limits, stale trials, preemption relay);
- ``_progress``: the loop's trial lines and live status;
- ``_executors``: what runs a trial where (``_local``: spawned worker processes; ``_ray_cluster``:
  Ray tasks);
- ``_worker``: runs one trial's Hydra job inside a worker process and tells its state;
- ``_console``: the workers' terminal (warnings once per sweep, INFO to the job log);
- ``_preemption``: SIGTERM in a worker: the grace period, then "interrupted";
- ``_warm_start``: earlier studies' fitting trials added to a new study, their best configs
  queued first;
- ``_trial_cache``: the process's storage, study and trial objects (read by ``trial_context``);
- ``_summary``: the study summary, computed once for the sweeper and the tracking callback.

Settings, grammar and the contract with the task: ``README.md`` beside this file.
"""
