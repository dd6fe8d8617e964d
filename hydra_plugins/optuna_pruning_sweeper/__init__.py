"""Optuna sweeper for Hydra with pruning, worker processes, resume and shared studies.

Modules, in the order a sweep uses them:

- ``config``: ConfigStore entries (``hydra/sweeper: optuna_pruning``, samplers, pruners);
- ``sweeper``: the thin Hydra Sweeper that wires the parts below from its typed config;
- ``distributions``: override grammar -> Optuna distributions, the conditional rule;
- ``conditions``: the conditional-space resolver and the per-trial sampling;
- ``samplers``: sampler and pruner builders, dependency checks, grid size;
- ``storage``: storage URLs, SQLite paths, the ask lock, password redaction;
- ``study``: open / resume the study, the search-space check, the counting rule, the ask;
- ``loop``: the slot loop (limits, stale trials, progress lines);
- ``executors``: what runs a trial where (``executors.local``: spawned worker processes);
- ``worker``: runs one trial's Hydra job inside a worker process and tells its state;
- ``trial_context``: the running trial for the task (``current_trial()``, ``trial_info()``);
- ``summary``: the study summary, computed once for the sweeper and the tracking callback.
"""
