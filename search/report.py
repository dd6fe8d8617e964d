"""Sweep report from a finished Optuna study, made with Optuna's own visualisations.

Each plot is written twice: into one interactive HTML page (plotly) and as a PNG (Optuna's
matplotlib backend, because plotly's PNG export needs kaleido plus a Chrome install).
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization as vis  # noqa: E402
import optuna.visualization.matplotlib as vis_mpl  # noqa: E402

from search import sweep_context  # noqa: E402

log = logging.getLogger(__name__)


def counts_by_state(study: optuna.Study) -> dict[str, int]:
    """Number of trials in each state (COMPLETE, PRUNED, FAIL, ...)."""
    return sweep_context.counts_by_state(study)


def summarize(study: optuna.Study) -> dict[str, Any]:
    """Best trial (or Pareto front), counts by state and the objective names.

    Computed by the sweeper plugin's summary module, the same that writes
    optuna_summary.yaml, so the two never disagree.
    """
    return sweep_context.study_summary(study)


def _plots(study: optuna.Study) -> dict[str, tuple[Any, Any]]:
    """Name → (plotly function, matplotlib function) applicable to this study."""
    multi = len(study.directions) > 1
    plots: dict[str, tuple[Any, Any]] = {
        "optimization_history": (vis.plot_optimization_history, vis_mpl.plot_optimization_history),
        "intermediate_values": (vis.plot_intermediate_values, vis_mpl.plot_intermediate_values),
        "parallel_coordinate": (vis.plot_parallel_coordinate, vis_mpl.plot_parallel_coordinate),
        "param_importances": (vis.plot_param_importances, vis_mpl.plot_param_importances),
    }
    if multi:
        plots["pareto_front"] = (vis.plot_pareto_front, vis_mpl.plot_pareto_front)
    return plots


def write_report(study: optuna.Study, folder: Path) -> list[Path]:
    """Write the sweep's plots (HTML + PNG) and its trials table (CSV) into ``folder``.

    A plot that does not apply (e.g. importances with fewer than two finished trials) is
    skipped with a log line rather than failing the sweep's end.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table = folder / "trials.csv"
    study.trials_dataframe().to_csv(table, index=False)
    written.append(table)
    multi = len(study.directions) > 1
    sections: list[str] = []
    for name, (plotly_fn, mpl_fn) in _plots(study).items():
        kwargs: dict[str, Any] = {}
        if multi and name not in ("pareto_front", "intermediate_values"):
            kwargs = {"target": lambda t: t.values[0], "target_name": "objective 0"}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna flags its matplotlib backend experimental
                fig = plotly_fn(study, **kwargs)
                # plotly.js embedded once, in the first section: the page works offline.
                sections.append(f"<h2>{name.replace('_', ' ')}</h2>" + fig.to_html(
                    full_html=False, include_plotlyjs=not sections))
                ax = mpl_fn(study, **kwargs)
                figure = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
                figure.set_size_inches(9, 5.5)
                figure.tight_layout()
                figure.savefig(folder / f"{name}.png", dpi=110)
                plt.close(figure)
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
            log.info("sweep report: %s skipped (%s)", name, exc)
            continue
        written.append(folder / f"{name}.png")
    page = folder / "sweep_report.html"
    summary = summarize(study)
    page.write_text(
        f"<html><head><meta charset='utf-8'><title>Sweep {study.study_name}</title></head><body>"
        f"<h1>Sweep report: {study.study_name}</h1><pre>{summary}</pre>{''.join(sections)}"
        "</body></html>"
    )
    written.append(page)
    return written
