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
from search.model_registry.model_store import run_intervals  # noqa: E402
from search.sweep.figures import (  # noqa: E402
    all_trials_html,
    curves_figure,
    run_curves,
    study_curves,
)
from search.tracking import mlflow_runs  # noqa: E402
from search.tracking import tags as tag_keys  # noqa: E402
from search.tracking.descriptions import ALL_TRIALS_FIGURE  # noqa: E402

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
    """The `k` most important parameters (Optuna's fANOVA importances); None: all of them,
    also below IMPORTANCE_MIN_COMPLETE complete trials, where the ranking is noise."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < IMPORTANCE_MIN_COMPLETE:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranked = list(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError):
        return None
    return ranked[:k] if len(ranked) > k else None


def best_trial_intervals(study: optuna.Study, summary: dict[str, Any]) -> dict[str, float]:
    """The best trial's 95 % intervals (`<metric>_ci_low/_ci_high`), from its run's
    `evaluation/*_intervals.json`: runs keep intervals as artifacts, not metric series."""
    best = summary.get("best")
    trials = [t for t in study.get_trials(deepcopy=False) if best and t.number == best["number"]]
    run_id = trials[0].user_attrs.get("mlflow_run_id") if trials else None
    return run_intervals(MlflowClient(), str(run_id)) if run_id else {}


def held_out_rows(metrics: dict[str, float] | None) -> list[tuple[str, str]]:
    """The best trial's held-out and external figures with their 95 % intervals (as
    `<metric>_ci_low/_ci_high` entries beside the point values)."""
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


def objective_name(study: optuna.Study) -> str:
    """The first objective's name (`hydra.sweeper.metric_names`) for every axis: `val_loss`,
    not Optuna's "Objective Value"."""
    names = study.metric_names or []
    return names[0] if names else "objective value"


def _plot_kwargs(study: optuna.Study, name: str, top: list[str] | None) -> dict[str, Any]:
    """Keyword arguments naming the objective on this plot's axis (and its parameters)."""
    target = objective_name(study)
    if name == "pareto_front":
        return {"target_names": list(study.metric_names)} if study.metric_names else {}
    if name == "intermediate_values":
        return {}
    kwargs: dict[str, Any] = {"target_name": target}
    if len(study.directions) > 1:
        kwargs["target"] = lambda t: t.values[0]
    if name == "parallel_coordinate" and top:
        kwargs["params"] = top
    return kwargs


def pruned_points(study: optuna.Study) -> list[tuple[int, float]]:
    """(trial number, last reported value) of each pruned trial: Optuna's optimisation
    history shows COMPLETE trials only, which hides most of a pruned sweep."""
    points = []
    for trial in study.get_trials(deepcopy=False,
                                  states=(optuna.trial.TrialState.PRUNED,)):
        if trial.intermediate_values:
            points.append((trial.number, trial.intermediate_values[max(trial.intermediate_values)]))
    return points


# fANOVA's importances need trials: none below IMPORTANCE_MIN_COMPLETE complete trials, and a
# caveat below max(IMPORTANCE_SOLID, 2 x parameters) (a forest on fewer points than twice its
# inputs ranks them by noise as readily as by effect).
IMPORTANCE_MIN_COMPLETE = 5
IMPORTANCE_SOLID = 30


def importance_caveat(study: optuna.Study) -> str | None:
    """None when the importances stand on enough complete trials, else the caveat to print;
    ValueError below IMPORTANCE_MIN_COMPLETE (the plot is then left out, saying why)."""
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    n_params = len({name for t in complete for name in t.params})
    if len(complete) < IMPORTANCE_MIN_COMPLETE:
        raise ValueError(f"not fitted on {len(complete)} complete trial(s): "
                         f"shown from {IMPORTANCE_MIN_COMPLETE}")
    solid = max(IMPORTANCE_SOLID, 2 * n_params)
    if len(complete) >= solid:
        return None
    return (f"fitted on {len(complete)} complete trials over {n_params} parameters: "
            f"indicative only (solid from about {solid})")


def _decorate_plotly(fig: Any, study: optuna.Study, name: str, caveat: str | None) -> None:
    """The objective's name, the pruned trials and the importances' caveat on a plotly plot."""
    import plotly.graph_objects as go

    target = objective_name(study)
    if name == "optimization_history":
        points = pruned_points(study)
        if points:
            fig.add_trace(go.Scatter(
                x=[n for n, _ in points], y=[v for _, v in points], mode="markers",
                name=f"pruned (last reported {target})",
                marker={"symbol": "x", "color": "#999999", "size": 7}))
    elif name == "intermediate_values":
        fig.update_layout(yaxis_title=f"reported {target}", xaxis_title="epoch")
    elif name == "param_importances" and caveat:
        fig.update_layout(title=f"Hyperparameter importances: {caveat}")


def _decorate_mpl(ax: Any, study: optuna.Study, name: str, caveat: str | None) -> None:
    """The same decorations on Optuna's matplotlib plot."""
    if name == "optimization_history":
        points = pruned_points(study)
        if points:
            ax.scatter([n for n, _ in points], [v for _, v in points], marker="x",
                       color="#999999", label=f"pruned (last reported {objective_name(study)})")
            ax.legend()
    elif name == "param_importances" and caveat:
        # Optuna's title sits on the left: the caveat replaces it there, on a second line
        ax.set_title(f"Hyperparameter Importances\n{caveat}", loc="left", fontsize=11)


def _mpl_png(mpl_fn: Any, study: optuna.Study, name: str, kwargs: dict[str, Any],
             caveat: str | None, path: Path) -> None:
    ax = mpl_fn(study, **kwargs)
    first = ax if hasattr(ax, "figure") else ax.flat[0]
    _decorate_mpl(first, study, name, caveat)
    figure = first.figure
    figure.set_size_inches(9, 5.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


# How many trials the report's table links to their MLflow runs (best first).
LINKED_TRIALS = 10


def trial_links(study: optuna.Study, k: int = LINKED_TRIALS) -> str:
    """The best ``k`` complete trials and then the latest pruned or failed ones, each linked to
    its MLflow run (user attrs `mlflow_run_url` / `mlflow_run_id`), as an HTML table."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    sign = -1 if study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else 1
    chosen = sorted(complete, key=lambda t: sign * t.values[0])[:k]
    chosen += sorted((t for t in trials if t.state.is_finished() and t not in complete),
                     key=lambda t: -t.number)[:max(0, k - len(chosen))]
    rows = []
    for trial in chosen:
        url = trial.user_attrs.get("mlflow_run_url")
        run_id = html.escape(str(trial.user_attrs.get("mlflow_run_id", "—")))
        # no target=_blank: MLflow shows HTML artifacts in a sandbox (allow-scripts only) that
        # blocks new windows, while the frame itself may still follow the link
        cell = (f"<a href='{html.escape(str(url))}'>{run_id}</a>" if url
                else run_id)
        value = f"{trial.values[0]:.6g}" if trial.values else "—"
        rows.append(f"<tr><td>{trial.number}</td><td>{trial.state.name.lower()}</td>"
                    f"<td>{value}</td><td>{cell}</td></tr>")
    if not rows:
        return ""
    return ("<h2>trials and their MLflow runs</h2><table style='font-family:sans-serif;"
            f"font-size:14px'><tr><th>trial</th><th>state</th><th>{objective_name(study)}</th>"
            f"<th>MLflow run</th></tr>{''.join(rows)}</table>")


def _curves_png(study: optuna.Study, summary: dict[str, Any], path: Path) -> None:
    """The intermediate values as one readable figure (Optuna's cuts its legend at ~25)."""
    curves, states = study_curves(study.get_trials(deepcopy=False))
    best = summary.get("best") or {}
    names = study.metric_names or ["intermediate value"]
    figure = curves_figure(curves, states, best.get("number"), f"reported {names[0]}",
                           best_value=best.get("value"))
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _plot(study: optuna.Study, name: str, fns: tuple[Any, Any], kwargs: dict[str, Any],
          summary: dict[str, Any], folder: Path, sections: list[str]) -> bool:
    """One plot: its HTML section appended to ``sections`` and its PNG written (True), or a
    section saying why it does not apply (False)."""
    plotly_fn, mpl_fn = fns
    heading = f"<h2>{name.replace('_', ' ')}</h2>"
    added = False
    try:
        caveat = importance_caveat(study) if name == "param_importances" else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna flags its matplotlib backend experimental
            fig = plotly_fn(study, **kwargs)
            _decorate_plotly(fig, study, name, caveat)
            # plotly.js embedded once, in the first plot: the page works offline.
            first = not any("plotly" in section for section in sections)
            sections.append(heading + fig.to_html(full_html=False, include_plotlyjs=first))
            added = True
            if name == "intermediate_values":
                _curves_png(study, summary, folder / f"{name}.png")
            else:
                _mpl_png(mpl_fn, study, name, kwargs, caveat, folder / f"{name}.png")
    except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as exc:
        log.info("sweep report: %s skipped (%s)", name, exc)
        if not added:
            sections.append(f"{heading}<p>{html.escape(str(exc))}</p>")
        return False
    return True


def write_report(study: optuna.Study, folder: Path,
                 held_out: dict[str, float] | None = None) -> list[Path]:
    """Write the sweep's plots (HTML + PNG) and its trials table (CSV) into ``folder``.

    ``held_out``: the best trial's run metrics (eval_test_*, ext_*), shown with the
    intervals of that trial's run (`best_trial_intervals`).

    A plot that does not apply (e.g. importances with fewer than two finished trials) is
    skipped with a log line rather than failing the sweep's end.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    table = folder / "trials.csv"
    # every cell through the one redaction: user attrs and params are free text
    study.trials_dataframe().map(sweep_context.redact_tree).to_csv(table, index=False)
    written.append(table)
    summary = summarize(study)
    if held_out is not None:
        held_out = {**best_trial_intervals(study, summary), **held_out}
    sections: list[str] = []
    top = top_params(study)
    for name, fns in _plots(study).items():
        if _plot(study, name, fns, _plot_kwargs(study, name, top), summary, folder, sections):
            written.append(folder / f"{name}.png")
    sections.append(trial_links(study))
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
    """Every trial's val_loss per epoch, from the tracked series, on the parent: a PNG, and
    an interactive HTML at the top of its artifacts (one click from the closing lines)."""
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
    mlflow.log_text(all_trials_html(runs, curves, states, best, study.study_name),
                    ALL_TRIALS_FIGURE)
