"""Grad-CAM on real X-ray images for the configurable CNN and a transfer backbone."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from data.loaders import BUILTIN_NPZ
from models import build_cnn, build_transfer
from search.evaluation import gradcam as gc


@pytest.fixture(scope="module")
def xrays() -> np.ndarray:
    """Four real PneumoniaMNIST images, uint8 (4, 28, 28)."""
    with np.load(BUILTIN_NPZ) as archive:
        return archive["val_images"][:4]


def as_input(images: np.ndarray, size: int) -> np.ndarray:
    from data.pipeline import preprocess_for_model

    return np.stack([preprocess_for_model(image, size, 1).numpy() for image in images])


def check_heatmaps(heatmaps: np.ndarray, n: int, size: int) -> None:
    assert heatmaps.shape == (n, size, size)
    assert heatmaps.dtype == np.float32
    assert np.all(np.isfinite(heatmaps))
    assert heatmaps.min() >= 0.0 and heatmaps.max() <= 1.0
    assert heatmaps.max() > 0.5  # normalised: the strongest evidence is near 1


def test_cnn_heatmaps_have_image_shape_and_unit_range(xrays):
    keras.utils.set_random_seed(0)
    model = build_cnn((28, 28, 1), 2, depth=2, base_filters=8, dense_units=16)
    images = as_input(xrays, 28)
    heatmaps, predictions = gc.gradcam_heatmaps(model, images)
    check_heatmaps(heatmaps, 4, 28)
    assert predictions.shape == (4, 1)
    single = gc.gradcam_heatmap(model, images[0])
    np.testing.assert_allclose(single, heatmaps[0], atol=1e-5)
    # Explaining the other class gives another map (1 - p moves the opposite way).
    flipped, _ = gc.gradcam_heatmaps(model, images, class_index=1 - gc.target_classes(
        predictions))
    assert not np.allclose(flipped, heatmaps)


def test_multiclass_cnn(xrays):
    keras.utils.set_random_seed(1)
    model = build_cnn((28, 28, 1), 3, depth=2, base_filters=8, dense_units=16)
    heatmaps, predictions = gc.gradcam_heatmaps(model, as_input(xrays, 28), class_index=2)
    assert predictions.shape == (4, 3)
    check_heatmaps(heatmaps, 4, 28)


def test_transfer_backbone_heatmaps_after_safe_reload(xrays, tmp_path):
    """The last conv layer sits inside the nested backbone; the model also survives a
    safe-mode save/load round trip, as predict.py loads it."""
    keras.utils.set_random_seed(2)
    # VGG19 has no BatchNorm: from random weights its activations stay informative (a random
    # MobileNetV2 in inference mode outputs ~0 features, so its Grad-CAM is rightly all zero).
    # 64 px gives a 2x2 feature map (32 px would be 1x1, a single value).
    model = build_transfer((64, 64, 1), 2, backbone="vgg19", weights="none",
                           trainable_layers=-1, dense_units=8)
    path = tmp_path / "transfer.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    images = as_input(xrays, 64)
    heatmaps, _ = gc.gradcam_heatmaps(loaded, images)
    check_heatmaps(heatmaps, 4, 64)
    original, _ = gc.gradcam_heatmaps(model, images)
    np.testing.assert_allclose(heatmaps, original, atol=1e-4)


def test_overlay_and_contact_sheet(tmp_path, xrays):
    heatmap = np.linspace(0, 1, 7 * 7, dtype=np.float32).reshape(7, 7)
    rgb = gc.overlay(xrays[0], heatmap)  # uint8 gray image, heatmap resized to it
    assert rgb.shape == (28, 28, 3) and rgb.dtype == np.uint8
    plain = gc.overlay(xrays[0], np.zeros((28, 28)), alpha=0.0)
    np.testing.assert_array_equal(plain[..., 0], xrays[0])  # alpha 0 = the grayscale image
    hot = gc.overlay(np.zeros((4, 4)), np.ones((4, 4)), alpha=1.0)
    assert hot[0, 0, 0] in (127, 128) and tuple(hot[0, 0, 1:]) == (0, 0)  # jet(1.0): dark red
    png = gc.save_png(rgb, tmp_path / "g" / "a.png")
    page = gc.contact_sheet(
        [{"image": png.name, "name": "a<b>.png", "caption": ["p=0.9"]}], tmp_path / "g" / "i.html"
    )
    text = page.read_text()
    assert 'src="a.png"' in text and "a&lt;b&gt;.png" in text and "p=0.9" in text


def test_caption_states_one_probability_and_the_rule() -> None:
    names = ["normal", "pneumonia"]
    below = gc.caption(names, [0.082, 0.918], 0, threshold=0.929, true_label=1)
    assert below == ["P(pneumonia) 0.918 < threshold 0.929 → normal", "true_label pneumonia"]
    assert gc.caption(names, [0.05, 0.95], 1, threshold=0.929) == [
        "P(pneumonia) 0.950 ≥ threshold 0.929 → pneumonia"]
    assert not any("0.082" in line for line in below)  # never the other class's probability
    assert gc.caption(["a", "b", "c"], [0.2, 0.71, 0.09], 1) == [
        "predicted_label b (P(b) 0.710)"]
