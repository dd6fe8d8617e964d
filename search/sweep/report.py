"""The sweep's report: Optuna's own visualisations on disk, and the parent run's record.

Each plot is written twice: into one interactive HTML page (plotly) and as a PNG (Optuna's
matplotlib backend, because plotly's PNG export needs kaleido plus a Chrome install). On the
sweep's MLflow parent run: the best trial (params, objective, its run id and eval metrics),
every trial's val_loss curve in one figure, and the runs a killed sweep left RUNNING closed.
"""

from __future__ import annotations

import html
import logging
import warnings
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import mlflow  # noqa: E402
import optuna  # noqa: E402
import optuna.visualization as vis  # noqa: E402
import optuna.visualization.matplotlib as vis_mpl  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from search import sweep_context  # noqa: E402
from search.model_registry.model_card import with_interval  # noqa: E402
from search.sweep.figures import curves_figure, run_curves, study_curves  # noqa: E402
from search.tracking import mlflow_runs  # noqa: E402
from search.tracking import tags as tag_keys  # noqa: E402

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


# Parallel coordinates with ~20 axes cannot be read: only the most important parameters.
TOP_PARAMS = 6


def top_params(study: optuna.Study, k: int = TOP_PARAMS) -> list[str] | None:
    """The `k` most important parameters (Optuna's fANOVA importances); None: all of them."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranked = list(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
        return None
    return ranked[:k] if len(ranked) > k else None


def held_out_rows(metrics: dict[str, float] | None) -> list[tuple[str, str]]:
    """The best trial's held-out and external figures with their 95 % intervals."""
    metrics = metrics or {}
    rows = []
    prefixes = [("held-out test", "eval_test_")] + [
        (f"external {k.split('_')[1]}", f"ext_{k.split('_')[1]}_")
        for k in sorted(metrics) if k.startswith("ext_") and k.endswith("_roc_auc")]
    for label, prefix in prefixes:
        found = [f"{name} {with_interval(metrics, prefix + name)}" for name in
                 ("roc_auc", "accuracy", "sensitivity", "specificity", "macro_recall")
                 if prefix + name in metrics]
        if found:
            rows.append((f"\u00a0\u00a0{label} (95 % interval)", " · ".join(found)))
    return rows


def header_table(study: optuna.Study, summary: dict[str, Any],
                 held_out: dict[str, float] | None = None) -> str:
    """The report's header: study, counts by state, best trial, its params and its held-out
    figures with intervals, as HTML."""
    rows = [("study", study.study_name),
            ("trials", ", ".join(f"{n} {s.lower()}" for s, n in summary["counts"].items())),
            ("objective", ", ".join(study.metric_names or []) or "value")]
    best = summary.get("best")
    if best:
        rows.append(("best trial", f"{best['number']} → {best['value']:.6g}"))
        # no-break spaces: html.escape below would show an "&nbsp;" as text
        rows += [(f"\u00a0\u00a0{k}", v) for k, v in best["params"].items()]
        rows += held_out_rows(held_out)
    elif summary.get("pareto_front"):
        rows.append(("Pareto front", f"{len(summary['pareto_front'])} trial(s)"))
    cells = "".join(f"<tr><th>{html.escape(str(k), quote=False)}</th>"
                    f"<td>{html.escape(str(v))}</td></tr>" for k, v in rows)
    return ("<table style='border-collapse:collapse;font-family:sans-serif;font-size:14px'>"
            "<style>th{text-align:left;padding:2px 14px 2px 0;font-weight:600}td{padding:2px 0}"
            f"</style>{cells}</table>")


def _curves_png(study: optuna.Study, summary: dict[str, Any], path: Path) -> None:
    """The intermediate values as one readable figure (Optuna's cuts its legend at ~25)."""
    curves, states = study_curves(study.get_trials(deepcopy=False))
    best = summary.get("best") or {}
    names = study.metric_names or ["intermediate value"]
    figure = curves_figure(curves, states, best.get("number"), f"reported {names[0]}",
                           best_value=best.get("value"))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def write_report(study: optuna.Study, folder: Path,
                 held_out: dict[str, float] | None = None) -> list[Path]:
    """Write the sweep's plots (HTML + PNG) and its trials table (CSV) into ``folder``.

    ``held_out``: the best trial's run metrics (eval_test_*, ext_*), shown with intervals.

    A plot that does not apply (e.g. importances with fewer than two finished trials) is
    skipped with a log line rather than failing the sweep's end.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table = folder / "trials.csv"
    # every cell through the one redaction: user attrs and params are free text
    study.trials_dataframe().map(sweep_context.redact_tree).to_csv(table, index=False)
    written.append(table)
    multi = len(study.directions) > 1
    summary = summarize(study)
    sections: list[str] = []
    top = top_params(study)
    for name, (plotly_fn, mpl_fn) in _plots(study).items():
        kwargs: dict[str, Any] = {}
        if multi and name not in ("pareto_front", "intermediate_values"):
            kwargs = {"target": lambda t: t.values[0], "target_name": "objective 0"}
        if name == "parallel_coordinate" and top:
            kwargs["params"] = top
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # Optuna flags its matplotlib backend experimental
                fig = plotly_fn(study, **kwargs)
                # plotly.js embedded once, in the first section: the page works offline.
                sections.append(f"<h2>{name.replace('_', ' ')}</h2>" + fig.to_html(
                    full_html=False, include_plotlyjs=not sections))
                if name == "intermediate_values":
                    _curves_png(study, summary, folder / f"{name}.png")
                else:
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
    page.write_text(sweep_context.redact(  # the plots' hover texts show user attrs
        f"<html><head><meta charset='utf-8'><title>Sweep {study.study_name}</title></head><body>"
        f"<h1>Sweep report: {study.study_name}</h1>{header_table(study, summary, held_out)}"
        f"{''.join(sections)}</body></html>"
    ))
    written.append(page)
    return written


# ---------------------------------------------------------------------------------------------
# The parent run's record of the sweep


def child_runs(client: MlflowClient, study: str, extra: str = "") -> list:
    """Trial runs of a study, in every experiment of the store."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    query = f"tags.`{tag_keys.OPTUNA_STUDY}` = '{study}'" + (f" and {extra}" if extra else "")
    return client.search_runs(experiments, filter_string=query, max_results=5000)


def close_stale_runs(client: MlflowClient, study: optuna.Study, keep: str) -> int:
    """End runs left RUNNING by a killed sweep: trial runs whose trial has finished, and
    other parent runs of this study once no trial is running any more."""
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    alive = any(t.state == optuna.trial.TrialState.RUNNING for t in trials.values())
    closed = 0
    for run in child_runs(client, study.study_name, "attributes.status = 'RUNNING'"):
        if run.info.run_id == keep:
            continue
        number = run.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER)
        if number is None:
            # Between two trials no trial runs, yet the sweep may well be alive: a parent
            # whose process on this host still runs is never closed.
            if (run.data.tags.get(tag_keys.SWEEP_PARENT) == "true" and not alive
                    and mlflow_runs.owner_alive(run.data.tags) is not True):
                client.set_terminated(run.info.run_id, "KILLED")
                closed += 1
            continue
        trial = trials.get(int(number))
        if trial is not None and trial.state.is_finished():
            client.set_tag(run.info.run_id, tag_keys.OPTUNA_TRIAL_STATE, trial.state.name)
            client.set_terminated(run.info.run_id, "KILLED")
            closed += 1
    if closed:
        log.info("closed %d MLflow run(s) left RUNNING by an interrupted sweep", closed)
    return closed


def log_best_trial(client: MlflowClient, study: optuna.Study, summary: dict) -> str | None:
    """Best params and value on the (active) parent run, plus the best trial's run id and eval
    metrics; that run's id, or None when the best trial has no FINISHED run."""
    best = summary.get("best")
    if not best:
        return None
    # The names the trials' runs use, so the parent's row reads like its best trial's.
    mlflow.log_params(dict(best["params"]))
    mlflow.log_metric("objective", best["value"])
    runs = child_runs(client, study.study_name,
                      f"tags.`{tag_keys.OPTUNA_TRIAL_NUMBER}` = '{best['number']}'")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if not finished:
        return None
    run = finished[0]
    mlflow.set_tag(tag_keys.BEST_RUN_ID, run.info.run_id)
    mlflow.log_metrics({
        k: v for k, v in run.data.metrics.items() if k.startswith(("eval_", "ext_"))
    })
    return run.info.run_id


def log_sweep_curves(client: MlflowClient, study: optuna.Study, summary: dict) -> None:
    """Every trial's val_loss per epoch, from the tracked series, as one PNG on the parent."""
    runs = child_runs(client, study.study_name)
    curves = run_curves(client, runs, "val_loss")
    if not curves:
        return
    states = {int(r.data.tags[tag_keys.OPTUNA_TRIAL_NUMBER]):
              r.data.tags.get(tag_keys.OPTUNA_TRIAL_STATE, "")
              for r in runs if tag_keys.OPTUNA_TRIAL_NUMBER in r.data.tags}
    best = summary.get("best") or {}
    figure = curves_figure(curves, states, best.get("number"), "val_loss",
                           title=f"val_loss per epoch: {len(curves)} trials of {study.study_name}",
                           best_value=best.get("value"))
    mlflow.log_figure(figure, "sweep/val_loss_all_trials.png")
    plt.close(figure)
