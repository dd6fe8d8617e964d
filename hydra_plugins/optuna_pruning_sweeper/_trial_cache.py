"""The process's storage, study and trial objects, each created once per process.

``trial_context`` (public, so Hydra's plugin scan re-executes it in place whenever the
plugins are rescanned, e.g. by ``Singleton.set_state`` in a worker) reads and writes its
objects here: this module is private, the scan skips it, and the cache lives as long as the
process.

Optuna is imported inside the functions: a plain run should not pay for it at the scan.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

from ._samplers import pruner_from_json
from ._storage import storage_kwargs

if TYPE_CHECKING:
    import optuna

# ("storage", url) / ("study", url, name, pruner) / ("trial", url, name, id) -> the object
CACHE: dict[Any, Any] = {}


def get_storage(storage_url: str) -> optuna.storages.BaseStorage:
    """The process's storage for ``storage_url`` (created once): an RDBStorage, or for
    ``grpc://host:port`` a client of Optuna's gRPC storage proxy."""
    key = ("storage", storage_url)
    if key not in CACHE:
        import optuna

        if storage_url.startswith("grpc://"):
            host, _, port = storage_url[len("grpc://"):].rstrip("/").rpartition(":")
            with warnings.catch_warnings():  # experimental in Optuna 5: chosen knowingly
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                CACHE[key] = optuna.storages.GrpcStorageProxy(host=host or "localhost",
                                                              port=int(port))
        else:
            CACHE[key] = optuna.storages.RDBStorage(storage_url,
                                                    **storage_kwargs(storage_url))
    return CACHE[key]


def load_study(storage_url: str, study_name: str, pruner_json: str | None = None) -> optuna.Study:
    """The study, loaded once per process (RandomSampler: the sweeper process samples)."""
    key = ("study", storage_url, study_name, pruner_json)
    if key not in CACHE:
        import optuna

        CACHE[key] = optuna.load_study(
            study_name=study_name,
            storage=get_storage(storage_url),
            sampler=optuna.samplers.RandomSampler(),
            pruner=pruner_from_json(pruner_json),
        )
    return CACHE[key]
