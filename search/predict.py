"""Predict with a registered or pulled model, offline, preprocessing exactly as training did.

    python search/predict.py models:/pneumonia-cnn@champion xray.jpeg
    python search/predict.py exports/pneumonia-cnn-v3 chest_xray/test --gradcam --out preds
    python search/predict.py exports/pneumonia-cnn-v3 pneumoniamnist.npz --npz-key test_images

MODEL: `models:/<name>@<alias>`, `models:/<name>/<version>`, `models:/m-<id>` (MLflow 3's
logged model, as the UI shows it), `runs:/<run id>/model`, a folder from search/pull.py, or
an MLflow Keras model folder. INPUT: an image file; a folder of images (searched
recursively; sub-folders named like the model's classes, case-insensitively, give labels);
or a MedMNIST-layout .npz (`--npz-key`, default test_images if present, else the first
*_images key; labels from `--labels-key` or the matching *_labels key).

Writes to --out: predictions.csv (path or index, `p_<class>` per class as the REST answer,
`predicted_label` at the stored threshold, `true_label` if known), skipped.csv (unreadable
inputs, never fatal),
metrics.json + confusion.png when labels are known, gradcam/*.png + gradcam/index.html with
--gradcam. Images go through `data.pipeline.preprocess_for_model`, the training pipeline's
own decode → channels → bilinear resize → 1/255 scaling, so train and predict cannot drift.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from search.evaluation.inputs import InputItem, batches, collect_inputs, display_image
from search.model_registry.model_store import LoadedModel, is_store_uri, load_model_reference
from search.tracking.serving import probability_column


@dataclass
class PredictionRun:
    """What a prediction call produced."""

    out: Path
    rows: list[dict[str, Any]]
    skipped: list[tuple[str, str]]
    key_name: str  # "path" or "index"
    metrics: dict[str, Any] | None = None
    files: dict[str, Path] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Prediction


def probabilities(outputs: np.ndarray) -> np.ndarray:
    """Model outputs as (N, n_classes) probabilities (a sigmoid unit gives [1 - p, p])."""
    outputs = np.asarray(outputs, dtype=np.float64)
    if outputs.ndim == 2 and outputs.shape[1] == 1:
        return np.concatenate([1.0 - outputs, outputs], axis=1)
    return outputs


def predicted_classes(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class index per row: positive if p >= stored threshold (binary), else argmax."""
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(axis=1)


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[-80:] or "image"


def write_metrics(loaded: LoadedModel, labels: list[int],
                  probs: np.ndarray, out: Path) -> dict[str, Any]:
    """metrics.json and confusion.png for the labelled predictions (search.evaluation.metrics)."""
    from search.evaluation import metrics as ev

    scores = probs[:, 1] if probs.shape[1] == 2 else probs
    threshold = loaded.threshold if probs.shape[1] == 2 else None
    result = ev.evaluate_split("predict", np.asarray(labels), scores, loaded.class_names,
                               threshold)
    metrics = {
        "n": len(labels),
        "threshold": result.threshold,
        "metrics": result.metrics,
        "confusion_matrix": {
            "labels": result.class_names, "matrix": result.confusion.tolist(),
            "rows": "true", "columns": "predicted",
        },
        "classification_report": result.report,
        "model": {k: loaded.info.get(k) for k in ("name", "version", "model_uri", "run_id")},
    }
    (out / "metrics.json").write_text(json.dumps(ev.json_ready(metrics), indent=2))
    figure = ev.confusion_figure(result)
    figure.savefig(out / "confusion.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(figure)
    return metrics


def predict(
    model: str | Path | LoadedModel,
    source: str | Path,
    out: str | Path = "predictions",
    gradcam: bool = False,
    npz_key: str | None = None,
    labels_key: str | None = None,
    batch_size: int = 32,
    overwrite: bool = False,
    tta: bool = False,
) -> PredictionRun:
    """Predict every input; write predictions.csv (+ skipped.csv, metrics, Grad-CAM).

    Args:
        model: Registry URI, pulled folder, MLflow model folder, or an already loaded model.
        source: Image file, folder of images, or MedMNIST-layout .npz.
        out: Output folder (created).
        gradcam: Also write Grad-CAM overlays and gradcam/index.html.
        npz_key: Images key of an npz input.
        labels_key: Labels key of an npz input.
        batch_size: Images per forward pass.
        overwrite: Replace the predictions of an earlier call in ``out`` (else refused).
        tta: Average each prediction over flipped and shifted copies (``search.evaluation.tta``).

    Returns:
        The rows written, the skipped inputs and, with labels, the metrics.
    """
    out = Path(out)
    check_out_folder(out, overwrite)  # before the model is loaded: seconds, not minutes
    with tempfile.TemporaryDirectory(prefix="predict-model-") as workdir:
        loaded = model if isinstance(model, LoadedModel) else load_model_reference(model, workdir)
        return _predict_loaded(loaded, source, out, gradcam, npz_key, labels_key, batch_size,
                               overwrite, tta)


class OutputFolderError(ValueError):
    """The --out folder cannot take the predictions; the message names it and the fix."""


def check_writable_folder(out: Path, what: str) -> None:
    """Refuse an --out folder that cannot be written, before any work (predict and pull).

    The write is tried for real, in ``out`` or the nearest folder above it that exists (it
    is created only once the work is known to be usable): file modes alone do not say (root,
    read-only mounts, ACLs).
    """
    if out.exists() and not out.is_dir():
        raise OutputFolderError(f"--out {out} is a file, not a folder; choose another --out")
    existing = next((p for p in (out, *out.absolute().parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise OutputFolderError(f"--out {out} cannot be created ({existing} is not a folder); "
                                "choose another --out")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".write-check-"):
            pass
    except OSError as error:
        where = "it" if existing == out else f"{existing}, where it would be created,"
        raise OutputFolderError(
            f"cannot write {what} to --out {out}: {where} is not writable "
            f"({error.strerror}); make it writable or choose another --out") from None


def check_out_folder(out: Path, overwrite: bool) -> None:
    """Refuse an --out that cannot be written, or holds earlier predictions, before any work."""
    check_writable_folder(out, "the predictions")
    if (out / "predictions.csv").exists() and not overwrite:
        raise FileExistsError(f"{out} already holds predictions.csv; pass --overwrite (or "
                              "overwrite=True) to replace them, or choose another --out")


def check_input_shape(loaded: LoadedModel, size: int, channels: int) -> None:
    """Refuse a model whose input does not take what its stored preprocessing produces."""
    shape = tuple(loaded.model.input_shape[1:])
    expected = (size, size, channels)
    if len(shape) != 3 or any(a is not None and a != b for a, b in zip(shape, expected,
                                                                       strict=True)):
        raise ValueError(
            f"{loaded.info.get('model_uri') or loaded.folder}: the model takes inputs of shape "
            f"{shape}, but its preprocessing metadata makes {expected} images; the model and "
            "its metadata do not belong together (re-log it with search/training/trainer.py)"
        )


def _predict_loaded(loaded: LoadedModel, source: str | Path, out: Path, gradcam: bool,
                    npz_key: str | None, labels_key: str | None,
                    batch_size: int, overwrite: bool, tta: bool = False) -> PredictionRun:
    classes = loaded.class_names
    prep = loaded.preprocessing
    size, channels = int(prep["image_size"]), int(prep["channels"])
    check_input_shape(loaded, size, channels)
    items, key_name = collect_inputs(source, classes, npz_key, labels_key)
    check_out_folder(out, overwrite)  # again: it may have changed while the model loaded
    out.mkdir(parents=True, exist_ok=True)  # only once model and inputs are known to be usable
    threshold = loaded.threshold
    skipped: list[tuple[str, str]] = []
    rows: list[dict[str, Any]] = []
    all_probs: list[np.ndarray] = []
    sheet: list[dict[str, Any]] = []
    grad_model = None
    if gradcam:
        from search.evaluation import gradcam as gc

        grad_model = gc.gradcam_model(loaded.model)
    for batch, images in batches(items, batch_size, size, channels, skipped):
        if tta:
            from search.evaluation.tta import tta_predict

            outputs = tta_predict(lambda x: loaded.model.predict(x, verbose=0), images)
        else:
            outputs = loaded.model.predict(images, verbose=0)
        probs = probabilities(outputs)
        predicted = predicted_classes(probs, threshold)
        all_probs.append(probs)
        for item, p, c in zip(batch, probs, predicted, strict=True):
            row: dict[str, Any] = {key_name: item.key}
            row.update({probability_column(name): float(v)
                        for name, v in zip(classes, p, strict=True)})
            row["predicted_label"] = classes[int(c)]
            row["true_label"] = "" if item.label is None else classes[item.label]
            rows.append(row)
        if gradcam:
            sheet += _gradcam_batch(loaded, grad_model, batch, images, predicted, probs,
                                    threshold, out, start=len(rows) - len(batch))
    files = {"predictions": out / "predictions.csv"}
    fieldnames = [key_name, *(probability_column(c) for c in classes), "predicted_label",
                  "true_label"]
    with open(files["predictions"], "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fieldnames)
        writer.writeheader()
        writer.writerows(rows)
    if skipped:
        files["skipped"] = out / "skipped.csv"
        with open(files["skipped"], "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([key_name, "error"])
            writer.writerows(skipped)
    metrics = None
    labelled = [i for i, row in enumerate(rows) if row["true_label"]]
    if labelled:
        probs = np.concatenate(all_probs)[labelled]
        labels = [classes.index(rows[i]["true_label"]) for i in labelled]
        metrics = write_metrics(loaded, labels, probs, out)
        files["metrics"], files["confusion"] = out / "metrics.json", out / "confusion.png"
    if gradcam:
        from search.evaluation import gradcam as gc

        files["gradcam"] = gc.contact_sheet(
            sheet, out / "gradcam" / "index.html",
            title=f"Grad-CAM: {loaded.info.get('model_uri') or loaded.folder}",
        )
    return PredictionRun(out, rows, skipped, key_name, metrics, files)


def _gradcam_batch(loaded: LoadedModel, grad_model: Any, batch: list[InputItem],
                   images: np.ndarray, predicted: np.ndarray, probs: np.ndarray,
                   threshold: float | None, out: Path, start: int) -> list[dict[str, Any]]:
    """Overlays of one batch (each image's predicted class explained) + contact-sheet entries."""
    from search.evaluation import gradcam as gc

    heatmaps, _ = gc.gradcam_heatmaps(loaded.model, images, class_index=predicted,
                                      grad_model=grad_model)
    entries = []
    for offset, (item, heatmap) in enumerate(zip(batch, heatmaps, strict=True)):
        index = start + offset
        name = Path(item.key).name if item.path is not None else f"index {item.key}"
        file_name = f"{index:05d}_{_safe_name(Path(item.key).stem)}.png"
        gc.save_png(gc.overlay(display_image(item), heatmap), out / "gradcam" / file_name)
        caption = gc.caption(loaded.class_names, probs[index - start],
                             int(predicted[index - start]), threshold, item.label)
        entries.append({"image": file_name, "name": name, "caption": caption})
    return entries


def main(argv: list[str] | None = None) -> int:
    from search.tracking.mlflow_runs import TrackingError, setup_cli

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="models:/name@alias, models:/name/N, models:/m-<id>, "
                        "runs:/<run id>/model, or a pulled folder")
    parser.add_argument("input", help="image file, folder of images, or MedMNIST .npz")
    parser.add_argument("--out", default="predictions", help="output folder (default: predictions)")
    parser.add_argument("--gradcam", action="store_true", help="write Grad-CAM overlays + HTML")
    parser.add_argument("--npz-key", default=None, help="npz images key (default: test_images "
                        "if present, else the first *_images)")
    parser.add_argument("--labels-key", default=None,
                        help="npz labels key (default: the images key's *_labels, if present)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--tta", action="store_true",
                        help="test-time augmentation: average over a mirror and 4 small shifts")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace earlier predictions in --out")
    parser.add_argument("--tracking-uri", default=None,
                        help="for models:/ and runs:/ URIs; default: $MLFLOW_TRACKING_URI, "
                        "else the repo's sqlite store")
    args = parser.parse_args(argv)
    try:
        # registry URIs need the store; a pulled folder never contacts it (works offline)
        setup_cli(args.tracking_uri, contact=is_store_uri(args.model))
        result = predict(args.model, args.input, args.out, gradcam=args.gradcam,
                         npz_key=args.npz_key, labels_key=args.labels_key,
                         batch_size=args.batch_size, overwrite=args.overwrite, tta=args.tta)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, LookupError,
            TrackingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except PermissionError as error:  # --out turned read-only while predicting
        print(f"error: cannot write {error.filename} ({error.strerror}); make --out "
              f"{args.out} writable and re-run, or choose another --out", file=sys.stderr)
        return 2
    if not result.rows:
        for key, reason in result.skipped:
            print(f"  skipped {key}: {reason}", file=sys.stderr)
        print(f"error: none of the {len(result.skipped)} input(s) could be read (listed in "
              f"{result.files.get('skipped')}); nothing was predicted", file=sys.stderr)
        return 2
    print(f"{len(result.rows)} prediction(s) -> {result.files['predictions']}")
    for key, reason in result.skipped:
        print(f"  skipped {key}: {reason}")
    if result.skipped:
        print(f"{len(result.skipped)} input(s) skipped -> {result.files['skipped']}")
    if result.metrics:
        from search.tracking.descriptions import headline, short_number

        m = result.metrics["metrics"]
        print(f"metrics on {result.metrics['n']} labelled image(s) at threshold "
              f"{short_number(result.metrics['threshold'])}: {headline(m)}")
        print(f"  confusion (rows true, columns predicted) "
              f"{result.metrics['confusion_matrix']['matrix']} -> {result.files['metrics']}")
    if "gradcam" in result.files:
        print(f"Grad-CAM contact sheet -> {result.files['gradcam']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
