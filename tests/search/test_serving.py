"""The champion served as it is: raw pixels through MLflow's pyfunc and its REST server give
search/predict.py's probabilities, labels at the stored threshold, named columns."""

from __future__ import annotations

import csv
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
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
    rgb = np.repeat(raw[..., None], 3, axis=3)  # RGB in, grayscale model: the mean
    assert np.allclose(serving.to_model_input(rgb, 2, 1), x)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_pyfunc_and_mlflow_serve_answer_like_predict_on_raw_real_images(trained_store,
                                                                        tmp_path):
    import mlflow
    from mlflow.tracking import MlflowClient

    from data.pipeline import decode_to_uint8
    from search.predict import predict

    uri = f"sqlite:///{trained_store.db}"
    model_uri = MlflowClient(uri).get_run(trained_store.good_run_id).data.tags["best_model_uri"]
    mlflow.set_tracking_uri(uri)
    model_dir = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path / "m")))
    mlflow.set_tracking_uri(None)
    with np.load(BUILTIN) as archive:  # real val images, raw uint8 as a PACS export gives
        raw = archive["val_images"][:24]
    np.savez(tmp_path / "rows.npz", val_images=raw)
    reference = predict(model_dir, tmp_path / "rows.npz", out=tmp_path / "pred",
                        npz_key="val_images")
    with open(tmp_path / "pred" / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    expected = np.array([float(r["prob_pneumonia"]) for r in rows])
    labels = [r["predicted"] for r in rows]
    assert len(set(labels)) == 2, labels  # both classes occur: the threshold matters

    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    frame = pyfunc.predict(raw[..., None].astype(np.float32))
    assert list(frame.columns) == ["p_normal", "p_pneumonia", "label", "threshold"]
    assert np.allclose(frame["p_pneumonia"], expected, atol=1e-6)
    assert list(frame["label"]) == labels and reference.rows
    meta = json.loads(json.dumps(pyfunc.metadata.metadata))
    assert frame["threshold"].iloc[0] == pytest.approx(meta["threshold"])
    with pytest.raises(Exception, match="look scaled to 0–1 already"):
        pyfunc.predict(raw[..., None].astype(np.float32) / 255.0)
    scaled = pyfunc.predict(raw[..., None].astype(np.float32) / 255.0, params={"scaled": True})
    assert np.allclose(scaled["p_pneumonia"], expected, atol=1e-6)

    # MLflow's own server, as the README says to start it
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "MLFLOW_TRACKING_URI": uri}
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", str(model_dir),
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            assert server.poll() is None, server.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "mlflow models serve never answered /ping"
            try:
                urllib.request.urlopen(f"{base}/ping", timeout=2)
                break
            except OSError:
                time.sleep(1)

        def invoke(images: np.ndarray) -> list[dict]:
            body = json.dumps({"inputs": images.tolist()}).encode()
            request = urllib.request.Request(f"{base}/invocations", data=body,
                                             headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())["predictions"]

        served = invoke(raw[..., None])  # JSON integers 0–255
        assert [p["label"] for p in served] == labels
        assert np.allclose([p["p_pneumonia"] for p in served], expected, atol=1e-6)
        # the full-size JPEGs, decoded and resized to the model's size by the client
        files = sorted(JPEGS.rglob("*.jpeg"))
        pixels = np.stack([decode_to_uint8(f.read_bytes(), 28, 1).numpy() for f in files])
        predict(model_dir, JPEGS, out=tmp_path / "jpeg-pred")
        with open(tmp_path / "jpeg-pred" / "predictions.csv") as handle:
            by_file = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
        for file, answer in zip(files, invoke(pixels), strict=True):
            assert answer["label"] == by_file[file.name]["predicted"], file.name
            assert answer["p_pneumonia"] == pytest.approx(
                float(by_file[file.name]["prob_pneumonia"]), abs=1e-5), file.name
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
