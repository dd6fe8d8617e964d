"""The champion served as it is: raw pixels through MLflow's pyfunc and its REST server give
search/predict.py's probabilities, labels at the stored threshold, named columns; what it cannot
score (NaN, out of range, other sizes, scaled pixels) is refused with a 400 whose message says
why and what to send; integers (uint8, JSON) are raw pixels, RGB goes through the adapter."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from search.tracking import serving

REPO = Path(__file__).resolve().parents[2]
BUILTIN = REPO / "data" / "builtin" / "pneumoniamnist_28_trainval.npz"
JPEGS = REPO.parent / "shared" / "data" / "chest_xray_sample" / "val"


def test_raw_pixels_are_scaled_once_and_scaled_ones_are_refused_unless_said():
    raw = np.array([[[0, 128], [255, 64]]], dtype=np.uint8)
    x = serving.to_model_input(raw, 2, 1)
    assert x.shape == (1, 2, 2, 1) and x.dtype == np.float32
    assert x[0, 1, 0, 0] == pytest.approx(1.0) and x[0, 0, 1, 0] == pytest.approx(128 / 255)
    same = serving.to_model_input(raw.astype(np.float32), 2, 1)
    assert np.array_equal(x, same)  # uint8 or float 0–255: one answer
    with pytest.raises(ValueError, match="look scaled to 0–1 already"):
        serving.to_model_input(raw / 255.0, 2, 1)
    assert np.allclose(serving.to_model_input(raw / 255.0, 2, 1, scaled=True), x)
    with pytest.raises(ValueError, match=r"must lie in \[0, 255\]; got \[0, 300\]"):
        serving.to_model_input(np.array([[[0.0, 300.0], [1.0, 2.0]]]), 2, 1)
    with pytest.raises(ValueError, match=r"expected images of shape \(N, 28, 28, 1\)"):
        serving.to_model_input(raw, 28, 1)
    rgb = np.repeat(raw[..., None], 3, axis=3)  # RGB in, grayscale model: training's weights
    assert np.allclose(serving.to_model_input(rgb, 2, 1), x)


def test_nan_infinite_ragged_and_other_shapes_are_refused_naming_the_fix():
    ok = np.zeros((1, 2, 2, 1), dtype=np.float32)
    for value in (np.nan, np.inf, -np.inf):
        x = ok.copy()
        x[0, 1, 1, 0] = value  # one pixel: NaN compares false with both bounds
        with pytest.raises(ValueError, match=r"1 pixel value\(s\) are NaN or infinite .*"
                                             r"send finite raw 0–255 pixels"):
            serving.to_model_input(x, 2, 1)
        with pytest.raises(ValueError, match="NaN or infinite"):
            serving.to_model_input(x, 2, 1, scaled=True)
    with pytest.raises(ValueError, match=r"got \[-1, 2\]; send raw 8-bit pixels"):
        serving.to_model_input(np.array([[[-1, 2], [0, 0]]]), 2, 1)
    with pytest.raises(ValueError, match="rectangular array of numbers"):
        serving.to_model_input([[[0, 1], [2]]], 2, 1)
    for odd in ([[["a", "b"], ["c", "d"]]], [[[True, False], [True, True]]],
                [[[None, 1], [2, 3]]]):
        with pytest.raises(ValueError, match="pixel values must be numbers"):
            serving.to_model_input(odd, 2, 1)
    with pytest.raises(ValueError, match="got 4 .*drop an alpha channel"):
        serving.to_model_input(np.zeros((1, 2, 2, 4), np.uint8), 2, 1)
    with pytest.raises(ValueError, match="holds no images"):
        serving.to_model_input(np.zeros((0, 2, 2, 1), np.uint8), 2, 1)
    with pytest.raises(ValueError, match=r"a single image must still be a batch: \[image\]"):
        serving.to_model_input(np.zeros((2, 2, 1), np.uint8), 2, 1)


def test_whole_numbers_are_raw_pixels_whatever_the_dtype():
    dark = [[[0, 1], [1, 0]]]  # a dark exposure, as JSON integers give it
    expected = np.array(dark, dtype=np.float32)[..., None] / 255.0
    for dtype in (np.int64, np.uint8, np.uint16, np.float32, np.float64):
        x = serving.to_model_input(np.array(dark, dtype=dtype), 2, 1)
        assert x.dtype == np.float32 and np.array_equal(x, expected), dtype
    assert np.array_equal(serving.to_model_input(dark, 2, 1), expected)  # nested lists
    with pytest.raises(ValueError, match="look scaled to 0–1 already"):  # fractions: scaled
        serving.to_model_input([[[0.0, 0.5], [1.0, 0.25]]], 2, 1)


def test_rgb_and_grayscale_adapters_are_the_training_decoders():
    import tensorflow as tf

    from data.pipeline import resize_to_uint8

    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 4, 3), dtype=np.uint8)
    gray = np.stack([resize_to_uint8(tf.constant(image), 4, 1).numpy() for image in rgb])
    assert np.array_equal(serving.to_model_input(rgb, 4, 1), gray.astype(np.float32) / 255.0)
    assert np.allclose(serving.to_model_input(rgb / 255.0, 4, 1, scaled=True),
                       gray / 255.0, atol=1e-6)
    as_rgb = np.stack([resize_to_uint8(tf.constant(image), 4, 3).numpy() for image in gray])
    assert np.array_equal(serving.to_model_input(gray, 4, 3),
                          as_rgb.astype(np.float32) / 255.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def model_dir(trained_store, tmp_path_factory) -> Path:
    """The good run's logged model, downloaded once for this module."""
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{trained_store.db}"
    model_uri = MlflowClient(uri).get_run(trained_store.good_run_id).data.tags["best_model_uri"]
    mlflow.set_tracking_uri(uri)
    target = tmp_path_factory.mktemp("served") / "m"
    folder = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(target)))
    mlflow.set_tracking_uri(None)
    return folder


@pytest.fixture(scope="module")
def served(model_dir, trained_store, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """One server for every test here, started as the README says (`python -m search.serve`,
    with no venv bin on PATH: it puts it there); its base URL and its terminal output."""
    port = free_port()
    env = {**os.environ, "PATH": "/usr/bin:/bin",
           "MLFLOW_TRACKING_URI": f"sqlite:///{trained_store.db}"}
    env.pop("XRAY_STARTUP_LOGS", None)
    log = tmp_path_factory.mktemp("serve-log") / "terminal.txt"
    with open(log, "w") as terminal:
        server = subprocess.Popen(
            [sys.executable, "-m", "search.serve", str(model_dir), "--port", str(port)],
            cwd=REPO, env=env, stdout=terminal, stderr=subprocess.STDOUT, text=True,
            start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "search.serve never answered /ping"
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)
        yield base, log
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


@pytest.fixture(scope="module")
def server_url(served) -> str:
    return served[0]


def post(base: str, body: dict | str) -> tuple[int, dict]:
    """POST /invocations (a dict as JSON, or JSON text as it is): (status, parsed answer)."""
    data = (body if isinstance(body, str) else json.dumps(body)).encode()
    request = urllib.request.Request(f"{base}/invocations", data=data,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def real_images(count: int = 8) -> np.ndarray:
    """Raw uint8 val images (N, 28, 28), as a PACS export gives them."""
    with np.load(BUILTIN) as archive:
        return archive["val_images"][:count]


@pytest.mark.slow
def test_pyfunc_and_mlflow_serve_answer_like_predict_on_raw_real_images(model_dir, server_url,
                                                                        tmp_path):
    import mlflow

    from data.pipeline import decode_to_uint8
    from search.predict import predict

    with np.load(BUILTIN) as archive:  # real val images, raw uint8 as a PACS export gives
        raw = archive["val_images"][:24]
    np.savez(tmp_path / "rows.npz", val_images=raw)
    reference = predict(model_dir, tmp_path / "rows.npz", out=tmp_path / "pred",
                        npz_key="val_images")
    with open(tmp_path / "pred" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = np.array([float(r["p_pneumonia"]) for r in rows])
    labels = [r["predicted_label"] for r in rows]
    assert len(set(labels)) == 2, labels  # both classes occur: the threshold matters

    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    frame = pyfunc.predict(raw[..., None].astype(np.float32))
    assert list(frame.columns) == ["p_normal", "p_pneumonia", "predicted_label", "threshold"]
    assert np.allclose(frame["p_pneumonia"], expected, atol=1e-6)
    assert list(frame["predicted_label"]) == labels and reference.rows
    meta = json.loads(json.dumps(pyfunc.metadata.metadata))
    assert frame["threshold"].iloc[0] == pytest.approx(meta["threshold"])
    with pytest.raises(Exception, match="look scaled to 0–1 already"):
        pyfunc.predict(raw[..., None].astype(np.float32) / 255.0)
    scaled = pyfunc.predict(raw[..., None].astype(np.float32) / 255.0, params={"scaled": True})
    assert np.allclose(scaled["p_pneumonia"], expected, atol=1e-6)

    # MLflow's own server, as the README says to start it (the module's one `server_url`)
    base = server_url

    def invoke(images: np.ndarray) -> list[dict]:
        body = json.dumps({"inputs": images.tolist()}).encode()
        request = urllib.request.Request(f"{base}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())["predictions"]

    served = invoke(raw[..., None])  # JSON integers 0–255
    assert [p["predicted_label"] for p in served] == labels
    assert np.allclose([p["p_pneumonia"] for p in served], expected, atol=1e-6)
    # the full-size JPEGs, decoded and resized to the model's size by the client
    files = sorted(JPEGS.rglob("*.jpeg"))
    pixels = np.stack([decode_to_uint8(f.read_bytes(), 28, 1).numpy() for f in files])
    predict(model_dir, JPEGS, out=tmp_path / "jpeg-pred")
    with open(tmp_path / "jpeg-pred" / "predictions.csv") as handle:
        by_file = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    for file, answer in zip(files, invoke(pixels), strict=True):
        assert answer["predicted_label"] == by_file[file.name]["predicted_label"], file.name
        assert answer["p_pneumonia"] == pytest.approx(
            float(by_file[file.name]["p_pneumonia"]), abs=1e-5), file.name


@pytest.mark.slow
def test_pyfunc_takes_uint8_rgb_and_dark_images_and_refuses_nan_by_name(model_dir):
    import mlflow
    from mlflow.exceptions import MlflowException

    raw = real_images()
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    expected = pyfunc.predict(raw[..., None].astype(np.float32))
    for images in (raw, raw[..., None], np.repeat(raw[..., None], 3, axis=3)):
        # uint8, the image's own type (MLflow's schema refused it), without a channel axis,
        # and RGB to the grayscale model (refused by the schema before the adapter ran)
        frame = pyfunc.predict(images)
        assert np.array_equal(frame["p_pneumonia"], expected["p_pneumonia"]), images.shape
        assert list(frame["predicted_label"]) == list(expected["predicted_label"])
    dark = (raw[:2] > 128).astype(np.uint8)  # pixels 0/1: raw, not "scaled already"
    assert np.array_equal(pyfunc.predict(dark)["p_pneumonia"],
                          pyfunc.predict(dark.astype(np.float32))["p_pneumonia"])
    nan = raw[..., None].astype(np.float32)
    nan[3, 10, 10, 0] = np.nan
    with pytest.raises(MlflowException, match="NaN or infinite") as refused:
        pyfunc.predict(nan)
    assert refused.value.error_code == "INVALID_PARAMETER_VALUE"
    assert refused.value.get_http_status_code() == 400


@pytest.mark.slow
def test_served_model_refuses_with_a_message_naming_the_fix(model_dir, server_url):
    import mlflow

    raw = real_images(4)
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    expected = pyfunc.predict(raw)["p_pneumonia"]
    gray = raw[..., None].tolist()

    def one_pixel(value: float) -> str:  # JSON integers and one NaN or Infinity token
        images = raw[..., None].tolist()
        images[2][10][10][0] = value
        return json.dumps({"inputs": images})

    refusals = {  # request -> what the message must say (problem, then the fix)
        one_pixel(float("nan")): r"1 pixel value\(s\) are NaN or infinite \(the first in "
                                 r"image 2\); send finite raw 0–255 pixels",
        one_pixel(float("inf")): r"NaN or infinite",
        json.dumps({"inputs": (raw[..., None].astype(int) + 100).tolist()}):
            rf"must lie in \[0, 255\]; got \[{int(raw.min()) + 100}, {int(raw.max()) + 100}\]; "
            r"send raw 8-bit pixels",
        json.dumps({"inputs": (raw[..., None] / 255.0).tolist()}):
            r"look scaled to 0–1 already .*pass params \{'scaled': true\}",
        json.dumps({"inputs": gray, "params": {"scaled": True}}):
            r"must lie in \[0, 1\] \(params scaled=true\)",
        json.dumps({"inputs": raw[:, :27, :27, None].tolist()}):
            r"expected images of shape \(N, 28, 28, 1\).*got \(4, 27, 27, 1\); resize first",
        json.dumps({"inputs": gray[0]}): r"a single image must still be a batch: \[image\]",
        json.dumps({"inputs": np.repeat(raw[..., None], 4, axis=3).tolist()}):
            r"got 4 .*drop an alpha channel",
        json.dumps({"inputs": [[["a"] * 28] * 28]}): r"pixel values must be numbers",
        # MLflow's own refusal: the model reads `inputs` only (serving_signature says why)
        json.dumps({"instances": gray}): r"'inputs' key",
    }
    for body, reason in refusals.items():
        status, answer = post(server_url, body)
        assert status == 400, (reason, answer)
        assert answer["error_code"] == "INVALID_PARAMETER_VALUE", answer
        # the reason is the message itself, not MLflow's generic line or an echo of the pixels
        assert re.search(reason, answer["message"]), (reason, answer["message"][:500])
        assert len(answer["message"]) < 400 and "Failed to predict" not in answer["message"]
    # what it can score: RGB through the adapter, JSON integers 0/1 as raw pixels
    status, answer = post(server_url, {"inputs": np.repeat(raw[..., None], 3, axis=3).tolist()})
    assert status == 200, answer
    assert np.allclose([p["p_pneumonia"] for p in answer["predictions"]], expected, atol=1e-6)
    dark = (raw[..., None] > 128).astype(int)
    status, answer = post(server_url, {"inputs": dark.tolist()})
    assert status == 200, answer
    local = pyfunc.predict(dark.astype(np.uint8))
    assert np.allclose([p["p_pneumonia"] for p in answer["predictions"]],
                       local["p_pneumonia"], atol=1e-6)


@pytest.mark.slow
def test_served_without_path_edits_and_without_startup_lines(served):
    """`python -m search.serve` starts MLflow's server with no venv bin on PATH (the bare
    `mlflow models serve` failed there with "Return code = 127") and prints no TF start-up
    line; the other tests here make their requests to this server."""
    from tests.search.test_quiet_start import startup_lines

    base, log = served
    urllib.request.urlopen(f"{base}/ping", timeout=10)
    text = log.read_text()
    assert "Serving " in text and "Uvicorn running on" in text, text
    assert "Return code" not in text and not startup_lines(text), text


@pytest.mark.slow
def test_the_pyfunc_load_prints_no_startup_lines_unless_asked(model_dir):
    """What the model server's process runs when it loads the model (also for a bare
    `mlflow models serve`): the serving flavour starts TF quietly."""
    from tests.search.test_quiet_start import startup_lines

    code = f"import mlflow; mlflow.pyfunc.load_model({str(model_dir)!r}); print('loaded')"
    for loud in ("", "1"):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              timeout=300, env={**os.environ, "XRAY_STARTUP_LOGS": loud})
        assert done.returncode == 0 and "loaded" in done.stdout, done.stderr[-2000:]
        assert bool(startup_lines(done.stderr)) == bool(loud), done.stderr


@pytest.mark.slow
def test_logged_models_carry_no_optimizer_and_load_without_warnings(model_dir):
    """The optimizer's state was saved with the model, then dropped with a warning at every
    compiled load ("Skipping variable loading for optimizer ...")."""
    import io
    import warnings
    import zipfile

    import h5py
    import mlflow

    from search.model_registry.model_store import keras_file

    with zipfile.ZipFile(keras_file(model_dir)) as archive:
        assert not json.loads(archive.read("config.json")).get("compile_config")
        with h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r") as weights:
            assert "optimizer" not in weights, list(weights)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        network = mlflow.keras.load_model(str(model_dir))  # MLflow's Keras flavour compiles
        mlflow.pyfunc.load_model(str(model_dir))
    assert not [str(w.message) for w in caught if "optimizer" in str(w.message)]
    assert network.predict(real_images(2)[..., None] / 255.0, verbose=0).shape == (2, 1)


def test_serve_names_a_missing_model_and_a_taken_port_before_starting(tmp_path, capsys):
    from search import serve

    store = ["--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}"]
    assert serve.main([str(tmp_path / "nowhere"), *store]) == 2
    assert "neither a pulled folder nor an MLflow model folder" in capsys.readouterr().err
    pulled = tmp_path / "pulled"
    (pulled / "model").mkdir(parents=True)
    (pulled / "model" / "MLmodel").write_text("flavors: {}\n")
    (pulled / "model_info.json").write_text("{}")
    assert serve.resolve_model(str(pulled)) == str(pulled / "model")  # a pulled folder serves
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        assert serve.main([str(pulled), "--port", str(port), *store]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err


def test_serve_puts_the_interpreters_bin_first_on_path(monkeypatch):
    from search import serve

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    env = serve.server_environment("sqlite:///x.db")
    bin_dir = Path(sys.executable).parent
    assert env["PATH"].split(os.pathsep)[0] == str(bin_dir) and (bin_dir / "uvicorn").exists()
    assert env["MLFLOW_TRACKING_URI"] == "sqlite:///x.db"
