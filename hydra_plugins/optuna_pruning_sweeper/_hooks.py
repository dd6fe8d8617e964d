"""User hooks named by dotpath: ``custom_search_space`` and ``dry_run_check``.

``hydra.utils.get_method`` resolves ``package.module.function``. The official Optuna
sweeper's examples also write ``.custom-search-space-objective.configure``: a leading dot
and a file name that is no module name, meaning "the function ``configure`` of the script
``custom-search-space-objective.py`` beside the app". Hydra 1.3 refuses relative dotpaths,
so that spelling is resolved here: against ``__main__`` when it is that script, else by
loading the file from the main script's folder.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.utils import get_method


def _main_script() -> Path | None:
    main = sys.modules.get("__main__")
    path = getattr(main, "__file__", None)
    return Path(path).resolve() if path else None


def _relative(path: str, key: str) -> Callable[..., Any]:
    module_name, _, attr = path.lstrip(".").rpartition(".")
    script = _main_script()
    if not module_name or not attr or script is None:
        raise ValueError(
            f"hydra.sweeper.{key}={path!r}: a relative dotpath needs '.<script>.<function>' "
            "and a main script to resolve it against"
        )
    if module_name == "__main__" or script.stem == module_name:
        module: Any = sys.modules["__main__"]
    else:
        file = script.parent / f"{module_name}.py"
        if not file.is_file():
            raise ValueError(f"hydra.sweeper.{key}={path!r}: no file {str(file)!r}")
        spec = importlib.util.spec_from_file_location(module_name.replace("-", "_"), file)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"hydra.sweeper.{key}={path!r}: {module_name} has no function {attr!r}")
    return fn


def locate(path: str | None, key: str) -> Callable[..., Any] | None:
    """The callable a ``hydra.sweeper.<key>`` dotpath names (None when unset).

    Raises:
        ValueError: naming the key when the path does not lead to a callable.
    """
    if not path:
        return None
    if path.startswith(".") or path.startswith("__main__."):
        return _relative(path, key)
    try:
        return get_method(path)
    except Exception as e:  # noqa: BLE001 - Hydra raises several types; name the key
        raise ValueError(f"hydra.sweeper.{key}={path!r} cannot be loaded: {e}") from e


def extend_trial(
    hook: Callable[..., Any] | None,
    config: Any,
    trial: Any,
    sampled: dict[str, Any],
    fixed_keys: set[str],
) -> dict[str, Any]:
    """Run ``custom_search_space`` on ``trial``; returns the params it suggested.

    Raises:
        ValueError: a suggested param is also fixed by an override (as the official plugin).
    """
    if hook is None:
        return {}
    hook(config, trial)
    extra = {k: v for k, v in trial.params.items() if k not in sampled}
    overlap = sorted(k for k in extra if k.lstrip("+~") in fixed_keys)
    if overlap:
        raise ValueError(
            f"hydra.sweeper.custom_search_space suggested {overlap}, which an override fixes "
            "too: drop one of them"
        )
    return extra
