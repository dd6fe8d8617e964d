"""Serving latency: MLflow's REST server, pyfunc in process and search/predict.py, side by side.

    python benchmarks/serve_latency.py [--model models:/pneumonia-cnn@champion] [--repeats 20]

For requests of 1, 16 and 128 raw val images (the built-in PneumoniaMNIST val split, uint8
as a PACS export gives them) it prints p50/p99 latency per request and images per second:
- rest: `mlflow models serve -m <model> --env-manager local` on a free 127.0.0.1 port,
  POST /invocations with {"inputs": pixels} (JSON encoding included, as a client pays it);
- pyfunc: `mlflow.pyfunc.load_model(...).predict(pixels)` in this process;
- predict.py: `search.predict.predict(loaded, rows.npz)` with the model loaded once (it also
  writes predictions.csv, as the command does).
The tracking URI is $MLFLOW_TRACKING_URI, else the project's default store.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.loaders import BUILTIN_NPZ  # noqa: E402


def timed(call, repeats: int) -> list[float]:
    call()  # warm-up: graph tracing and first-request costs are not latency
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return times


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    bin_dir = Path(sys.executable).parent  # mlflow serve starts uvicorn from PATH
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '')}"}
    server = subprocess.Popen(
        [str(bin_dir / "mlflow"), "models", "serve", "-m", str(model_dir), "--env-manager",
         "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            urllib.request.urlopen(f"{base}/ping", timeout=2)
            return server, base
        except OSError:
            if server.poll() is not None:
                raise RuntimeError("mlflow models serve exited") from None
            time.sleep(1)
    raise RuntimeError("mlflow models serve never answered /ping")


def main() -> None:
    import mlflow

    from search.model_registry.model_store import load_model_reference
    from search.predict import predict
    from search.tracking import mlflow_runs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/pneumonia-cnn@champion")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    mlflow_runs.setup_cli(None)
    import logging

    logging.getLogger("search").setLevel(logging.WARNING)  # predict() logs every call
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    model_dir = Path(args.model) if Path(args.model).is_dir() else Path(
        mlflow.artifacts.download_artifacts(args.model, dst_path=str(work / "model")))
    with np.load(BUILTIN_NPZ) as archive:
        val = archive["val_images"]
    pyfunc = mlflow.pyfunc.load_model(str(model_dir))
    loaded = load_model_reference(model_dir, work)
    server, base = start_server(model_dir)
    try:
        print(f"model {args.model}; {args.repeats} requests each after one warm-up")
        print(f"{'path':>10} | {'images':>6} | {'p50 ms':>8} | {'p99 ms':>8} | {'images/s':>9}")
        for n in (1, 16, 128):
            pixels = val[:n][..., None]
            np.savez(work / f"rows{n}.npz", val_images=val[:n])
            body = json.dumps({"inputs": pixels.tolist()}).encode()

            def rest(body: bytes = body) -> None:
                request = urllib.request.Request(f"{base}/invocations", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=120) as response:
                    response.read()

            paths = {
                "rest": rest,
                "pyfunc": lambda p=pixels: pyfunc.predict(p.astype(np.float32)),
                "predict.py": lambda n=n: predict(loaded, work / f"rows{n}.npz",
                                                  out=work / f"out{n}", npz_key="val_images",
                                                  overwrite=True),
            }
            for name, call in paths.items():
                times = np.array(timed(call, args.repeats)) * 1000.0
                p50, p99 = np.percentile(times, 50), np.percentile(times, 99)
                print(f"{name:>10} | {n:>6} | {p50:>8.1f} | {p99:>8.1f} | "
                      f"{n / (p50 / 1000.0):>9.0f}")
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
