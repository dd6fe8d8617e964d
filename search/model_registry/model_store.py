"""Registered models: URIs, versions and aliases, download, safe loading and metadata.

    models:/pneumonia-cnn@champion   models:/pneumonia-cnn/3   exports/pneumonia-cnn-v3/
    models:/m-<id> (MLflow 3's logged model)   runs:/<run id>/model

`export_model` writes a self-contained local folder for offline prediction from any model URI
(`export_version` for a registered version, `export_logged` for a logged or run model that may
never have been registered):

    model/            the MLflow Keras model (MLmodel, data/model.keras, input example)
    model_info.json   name, version, aliases, run link, class names, preprocessing, threshold,
                      data fingerprint, config hash, metrics
    config.yaml       the run's composed Hydra config
    MODEL_CARD.md     the same, for humans (`search.model_registry.model_card`)

`parse_reference` is the one reading of a model reference that pull, predict and serve share;
`load_model_reference` loads a store URI (through such an export), a pulled folder or a bare
MLflow Keras model folder. Models are always loaded from the
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
            "pull and predict also take models:/m-<32 hex digits> (a logged model, as the "
            "MLflow UI shows it) and runs:/<run id>/model"
        )
    version = match.group("version")
    return match.group("name"), match.group("alias"), int(version) if version else None


@dataclass(frozen=True)
class ModelReference:
    """What a model reference names: a registered version (name with alias or version), a
    logged model (model_id), a run's model (run_id and path) or a local folder."""

    text: str
    kind: str  # "registry", "logged", "run" or "folder"
    name: str | None = None
    alias: str | None = None
    version: int | None = None
    model_id: str | None = None
    run_id: str | None = None
    path: str | None = None


def parse_reference(reference: str | Path) -> ModelReference:
    """Read `models:/name@alias`, `models:/name/N`, `models:/m-<id>`, `runs:/<id>/<path>` or
    a folder; a malformed URI raises ValueError naming the forms."""
    text = str(reference).strip()
    if logged := LOGGED_MODEL_URI.match(text):
        return ModelReference(text, "logged", model_id=logged.group("model_id"))
    if run := RUN_MODEL_URI.match(text):
        return ModelReference(text, "run", run_id=run.group("run_id"), path=run.group("path"))
    if text.startswith("runs:/"):
        raise ValueError(f"{text!r} names no model path; expected runs:/<run id>/<path> (the "
                         "trainer logs its model as runs:/<run id>/model)")
    if text.startswith("models:/"):
        name, alias, version = parse_model_uri(text)
        return ModelReference(text, "registry", name=name, alias=alias, version=version)
    return ModelReference(text, "folder")


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
    """The run's evaluation metrics (eval_val_*, eval_test_*, external ext_*) and the
    threshold, with each metric's interval as `<metric>_ci_low/_ci_high` (the keys
    model_info.json and the card have always held) read from the run's JSON artifacts."""
    metrics = {k: float(v) for k, v in client.get_run(run_id).data.metrics.items()
               if k.startswith(("eval_val_", "eval_test_", "ext_")) or k == "threshold"}
    # Runs logged before intervals left the metric series still carry them as metrics.
    found = {k: v for k, v in run_intervals(client, run_id).items()
             if k.rsplit("_ci_", 1)[0] in metrics}  # only beside a logged point value
    return dict(sorted({**found, **metrics}.items()))


def run_intervals(client: MlflowClient, run_id: str) -> dict[str, float]:
    """A run's 95 % intervals as `<metric>_ci_low/_ci_high`, from its
    `evaluation/<split>_intervals.json` artifacts; {} for a run without them."""
    from search.evaluation.intervals import artifact_split, flat_intervals, metric_prefix

    try:
        paths = [f.path for f in client.list_artifacts(run_id, "evaluation")]
    except (MlflowException, OSError):  # no artifacts (yet): the point values stand alone
        return {}
    found: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for path in paths:
            split = artifact_split(path)
            if split is not None:
                local = Path(client.download_artifacts(run_id, path, tmp))
                found.update(flat_intervals(json.loads(local.read_text()), metric_prefix(split)))
    return found


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
        **run_fields(client, mv.run_id),
        "description": mv.description,
        "version_tags": tags,
        "created": utc_time(mv.creation_timestamp),
    })
    return info


def utc_time(milliseconds: int | float) -> str:
    """An MLflow timestamp (ms) as `YYYY-mm-dd HH:MM:SS UTC`."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(int(milliseconds) / 1000)) + " UTC"


def run_fields(client: MlflowClient, run_id: str | None) -> dict[str, Any]:
    """What an export records of the model's source run: ids, link, store, metrics, data."""
    return {
        "run_id": run_id,
        "run_uri": f"runs:/{run_id}" if run_id else None,
        "run_link": run_link(client, run_id) if run_id else None,
        "tracking_uri": redact_uri(mlflow.get_tracking_uri()),
        "metrics": run_metrics(client, run_id) if run_id else {},
        "training_data": run_data(client, run_id) if run_id else {},
    }


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


def export_model(
    reference: str | Path,
    out: str | Path | None = None,
    client: MlflowClient | None = None,
    force: bool = False,
) -> Path:
    """Export what a model URI names (any form `parse_reference` reads) to a folder.

    Returns:
        The export folder (model/, model_info.json, config.yaml, MODEL_CARD.md, figures).
    """
    ref = parse_reference(reference)
    if ref.kind == "registry":
        return export_version(str(ref.name), alias=ref.alias,
                              version=ref.version, out=out, client=client, force=force)
    if ref.kind == "folder":
        raise ValueError(
            f"{ref.text!r} is not a model URI; pull takes models:/<name>@<alias>, "
            "models:/<name>/<version>, models:/m-<id> or runs:/<run id>/<path>"
            + (" (that folder is already a model: predict takes it as it is)"
               if Path(ref.text).is_dir() else ""))
    return export_logged(ref, out, client, force)


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
        check_replaceable(out, f"{mv.name} v{mv.version}", overwrite)

    def describe(model_dir: Path) -> dict[str, Any]:
        info = version_info(client, mv, model_dir)
        info["alias_requested"] = None if version is not None else (alias or DEFAULT_ALIAS)
        return info

    return write_export(out, client, lambda dst: download_version(mv, dst), describe)


def write_export(out: Path, client: MlflowClient, download: Callable[[Path], Path],
                 describe: Callable[[Path], dict[str, Any]]) -> Path:
    """Download a model and write its export folder: model/, model_info.json (``describe``'s
    info), the run's config.yaml and card figures, MODEL_CARD.md; checked to load."""
    # Written next to `out`, then renamed: a kill mid-export never leaves a half folder there.
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_src = download(Path(tmp) / "download")
            partial.mkdir(parents=True)
            shutil.copytree(model_src, partial / MODEL_DIR)
        info = describe(partial / MODEL_DIR)
        info["exported"] = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()) + " UTC"
        run_id = info.get("run_id")
        config = run_config_text(client, run_id) if run_id else None
        if config is not None:
            (partial / CONFIG_FILE).write_text(config)
        info["figures"] = copy_figures(client, run_id, partial) if run_id else []
        (partial / INFO_FILE).write_text(json.dumps(info, indent=2, default=str))
        (partial / CARD_FILE).write_text(card_text(info, has_config=config is not None))
        load_keras_safely(partial / MODEL_DIR)  # fail now, not on the offline machine
        if out.exists():
            shutil.rmtree(out)
        os.replace(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


def export_identity(info: dict[str, Any]) -> str:
    """What an export holds, in words: `name vN` for a registered version, else the logged
    model's id (or the run URI it came from)."""
    if info.get("version") is not None:
        return f"{info.get('name')} v{info.get('version')}"
    return str(info.get("model_id") or info.get("model_uri"))


def check_replaceable(out: Path, identity: str, overwrite: bool) -> None:
    """Refuse to replace a folder that is not an export of this same model (``identity``,
    as `export_identity` words it)."""
    if not overwrite:
        raise FileExistsError(f"{out} exists; pass another --out or remove it")
    if not (out / INFO_FILE).is_file():
        if any(out.iterdir()):
            raise FileExistsError(
                f"{out} exists and is not a pulled model folder; use another --out"
            )
        return
    try:
        held = export_identity(json.loads((out / INFO_FILE).read_text()))
    except (OSError, ValueError):
        held = "an unreadable export"
    if held != identity:
        raise FileExistsError(
            f"{out} holds {held}, not {identity}; pass another --out, or --force to replace it"
        )


# ---------------------------------------------------------------------------------------------
# Logged models (MLflow 3's models:/m-<id>) and run models (runs:/<id>/<path>), registered or not


def find_logged_model(client: MlflowClient, ref: ModelReference) -> tuple[Any, str]:
    """The LoggedModel a logged-model or run URI names (None for a run artifact that is no
    logged model) and its source run; an unknown one raises LookupError naming the URI."""
    store = redact_uri(mlflow.get_tracking_uri())
    try:
        if ref.kind == "logged":
            logged = client.get_logged_model(str(ref.model_id))
            return logged, logged.source_run_id
        experiment = client.get_run(str(ref.run_id)).info.experiment_id
    except MlflowException as error:
        kind = "logged model" if ref.kind == "logged" else "run"
        raise LookupError(
            f"no {kind} {ref.text} in {store} ({error.message.splitlines()[0][:200]}); "
            "check the id (the MLflow UI shows it on the run's page), or pass --tracking-uri "
            "of the store that logged it") from None
    found = client.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"source_run_id = '{ref.run_id}' AND name = '{ref.path}'")
    return (found[0] if found else None), str(ref.run_id)


def download_logged(ref: ModelReference, dst: Path) -> Path:
    """A logged or run model's MLflow folder, with MLflow's own resolver, into ``dst``."""
    dst.mkdir(parents=True, exist_ok=True)
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=ref.text,
                                                        dst_path=str(dst)))
    except (MlflowException, OSError) as error:
        reason = getattr(error, "message", None) or str(error)
        raise LookupError(
            f"no model at {ref.text} in {redact_uri(mlflow.get_tracking_uri())} "
            f"({reason.splitlines()[0][:200]}); a run's model path is its name under the "
            "run's logged models (the trainer's is runs:/<run id>/model)") from None


def registered_as(client: MlflowClient, logged: Any, run_id: str) -> list[str]:
    """The registered versions made from this logged model, as `models:/name/N` URIs."""
    if logged is None:
        return []
    versions = client.search_model_versions(f"run_id = '{run_id}'")
    # a SQLite store leaves model_id empty on versions; their source is the logged model's URI
    return sorted(f"models:/{mv.name}/{mv.version}" for mv in versions
                  if logged.model_id in (mv.model_id, (mv.source or "").removeprefix("models:/")))


def logged_info(client: MlflowClient, ref: ModelReference, logged: Any, run_id: str,
                model_dir: Path) -> dict[str, Any]:
    """What an export of a logged or run model records: the MLmodel metadata the trainer
    wrote, the source run's fields, and where (if anywhere) it was registered."""
    metadata = mlmodel_metadata(model_dir)
    info: dict[str, Any] = {key: metadata.get(key) for key in METADATA_KEYS}
    if not info["class_names"] or not info["preprocessing"]:
        raise ValueError(f"{ref.text} has no class_names/preprocessing metadata; it was not "
                         "logged by search/training/trainer.py")
    created = (logged.creation_timestamp if logged is not None
               else client.get_run(run_id).info.start_time)
    info.update({
        "name": logged.name if logged is not None else ref.path,
        "version": None,
        "aliases": [],
        "registered_as": registered_as(client, logged, run_id),
        "model_uri": ref.text,
        "model_id": logged.model_id if logged is not None else None,
        "source": logged.artifact_location if logged is not None else ref.text,
        **run_fields(client, run_id),
        "description": None,
        "version_tags": {},
        "created": utc_time(created),
    })
    return info


def export_logged(ref: ModelReference, out: str | Path | None = None,
                  client: MlflowClient | None = None, force: bool = False) -> Path:
    """Export a logged model or a run's model, registered or not, like a registered version
    (same files; the info and card say where it is registered, if anywhere)."""
    client = client or MlflowClient()
    logged, run_id = find_logged_model(client, ref)
    default = (ref.model_id or (logged.model_id if logged is not None else None)
               or f"run-{run_id}-{re.sub(r'[^A-Za-z0-9._-]+', '_', str(ref.path))}")
    out = Path(out) if out else Path("exports") / default
    identity = logged.model_id if logged is not None else ref.text
    if out.exists() and not (force and (out / INFO_FILE).is_file()):
        check_replaceable(out, identity, overwrite=True)
    return write_export(out, client, lambda dst: download_logged(ref, dst),
                        lambda model_dir: logged_info(client, ref, logged, run_id, model_dir))


def card_text(info: dict[str, Any], has_config: bool) -> str:
    """MODEL_CARD.md of an export; for a model outside the registry, the card's registry lines
    (title version, aliases, registry URI, registration date) say where it stands instead."""
    card = model_card(info, has_config)
    if info.get("version") is not None:
        return card
    where = ", ".join(info.get("registered_as") or [])
    status = f"yes, as {where}" if where else "no"
    what = " ".join(filter(None, ["logged model", info.get("model_id")]))
    replace = {
        "# ": f"# {info['name']} ({what}{'' if where else ', not registered'})",
        "Aliases:": f"Registered: {status}."
                    + ("" if where else " Register it with `python search/registry.py --run-id "
                       f"{info.get('run_id')}`."),
        "| registry URI |": f"| model URI | `{info['model_uri']}` |",
        "| registered |": f"| registered | {status} (logged {info.get('created')}) |",
    }
    lines = card.split("\n")
    for prefix, text in replace.items():
        at = next(i for i, line in enumerate(lines) if line.startswith(prefix))
        lines[at] = text
    return "\n".join(lines)


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


def load_model_reference(reference: str | Path, workdir: str | Path | None = None) -> LoadedModel:
    """Load `models:/name@alias`, `models:/name/N`, `models:/m-<id>` (MLflow 3's logged
    model), `runs:/<id>/<path>`, a pulled folder or an MLflow model folder.

    Store URIs are exported (`export_model`, as pull does) to `workdir` (a temporary folder if
    None) first, so predictions always go through the same files an offline user has.
    """
    ref = parse_reference(reference)
    if ref.kind == "folder":
        return load_exported(Path(ref.text))
    workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="pulled-"))
    return load_exported(export_model(ref.text, out=workdir / "model-export"))


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
