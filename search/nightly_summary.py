"""A sweep folder as a short Markdown table, e.g. for ``$GITHUB_STEP_SUMMARY``.

``python -m search.nightly_summary <hydra.sweep.dir>`` reads the sweeper's
``optuna_summary.yaml`` and the registry's ``promotion.json`` (written by the sweep
callback) and prints the best value, the registered version's held-out ROC AUC against the
floor, the trial counts by state and the wall time. ``RC``, ``WALL_S`` and ``REPORT_URL``
from the environment add the exit status, the step's wall time and a link.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import yaml

from search.model_registry.registry_settings import DEFAULTS
from search.sweep_context import SUMMARY_FILE


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def summary_markdown(sweep_dir: Path, env: dict[str, str] | None = None) -> str:
    """The table; says plainly what is missing when the sweep did not get that far."""
    env = dict(os.environ if env is None else env)
    lines = ["## Nightly sweep", "", "| | |", "| --- | --- |"]
    summary_path = sweep_dir / SUMMARY_FILE
    if not summary_path.is_file():
        lines.append(f"| result | no {SUMMARY_FILE}: the sweep stopped before its end |")
    else:
        summary = yaml.safe_load(summary_path.read_text())
        best = summary.get("best") or {}
        lines.append(f"| study | {summary.get('study')} ({summary.get('sampler')}, "
                     f"{summary.get('pruner')}) |")
        lines.append(f"| best value | {_fmt(best.get('value', 'none'))} (trial "
                     f"{best.get('number', '-')}) |")
        states = {k: v for k, v in (summary.get("states") or {}).items() if v}
        lines.append("| trials | " + ", ".join(f"{v} {k}" for k, v in states.items()) + " |")
        lines.append(f"| sweeper time | {summary.get('elapsed_s')} s "
                     f"(stop: {summary.get('stop_reason')}) |")
    promotion_path = sweep_dir / "promotion.json"
    if promotion_path.is_file():
        p = json.loads(promotion_path.read_text())
        metric = p.get("metric", DEFAULTS.metric)  # a record from before the key
        value = (p.get("new_metrics") or {}).get(metric, p.get("new_score"))
        lines.append(f"| held-out {metric} | {_fmt(value)} ({p.get('model_name')} "
                     f"v{p.get('version')}, {p.get('alias')}) |")
    else:
        lines.append("| held-out | nothing registered |")
    if env.get("WALL_S"):
        lines.append(f"| wall time | {env['WALL_S']} s |")
    if env.get("RC"):
        lines.append(f"| exit status | {env['RC']}{' (failed)' if env['RC'] != '0' else ''} |")
    if env.get("REPORT_URL"):
        lines.append(f"| report | [sweep_report artifact]({env['REPORT_URL']}) |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m search.nightly_summary <sweep dir>", file=sys.stderr)
        return 2
    print(summary_markdown(Path(args[0])), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
