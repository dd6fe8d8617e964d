"""pull + predict: offline export, training preprocessing, labels, corrupt inputs, Grad-CAM."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import keras
import mlflow
import numpy as np
import pytest
import yaml

from data.loaders import BUILTIN_NPZ
from models import build_cnn
from models.precision import as_float32
from search import predict as pr
from search import pull
from search.evaluation import inputs
from search.evaluation.calibration import Calibration, fold_into_output
from search.model_registry import model_store
from search.model_registry import registration as registry
from search.model_registry.model_store import LoadedModel
from tests.faults.permissions import ordinary_user  # noqa: F401 - fixture

CLASSES = ["normal", "pneumonia"]


@pytest.fixture(scope="module")
def val_xrays() -> tuple[np.ndarray, np.ndarray]:
    """48 real PneumoniaMNIST val images (uint8 28x28) and labels (N, 1), both classes."""
    with np.load(BUILTIN_NPZ) as archive:
        return archive["val_images"][:48], archive["val_labels"][:48]


@pytest.fixture(scope="module")
def tiny_model() -> LoadedModel:
    """An untrained CNN with the metadata train.py stores (threshold 0.5)."""
    keras.utils.set_random_seed(0)
    model = build_cnn((28, 28, 1), 2, depth=2, base_filters=8, dense_units=16)
    info = {"class_names": CLASSES, "threshold": 0.5,
            "preprocessing": {"image_size": 28, "channels": 1, "scale": 1 / 255}}
    return LoadedModel(model, info, Path("."))


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_probabilities(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """P(pneumonia) computed by hand: at 28x28x1 the pipeline is exactly uint8 / 255."""
    x = images.astype(np.float32)[..., np.newaxis] / 255.0
    return model.predict(x, verbose=0)[:, 0]


# ---------------------------------------------------------------------------------------------
# Inputs and outputs (fast: an in-memory model)


def test_npz_default_key_labels_metrics(tiny_model, val_xrays, make_npz, tmp_path):
    images, labels = val_xrays
    path = make_npz(train_images=images[:4], train_labels=labels[:4], test_images=images,
                    test_labels=labels)
    result = pr.predict(tiny_model, path, tmp_path / "out")
    rows = read_csv(result.files["predictions"])
    assert [r["index"] for r in rows] == [str(i) for i in range(48)]  # test_images chosen
    p = np.array([float(r["p_pneumonia"]) for r in rows])
    np.testing.assert_allclose(p, expected_probabilities(tiny_model.model, images), atol=1e-6)
    np.testing.assert_allclose(p + [float(r["p_normal"]) for r in rows], 1.0, atol=1e-6)
    assert [r["predicted_label"] for r in rows] == [CLASSES[int(v >= 0.5)] for v in p]
    assert [r["true_label"] for r in rows] == [CLASSES[int(v)] for v in labels[:, 0]]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["n"] == 48 and metrics["threshold"] == 0.5
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        assert 0.0 <= metrics["metrics"][key] <= 1.0
    matrix = np.array(metrics["confusion_matrix"]["matrix"])
    assert matrix.sum() == 48 and matrix.sum(axis=1).tolist() == np.bincount(
        labels[:, 0], minlength=2).tolist()
    assert (tmp_path / "out" / "confusion.png").stat().st_size > 0


def test_npz_key_choice_and_errors(tiny_model, val_xrays, make_npz, tmp_path):
    images, labels = val_xrays
    path = make_npz(val_images=images[:5], val_labels=labels[:5], train_images=images[:3])
    rows = pr.predict(tiny_model, path, tmp_path / "a").rows  # first *_images, its labels
    assert len(rows) == 5 and all(r["true_label"] for r in rows)
    rows = pr.predict(tiny_model, path, tmp_path / "b", npz_key="train_images").rows
    assert len(rows) == 3 and not any(r["true_label"] for r in rows)  # no train_labels: unlabelled
    assert not (tmp_path / "b" / "metrics.json").exists()
    with pytest.raises(KeyError, match="nope"):
        pr.predict(tiny_model, path, tmp_path / "c", npz_key="nope")
    with pytest.raises(KeyError, match="missing_labels"):
        pr.predict(tiny_model, path, tmp_path / "c", labels_key="missing_labels")
    bad = make_npz(test_images=images[:2], test_labels=np.array([[0], [5]]))
    with pytest.raises(ValueError, match="outside"):
        pr.predict(tiny_model, bad, tmp_path / "d")


def test_folder_labels_corrupt_files_and_gradcam(tiny_model, chest_xray_tree, tmp_path):
    normal = chest_xray_tree / "val" / "NORMAL"
    real = sorted(normal.glob("*.jpeg"))[0].read_bytes()
    (normal / "broken.jpeg").write_bytes(b"this is not an image")
    (normal / "truncated.jpeg").write_bytes(real[: len(real) // 3])
    (normal / "notes.txt").write_text("ignored: not an image suffix")
    result = pr.predict(tiny_model, chest_xray_tree, tmp_path / "out", gradcam=True)

    skipped = {Path(key).name for key, _ in result.skipped}
    assert skipped == {"broken.jpeg", "truncated.jpeg"}
    rows = read_csv(result.files["predictions"])
    assert len(rows) == 16
    labels = {Path(r["path"]).parent.name: r["true_label"] for r in rows}
    assert labels == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}  # case-insensitive match
    skipped_rows = read_csv(result.files["skipped"])
    assert {Path(r["path"]).name for r in skipped_rows} == skipped and all(
        r["error"] for r in skipped_rows)
    assert result.metrics["n"] == 16
    assert np.array(result.metrics["confusion_matrix"]["matrix"]).sum() == 16

    pngs = sorted((tmp_path / "out" / "gradcam").glob("*.png"))
    assert len(pngs) == 16
    from PIL import Image

    with Image.open(pngs[0]) as overlay:
        assert overlay.mode == "RGB" and max(overlay.size) == inputs.DISPLAY_SIZE
    page = (tmp_path / "out" / "gradcam" / "index.html").read_text()
    assert page.count("<img ") == 16 and "person" in page


def test_single_image_without_label(tiny_model, chest_xray_sample_files, tmp_path):
    image = chest_xray_sample_files[0]
    result = pr.predict(tiny_model, image, tmp_path / "out")
    assert len(result.rows) == 1 and result.rows[0]["path"] == str(image)
    assert result.rows[0]["true_label"] == "" and result.metrics is None
    from data.pipeline import preprocess_for_model

    x = preprocess_for_model(image.read_bytes(), 28, 1).numpy()[np.newaxis]
    expected = float(tiny_model.model.predict(x, verbose=0)[0, 0])
    assert result.rows[0]["p_pneumonia"] == pytest.approx(expected, abs=1e-6)


def test_cli_on_an_mlflow_model_folder(tiny_model, val_xrays, make_npz, tmp_path, capsys,
                                       monkeypatch):
    folder = tmp_path / "mlflow-model"
    mlflow.keras.save_model(tiny_model.model, str(folder), metadata=tiny_model.info,
                            pip_requirements=["keras"])  # skip the slow requirement inference
    images, labels = val_xrays
    path = make_npz(test_images=images[:10], test_labels=labels[:10])
    assert pr.main([str(folder), str(path), "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "10 prediction(s)" in out and "ROC AUC" in out
    monkeypatch.chdir(tmp_path)
    assert pr.main([str(tmp_path / "nowhere"), str(path)]) == 2
    assert not (tmp_path / "predictions").exists()  # nothing written for a bad model path


def test_pull_reports_a_missing_alias(tmp_path, capsys, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    try:
        assert pull.main(["--alias", "champion", "--tracking-uri", uri]) == 2
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert "search/registry.py" in capsys.readouterr().err
    assert model_store.parse_model_uri("models:/m@champion") == ("m", "champion", None)
    assert model_store.parse_model_uri("models:/m/4") == ("m", None, 4)
    with pytest.raises(ValueError, match="registry URI"):
        model_store.parse_model_uri("runs:/abc/model")


# ---------------------------------------------------------------------------------------------
# Through the registry (slow: the trained store)


@pytest.mark.slow
def test_pull_then_predict_matches_the_in_memory_models(registry_store, val_xrays, make_npz,
                                                        tmp_path):
    runs = registry_store.runs
    good = registry.register_and_promote(runs.good_run_id)
    poor = registry.register_and_promote(runs.poor_run_id)
    assert good.alias == "champion" and poor.alias == "challenger"

    folder = tmp_path / "champion"
    assert pull.main(["--out", str(folder), "--tracking-uri", registry_store.uri]) == 0
    info = json.loads((folder / "model_info.json").read_text())
    run = mlflow.get_run(runs.good_run_id)
    assert info["version"] == good.version and info["aliases"] == ["champion"]
    assert info["alias_requested"] == "champion" and info["run_id"] == runs.good_run_id
    assert info["class_names"] == CLASSES and info["preprocessing"]["image_size"] == 28
    assert info["threshold"] == pytest.approx(run.data.metrics["threshold"])
    assert info["data_fingerprint"] == run.data.params["data.fingerprint"]
    assert info["config_hash"] == run.data.params["config_hash"]
    assert info["metrics"]["eval_test_roc_auc"] == pytest.approx(
        run.data.metrics["eval_test_roc_auc"])
    assert yaml.safe_load((folder / "config.yaml").read_text())["seed"] == 3
    assert (folder / "model" / "MLmodel").is_file()
    card = (folder / "MODEL_CARD.md").read_text()
    for text in (f"v{good.version}", "champion", f"runs:/{runs.good_run_id}", "roc_auc",
                 info["data_fingerprint"], info["config_hash"], "promotion.decision"):
        assert text in card, text

    images, labels = val_xrays
    path = make_npz(test_images=images, test_labels=labels)
    mlflow.set_tracking_uri("sqlite:////nonexistent/offline.db")  # the folder needs no store
    result = pr.predict(folder, path, tmp_path / "pred-champion")
    p = np.array([r["p_pneumonia"] for r in result.rows])
    # the served model is the checkpoint, in float32 (it may have trained in mixed precision),
    # with the recorded val calibration folded in
    checkpoint = as_float32(keras.models.load_model(runs.good_checkpoint, safe_mode=True))
    assert fold_into_output(checkpoint, Calibration.from_record(info["calibration"]))
    np.testing.assert_allclose(p, expected_probabilities(checkpoint, images), atol=1e-6)
    threshold = info["threshold"]
    assert [r["predicted_label"] for r in result.rows] == [CLASSES[int(v >= threshold)] for v in p]

    mlflow.set_tracking_uri(registry_store.uri)
    result = pr.predict(f"models:/pneumonia-cnn/{poor.version}", path, tmp_path / "pred-poor")
    p = np.array([r["p_pneumonia"] for r in result.rows])
    np.testing.assert_allclose(p, expected_probabilities(runs.poor_model, images), atol=1e-6)


@pytest.mark.slow
def test_predict_cli_registry_uri_folder_gradcam(registry_store, chest_xray_tree, tmp_path,
                                                 capsys):
    registry.register_and_promote(registry_store.runs.good_run_id)
    out = tmp_path / "out"
    code = pr.main(["models:/pneumonia-cnn@champion", str(chest_xray_tree), "--out", str(out),
                    "--gradcam", "--tracking-uri", registry_store.uri])
    assert code == 0
    printed = capsys.readouterr().out
    assert "16 prediction(s)" in printed and "Grad-CAM contact sheet" in printed
    assert len(read_csv(out / "predictions.csv")) == 16
    assert json.loads((out / "metrics.json").read_text())["n"] == 16
    assert (out / "gradcam" / "index.html").read_text().count("<img ") == 16


@pytest.mark.slow
def test_predict_takes_mlflow_3_logged_model_and_run_uris(registry_store, val_xrays, make_npz,
                                                         tmp_path, capsys):
    """`models:/m-<id>` (the URI the MLflow UI and the run's best_model_uri show) and
    `runs:/<id>/model` predict like the registered version of the same model."""
    runs = registry_store.runs
    logged = mlflow.get_run(runs.good_run_id).data.tags["best_model_uri"]
    assert re.fullmatch(r"models:/m-[0-9a-f]{32}", logged), logged
    version = registry.register_and_promote(runs.good_run_id).version
    images, labels = val_xrays
    path = make_npz(test_images=images[:8], test_labels=labels[:8])
    answers = {}
    for uri in (logged, f"runs:/{runs.good_run_id}/model", f"models:/pneumonia-cnn/{version}"):
        out = tmp_path / re.sub(r"\W+", "_", uri)
        code = pr.main([uri, str(path), "--out", str(out), "--tracking-uri", registry_store.uri])
        assert code == 0, capsys.readouterr().err
        answers[uri] = [float(r["p_pneumonia"]) for r in read_csv(out / "predictions.csv")]
        model = json.loads((out / "metrics.json").read_text())["model"]
        assert model["model_uri"] == uri and model["run_id"] == runs.good_run_id, model
    assert len(set(map(tuple, answers.values()))) == 1, answers  # one model, three names
    unknown = "models:/m-" + "0" * 32
    assert pr.main([unknown, str(path), "--out", str(tmp_path / "unknown"),
                    "--tracking-uri", registry_store.uri]) == 2
    err = capsys.readouterr().err
    assert f"no logged model {unknown}" in err and "Traceback" not in err, err
    with pytest.raises(ValueError, match=r"models:/m-<32 hex digits> \(a logged model"):
        model_store.parse_model_uri("models:/m-123")


# ---------------------------------------------------------------------------------------------
# Outputs and stores: refused at once, named; read-only commands never take a write lock


def test_an_out_that_cannot_be_a_folder_is_refused_before_the_model_is_loaded(
        tmp_path, capsys, make_npz, val_xrays):
    images, _ = val_xrays
    path = make_npz(test_images=images[:2])
    taken = tmp_path / "taken"
    taken.write_text("")
    # no model is registered in this store: loading first would fail on that instead
    uri = f"sqlite:///{tmp_path / 'empty.db'}"
    try:
        for out, message in [
            (taken, f"--out {taken} is a file, not a folder; choose another --out"),
            (taken / "sub", f"--out {taken / 'sub'} cannot be created ({taken} is not a "
             "folder); choose another --out"),
        ]:
            assert pr.main(["models:/pneumonia-cnn@champion", str(path), "--out", str(out),
                            "--tracking-uri", uri]) == 2
            assert message in capsys.readouterr().err
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    assert not (tmp_path / "empty.db").exists()  # the store was never opened


@pytest.mark.slow
@pytest.mark.usefixtures("ordinary_user")
def test_an_unwritable_out_is_named_before_the_model_or_the_store_is_read(
        tiny_model, val_xrays, make_npz, tmp_path):
    """As a user for whom file modes hold (tests/faults/permissions.py)."""
    import subprocess
    import sys

    from tests.faults.permissions import as_ordinary_user, make_read_only

    folder = tmp_path / "mlflow-model"
    mlflow.keras.save_model(tiny_model.model, str(folder), metadata=tiny_model.info,
                            pip_requirements=["keras"])
    path = make_npz(test_images=val_xrays[0][:4])
    shut, existing = tmp_path / "shut", tmp_path / "shut" / "existing"
    existing.mkdir(parents=True)
    make_read_only(existing, shut)
    repo = Path(__file__).resolve().parents[2]
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    for args, message in [
        (["predict.py", str(folder), str(path), "--out", str(existing)],
         f"cannot write the predictions to --out {existing}: it is not writable (Permission "
         "denied); make it writable or choose another --out"),
        # a registry URI of a store holding no model: loading first would fail on that
        (["predict.py", "models:/pneumonia-cnn@champion", str(path), "--out", str(shut / "new")],
         f"cannot write the predictions to --out {shut / 'new'}: {shut}, where it would be "
         "created, is not writable"),
        (["pull.py", "--out", str(shut / "export")],
         f"cannot write the export to --out {shut / 'export'}: {shut}, where it would be "
         "created, is not writable"),
    ]:
        proc = subprocess.run(as_ordinary_user(
            [sys.executable, str(repo / "search" / args[0]), *args[1:], "--tracking-uri",
             store]), cwd=repo, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr
    assert not list(existing.iterdir())


@pytest.mark.slow
def test_pull_and_predict_read_a_store_another_process_is_writing(registry_store, val_xrays,
                                                                  make_npz, tmp_path):
    """Another process holds the store's write lock (an open write transaction) all along."""
    import subprocess
    import sys

    registry.register_and_promote(registry_store.runs.good_run_id)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sqlite3, sys\n"
         f"con = sqlite3.connect({str(registry_store.db)!r}, isolation_level=None)\n"
         "con.execute('BEGIN IMMEDIATE')\n"
         "con.execute('UPDATE experiments SET name = name')\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        folder = tmp_path / "champion"
        assert pull.main(["--out", str(folder), "--tracking-uri", registry_store.uri]) == 0
        path = make_npz(test_images=val_xrays[0][:4])
        assert pr.main(["models:/pneumonia-cnn@champion", str(path), "--out",
                        str(tmp_path / "pred"), "--tracking-uri", registry_store.uri]) == 0
        assert len(read_csv(tmp_path / "pred" / "predictions.csv")) == 4
        assert json.loads((folder / "model_info.json").read_text())["aliases"] == ["champion"]
        assert holder.poll() is None  # the writer held its lock all along
    finally:
        holder.communicate("")
