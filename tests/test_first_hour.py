"""The README's first hour, run as written: its `<!-- first-hour -->` block, step by step, on a
tiny sweep into a private store, with TensorFlow's own start-up logging left on (no
TF_CPP_MIN_LOG_LEVEL). Then the hour's promises are checked on what it produced: no TensorFlow
start-up line, the printed UI addresses open on the training runs in headless Chromium
(screenshots kept beside the store), the all-trials figure one click from the printed lines, the
pulled card's images where it links them, no `:5000` in any description, `models:/m-<id>`
predicts, one label vocabulary in CSV and REST, and at most about 30 series per trial run."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TINY_RUN
from tests.stack.conftest import free_port

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SAMPLE = SHARED / "data" / "chest_xray_sample"
# TensorFlow's and XLA's native start-up lines (absl logging before Python's logging is up)
TF_START_UP = re.compile(r"cuInit|oneDNN|cpu_feature_guard|TensorFlow binary is optimized|"
                         r"Unable to register cu|absl::InitializeLog|^[EWI]0000 ", re.MULTILINE)
# the default sweep made tiny: the keys its space searches fixed to the tiny run's values
TINY_SWEEP = (*TINY_RUN, "hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=1",
              "hydra/sweeper/pruner=nop", "trainer.max_epochs=2", "model.depth=2",
              "model.base_filters=8", "model.dense_units=16")
MAX_SERIES = 30
START_LIMIT_S = 240


def readme_steps() -> list[str]:
    """The commands of the README's first-hour block, comments dropped."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- first-hour -->", 1)[1].split("<!-- /first-hour -->", 1)[0]
    return [re.split(r"\s{2,}#", line, maxsplit=1)[0].strip() for line in block.splitlines()
            if line.strip() and not line.startswith("```")]


@dataclass
class Hour:
    """The hour's working folder, environment, and what each step printed."""

    work: Path
    env: dict[str, str]
    ui_port: int = field(default_factory=free_port)
    serve_port: int = field(default_factory=free_port)
    printed: dict[str, str] = field(default_factory=dict)  # step -> stdout + stderr
    background: list[tuple[subprocess.Popen, Path]] = field(default_factory=list)
    export: Path | None = None

    @property
    def uri(self) -> str:
        return self.env["MLFLOW_TRACKING_URI"]

    def client(self) -> Any:
        """The hour's store, tracking and registry (not whatever registry an earlier test set
        process-wide)."""
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)

    def localise(self, step: str) -> list[str]:
        """The README's command, pointed at this hour's store, folders and ports."""
        argv = [a.replace("../shared/", f"{SHARED}/") for a in shlex.split(step)]
        if argv[0] == "python":
            argv = [sys.executable, str(REPO / argv[1]), *argv[2:]]
        if self.export is not None:
            argv = [str(self.export) if a.startswith("exports/") else a for a in argv]
        script = Path(argv[1]).name if len(argv) > 1 else ""
        if script == "run.py":
            argv += [*TINY_SWEEP, f"hydra.sweep.dir={self.work / 'sweep'}",
                     f"hydra.sweeper.storage=sqlite:///{self.work / 'optuna.db'}",
                     f"tracking.artifact_root={(self.work / 'artifacts').as_uri()}"]
        elif script == "ui.py":
            argv += ["--port", str(self.ui_port)]
        elif script == "serve.py" and "--request" not in argv:
            argv += ["--port", str(self.serve_port)]
        return [a.replace("127.0.0.1:5001", f"127.0.0.1:{self.serve_port}") for a in argv]

    def run(self, step: str) -> None:
        """One step: in the foreground (output kept, exit 0 asserted) or, ending in `&`, in the
        background until it is ready."""
        background, redirect = step.endswith("&"), None
        step = step.rstrip("& ")
        if " > " in step:
            step, redirect = (part.strip() for part in step.split(" > ", 1))
        argv = self.localise(step)
        if background:
            return self.start(step, argv)
        proc = subprocess.run(argv, cwd=self.work, env=self.env, capture_output=True, text=True,
                              timeout=900)
        self.printed[step] = proc.stdout + proc.stderr
        # kept for a person to read: what a newcomer sees at each step
        (self.work / f"step{len(self.printed)}.out").write_text(f"$ {step}\n{self.printed[step]}")
        assert proc.returncode == 0, f"{step}\n{self.printed[step][-3000:]}"
        if redirect:
            (self.work / redirect).write_text(proc.stdout)
        if Path(argv[1]).name == "pull.py":
            self.export = Path(re.search(r" to (\S+)\s*$", proc.stdout, re.MULTILINE)[1])
            self.export = self.export if self.export.is_absolute() else self.work / self.export

    def start(self, step: str, argv: list[str]) -> None:
        """A server step: started in its own session, ready when it answers."""
        log = self.work / f"{Path(argv[1]).stem}.out"
        with log.open("w") as out:
            proc = subprocess.Popen(argv, cwd=self.work, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.background.append((proc, log))
        port = self.ui_port if Path(argv[1]).name == "ui.py" else self.serve_port
        path = "/health" if Path(argv[1]).name == "ui.py" else "/ping"
        deadline = time.monotonic() + START_LIMIT_S
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{step} exited {proc.returncode}:\n{log.read_text()}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5):
                    break
            except OSError:
                time.sleep(1)
        else:
            pytest.fail(f"{step} did not answer on port {port} in {START_LIMIT_S} s")
        time.sleep(1)  # the addresses are printed right after the server answers
        self.printed[step] = log.read_text()

    def stop(self) -> None:
        for proc, _ in self.background:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()


@pytest.fixture(scope="module")
def hour(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hour]:
    """The README's first hour, every step run once for the whole module."""
    work = tmp_path_factory.mktemp("first-hour")
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "XRAY_STARTUP_LOGS")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    hour = Hour(work, env)
    try:
        for step in readme_steps():
            hour.run(step)
        yield hour
    finally:
        hour.stop()


def step_output(hour: Hour, script: str, *, also: str = "") -> str:
    """What the step running `script` (and containing `also`) printed."""
    found = [text for step, text in hour.printed.items() if script in step and also in step]
    assert found, f"the README's first hour has no step running {script} {also}"
    return found[0]


def test_the_readme_block_is_the_hour_the_issue_names() -> None:
    scripts = " ".join(readme_steps())
    for part in ("search/run.py -m", "search/ui.py", "search/pull.py", "search/predict.py",
                 "search/serve.py", "--request", "curl"):
        assert part in scripts


def test_no_step_prints_a_tensorflow_start_up_line(hour: Hour) -> None:
    noisy = {step: TF_START_UP.findall(text) for step, text in hour.printed.items()
             if TF_START_UP.search(text)}
    assert not noisy, noisy
    assert set(hour.printed) == {s.rstrip("& ").split(" > ")[0].strip() for s in readme_steps()}


def test_no_step_narrates_its_libraries_start_in_another_format(hour: Hour) -> None:
    """MLflow's schema creation, Optuna's study creation and `mlflow models serve`'s backend
    narration say again, in their own formats, what the steps' own lines say."""
    narration = re.compile(r"mlflow\.store\.db\.utils|A new study created in RDB|"
                           r"=== Running command|Selected backend for flavor")
    found = {step: narration.findall(text) for step, text in hour.printed.items()
             if narration.search(text)}
    assert not found, found
    pulled = step_output(hour, "search/pull.py")
    assert re.search(r"threshold 0\.\d{1,4},", pulled), pulled  # as the card says it


def test_the_printed_ui_addresses_open_on_the_training_runs(hour: Hour, browser) -> None:

    printed = step_output(hour, "search/ui.py")
    found = dict(re.findall(r"^\s+(runs|sweep|curves|champion):\s+(\S+)", printed, re.MULTILINE))
    assert set(found) == {"runs", "sweep", "curves", "champion"}, printed
    client = hour.client()
    parent = client.search_runs([e.experiment_id for e in client.search_experiments()],
                                "tags.`sweep.parent` = 'true'")[0]
    trials = [r.info.run_name for r in client.search_runs([parent.info.experiment_id],
              f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")]
    page = browser.new_page(viewport={"width": 1400, "height": 900})
    try:
        texts = {}
        for name, url in found.items():
            page.goto(url, wait_until="load")
            page.get_by_text(re.compile("Run Name|Description|Version 1|val_loss")).first\
                .wait_for(timeout=60_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(hour.work / f"ui-{name}.png"))
            texts[name] = page.inner_text("body")
            if name == "curves":  # the HTML artifact renders in MLflow's artifact viewer
                frame = next(f for f in page.frames if f is not page.main_frame)
                frame.get_by_text(trials[0]).first.wait_for(timeout=60_000)
                texts["curves-figure"] = frame.inner_text("body")
    finally:
        page.close()
    assert "Welcome" not in " ".join(texts.values())  # not MLflow's GenAI landing page
    assert "Observability" not in texts["runs"]  # not the experiment's GenAI overview
    assert "Run Name" in texts["runs"] and parent.info.run_name[:15] in texts["runs"]
    assert "Registry:" in texts["sweep"] and parent.info.run_name in texts["sweep"]
    assert all(t in texts["curves-figure"] for t in trials) and "val_loss" in texts["curves-figure"]
    assert "Version 1" in texts["champion"] and "champion" in texts["champion"]
    for name in found:
        assert (hour.work / f"ui-{name}.png").stat().st_size > 10_000


def test_the_all_trials_figure_is_one_click_from_the_sweeps_closing_lines(hour: Hour,
                                                                          browser) -> None:
    printed = step_output(hour, "search/run.py")
    figure = re.search(r"curves:\s+(\S+)", printed)[1]
    page = browser.new_page()
    try:
        page.goto(figure, wait_until="load")
        page.get_by_text("trials (click: hide / show)").wait_for(timeout=60_000)
        assert "val_loss" in page.inner_text("body")
    finally:
        page.close()


def test_the_pulled_card_shows_its_images_where_it_links_them(hour: Hour) -> None:
    card = (hour.export / "MODEL_CARD.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", card)
    assert images, card
    for image in images:
        assert (hour.export / image).is_file(), f"MODEL_CARD.md links {image}: missing"


def test_no_description_holds_the_default_port(hour: Hour) -> None:

    client = hour.client()
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    texts = [r.data.tags.get("mlflow.note.content", "") for r in runs]
    texts += [m.description or "" for m in client.search_registered_models()]
    texts += [v.description or "" for v in client.search_model_versions()]
    assert len(texts) >= 4 and all(texts[:3])
    assert not [t for t in texts if ":5000" in t]


def test_the_logged_model_uri_predicts(hour: Hour) -> None:

    source = hour.client().get_model_version("pneumonia-cnn", "1").source
    assert source.startswith("models:/m-")  # the logged model the UI's "Source Model" opens
    out = hour.work / "predictions-logged"
    proc = subprocess.run([sys.executable, str(REPO / "search" / "predict.py"), source,
                           str(SAMPLE), "--out", str(out)],
                          cwd=hour.work, env=hour.env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not TF_START_UP.search(proc.stdout + proc.stderr)
    with (out / "predictions.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 16


def test_one_label_vocabulary_in_csv_and_rest(hour: Hour) -> None:
    with (hour.work / "predictions" / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 16 and {"true_label", "predicted_label"} <= set(rows[0])
    assert "label" not in rows[0]
    assert {r["true_label"] for r in rows} == {"normal", "pneumonia"}
    answer = json.loads(step_output(hour, "curl"))
    prediction = answer["predictions"][0]
    assert prediction["predicted_label"] in ("normal", "pneumonia") and "label" not in prediction


def test_no_trial_run_has_more_than_about_30_series(hour: Hour) -> None:

    client = hour.client()
    trials = [r for r in client.search_runs([e.experiment_id
                                             for e in client.search_experiments()])
              if r.data.tags.get("mlflow.parentRunId")]
    assert len(trials) == 2
    counts = {r.info.run_name: len(r.data.metrics) for r in trials}
    assert max(counts.values()) <= MAX_SERIES, counts


def test_the_readmes_dry_run_prints_no_tensorflow_start_up_line(tmp_path: Path) -> None:
    """The README's "prove it first" dry run checks a trial's model in-process: TensorFlow's
    first device query (cuInit) there must be as quiet as the sweep's."""
    line = next(s for s in re.findall(r"^python search/run\.py -m hydra\.sweeper\.dry_run=\S+",
                                      (REPO / "README.md").read_text(), re.MULTILINE))
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "XRAY_STARTUP_LOGS")}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
    hour = Hour(tmp_path, env)
    argv = [a.replace("dry_run=5", "dry_run=2") for a in hour.localise(line)]
    proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "Dry run passed" in proc.stdout + proc.stderr, proc.stderr
    assert not TF_START_UP.search(proc.stdout + proc.stderr), proc.stderr
