"""Serve a model through MLflow's own server, with nothing to set up first.

    python search/serve.py                                  # models:/pneumonia-cnn@champion
    python search/serve.py models:/pneumonia-cnn/3 --port 5002
    python search/serve.py exports/pneumonia-cnn-v3         # a pulled folder (offline)
    python search/serve.py --request xray.jpeg > request.json   # a request body, then:
    curl -s -X POST -H 'Content-Type: application/json' --data @request.json \\
        http://127.0.0.1:5001/invocations

Runs `mlflow models serve --env-manager local` with this interpreter's bin folder first on
PATH (MLflow starts `uvicorn` from PATH: without it the start fails with "Return code = 127"),
the tracking store of pull and predict, and TensorFlow's start-up lines dropped
(`XRAY_STARTUP_LOGS=1` shows them). The request format and an answer: docs/registry.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

from search.model_registry.model_store import DEFAULT_ALIAS, DEFAULT_MODEL_NAME

DEFAULT_MODEL = f"models:/{DEFAULT_MODEL_NAME}@{DEFAULT_ALIAS}"


class ServeError(RuntimeError):
    """The server cannot start; the message names why and the fix."""


def server_environment(tracking_uri: str) -> dict[str, str]:
    """This process's environment with the interpreter's bin folder first on PATH."""
    bin_dir = str(Path(sys.executable).parent)
    for module in ("mlflow", "uvicorn"):
        if importlib.util.find_spec(module) is None:
            raise ServeError(f"{module} is not installed for {sys.executable}; install the "
                             "project there (`pip install -e .`) and re-run")
    if not (Path(bin_dir) / "uvicorn").exists():
        raise ServeError(f"no uvicorn command in {bin_dir} (MLflow's server starts it from "
                         "there); reinstall it with `pip install --force-reinstall uvicorn`")
    path = os.environ.get("PATH", "")
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{path}" if path else bin_dir,
            "MLFLOW_TRACKING_URI": tracking_uri}


def check_port(host: str, port: int) -> None:
    """Refuse a port another process holds, before the model loads."""
    with socket.socket() as probe:
        try:
            probe.bind((host, port))
        except OSError as error:
            raise ServeError(f"cannot listen on {host}:{port} ({error.strerror}); another "
                             "server holds it: stop it, or pass --port N") from None


def resolve_model(model: str) -> str:
    """The model MLflow should serve: a pulled folder's model/ sub-folder for the folder; a
    model that does not exist is named now, not in a traceback from the server."""
    from mlflow.tracking import MlflowClient

    from search.model_registry import model_store

    ref = model_store.parse_reference(model)  # the one reading of a model URI (pull, predict)
    if ref.kind in ("logged", "run"):
        return model  # MLflow's own resolver names these (the server's first lines)
    if ref.kind == "registry":
        model_store.resolve_version(MlflowClient(), ref.name, ref.alias, ref.version)
        return model
    folder = Path(model)
    if (folder / model_store.INFO_FILE).is_file():  # a pulled folder (search/pull.py)
        folder = folder / model_store.MODEL_DIR
    if not (folder / "MLmodel").is_file():
        raise ServeError(f"{model} is neither a pulled folder nor an MLflow model folder (no "
                         "MLmodel file); pull one with `python search/pull.py`")
    return str(folder)


# MLflow's own start-up narration of `mlflow models serve` (the backend it picked, the uvicorn
# command line): our first line already says what is served where.
MLFLOW_NARRATION = re.compile(r"^\S+ \S+ INFO mlflow\.(models\.flavor_backend_registry: Selected "
                              r"backend|pyfunc\.backend: === Running command)")


def pump_quietly(stream: object) -> None:
    """Copy the server's stderr to ours, without TensorFlow's known start-up lines and
    MLflow's start-up narration (``XRAY_STARTUP_LOGS=1`` shows both)."""
    from search.quiet_start import filter_lines, wanted

    show_all, no_driver = wanted(), False
    for line in stream:  # type: ignore[attr-defined]
        if not show_all:
            line, no_driver = filter_lines(line, no_driver)
            line = "" if MLFLOW_NARRATION.match(line) else line
        if line:
            sys.stderr.write(line)
            sys.stderr.flush()


def serve(model: str, host: str, port: int, env: dict[str, str], workers: int = 1) -> int:
    """Run MLflow's server until it stops or Ctrl-C; its exit status."""
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model,
               "--env-manager", "local", "--host", host, "--port", str(port),
               "--workers", str(workers)]
    server = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True,
                              errors="replace", bufsize=1)
    previous = signal.signal(signal.SIGTERM, _interrupt)  # a `kill` stops the server too
    try:
        pump_quietly(server.stderr)
        return server.wait()
    except KeyboardInterrupt:  # Ctrl-C: the terminal sent it to the server too
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if server.poll() is None:
            server.terminate()  # MLflow's CLI takes its uvicorn with it (PR_SET_PDEATHSIG)
            server.wait(timeout=30)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def request_body(model: str, images: list[str]) -> dict:
    """`{"inputs": [...]}` for image files, decoded and resized as training does."""
    import mlflow

    from search.model_registry.model_store import mlmodel_metadata
    from search.quiet_start import start_tensorflow

    metadata = (mlmodel_metadata(model) if Path(model).is_dir()  # offline: MLmodel as it is
                else mlflow.models.get_model_info(model).metadata or {})
    prep = metadata.get("preprocessing") or {}
    if not prep:
        raise ServeError(f"{model} has no preprocessing metadata; log it with "
                         "search/training/trainer.py")
    start_tensorflow()
    from data.pipeline import decode_to_uint8

    size, channels = int(prep["image_size"]), int(prep["channels"])
    pixels = [decode_to_uint8(Path(f).read_bytes(), size, channels).numpy().tolist()
              for f in images]
    return {"inputs": pixels}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help=f"models:/name@alias, models:/name/N, models:/m-<id>, runs:/<id>/"
                        f"model, a pulled or MLflow model folder (default: {DEFAULT_MODEL})")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=5001, help="default: 5001")
    parser.add_argument("--workers", type=int, default=1, help="server processes (default: 1)")
    parser.add_argument("--request", nargs="+", metavar="IMAGE", default=None,
                        help="print a request body for these image files and exit")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from mlflow.exceptions import MlflowException

    from search.model_registry.model_store import is_store_uri
    from search.sweep_context import redact
    from search.tracking.mlflow_runs import TrackingError, setup_cli

    args = parse_args(argv)
    try:
        uri = setup_cli(args.tracking_uri, contact=is_store_uri(args.model))
        model = resolve_model(args.model)
        if args.request:
            print(json.dumps(request_body(model, args.request)))
            return 0
        env = server_environment(uri)
        check_port(args.host, args.port)
    except (ServeError, LookupError, ValueError, OSError, TrackingError,
            MlflowException) as error:
        print(redact(f"error: {error}"), file=sys.stderr)
        return 2
    store = f"store {redact(uri)}; " if is_store_uri(args.model) else ""
    print(f"Serving {model} at http://{args.host}:{args.port}/invocations ({store}Ctrl-C "
          "stops)", flush=True)
    code = serve(model, args.host, args.port, env, args.workers)
    if code not in (0, 130):
        print(f"error: mlflow models serve stopped with exit status {code}; its own lines "
              "above say why", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
