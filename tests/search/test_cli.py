"""`xray-sweeps <command>`: the installed command dispatches to each script's own main."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
from pathlib import Path

from search import cli

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_command_is_declared_and_every_command_has_a_main():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["xray-sweeps"] == "search.cli:main"
    assert {"run", "sweep", "ui", "pull", "predict", "serve"} <= {*cli.HYDRA, *cli.COMMANDS}
    for command, module in cli.COMMANDS.items():
        assert callable(importlib.import_module(module).main), command
        assert f"xray-sweeps {command}" in cli.__doc__, command


def test_commands_dispatch_to_the_scripts_and_unknown_ones_are_named(tmp_path, capsys):
    assert cli.main(["nightly-summary", str(tmp_path)]) == 0
    assert "## Nightly sweep" in capsys.readouterr().out
    assert cli.main(["no-such"]) == 2
    assert "unknown command 'no-such'; one of: run, sweep" in capsys.readouterr().err
    assert cli.main([]) == 2 and "xray-sweeps serve" in capsys.readouterr().out


def test_run_goes_through_hydra_as_the_script_does_from_any_folder(tmp_path):
    """`xray-sweeps run` composes conf/ like `python search/run.py` (here: --cfg job, no
    training), also from outside the repository; `pull --help` names the command."""
    job = subprocess.run([sys.executable, "-m", "search.cli", "run", "--cfg", "job", "seed=7"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)})
    assert job.returncode == 0, job.stderr[-2000:]
    assert "seed: 7" in job.stdout and "_target_: data.build.build_data" in job.stdout
    usage = subprocess.run([sys.executable, "-m", "search.cli", "pull", "--help"],
                           capture_output=True, text=True, timeout=120, cwd=REPO)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: xray-sweeps pull")
