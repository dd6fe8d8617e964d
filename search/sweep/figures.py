"""One picture of a whole sweep: every trial's per-epoch curve, pruned ones apart, best on top.

Optuna's intermediate-values plot gives each trial a legend entry and a colour from a
10-colour cycle: past ~25 trials the legend is cut off (the best trial can go missing) and
colours repeat. Here the legend has one entry per state plus the best trial, so the figure
reads the same with 5 trials or 100.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
