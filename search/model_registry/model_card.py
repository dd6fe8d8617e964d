"""MODEL_CARD.md of a pulled model version: what it is, how it scored, how to use it."""

from __future__ import annotations

import json
from typing import Any

from search.tracking import tags as tag_keys


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def decision(info: dict[str, Any]) -> str:
    """How a label is chosen: the stored threshold (two classes) or the argmax (K)."""
    if info.get("threshold") is None:
        return (f"the most probable of the {len(info['class_names'])} classes (argmax; no "
                "threshold)")
    return (f"P({info['class_names'][-1]}) >= {_fmt(info.get('threshold'))} (threshold rule "
            f"`{info.get('threshold_rule')}`, chosen on validation)")


def calibrated(info: dict[str, Any]) -> str:
    """How the served probabilities were calibrated (folded into the output layer)."""
    calibration = info.get("calibration")
    if not calibration:
        return "as trained (no calibration)"
    if calibration["method"] == "members":
        return "each member's calibrated on validation before averaging"
    return (f"calibrated on validation ({calibration['method']}, temperature "
            f"{_fmt(float(calibration['temperature']))}, folded into the output layer)")


def with_interval(metrics: dict[str, float], key: str) -> str:
    """`0.9712 [0.9500, 0.9861]`, the point value alone without an interval, `-` if absent.

    The interval is `{key}_ci_low/_ci_high` in ``metrics``: model_info.json's metrics, where
    `model_store.run_metrics` put the run's `evaluation/*_intervals.json` (not metric series)."""
    if metrics.get(key) is None:
        return "-"
    low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
    interval = f" [{_fmt(low)}, {_fmt(high)}]" if low is not None and high is not None else ""
    return _fmt(metrics[key]) + interval


def operating_point(info: dict[str, Any]) -> list[str]:
    """Where the model operates on held-out images: at its stored threshold, with intervals,
    and the ROC curve the pull copied beside the card."""
    metrics = info.get("metrics") or {}
    keys = ["sensitivity", "specificity"] if info.get("threshold") is not None else [
        "macro_recall", "macro_specificity"]
    found = [(k, with_interval(metrics, f"eval_test_{k}")) for k in keys]
    lines = ["", "## Operating point", ""]
    if all(v == "-" for _, v in found):
        return lines + ["No held-out test split was evaluated (data.test_fraction=0)."]
    lines.append(f"On the run's held-out test split at {decision(info)}: "
                 + ", ".join(f"{k} {v}" for k, v in found)
                 + " (95 % stratified bootstrap intervals, threshold fixed).")
    if "evaluation/test_roc_pr.png" in (info.get("figures") or []):
        lines += ["", "![held-out ROC and precision-recall curves](evaluation/test_roc_pr.png)"]
    if "evaluation/test_confusion.png" in (info.get("figures") or []):
        lines += ["", "![held-out confusion matrix](evaluation/test_confusion.png)"]
    return lines


def external_tables(metrics: dict[str, float]) -> list[str]:
    """One row per external set and metric (`evaluation.external`: never used for selection)."""
    keys = sorted(k for k in metrics if k.startswith("ext_") and "_ci_" not in k)
    if not keys:
        return []
    lines = ["", "## External sets", "",
             "Scored at the stored threshold, never used for selection or the threshold.", "",
             "| set | metric | value (95 % interval) |", "| --- | --- | --- |"]
    for key in keys:
        name, metric = key.removeprefix("ext_").split("_", 1)
        lines.append(f"| {name} | {metric} | {with_interval(metrics, key)} |")
    return lines


def model_card(info: dict[str, Any], has_config: bool = True) -> str:
    """MODEL_CARD.md for a pulled version."""
    tags = info.get("version_tags") or {}
    lines = [
        f"# {info['name']} v{info['version']}",
        "",
        f"Aliases: {', '.join(info['aliases']) or 'none'}"
        + (f" (pulled as `{info['alias_requested']}`)" if info.get("alias_requested") else ""),
        "",
        "| field | value |",
        "| --- | --- |",
        f"| registry URI | `{info['model_uri']}` |",
        f"| run | `{info.get('run_uri')}`"
        + (f" ({info['run_link']})" if info.get("run_link") != info.get("run_uri") else "")
        + " |",
        f"| tracking store | `{info.get('tracking_uri')}` |",
        f"| registered | {info.get('created')} |",
        f"| exported | {info.get('exported')} |",
        f"| classes | {', '.join(map(str, info['class_names']))} |",
        f"| decision | {decision(info)} |",
        f"| probabilities | {calibrated(info)} |",
        f"| data fingerprint | `{info.get('data_fingerprint')}` |",
        f"| config hash | `{info.get('config_hash')}` |",
        f"| preprocessing | `{json.dumps(info['preprocessing'], sort_keys=True)}` |",
        "",
        "## Metrics of the training run",
        "",
        "Computed by search/training/trainer.py on the run's own splits; `test` is that config's"
        " held-out",
        "split (never used for tuning), not an official test set."
        + (" With more than two classes, `macro_*` are means over the classes, `roc_auc` and"
           " `pr_auc` are one-vs-rest and macro-averaged, and `recall_<class>`,"
           " `precision_<class>`, `f1_<class>` are per class."
           if len(info["class_names"]) > 2 else ""),
        "",
        "| metric | val | test (95 % interval) |",
        "| --- | --- | --- |",
    ]
    metrics = info.get("metrics") or {}
    names = sorted({k.split("_", 2)[2] for k in metrics
                    if k.startswith("eval_") and "_ci_" not in k})
    for metric in names:
        val = metrics.get(f"eval_val_{metric}")
        lines.append(f"| {metric} | {_fmt(val) if val is not None else '-'} | "
                     f"{with_interval(metrics, f'eval_test_{metric}')} |")
    lines += operating_point(info)
    lines += external_tables(metrics)
    promotion = {k: v for k, v in tags.items() if k.startswith(tag_keys.PROMOTION_PREFIX)}
    if promotion:
        lines += ["", "## Promotion", "", "| tag | value |", "| --- | --- |"]
        lines += [f"| {k} | {v} |" for k, v in sorted(promotion.items())]
    lines += [
        "",
        "## Use",
        "",
        "```",
        "python search/predict.py <this folder> image.jpeg|folder/|images.npz [--gradcam]",
        "```",
        "",
        "Images are decoded to the model's channels, resized (bilinear, antialiased) to "
        f"{info['preprocessing'].get('image_size')} px and scaled by 1/255, exactly as in "
        "training (`data.pipeline.preprocess_for_model`).",
        "",
        "Files: `model/` (MLflow Keras model; loaded from `model/data/model.keras` with "
        "`safe_mode=True`), `model_info.json`"
        + (", `config.yaml` (composed Hydra config of the run)" if has_config else "") + ".",
        "",
        f"Research use only: not a medical device, not validated for diagnosis. "
        f"{training_data(info)}",
        "",
    ]
    return "\n".join(lines)


# The built-in dataset's source, as its ATTRIBUTION.md gives it (other data: its own config).
BUILTIN_ATTRIBUTION = ("Kermany et al. (2018) pediatric chest X-rays, as MedMNIST v2 "
                       "PneumoniaMNIST (CC BY 4.0)")


def training_data(info: dict[str, Any]) -> str:
    """The card's training-data line, from the run's own data params (never assumed)."""
    data = info.get("training_data") or {}
    name = data.get("data")
    if not name:
        return "Training data: see the run's config (`config.yaml`)."
    sizes = "/".join(data.get(f"data.n_{s}", "?") for s in ("train", "val", "test"))
    line = f"Training data: `{name}` ({sizes} train/val/test images"
    line += f", fingerprint `{str(info.get('data_fingerprint'))[:12]}`)."
    if name == "pneumoniamnist":
        line += f" Source: {BUILTIN_ATTRIBUTION}."
    return line
