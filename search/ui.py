"""MLflow's UI on the project's store, and the addresses that open on the training runs.

    python search/ui.py                        # the repo's store, http://127.0.0.1:5000
    python search/ui.py --port 5001            # another port; --host 0.0.0.0 for other machines
    python search/ui.py -- --allowed-hosts gpu-box:5000   # after --: options of `mlflow server`

MLflow 3's UI opens on its GenAI welcome page; the addresses printed here open on the
model-training side: the experiment's runs, the last sweep's parent run, its every-trial
val_loss figure and the champion's registered version. The store is found as every command
finds it (--tracking-uri, else $MLFLOW_TRACKING_URI, else sqlite under mlruns/). A store that
is a tracking server is already served: its addresses are printed and nothing is started.
Ctrl-C stops the UI.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from search.tracking import descriptions as d
from search.tracking import tags as tag_keys
from search.tracking.mlflow_runs import TRAINING_KIND, public_uri, redact_uri

# How long MLflow's server may take to answer /health (~5 s on 2 busy cores; a cold
# first start migrates a new SQLite store first).
START_TIMEOUT_S = 90.0
ALL_INTERFACES = ("0.0.0.0", "::", "")


@dataclass
class Places:
    """What the printed addresses point at, read from the store before the UI starts."""

    experiment_id: str | None = None
    experiment_name: str | None = None
    sweep_run_id: str | None = None
    study: str | None = None
    figure: str | None = None  # the all-trials figure's artifact path on the sweep's run
    champions: list[tuple[str, str]] = field(default_factory=list)  # (model, version)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    """The command's options, and those after `--` (for `mlflow server`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=d.LOCAL_HOST,
                        help=f"interface to bind (default {d.LOCAL_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=d.LOCAL_PORT,
                        help=f"port (default {d.LOCAL_PORT})")
    parser.add_argument("--tracking-uri", default=None,
                        help="default: $MLFLOW_TRACKING_URI, else sqlite:///<repo>/mlruns/mlflow.db")
    parser.add_argument("--experiment", default=None,
                        help="experiment to open (default: the last sweep's)")
    parser.add_argument("--model", default=None,
                        help="registered model whose champion to link (default: the last "
                             "sweep's, else every model with a @champion)")
    return parser.parse_args(argv), extra


def find_places(client: Any, experiment: str | None, model: str | None) -> Places:
    """The experiment, the last sweep's parent run, its figure and the champion(s)."""
    places = Places()
    experiments = client.search_experiments()
    if experiment:
        chosen = [e for e in experiments if e.name == experiment]
        if not chosen:
            raise LookupError(f"no experiment {experiment!r} in this store (it has: "
                              f"{', '.join(sorted(e.name for e in experiments)) or 'none'})")
        experiments = chosen
    ids = [e.experiment_id for e in experiments]
    sweeps = client.search_runs(
        ids, f"tags.`{tag_keys.SWEEP_PARENT}` = 'true'", order_by=["attributes.start_time DESC"],
        max_results=1) if ids else []
    if sweeps:
        run = sweeps[0]
        places.experiment_id, places.sweep_run_id = run.info.experiment_id, run.info.run_id
        places.study = run.data.tags.get(tag_keys.OPTUNA_STUDY)
        places.figure = sweep_figure(client, run.info.run_id)
        model = model or run.data.tags.get(tag_keys.PROMOTION_MODEL_NAME)
    elif experiments:  # no sweep yet: the training experiment updated last
        training = [e for e in experiments if (e.tags or {}).get(tag_keys.EXPERIMENT_KIND)
                    == TRAINING_KIND] or experiments
        places.experiment_id = max(training, key=lambda e: e.last_update_time or 0).experiment_id
    names = {e.experiment_id: e.name for e in experiments}
    places.experiment_name = names.get(places.experiment_id)
    places.champions = champions(client, model)
    return places


def sweep_figure(client: Any, run_id: str) -> str | None:
    """The parent run's all-trials figure: the HTML at its top level, or an older sweep's PNG."""
    if any(a.path == d.ALL_TRIALS_FIGURE for a in client.list_artifacts(run_id)):
        return d.ALL_TRIALS_FIGURE
    older = "sweep/val_loss_all_trials.png"
    return older if any(a.path == older for a in client.list_artifacts(run_id, "sweep")) else None


def champions(client: Any, model: str | None) -> list[tuple[str, str]]:
    """(model, version) holding @champion: of `model`, else of every registered model."""
    from mlflow.exceptions import MlflowException

    if model:
        try:
            return [(model, str(client.get_model_version_by_alias(model, "champion").version))]
        except MlflowException:  # no such model, or no champion yet
            return []
    return [(m.name, str(m.aliases["champion"])) for m in client.search_registered_models()
            if "champion" in (m.aliases or {})]


def address_lines(base: str, places: Places) -> list[str]:
    """The addresses to print, each with what it opens."""
    if places.experiment_id is None:
        return ["  (no experiment yet: `python search/run.py -m` runs the default sweep)"]
    eid = places.experiment_id
    lines = [f"  runs:     {d.address(base, d.experiment_route(eid))}   (experiment "
             f"{places.experiment_name}: its training runs)"]
    if places.sweep_run_id:
        study = f", study {places.study}" if places.study else ""
        lines.append(f"  sweep:    {d.address(base, d.run_route(eid, places.sweep_run_id))}"
                     f"   (the last sweep's parent run{study})")
        if places.figure:
            figure = d.artifact_route(eid, places.sweep_run_id, places.figure)
            lines.append(f"  curves:   {d.address(base, figure)}   (every trial's val_loss)")
    else:
        lines.append("  (no sweep in this experiment yet)")
    for name, version in places.champions:
        lines.append(f"  champion: {d.address(base, d.model_route(name, version))}"
                     f"   (models:/{name}@champion = v{version})")
    return lines


def port_problem(host: str, port: int) -> str | None:
    """Why the UI cannot listen on host:port (in use, not an address here), or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as error:
            if error.errno == errno.EADDRINUSE:
                return (f"port {port} on {host or 'all interfaces'} is in use (another MLflow "
                        f"UI?); open that one, or choose another with --port")
            return f"cannot listen on {host}:{port} ({error.strerror}); check --host"
    return None


def server_command(uri: str, host: str, port: int, extra: list[str]) -> tuple[list[str], dict]:
    """`mlflow server` for this store: one worker (one person's UI), new experiments' artifacts
    beside a SQLite store. The store goes in the environment, not argv (`ps` shows argv)."""
    from search.tracking.mlflow_runs import default_artifact_root

    command = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
               "--workers", "1"]
    root = default_artifact_root(uri)
    if root and "--default-artifact-root" not in extra:
        command += ["--default-artifact-root", root]
    env = {**os.environ, "MLFLOW_BACKEND_STORE_URI": uri}
    # its job runner (GenAI judges and scorers: six huey processes) has nothing to do here
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    return command + extra, env


@contextmanager
def running_server(command: list[str], env: dict, base: str, log: Path) -> Iterator[None]:
    """The server, up (its /health answering) while the block runs, then stopped with its
    process group; RuntimeError naming why when it does not come up."""
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until_up(process, base, log)
        yield
    finally:
        stop(process)


def wait_until_up(process: subprocess.Popen, base: str, log: Path,
                  timeout: float = START_TIMEOUT_S) -> None:
    """Poll /health until it answers; a server that exits or stays silent is named."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"MLflow's UI did not start at {base}: `mlflow server` exited "
                               f"with status {process.returncode}:\n{log_tail(log)}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"MLflow's UI did not answer at {base}/health within {timeout:.0f} s "
                       f"(its log: {log}):\n{log_tail(log)}")


def log_tail(log: Path, lines: int = 8) -> str:
    """The server log's last lines, redacted (a store URL may carry a password)."""
    from search.sweep_context import redact

    text = log.read_text(errors="replace").strip().splitlines()[-lines:] if log.exists() else []
    return "\n".join(f"  {redact(line)}" for line in text) or "  (it printed nothing)"


def stop(process: subprocess.Popen) -> None:
    """End the server and the workers it spawned (its own process group)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def shown_host(host: str) -> str:
    """The host to print: a wildcard bind is reached on this machine at 127.0.0.1."""
    if host in ALL_INTERFACES or host == "localhost":
        return d.LOCAL_HOST
    return f"[{host}]" if ":" in host else host


def serve(uri: str, args: argparse.Namespace, extra: list[str], places: Places) -> int:
    """Start the UI on a local store, print where to look, wait for Ctrl-C or SIGTERM."""
    problem = port_problem(args.host, args.port)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 1
    base = f"http://{shown_host(args.host)}:{args.port}"
    handle, name = tempfile.mkstemp(prefix=f"xray-sweeps-ui-{args.port}-", suffix=".log")
    os.close(handle)  # a fresh private file (0600): never another user's, nor a link
    log = Path(name)
    command, env = server_command(uri, args.host, args.port, extra)
    # Ctrl-C and SIGTERM both stop it (SIGINT too where a shell started it ignoring it)
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with running_server(command, env, base, log):
            print(f"MLflow UI on {redact_uri(uri)} at {base} (Ctrl-C stops it; log: {log})")
            if args.host in ALL_INTERFACES:
                print("  (listening on every interface: from another machine use this one's "
                      "address, allowed with `-- --allowed-hosts <name>:<port>`)")
            print("\n".join(address_lines(base, places)), flush=True)
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        print("MLflow UI stopped.")
        return 0
    except RuntimeError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """`python search/ui.py [--host H] [--port P] [--tracking-uri URI] [-- mlflow options]`."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from search.tracking.mlflow_runs import TrackingError, setup_cli

    args, extra = parse_args(argv)
    try:
        uri = setup_cli(args.tracking_uri)  # a moved store followed, a server's login checked
        places = find_places(MlflowClient(uri), args.experiment, args.model)
    except (TrackingError, LookupError, MlflowException) as error:
        print(f"error: {redact_uri(str(error))}", file=sys.stderr)
        return 1
    if d.is_server(uri):  # already served: its addresses, nothing to start
        print(f"MLflow UI of the tracking server {public_uri(uri)}")
        print("\n".join(address_lines(public_uri(uri), places)))
        return 0
    return serve(uri, args, extra, places)


if __name__ == "__main__":
    sys.exit(main())
