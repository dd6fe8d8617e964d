"""Registered models: URIs, versions and aliases, download, safe loading and metadata.

    models:/pneumonia-cnn@champion   models:/pneumonia-cnn/3   exports/pneumonia-cnn-v3/
    models:/m-<id> (MLflow 3's logged model)   runs:/<run id>/model

`export_version` writes a self-contained local folder for offline prediction:

    model/            the MLflow Keras model (MLmodel, data/model.keras, input example)
    model_info.json   name, version, aliases, run link, class names, preprocessing, threshold,
                      data fingerprint, config hash, metrics
    config.yaml       the run's composed Hydra config
    MODEL_CARD.md     the same, for humans (`search.model_registry.model_card`)

`load_model_reference` loads a registry URI (through such an export), a logged-model or run
URI, a pulled folder or a bare MLflow Keras model folder. Models are always loaded from the
`.keras` file with Keras' safe mode on (no arbitrary code).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import yaml
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from search.model_registry.model_card import model_card
from search.model_registry.registry_settings import DEFAULTS
from search.tracking import tags as tag_keys
from search.tracking.mlflow_runs import redact_uri

if TYPE_CHECKING:
    import keras

log = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = DEFAULTS.model_name
DEFAULT_ALIAS = "champion"
INFO_FILE = "model_info.json"
MODEL_DIR = "model"
CARD_FILE = "MODEL_CARD.md"
CONFIG_FILE = "config.yaml"
# Metadata keys train.py stores with every logged model (and registry.py copies to version tags).
METADATA_KEYS = (
    "class_names", "preprocessing", "threshold", "threshold_rule", "data_fingerprint",
    "config_hash", "calibration",
)
_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))$")
# MLflow 3's logged-model URI (what the UI and a run's best_model_uri tag show), and a run's
LOGGED_MODEL_URI = re.compile(r"^models:/(?P<model_id>m-[0-9a-f]{32})$")
RUN_MODEL_URI = re.compile(r"^runs:/(?P<run_id>[^/]+)/(?P<path>.+)$")


@dataclass
class LoadedModel:
    """A Keras model with what prediction needs to use it exactly as training did."""

    model: keras.Model
    info: dict[str, Any]
    folder: Path

    @property
    def class_names(self) -> list[str]:
        return list(self.info["class_names"])

    @property
    def preprocessing(self) -> dict[str, Any]:
        return dict(self.info["preprocessing"])

    @property
    def threshold(self) -> float | None:
        value = self.info.get("threshold")
        return None if value is None else float(value)


def parse_model_uri(uri: str) -> tuple[str, str | None, int | None]:
    """Split `models:/name@alias` or `models:/name/3` into (name, alias, version)."""
    match = _URI.match(uri.strip())
    if not match:
        raise ValueError(
            f"{uri!r} is not a registry URI; expected models:/<name>@<alias> "
            f"(e.g. models:/{DEFAULT_MODEL_NAME}@champion) or models:/<name>/<version>; "
            "predict also takes models:/m-<32 hex digits> (a logged model, as the MLflow UI "
            "shows it) and runs:/<run id>/model"
        )
    version = match.group("version")
    return match.group("name"), match.group("alias"), int(version) if version else None


def resolve_version(
    client: MlflowClient, name: str, alias: str | None = None, version: int | str | None = None
) -> ModelVersion:
    """The model version an alias points to, or a numbered version; errors name the fix."""
    if version is not None:
        try:
            return client.get_model_version(name, str(version))
        except MlflowException as error:
            raise LookupError(
                f"registered model {name!r} has no version {version} ({error.message}); list "
                f"them with MlflowClient().search_model_versions(\"name='{name}'\")"
            ) from error
    alias = alias or DEFAULT_ALIAS
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as error:
        raise LookupError(
            f"no version of registered model {name!r} holds the alias {alias!r} "
            f"({error.message}); promote one with `python search/registry.py --run-id RUN_ID "
            f"--name {name}`, or pass --version N"
        ) from error


class DamagedFileError(ValueError):
    """A model file that cannot be read as what it should be; the message names it."""


REFETCH = ("pull the version again (`python search/pull.py --version N --out DIR`) or copy "
           "the folder again")


def read_document(path: Path, parse: Callable[[str], Any] = json.loads) -> Any:
    """A JSON (or, with `yaml.safe_load`, YAML) file of a model folder; a damaged one is
    named, with what to do, instead of a bare parser error with no file in it."""
    try:
        return parse(path.read_text())
    except (ValueError, yaml.YAMLError, UnicodeDecodeError) as error:
        reason = " ".join(str(error).split())[:200]
        kind = "YAML" if parse is yaml.safe_load else "JSON"
        raise DamagedFileError(f"{path} is damaged (not valid {kind}: {reason}); "
                               f"{REFETCH}") from None


def keras_archive_problem(path: Path) -> str | None:
    """Why `path` is not a whole `.keras` archive (None when it is): unreadable, truncated
    or overwritten (every member's CRC is read), or without its config or weights."""
    try:
        with zipfile.ZipFile(path) as archive:
            broken = archive.testzip()
            names = set(archive.namelist())
    except Exception as error:  # noqa: BLE001 - whatever the bytes are, they are no model
        text = " ".join(str(error).split())[:200]
        return f"not a readable .keras archive ({type(error).__name__}: {text})"
    missing = {"config.json", "model.weights.h5"} - names
    if broken or missing:
        return (f"damaged ({broken or ', '.join(sorted(missing))} "
                f"{'fails its CRC' if broken else 'missing'})")
    return None


def mlmodel_metadata(model_dir: str | Path) -> dict[str, Any]:
    """The `metadata` block of an MLflow model folder's MLmodel file ({} if absent)."""
    mlmodel = Path(model_dir) / "MLmodel"
    if not mlmodel.is_file():
        raise FileNotFoundError(f"{model_dir} is not an MLflow model folder: no MLmodel file")
    return dict((read_document(mlmodel, yaml.safe_load) or {}).get("metadata") or {})


def keras_file(model_dir: str | Path) -> Path:
    """The `.keras` file inside an MLflow Keras model folder."""
    model_dir = Path(model_dir)
    spec = read_document(model_dir / "MLmodel", yaml.safe_load) or {}
    keras_flavor = (spec.get("flavors") or {}).get("keras")
    if keras_flavor is None:
        raise ValueError(f"{model_dir}/MLmodel has no keras flavor: not an MLflow Keras model")
    if keras_flavor.get("save_exported_model"):
        raise ValueError(
            f"{model_dir} holds a TF SavedModel export, not a .keras file; re-log the model with "
            "mlflow.keras.log_model(..., save_exported_model=False)"
        )
    data = model_dir / keras_flavor.get("data", "data")
    path = data / "model.keras" if data.is_dir() else data.with_suffix(".keras")
    if not path.is_file():
        raise FileNotFoundError(f"no Keras model file at {path}")
    return path


def load_keras_safely(model_dir: str | Path) -> keras.Model:
    """Load the model of an MLflow Keras folder with `safe_mode=True` (no lambda code runs)."""
    from search.quiet_start import start_tensorflow

    start_tensorflow()  # the first TF import of pull and predict: its start-up lines go
    import keras

    path = keras_file(model_dir)
    problem = keras_archive_problem(path)
    if problem:  # Keras would say "File not found" or blame safe mode
        raise DamagedFileError(f"{path} is {problem}; {REFETCH}")
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except (ValueError, TypeError) as error:
        text = str(error).splitlines()[0][:400]
        raise ValueError(
            f"{path} was refused: {text}. Models load in Keras safe mode (no code stored in "
            "the file runs), so a Lambda layer or an unregistered custom object cannot load; "
            "re-save the model with built-in layers only"
        ) from error


def run_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """The run's evaluation metrics (eval_val_*, eval_test_*, external ext_*, with their
    intervals) and the threshold."""
    metrics = client.get_run(run_id).data.metrics
    return {k: float(v) for k, v in sorted(metrics.items())
            if k.startswith(("eval_val_", "eval_test_", "ext_")) or k == "threshold"}


def run_data(client: MlflowClient, run_id: str) -> dict[str, str]:
    """What the run trained on, from its params (`data`, `data.n_*`, `data.fingerprint`)."""
    params = client.get_run(run_id).data.params
    return {k: v for k, v in params.items() if k == "data" or k.startswith("data.n_")}


def run_link(client: MlflowClient, run_id: str) -> str:
    """A clickable run address for a tracking server, else the runs:/ URI."""
    uri = redact_uri(mlflow.get_tracking_uri())
    if uri.startswith(("http://", "https://")):
        experiment = client.get_run(run_id).info.experiment_id
        return f"{uri.rstrip('/')}/#/experiments/{experiment}/runs/{run_id}"
    return f"runs:/{run_id}"


def version_info(client: MlflowClient, mv: ModelVersion, model_dir: Path) -> dict[str, Any]:
    """Everything known about a version: MLmodel metadata, version tags, run metrics."""
    metadata = mlmodel_metadata(model_dir)
    tags = dict(mv.tags or {})
    info: dict[str, Any] = {key: metadata.get(key) for key in METADATA_KEYS}
    for key in METADATA_KEYS:
        if info[key] is None and key in tags:
            info[key] = (json.loads(tags[key]) if key in tag_keys.VERSION_JSON_TAGS
                         else tags[key])
    if not info["class_names"] or not info["preprocessing"]:
        raise ValueError(
            f"model version {mv.name}/{mv.version} has no class_names/preprocessing metadata; "
            "it was not logged by search/training/trainer.py"
        )
    info.update({
        "name": mv.name,
        "version": int(mv.version),
        "aliases": sorted(mv.aliases or []),
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "source": mv.source,
        "run_id": mv.run_id,
        "run_uri": f"runs:/{mv.run_id}" if mv.run_id else None,
        "run_link": run_link(client, mv.run_id) if mv.run_id else None,
        "tracking_uri": redact_uri(mlflow.get_tracking_uri()),
        "description": mv.description,
        "version_tags": tags,
        "metrics": run_metrics(client, mv.run_id) if mv.run_id else {},
        "training_data": run_data(client, mv.run_id) if mv.run_id else {},
        "created": time.strftime(
            "%Y-%m-%d %H:%M:%S", time.gmtime(int(mv.creation_timestamp) / 1000)
        ) + " UTC",
    })
    return info


def download_version(mv: ModelVersion, dst: Path) -> Path:
    """Copy a version's MLflow model folder to `dst` (created)."""
    dst.mkdir(parents=True, exist_ok=True)
    path = mlflow.artifacts.download_artifacts(
        artifact_uri=f"models:/{mv.name}/{mv.version}", dst_path=str(dst)
    )
    return Path(path)


def run_config_text(client: MlflowClient, run_id: str) -> str | None:
    """The composed config YAML a run logged (config/config.yaml), if any."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "config/config.yaml", tmp)
        except (MlflowException, OSError):
            return None
        return Path(path).read_text()


CARD_FIGURES = ("evaluation/test_roc_pr.png", "evaluation/test_confusion.png")


def copy_figures(client: MlflowClient, run_id: str, folder: Path) -> list[str]:
    """The run's held-out ROC/PR curves and confusion matrix, for the model card."""
    copied = []
    for artifact in CARD_FIGURES:
        # MLflow puts a downloaded file at dst_path/<its base name>; the card links it by its
        # run-relative path (evaluation/...), so it goes in that sub-folder
        dest = folder / Path(artifact).parent
        try:
            dest.mkdir(parents=True, exist_ok=True)
            client.download_artifacts(run_id, artifact, str(dest))
            copied.append(artifact)
        except (MlflowException, OSError):  # a run without a test split has none
            continue
    return copied


def export_version(
    name: str = DEFAULT_MODEL_NAME,
    alias: str | None = None,
    version: int | str | None = None,
    out: str | Path | None = None,
    client: MlflowClient | None = None,
    overwrite: bool = True,
    force: bool = False,
) -> Path:
    """Export one registered version (by alias, default champion, or number) to a folder.

    An existing export of the same version is refreshed; one of another version is replaced
    only with ``force`` (never silently).

    Returns:
        The export folder (model/, model_info.json, config.yaml, MODEL_CARD.md).
    """
    client = client or MlflowClient()
    mv = resolve_version(client, name, alias, version)
    out = Path(out) if out else Path("exports") / f"{name}-v{mv.version}"
    if out.exists() and not (force and (out / INFO_FILE).is_file()):
        check_replaceable(out, mv, overwrite)
    # Written next to `out`, then renamed: a kill mid-export never leaves a half folder there.
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_src = download_version(mv, Path(tmp) / "download")
            partial.mkdir(parents=True)
            shutil.copytree(model_src, partial / MODEL_DIR)
        info = version_info(client, mv, partial / MODEL_DIR)
        info["alias_requested"] = None if version is not None else (alias or DEFAULT_ALIAS)
        info["exported"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC"
        config = run_config_text(client, mv.run_id) if mv.run_id else None
        if config is not None:
            (partial / CONFIG_FILE).write_text(config)
        info["figures"] = copy_figures(client, mv.run_id, partial) if mv.run_id else []
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        (partial / CARD_FILE).write_text(model_card(info, has_config=config is not None))
        load_keras_safely(partial / MODEL_DIR)  # fail now, not on the offline machine
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def check_replaceable(out: Path, mv: ModelVersion, overwrite: bool) -> None:
    """Refuse to replace a folder that is not an export of this same model version."""
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass another --out or remove it")
    if not (out / INFO_FILE).is_file():
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and is not a pulled model folder; use another --out"
            )
        return
    try:
        held = json.loads((out / INFO_FILE).read_text())
    except (OSError, ValueError):
        held = {}
    if (held.get("name"), held.get("version")) != (mv.name, int(mv.version)):
        raise FileExistsError(
            f"{out} holds {held.get('name')} v{held.get('version')}, not {mv.name} "
            f"v{mv.version}; pass another --out, or --force to replace it"
        )


def load_exported(folder: str | Path) -> LoadedModel:
    """Load a pulled folder (model_info.json) or a bare MLflow Keras model folder (MLmodel)."""
    folder = Path(folder)
    if (folder / INFO_FILE).is_file():
        info = read_document(folder / INFO_FILE)
        return LoadedModel(load_keras_safely(folder / MODEL_DIR), info, folder)
    if (folder / "MLmodel").is_file():
        info = mlmodel_metadata(folder)
        missing = [k for k in ("class_names", "preprocessing") if not info.get(k)]
        if missing:
            raise ValueError(
                f"{folder}/MLmodel metadata lacks {missing}; log models with "
                "search/training/trainer.py "
                "or pull a registered version with search/pull.py"
            )
        return LoadedModel(load_keras_safely(folder), info, folder)
    raise FileNotFoundError(
        f"{folder} is neither a pulled model folder ({INFO_FILE}) nor an MLflow model folder "
        "(MLmodel); pull one with `python search/pull.py --out DIR`"
    )


def is_store_uri(reference: str | Path) -> bool:
    """Whether a model reference needs the tracking store (models:/ or runs:/)."""
    return str(reference).strip().startswith(("models:/", "runs:/"))


def download_logged_model(uri: str, workdir: Path) -> LoadedModel:
    """A logged model (`models:/m-<id>`) or a run's model (`runs:/<id>/<path>`), downloaded
    with MLflow's own resolver and loaded like a bare MLflow model folder."""
    logged = LOGGED_MODEL_URI.match(uri)
    run = RUN_MODEL_URI.match(uri)
    try:
        run_id = (mlflow.get_logged_model(logged.group("model_id")).source_run_id if logged
                  else run.group("run_id"))
        folder = mlflow.artifacts.download_artifacts(artifact_uri=uri,
                                                     dst_path=str(workdir / "logged-model"))
    except MlflowException as error:
        kind = "logged model" if logged else "run model"
        raise LookupError(f"no {kind} {uri} in {redact_uri(mlflow.get_tracking_uri())} "
                          f"({error.message.splitlines()[0][:200]}); check the id, or pass "
                          "--tracking-uri of the store that logged it") from None
    loaded = load_exported(folder)
    loaded.info.update(model_uri=uri, run_id=run_id,
                       run_uri=f"runs:/{run_id}" if run_id else None)
    return loaded


def load_model_reference(reference: str | Path, workdir: str | Path | None = None) -> LoadedModel:
    """Load `models:/name@alias`, `models:/name/N`, `models:/m-<id>` (MLflow 3's logged
    model), `runs:/<id>/<path>`, a pulled folder or an MLflow model folder.

    Registry URIs are exported to `workdir` (a temporary folder if None) first, so predictions
    always go through the same files an offline user has.
    """
    text = str(reference).strip()
    if LOGGED_MODEL_URI.match(text) or RUN_MODEL_URI.match(text):
        workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pulled-"))
        return download_logged_model(text, workdir)
    if text.startswith("models:/"):
        name, alias, version = parse_model_uri(text)
        workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pulled-"))
        folder = export_version(name, alias=alias, version=version, out=workdir / "model-export")
        return load_exported(folder)
    return load_exported(Path(text))


def run_model_metadata(client: MlflowClient, run_id: str) -> dict[str, Any]:
    """The model metadata train.py logged as model_metadata.json."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "model_metadata.json", tmp)
        except (MlflowException, OSError) as error:
            raise FileNotFoundError(
                f"run {run_id} has no model_metadata.json: was it logged with "
                "tracking.log_model=true by search/training/trainer.py?"
            ) from error
        return json.loads(Path(path).read_text())
