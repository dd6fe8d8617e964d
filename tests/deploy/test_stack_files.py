"""The deployment files as written: compose (schema + what a GPU team needs), the image, the
GitHub workflows (schema; actionlint runs in .ci/run), the nightly recipe and its summary.

No Docker engine here: the compose files are validated, not run.
"""

from __future__ import annotations

import configparser
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def check_schema(schema: str, *files: Path) -> None:
    """check-jsonschema against its vendored copy of a public schema (no network)."""
    proc = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema,
         *map(str, files)], capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def compose(name: str = "docker-compose.yml") -> dict:
    return yaml.safe_load((REPO / name).read_text())


def test_compose_files_follow_the_compose_spec():
    check_schema("vendor.compose-spec", REPO / "docker-compose.yml",
                 REPO / "docker-compose.gpu.yml")


def test_compose_services_health_ports_and_secrets():
    services = compose()["services"]
    assert set(services) == {"db", "mlflow", "worker"}
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no health check"
    # Workers wait for a healthy database and a healthy tracking server.
    assert services["worker"]["depends_on"] == {"db": {"condition": "service_healthy"},
                                                "mlflow": {"condition": "service_healthy"}}
    assert services["mlflow"]["depends_on"]["db"]["condition"] == "service_healthy"
    # Published ports default to 127.0.0.1; the worker publishes none (scalable).
    for name in ("db", "mlflow"):
        for port in services[name]["ports"]:
            assert port.startswith("${BIND_ADDRESS:-127.0.0.1}:"), port
    assert "ports" not in services["worker"] and "container_name" not in services["worker"]
    # The password only ever comes from the environment (.env), never the repo.
    text = (REPO / "docker-compose.yml").read_text()
    assert "${POSTGRES_PASSWORD:?" in text
    assert set(compose()["volumes"]) == {"pgdata", "mlartifacts"}
    assert "--artifacts-destination=/mlartifacts" in services["mlflow"]["command"]
    ignored = (REPO / ".gitignore").read_text().splitlines()
    assert ".env" in ignored and (REPO / ".env.example").is_file()
    example = dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert example["BIND_ADDRESS"] == "127.0.0.1" and "POSTGRES_PASSWORD" in example


def test_gpu_override_reserves_one_gpu_per_worker_and_the_cuda_build():
    worker = compose("docker-compose.gpu.yml")["services"]["worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    assert worker["build"]["args"]["TF_PACKAGE"].startswith("tensorflow[and-cuda]")


def test_image_is_non_root_pinned_and_without_test_tools():
    docker = (REPO / "Dockerfile").read_text()
    assert "\nUSER sweeps\n" in docker and "useradd" in docker
    assert "requirements.lock" in docker and "PIP_NO_CACHE_DIR=1" in docker
    assert "[test]" not in docker
    pins = [line for line in (REPO / "requirements.lock").read_text().splitlines()
            if line and not line.startswith("#")]
    assert pins and all("==" in p for p in pins)
    names = {p.split("==")[0].lower() for p in pins}
    assert {"mlflow", "optuna", "hydra-core", "keras"} <= names
    assert not names & {"pytest", "ruff", "tensorflow"}  # TF comes from TF_PACKAGE


def test_workflows_follow_the_github_schema_and_the_nightly_contract():
    workflows = REPO / ".github" / "workflows"
    check_schema("vendor.github-workflows", workflows / "ci.yml", workflows / "nightly.yml")
    nightly = yaml.safe_load((workflows / "nightly.yml").read_text())
    triggers = nightly[True]  # YAML 1.1 reads the key `on` as True
    assert "schedule" in triggers and "workflow_dispatch" in triggers
    job = nightly["jobs"]["sweep"]
    # the owner's switch (tests/deploy/test_nightly_workflow.py), not a hard-coded owner
    assert job["needs"] == "enabled" and "repository_owner" not in json.dumps(nightly)
    steps = {s.get("name", s.get("uses")): s for s in job["steps"]}
    assert steps["actions/setup-python@v5"]["with"]["cache-dependency-path"] == "pyproject.toml"
    assert "+experiment=nightly" in steps["Nightly sweep"]["run"]
    assert "GITHUB_STEP_SUMMARY" in steps["Summary"]["run"]
    ci = yaml.safe_load((workflows / "ci.yml").read_text())
    assert {"push", "pull_request"} <= set(ci[True])
    assert "bash .ci/run" in ci["jobs"]["test"]["steps"][-1]["run"]


def test_nightly_summary_reads_the_sweep_folder(tmp_path):
    from search.nightly_summary import summary_markdown

    assert "stopped before its end" in summary_markdown(tmp_path, env={})
    (tmp_path / "optuna_summary.yaml").write_text(yaml.safe_dump({
        "study": "nightly", "sampler": "TPESampler", "pruner": "HyperbandPruner",
        "states": {"COMPLETE": 5, "PRUNED": 3, "FAIL": 0}, "elapsed_s": 241.5,
        "stop_reason": "n_trials", "best": {"number": 4, "value": 0.2131}}))
    (tmp_path / "promotion.json").write_text(json.dumps({
        "model_name": "pneumonia-cnn-nightly", "version": 3, "alias": "challenger",
        "metric": "roc_auc", "new_metrics": {"roc_auc": 0.9412}}))
    text = summary_markdown(tmp_path, env={"RC": "1", "WALL_S": "260", "REPORT_URL": "http://r"})
    assert "| best value | 0.2131 (trial 4) |" in text
    assert "| trials | 5 COMPLETE, 3 PRUNED |" in text
    assert "| held-out roc_auc | 0.9412 (pneumonia-cnn-nightly v3, challenger) |" in text
    assert "| exit status | 1 (failed) |" in text and "(http://r)" in text


@pytest.mark.parametrize(("value", "floor", "missed"), [(0.85, 0.9, True), (0.93, 0.9, False)])
def test_quality_floor(value, floor, missed):
    from search.model_registry.champion import PromotionDecision, floor_failure

    decision = PromotionDecision(
        model_name="m", version=2, run_id="r", alias="challenger", promoted=False,
        metric="roc_auc", tie_break="sensitivity", reason="", new_metrics={"roc_auc": value})
    message = floor_failure(decision, floor)
    assert (message is not None) == missed
    if missed:
        assert "roc_auc 0.8500 < registry.floor 0.9000" in message
    assert floor_failure(decision, None) is None
    assert "registered no model" in floor_failure(None, floor)


# ---------------------------------------------------------------------------------------------
# Logins on the team stack: docker/compose.auth.yml over docker-compose.yml, MLflow's basic-auth
# app configured by docker/basic_auth.ini; every credential from the environment (.env).
# ---------------------------------------------------------------------------------------------

AUTH_OVERRIDE = REPO / "docker" / "compose.auth.yml"
AUTH_INI = REPO / "docker" / "basic_auth.ini"


def env_example() -> dict[str, str]:
    return dict(line.split("=", 1) for line in (REPO / ".env.example").read_text().splitlines()
                if line and not line.startswith("#"))


def test_auth_override_follows_the_compose_spec_and_adds_the_app():
    check_schema("vendor.compose-spec", AUTH_OVERRIDE)
    base = compose()["services"]["mlflow"]["command"]
    mlflow = yaml.safe_load(AUTH_OVERRIDE.read_text())["services"]["mlflow"]
    # compose replaces a list on override: the base command must be there whole, plus the app
    assert mlflow["command"] == [*base, "--app-name=basic-auth"]
    assert mlflow["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert "./docker/basic_auth.ini:/etc/mlflow/basic_auth.ini:ro" in mlflow["volumes"]
    # the health check stays the base one: MLflow's auth app leaves /health open
    assert "healthcheck" not in mlflow


def test_auth_credentials_come_only_from_the_environment():
    override = yaml.safe_load(AUTH_OVERRIDE.read_text())["services"]
    server, worker = override["mlflow"]["environment"], override["worker"]["environment"]
    for value in (server["MLFLOW_AUTH_ADMIN_PASSWORD"], server["MLFLOW_FLASK_SERVER_SECRET_KEY"],
                  worker["MLFLOW_TRACKING_PASSWORD"]):
        assert value.startswith("${") and ":?" in value, value  # required, never a default
    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    assert "admin_password" not in ini["mlflow"]
    example = env_example()
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
                 "MLFLOW_TRACKING_PASSWORD"):
        assert example[name] == "", name  # empty: compose refuses to start until it is set
    assert "docker/compose.auth.yml" in (REPO / ".env.example").read_text()


def test_auth_users_live_on_their_own_volume_not_under_the_served_artifacts():
    ini = configparser.ConfigParser()
    ini.read(AUTH_INI)
    database = ini["mlflow"]["database_uri"]
    assert database.startswith("sqlite:////mlauth/")
    override = yaml.safe_load(AUTH_OVERRIDE.read_text())
    assert "mlauth:/mlauth" in override["services"]["mlflow"]["volumes"]
    assert "mlauth" in override["volumes"]
    assert "/mlartifacts" not in database
    # the server runs as `sweeps`: a new named volume takes the ownership of its mount point
    assert "chown sweeps:sweeps /mlartifacts /mlauth" in (REPO / "Dockerfile").read_text()


def test_mlflow_reads_the_stack_ini_with_the_admin_from_the_environment(monkeypatch):
    """MLflow's own reader on the repo's ini: the admin's password is the environment's."""
    from mlflow.server.auth.config import read_auth_config

    monkeypatch.setenv("MLFLOW_AUTH_CONFIG_PATH", str(AUTH_INI))
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_AUTH_ADMIN_PASSWORD", "from-the-env-123")
    config = read_auth_config()
    assert (config.admin_username, config.admin_password) == ("admin", "from-the-env-123")
    assert config.authorization_function.endswith(":authenticate_request_basic_auth")
    assert config.default_permission == "READ"


def test_the_auth_app_is_installed_for_tests_and_the_image():
    import importlib.util
    import tomllib

    assert importlib.util.find_spec("flask_wtf") is not None  # what --app-name basic-auth needs
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert any(r.startswith("mlflow[auth]") for r in extras["test"])
    assert '"mlflow[auth]"' in (REPO / "Dockerfile").read_text()


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${NAME}` / `${NAME:-default}` interpolation, nested defaults included."""
    import re

    pattern = re.compile(r"\$\{(\w+)(?::-((?:[^${}]|\$\{[^{}]*\})*))?\}")
    while (found := pattern.search(text)) is not None:
        name, default = found.group(1), found.group(2)
        value = env.get(name) or interpolate(default or "", env)
        text = text[:found.start()] + value + text[found.end():]
    return text


def test_mlflow_allowed_hosts_follow_the_published_port_and_the_settings():
    """The server answers its workers, this machine on MLFLOW_PORT and private-network IPs,
    and the names MLFLOW_ALLOWED_HOSTS gives; other Host headers stay refused."""
    from mlflow.server.security_utils import is_allowed_host_header

    service = compose()["services"]["mlflow"]
    (flag,) = [a for a in service["command"] if a.startswith("--allowed-hosts=")]
    assert flag.startswith("--allowed-hosts=${MLFLOW_ALLOWED_HOSTS:-")
    assert "localhost:5000" not in flag.replace("${MLFLOW_PORT:-5000}", "PORT")  # no pinned port
    worker = compose()["services"]["worker"]["environment"]["MLFLOW_TRACKING_URI"]

    def allowed(env: dict[str, str], host: str) -> bool:
        return is_allowed_host_header(interpolate(flag, env).split("=", 1)[1].split(","), host)

    moved = {"MLFLOW_PORT": "8080"}
    for host in ("localhost:8080", "127.0.0.1:8080", worker.split("//")[1], "192.168.1.20:8080",
                 "10.0.0.7:8080", "172.20.0.3:8080"):
        assert allowed(moved, host), host
    for host in ("localhost:5000x", "evil.example:8080", "172.40.0.3:8080"):
        assert not allowed(moved, host), host
    assert allowed({}, "localhost:5000") and not allowed(moved, "gpu-box:8080")
    assert allowed({**moved, "MLFLOW_ALLOWED_HOSTS": "gpu-box:8080,mlflow:5000"}, "gpu-box:8080")
