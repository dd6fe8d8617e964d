"""One picture of a whole sweep: every trial's per-epoch curve, pruned ones apart, best on top.

Optuna's intermediate-values plot gives each trial a legend entry and a colour from a
10-colour cycle: past ~25 trials the legend is cut off (the best trial can go missing) and
colours repeat. Here the PNG's legend has one entry per state plus the best trial, so it reads
the same with 5 trials or 100; the interactive HTML (plotly) gives every trial its own colour,
its run's name on hover and a legend entry that hides or shows it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

from search.tracking import tags as tag_keys  # noqa: E402

# state -> (colour, line style, alpha, width)
STYLE = {
    "COMPLETE": ("tab:blue", "-", 0.55, 1.2),
    "PRUNED": ("0.55", "--", 0.45, 1.0),
    "FAIL": ("tab:red", ":", 0.6, 1.0),
}


def curves_figure(curves: Mapping[int, Sequence[float]], states: Mapping[int, str],
                  best: int | None, metric: str, title: str = "",
                  best_value: float | None = None) -> plt.Figure:
    """Per-epoch `metric` of every trial (epoch 1..n), one figure.

    Args:
        curves: trial number -> values per epoch.
        states: trial number -> Optuna state name (COMPLETE, PRUNED, FAIL...).
        best: the best trial's number, drawn thick and named in the legend with
            `best_value` (its objective).
    """
    fig, ax = plt.subplots(figsize=(9, 5.2))
    counts: dict[str, int] = {}
    for number, values in sorted(curves.items()):
        if not values or number == best:
            continue
        state = states.get(number, "COMPLETE")
        colour, style, alpha, width = STYLE.get(state, STYLE["COMPLETE"])
        epochs = range(1, len(values) + 1)
        ax.plot(epochs, values, linestyle=style, color=colour, alpha=alpha, linewidth=width)
        if state == "PRUNED":  # where the pruner stopped it
            ax.plot(len(values), values[-1], "x", color=colour, alpha=0.8, markersize=5)
        counts[state] = counts.get(state, 0) + 1
    handles = [Line2D([], [], color=STYLE[s][0], linestyle=STYLE[s][1], label=f"{s.lower()} "
                      f"({n})") for s, n in counts.items() if s in STYLE]
    if best is not None and curves.get(best):
        values = list(curves[best])
        ax.plot(range(1, len(values) + 1), values, "o-", color="tab:orange", linewidth=2.6,
                markersize=4, zorder=5)
        handles.insert(0, Line2D([], [], color="tab:orange", marker="o", linewidth=2.6,
                                 label=f"best: trial {best}" + (
                                     "" if best_value is None else f" ({best_value:.4g})")))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} per epoch, {len(curves)} trials")
    ax.grid(alpha=0.3)
    if handles:
        ax.legend(handles=handles, loc="best")
    fig.tight_layout()
    return fig


def study_curves(trials: Sequence) -> tuple[dict[int, list[float]], dict[int, str]]:
    """Optuna's intermediate values (the pruning metric per epoch) and states, by trial."""
    curves = {t.number: [v for _, v in sorted(t.intermediate_values.items())] for t in trials}
    return curves, {t.number: t.state.name for t in trials}


def run_curves(client, runs: Sequence, metric: str = "val_loss") -> dict[int, list[float]]:
    """`metric` per epoch of each trial's MLflow run (the tracked series, pruned included)."""
    curves: dict[int, list[float]] = {}
    for run in runs:
        number = run.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER)
        if number is None or metric not in run.data.metrics:
            continue
        history = sorted(client.get_metric_history(run.info.run_id, metric),
                         key=lambda m: (m.step, m.timestamp))
        by_step = {m.step: m.value for m in history}  # a retried epoch logs its step again
        curves[int(number)] = [by_step[s] for s in sorted(by_step)]
    return curves


DASH = {"COMPLETE": "solid", "PRUNED": "dash", "FAIL": "dot"}


def trial_colours(n: int) -> list[str]:
    """`n` distinct colours: plotly's two largest qualitative sets (50 colours), then an even
    sample of a perceptual scale for bigger sweeps (neighbours alike, every colour distinct)."""
    import plotly.colors as pc

    palette = list(pc.qualitative.Dark24) + list(pc.qualitative.Alphabet)
    return palette[:n] if n <= len(palette) else pc.sample_colorscale("Turbo", n)


def curves_html_figure(curves: Mapping[int, Sequence[float]], states: Mapping[int, str],
                       best: int | None, metric: str, names: Mapping[int, str] | None = None,
                       title: str = "", best_value: float | None = None) -> Any:
    """Every trial's per-epoch `metric` as an interactive plotly figure: one line and one
    colour per trial, named on hover (`names`: trial number -> its run's name), pruned trials
    dashed with a cross where the pruner stopped them, the best drawn thick."""
    import plotly.graph_objects as go

    numbers = sorted(n for n, values in curves.items() if values)
    fig = go.Figure()
    for number, colour in zip(numbers, trial_colours(len(numbers)), strict=True):
        values = list(curves[number])
        state = states.get(number, "COMPLETE") or "COMPLETE"
        name = (names or {}).get(number) or f"t{number:03d} {state.lower()}"
        is_best = number == best
        ends = ["x" if state == "PRUNED" else "circle"] * len(values)
        fig.add_trace(go.Scatter(
            x=list(range(1, len(values) + 1)), y=values, mode="lines+markers", name=name,
            line={"color": colour, "dash": DASH.get(state, "solid"),
                  "width": 4 if is_best else 1.6},
            marker={"size": [0] * (len(values) - 1) + [9 if state == "PRUNED" else 0],
                    "symbol": ends, "color": colour},
            legendrank=1 if is_best else 1000,
            hovertemplate=(f"<b>{name}</b> ({state.lower()}{', best' if is_best else ''})"
                           f"<br>epoch %{{x}}<br>{metric} %{{y:.4f}}<extra></extra>")))
    best_words = "" if best is None else f"; best: trial {best}" + (
        "" if best_value is None else f" ({best_value:.4g})")
    fig.update_layout(
        title=(title or f"{metric} per epoch, {len(numbers)} trials") + best_words,
        xaxis_title="epoch", yaxis_title=metric, hovermode="closest", template="plotly_white",
        legend={"title": {"text": "trials (click: hide / show)"}}, height=620)
    return fig


def run_names_by_trial(runs: Sequence, metric: str = "val_loss") -> dict[int, str]:
    """Trial number -> the name of its run holding `metric` (as `run_curves` picks it)."""
    names = {}
    for run in runs:
        number = run.data.tags.get(tag_keys.OPTUNA_TRIAL_NUMBER)
        if number is not None and metric in run.data.metrics:
            names[int(number)] = run.info.run_name or f"t{int(number):03d}"
    return names


def all_trials_html(runs: Sequence, curves: Mapping[int, Sequence[float]],
                    states: Mapping[int, str], best: Mapping[str, Any], study: str,
                    metric: str = "val_loss") -> str:
    """The sweep's all-trials page (self-contained HTML: MLflow's artifact view and a
    browser offline both run its inline plotly.js)."""
    figure = curves_html_figure(
        curves, states, best.get("number"), metric, run_names_by_trial(runs, metric),
        title=f"{metric} per epoch: {len(curves)} trials of {study}", best_value=best.get("value"))
    return figure.to_html(include_plotlyjs=True, full_html=True)
