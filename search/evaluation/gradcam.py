"""Grad-CAM heatmaps, overlays and an HTML contact sheet for the CNN and transfer models.

Grad-CAM (Selvaraju et al., 2017): the gradient of a class score with respect to the last
conv feature map, averaged over space, weights the map's channels; the ReLU of the weighted
sum, normalised to [0, 1] and resized to the image, shows where the evidence for that class
lies. The feature-map model comes from `models.build_gradcam_model`, which also reaches into
a transfer model's nested backbone.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import keras


def gradcam_model(model: keras.Model, layer_name: str | None = None
                  ) -> keras.Model | list[keras.Model]:
    """Model mapping an image batch to [last conv feature map, predictions]; for an ensemble,
    one such model per member."""
    from models import build_gradcam_model
    from models.ensemble import ensemble_members

    members = ensemble_members(model)
    if members:
        return [build_gradcam_model(member, layer_name) for member in members]
    return build_gradcam_model(model, layer_name)


def target_classes(predictions: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Predicted class per image: sigmoid output >= threshold, else argmax of softmax."""
    predictions = np.asarray(predictions)
    if predictions.ndim == 2 and predictions.shape[1] == 1:
        return (predictions[:, 0] >= threshold).astype(int)
    return predictions.argmax(axis=-1).astype(int)


def gradcam_heatmaps(
    model: keras.Model,
    images: np.ndarray,
    class_index: int | Sequence[int] | None = None,
    threshold: float = 0.5,
    grad_model: keras.Model | None = None,
    layer_name: str | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM heatmaps for a batch of preprocessed images.

    Args:
        model: A model from `build_cnn` or `build_transfer` (built or loaded).
        images: float32 (N, H, W, C) exactly as the model takes them.
        class_index: Class to explain (one int for all, or one per image); None explains each
            image's predicted class. A single sigmoid unit scores class 1 as p, class 0 as 1 - p.
        threshold: Decision threshold deciding the predicted class of a sigmoid model.
        grad_model: Reuse a `gradcam_model(model)` across batches.
        layer_name: Feature map to use (default: the last conv layer, nested ones included).

    Returns:
        (heatmaps float32 (N, H, W) in [0, 1], predictions as the model outputs them).
    """
    import tensorflow as tf

    grad_model = grad_model or gradcam_model(model, layer_name)
    if isinstance(grad_model, list):
        return _ensemble_heatmaps(model, images, class_index, threshold, grad_model)
    x = tf.convert_to_tensor(np.asarray(images, dtype=np.float32))
    if x.shape.rank != 4:
        raise ValueError(f"images must be a batch (N, H, W, C), got shape {tuple(x.shape)}")
    with tf.GradientTape() as tape:
        feature_map, predictions = grad_model(x, training=False)
        predictions = tf.cast(predictions, tf.float32)
        if class_index is None:
            targets = target_classes(predictions.numpy(), threshold)
        else:
            targets = np.broadcast_to(np.asarray(class_index, dtype=int), (x.shape[0],))
        targets = tf.constant(targets, dtype=tf.int32)
        if predictions.shape[-1] == 1:
            p = predictions[:, 0]
            score = tf.where(targets == 1, p, 1.0 - p)
        else:
            score = tf.gather(predictions, targets, axis=1, batch_dims=1)
    grads = tape.gradient(score, feature_map)
    weights = tf.reduce_mean(tf.cast(grads, tf.float32), axis=(1, 2))  # (N, channels)
    cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", tf.cast(feature_map, tf.float32), weights))
    peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
    cam = tf.math.divide_no_nan(cam, peak)  # all-zero maps stay zero
    cam = tf.image.resize(cam[..., tf.newaxis], tuple(x.shape[1:3]), method="bilinear")
    heatmaps = np.clip(cam.numpy()[..., 0], 0.0, 1.0).astype(np.float32)
    return heatmaps, predictions.numpy()


def _ensemble_heatmaps(model: keras.Model, images: np.ndarray,
                       class_index: int | Sequence[int] | None, threshold: float,
                       grad_models: list[keras.Model]) -> tuple[np.ndarray, np.ndarray]:
    """An ensemble's Grad-CAM: the mean of its members' heatmaps for the ensemble's class.

    Grad-CAM needs one feature map; an ensemble has one per member, and its output is their
    mean, so the evidence maps are averaged (each normalised first, as each member's is).
    """
    predictions = model.predict(np.asarray(images, dtype=np.float32), verbose=0)
    targets = target_classes(predictions, threshold) if class_index is None else class_index
    maps = [gradcam_heatmaps(member, images, class_index=targets, grad_model=grad)[0]
            for member, grad in zip(_members(model), grad_models, strict=True)]
    cam = np.mean(maps, axis=0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, cam / np.maximum(peak, 1e-12), 0.0).astype(np.float32), predictions


def _members(model: keras.Model) -> list[keras.Model]:
    from models.ensemble import ensemble_members

    return ensemble_members(model)


def gradcam_heatmap(model: keras.Model, image: np.ndarray, **kwargs: Any) -> np.ndarray:
    """Grad-CAM heatmap (H, W) in [0, 1] of one preprocessed image (H, W, C)."""
    heatmaps, _ = gradcam_heatmaps(model, np.asarray(image)[np.newaxis], **kwargs)
    return heatmaps[0]


def _resize(array: np.ndarray, height: int, width: int) -> np.ndarray:
    import tensorflow as tf

    resized = tf.image.resize(array.astype(np.float32)[..., np.newaxis], (height, width),
                              method="bilinear")
    return resized.numpy()[..., 0]


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.4,
            cmap: str = "jet") -> np.ndarray:
    """Blend a heatmap (colormap `cmap`) over the grayscale image; uint8 RGB (H, W, 3).

    Args:
        image: (H, W), (H, W, 1) or (H, W, 3); uint8, or float in [0, 1].
        heatmap: (h, w) in [0, 1]; resized to the image if needed.
        alpha: Weight of the heatmap colours.
        cmap: A matplotlib colormap name.
    """
    import matplotlib

    image = np.asarray(image)
    gray = image.astype(np.float32)
    if image.dtype == np.uint8:
        gray = gray / 255.0
    if gray.ndim == 3:
        gray = gray.mean(axis=-1)
    gray = np.clip(gray, 0.0, 1.0)
    heatmap = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    if heatmap.shape != gray.shape:
        heatmap = np.clip(_resize(heatmap, *gray.shape), 0.0, 1.0)
    colours = matplotlib.colormaps[cmap](heatmap)[..., :3]
    blended = (1.0 - alpha) * np.repeat(gray[..., np.newaxis], 3, axis=-1) + alpha * colours
    return np.round(np.clip(blended, 0.0, 1.0) * 255.0).astype(np.uint8)


def save_png(rgb: np.ndarray, path: str | Path) -> Path:
    """Write a uint8 (H, W, 3) array as PNG."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb).save(path)
    return path


def caption(class_names: Sequence[str], probs: Sequence[float], predicted: int,
            threshold: float | None = None, true_label: int | None = None) -> list[str]:
    """Caption lines for one overlay, in the predictions' vocabulary (predicted_label,
    true_label) and with one probability throughout.

    Two classes with a threshold state the rule on P(positive class), the one probability
    the threshold applies to: "P(pneumonia) 0.918 < threshold 0.929 → normal". Otherwise the
    predicted class's own probability (argmax): "predicted_label cat (P(cat) 0.71)".
    """
    probs = [float(p) for p in probs]
    if threshold is not None and len(class_names) == 2:
        p = probs[1]
        sign = "≥" if p >= threshold else "<"
        lines = [f"P({class_names[1]}) {p:.3f} {sign} threshold {threshold:.3f} "
                 f"→ {class_names[predicted]}"]
    else:
        lines = [f"predicted_label {class_names[predicted]} "
                 f"(P({class_names[predicted]}) {probs[predicted]:.3f})"]
    if true_label is not None:
        lines.append(f"true_label {class_names[true_label]}")
    return lines


def contact_sheet(entries: Sequence[dict[str, Any]], path: str | Path,
                  title: str = "Grad-CAM") -> Path:
    """An HTML page showing the overlays in a grid.

    Args:
        entries: One dict per overlay: `image` (path relative to the page), `name`, and
            optional `caption` lines.
        path: The HTML file to write.
        title: Page heading.
    """
    path = Path(path)
    cards = []
    for entry in entries:
        caption = "<br>".join(html.escape(str(line)) for line in entry.get("caption", []))
        cards.append(
            f'<figure><a href="{html.escape(str(entry["image"]))}">'
            f'<img src="{html.escape(str(entry["image"]))}" alt="{html.escape(entry["name"])}">'
            f'</a><figcaption><b>{html.escape(entry["name"])}</b><br>{caption}</figcaption>'
            "</figure>"
        )
    page = (
        "<!doctype html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>"
        "body{font-family:sans-serif;margin:1em}"
        ".grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(230px,1fr));gap:12px}"
        "figure{margin:0;border:1px solid #ccc;padding:6px;font-size:12px}"
        "img{width:100%;image-rendering:auto}"
        "</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(entries)} image(s). Red = regions that raised "
        "the explained class's score most (Grad-CAM on the last conv feature map).</p>"
        f"<div class='grid'>{''.join(cards)}</div></body></html>\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    return path
