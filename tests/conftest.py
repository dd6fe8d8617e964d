"""Shared pytest fixtures. Keep one section per package; tests compose configs with compose()."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest


@pytest.fixture(scope="session", autouse=True)
def split_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The session's own split cache (data.splits), shared by every command the tests run,
    so tests never write into the user's ~/.cache."""
    folder = tmp_path_factory.mktemp("split-cache")
    saved = os.environ.get("XRAY_CACHE_DIR")
    os.environ["XRAY_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("XRAY_CACHE_DIR", None)
    else:
        os.environ["XRAY_CACHE_DIR"] = saved


# ----------------------------------------------------------------------------------------------
# data: the real shared files (skipped cleanly where the shared folder is absent) and small npz
# files written per test.
# ----------------------------------------------------------------------------------------------

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CHEST_XRAY_SAMPLE = SHARED_DATA / "chest_xray_sample"


@pytest.fixture(scope="session")
def chest_xray_sample_files() -> list[Path]:
    """The 16 real JPEGs of chest_xray/val/{NORMAL,PNEUMONIA} (skips if not available)."""
    files = sorted(CHEST_XRAY_SAMPLE.glob("val/*/*.jpeg"))
    if not files:
        pytest.skip(f"real chest X-ray sample not found under {CHEST_XRAY_SAMPLE}")
    return files


@pytest.fixture
def chest_xray_tree(tmp_path: Path, chest_xray_sample_files: list[Path]) -> Path:
    """A writable copy of the sample: tmp/chest_xray/val/{NORMAL,PNEUMONIA}/*.jpeg; returns root."""
    root = tmp_path / "chest_xray"
    for source in chest_xray_sample_files:
        target = root / "val" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    return root


DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_cause_tree(root: Path, sample_files: list[Path]) -> Path:
    """The 16 real X-rays plus a DERIVED viral class, as root/val/{NORMAL,PNEUMONIA}/.

    The sample holds only normal and bacterial cases: each pneumonia image, mirrored
    left-right, is saved again under a viral file name (`person9NNN_virus_K.jpeg`, a new
    patient id). The images are real; their viral label is not.
    """
    from PIL import Image, ImageOps

    for i, source in enumerate(sample_files):
        target = root / "val" / source.parent.name / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes())
        if source.parent.name == "PNEUMONIA":
            ImageOps.mirror(Image.open(source)).save(
                target.parent / f"person{9000 + i}_virus_{i}.jpeg", quality=95)
    return root


def digit_images(n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits (0-16) as uint8 28x28 images (never downloaded)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits(n_class=n_classes)
    small = (bunch.images * (255 / 16)).round().astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(im).resize((28, 28), Image.BILINEAR))
                    for im in small])
    return big, bunch.target.astype(np.int64)


def write_digits_tree(root: Path, n_classes: int) -> Path:
    """Digits as root/<name>/<k>.png, RGB (a random tint per image, so colour is real)."""
    from PIL import Image

    images, labels = digit_images(n_classes)
    tints = np.random.default_rng(0).uniform(0.5, 1.0, size=(len(images), 3))
    for k, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / DIGIT_NAMES[label]
        folder.mkdir(parents=True, exist_ok=True)
        rgb = (image[..., None] * tints[k]).round().astype(np.uint8)
        Image.fromarray(rgb, "RGB").save(folder / f"{k}.png")
    return root


@pytest.fixture
def make_npz(tmp_path: Path) -> Callable[..., Path]:
    """Factory writing a MedMNIST-layout npz in tmp: ``make_npz(train_images=..., ...) -> path``."""
    counter = iter(range(1_000_000))

    def write(**arrays: np.ndarray) -> Path:
        path = tmp_path / f"data_{next(counter)}.npz"
        np.savez(path, **arrays)
        return path

    return write


# ----------------------------------------------------------------------------------------------
# search: configs composed from conf/ and a real MLflow SQLite store holding trained, logged
# runs (registry, pull and predict tests).
# ----------------------------------------------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
# A CNN that trains in seconds on 10% of the built-in PneumoniaMNIST (test split ~47 images):
# conf/debug/tiny.yaml, the tiny run tests and benchmarks share.
TINY_RUN = ("+debug=tiny",)


@pytest.fixture(scope="session")
def compose_cfg() -> Callable[..., Any]:
    """``compose_cfg(*overrides)`` -> the DictConfig search/run.py would get (no hydra key)."""
    from hydra import compose, initialize_config_dir

    def make(*overrides: str, config_name: str = "config") -> Any:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose(config_name, overrides=list(overrides))

    return make


def log_run_like_train(cfg: Any, invert_labels: bool, epochs: int) -> tuple[str, Any]:
    """Train a CNN outside search.training.trainer.train (e.g. on inverted labels: a poor
    model) and log it with train.py's own functions, so the run looks exactly like a trial's."""
    import keras
    import mlflow
    from hydra.utils import instantiate

    from search.tracking import mlflow_runs as tracking
    from search.training.trainer import (
        compile_model,
        config_hash,
        evaluate_and_log,
        log_keras_model,
    )

    data = instantiate(cfg.data, seed=int(cfg.seed), _convert_="all")
    keras.utils.set_random_seed(int(cfg.seed))
    model = instantiate(cfg.model, input_shape=tuple(data.input_shape), num_classes=2)
    compile_model(model, keras.optimizers.Adam(1e-3), binary=True)
    train = data.train.map(lambda x, y: (x, 1.0 - y)) if invert_labels else data.train
    model.fit(train, steps_per_epoch=data.steps_per_epoch, epochs=epochs, verbose=0,
              shuffle=False)  # the tf.data pipeline shuffles, as in train.py
    tracking.setup_tracking(cfg.tracking)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:
        tracking.log_run_context(cfg)
        mlflow.log_params({"data.fingerprint": data.fingerprint, "config_hash": config_hash(cfg)})
        results = evaluate_and_log(cfg, model, data, binary=True)
        log_keras_model(cfg, model, data, results)
    return run.info.run_id, model


@dataclass
class TrainedStore:
    """A SQLite MLflow store with three finished runs logged the way the trainer logs."""

    root: Path
    good_run_id: str  # search.training.trainer.train, 2 epochs: held-out ROC AUC ~0.85+
    poor_run_id: str  # same config and data, trained on inverted labels: ROC AUC << 0.5
    other_data_run_id: str  # another data seed (other split, other fingerprint)
    good_checkpoint: Path  # the good run's best.keras, as train() left it
    poor_model: Any  # the poor run's Keras model, still in memory

    @property
    def db(self) -> Path:
        return self.root / "mlflow.db"


@pytest.fixture(scope="session")
def trained_store(tmp_path_factory: pytest.TempPathFactory, compose_cfg: Callable[..., Any]
                  ) -> Iterator[TrainedStore]:
    """Train and log the three runs once per session (~30 s on 2 CPU cores)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from search.training.trainer import train

    root = tmp_path_factory.mktemp("trained-store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    common = (*TINY_RUN, f"tracking.artifact_root={(root / 'artifacts').as_uri()}",
              "tracking.experiment=registry-tests")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        train(compose_cfg(*common, "seed=3", "tracking.run_name=good"), output_dir=root / "good")
        good = MlflowClient(uri).search_runs(
            [mlflow.get_experiment_by_name("registry-tests").experiment_id],
            filter_string="attributes.run_name = 'good'",
        )[0].info.run_id
        poor, poor_model = log_run_like_train(
            compose_cfg(*common, "seed=3", "tracking.run_name=poor"), invert_labels=True, epochs=2
        )
        other, _ = log_run_like_train(
            compose_cfg(*common, "seed=4", "tracking.run_name=other-data"),
            invert_labels=False, epochs=1,
        )
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
    yield TrainedStore(root, good, poor, other, root / "good" / "checkpoints" / "best.keras",
                       poor_model)


@dataclass
class StoreCopy:
    """A private copy of the trained store's database (artifacts stay shared, read-only)."""

    db: Path
    runs: TrainedStore

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.db}"

    def new_parent_run(self, **tags: str) -> str:
        """A finished run standing for a sweep's parent run."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name("registry-tests").experiment_id
        run = client.create_run(experiment, tags={"sweep.parent": "true", **tags})
        client.set_terminated(run.info.run_id)
        return run.info.run_id


@pytest.fixture
def registry_store(tmp_path: Path, trained_store: TrainedStore,
                   monkeypatch: pytest.MonkeyPatch) -> Iterator[StoreCopy]:
    """The trained store with an empty registry, private to one test and made current."""
    import mlflow

    copy = StoreCopy(tmp_path / "mlflow.db", trained_store)
    shutil.copyfile(trained_store.db, copy.db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", copy.uri)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    mlflow.set_tracking_uri(copy.uri)
    mlflow.set_registry_uri(copy.uri)
    yield copy
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


@pytest.fixture(scope="module")
def pg():
    """A throw-away PostgreSQL (tests/stack's) with `optuna` and `mlflow` databases, one per
    test module; its random password is the secret the secrets tests look for."""
    from tests.stack.conftest import start_postgres

    server, stop = start_postgres(("optuna", "mlflow"))
    try:
        yield server
    finally:
        stop()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    """Headless Chromium (Debian's, installed with apt when missing) driven by Playwright:
    the browser a user opens the printed addresses in. Playwright's own browser download is
    never used (tests never download)."""
    from playwright.sync_api import sync_playwright

    from tests.stack.conftest import debian_package

    executable = debian_package("/usr/bin/chromium", "chromium")
    with sync_playwright() as playwright:
        # root cannot use Chromium's sandbox; the pages are the tests' own local servers
        chromium = playwright.chromium.launch(executable_path=str(executable),
                                              args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()
