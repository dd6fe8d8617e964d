"""Hydra's plugin scan imports only the plugin's public modules, and a rescan keeps state.

Run in a fresh interpreter: a rescan re-executes the public modules in place, which this
test process should not see.
"""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "hydra_plugins.optuna_pruning_sweeper"
PUBLIC = [PACKAGE, f"{PACKAGE}.config", f"{PACKAGE}.sweeper", f"{PACKAGE}.trial_context"]

SCRIPT = f"""
import json
from hydra.core.plugins import Plugins
from hydra.core.singleton import Singleton
from {PACKAGE} import _preemption, _trial_cache, _worker, trial_context

_worker._STATE["probe"] = 1
_preemption._STATE["probe"] = 2
_trial_cache.CACHE[("probe",)] = 3
Singleton._instances.pop(Plugins, None)  # a rescan, as Singleton.set_state in every worker
stats = Plugins.instance().get_stats()
print(json.dumps({{
    "scanned": sorted(m for m in stats.modules_import_time if m.startswith("{PACKAGE}")),
    "state": [_worker._STATE.get("probe"), _preemption._STATE.get("probe"),
              trial_context._CACHE.get(("probe",))],
    "shared_cache": trial_context._CACHE is _trial_cache.CACHE,
}}))
"""


def test_the_scan_executes_only_the_public_modules_and_keeps_process_state():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         check=True, timeout=120, cwd=ROOT)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["scanned"] == sorted(PUBLIC)
    assert result["state"] == [1, 2, 3]
    assert result["shared_cache"]
