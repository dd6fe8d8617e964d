"""Optuna sweeper for Hydra with pruning, worker processes, resume and shared studies.

Modules: ``config`` (ConfigStore entries: ``hydra/sweeper: optuna_pruning``, samplers,
pruners), ``distributions`` (override grammar -> Optuna distributions, the conditional
rule), ``trial_context`` (the running trial for the task: ``current_trial()``,
``trial_info()``), ``worker`` (runs one trial's Hydra job and tells its state),
``_impl`` (the sweep loop, counting rule, ask lock, stale trials) and ``sweeper``.
"""
