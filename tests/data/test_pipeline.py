"""tf.data pipelines and augmentation on real arrays and real JPEG files."""

from __future__ import annotations

import math
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

from data.loaders import load_npz
from data.pipeline import build_augmenter, make_dataset, mixup_batch, preprocess_for_model


@pytest.fixture(scope="module")
def val_images() -> tuple[np.ndarray, np.ndarray]:
    """The first 100 real PneumoniaMNIST val images and labels."""
    npz = load_npz()
    return npz.images["val"][:100], npz.labels["val"][:100]


def _eval(images: np.ndarray, labels: np.ndarray, **kwargs) -> tf.data.Dataset:
    options = {"binary": True, "image_size": 28, "channels": 1, "batch_size": 32}
    options.update(kwargs)
    return make_dataset(images, labels, training=False, seed=0, **options)


def test_eval_dataset_is_finite_ordered_and_scaled(val_images) -> None:
    images, labels = val_images
    batches = list(_eval(images, labels))
    assert len(batches) == math.ceil(100 / 32)
    x = np.concatenate([b[0] for b in batches])
    y = np.concatenate([b[1] for b in batches])
    assert x.dtype == np.float32 and x.shape == (100, 28, 28, 1)
    assert np.allclose(x, images / 255.0)  # same size and channels: exact pixels, in order
    assert y.dtype == np.float32 and y.shape == (100,)
    assert np.array_equal(y, labels)
    assert list(_eval(images, labels))[0][0].shape == (32, 28, 28, 1)  # finite: iterates again


def test_resize_and_channels(val_images) -> None:
    images, labels = val_images
    x, y = next(iter(_eval(images, labels, image_size=32, channels=3, binary=False)))
    assert x.shape == (32, 32, 32, 3) and x.dtype == tf.float32
    assert y.dtype == tf.int32 and y.shape == (32,)
    assert np.array_equal(x[..., 0], x[..., 2])  # grayscale copied to RGB
    assert float(tf.reduce_min(x)) >= 0.0 and float(tf.reduce_max(x)) <= 1.0


def test_eval_datasets_have_autotuning_off(val_images) -> None:
    assert _eval(*val_images).options().autotune.enabled is False


def test_train_dataset_repeats_and_reshuffles(val_images) -> None:
    images, labels = val_images

    def train(seed: int) -> tf.data.Dataset:
        return make_dataset(
            images, labels, binary=True, image_size=28, channels=1, batch_size=32,
            training=True, seed=seed,
        )  # fmt: skip

    steps = math.ceil(100 / 32)
    epochs = [b[1].numpy() for b in train(5).take(2 * steps + 1)]  # beyond one pass: repeats
    assert len(epochs) == 2 * steps + 1
    first, second = np.concatenate(epochs[:steps]), np.concatenate(epochs[steps : 2 * steps])
    assert sorted(first) == sorted(labels) and sorted(second) == sorted(labels)  # whole passes
    again = np.concatenate([b[1].numpy() for b in train(5).take(steps)])
    assert np.array_equal(first, again)  # seeded
    x_first = next(iter(train(5)))[0].numpy()
    x_second = [b[0].numpy() for b in train(5).take(steps + 1)][steps]
    assert not np.array_equal(x_first, x_second)  # reshuffled each pass


def test_folder_pipeline_decodes_real_jpegs(chest_xray_sample_files: list[Path]) -> None:
    paths = np.array([str(p) for p in chest_xray_sample_files[:4]])
    dataset = make_dataset(
        paths, np.array([0, 0, 1, 1]), binary=True, image_size=64, channels=1, batch_size=4,
        training=False, seed=0,
    )  # fmt: skip
    x, _ = next(iter(dataset))
    assert x.shape == (4, 64, 64, 1)
    expected = preprocess_for_model(chest_xray_sample_files[0].read_bytes(), 64, 1)
    assert np.array_equal(x[0], expected)  # predict's helper matches the pipeline exactly
    assert 0.2 < float(tf.reduce_mean(x)) < 0.8  # a real X-ray, not a blank image


def test_preprocess_for_model_on_arrays(val_images) -> None:
    images, _ = val_images
    out = preprocess_for_model(images[0, ..., 0], 32, 3)
    assert out.shape == (32, 32, 3) and out.dtype == tf.float32
    x, _ = next(iter(_eval(images, val_images[1], image_size=32, channels=3)))
    assert np.array_equal(out, x[0])
    with pytest.raises(ValueError, match="uint8"):
        preprocess_for_model(images[0].astype(np.float32), 32, 1)


@pytest.mark.parametrize("augment", [None, {}, {"flip": False, "rotation": 0.0, "zoom": 0}])
def test_no_augmenter_when_all_off(augment) -> None:
    assert build_augmenter(augment, seed=0) is None


def test_augmenter_has_only_the_configured_layers() -> None:
    only_flip = build_augmenter({"flip": True}, seed=0)
    assert [type(layer) for layer in only_flip.layers] == [keras.layers.RandomFlip]
    everything = build_augmenter(
        {"flip": True, "rotation": 0.05, "zoom": 0.1, "translation": 0.1, "contrast": 0.2}, seed=0
    )
    assert [type(layer).__name__ for layer in everything.layers] == [
        "RandomFlip", "RandomRotation", "RandomZoom", "RandomTranslation", "RandomContrast"
    ]  # fmt: skip
    assert everything.layers[0].mode == "horizontal"
    assert tuple(everything.layers[-1].value_range) == (0.0, 1.0)  # pixels are in [0, 1]


@pytest.mark.parametrize(
    ("augment", "message"),
    [({"flip": True, "blur": 0.1}, r"unknown data.augment key\(s\) \['blur'\]"),
     ({"rotation": -0.1}, "data.augment.rotation must be a number in"),
     ({"zoom": "big"}, "data.augment.zoom"),
     ({"brightness": 1.0}, r"data.augment.brightness must be a number in \[0, 1\), got 1.0"),
     ({"noise": -0.01}, r"data.augment.noise must be a number in \[0, 1\), got -0.01"),
     ({"noise": True}, "data.augment.noise")],
)  # fmt: skip
def test_bad_augment_config(augment: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_augmenter(augment, seed=0)


def first_batch(images: np.ndarray, labels: np.ndarray, augmenter, training: bool) -> np.ndarray:
    """The first batch of 100 images, as train (augmented) or eval (plain) sees it."""
    dataset = make_dataset(
        images, labels, binary=True, image_size=28, channels=1, batch_size=100,
        training=training, seed=0, shuffle_buffer=1, augmenter=augmenter,
    )  # fmt: skip
    return next(iter(dataset))[0].numpy()


def test_augmentation_changes_train_batches_only(val_images) -> None:
    images, labels = val_images
    augmenter = build_augmenter({"flip": True, "rotation": 0.1, "contrast": 0.3}, seed=1)
    augmented = first_batch(images, labels, augmenter, training=True)
    plain = first_batch(images, labels, augmenter, training=False)
    assert np.allclose(plain, images / 255.0)  # eval ignores the augmenter
    assert not np.allclose(augmented, plain)
    assert augmented.min() >= 0.0 and augmented.max() <= 1.0


def test_brightness_and_noise_layers_work_on_unit_pixels() -> None:
    augmenter = build_augmenter({"contrast": 0.1, "brightness": 0.2, "noise": 0.05}, seed=0)
    assert [type(layer).__name__ for layer in augmenter.layers] == [
        "RandomContrast", "RandomBrightness", "GaussianNoise", "ReLU"
    ]  # fmt: skip
    brightness, noise, clip = augmenter.layers[1:]
    assert tuple(brightness.value_range) == (0.0, 1.0) and brightness.factor == (-0.2, 0.2)
    assert noise.stddev == 0.05 and clip.max_value == 1.0  # noise last, then clipped
    only_brightness = build_augmenter({"brightness": 0.1}, seed=0)
    assert [type(layer).__name__ for layer in only_brightness.layers] == ["RandomBrightness"]


@pytest.mark.parametrize("augment", [{"brightness": 0.3}, {"noise": 0.1}])
def test_brightness_and_noise_change_train_batches_only(val_images, augment: dict) -> None:
    images, labels = val_images
    augmenter = build_augmenter(augment, seed=3)
    augmented = first_batch(images, labels, augmenter, training=True)
    plain = first_batch(images, labels, augmenter, training=False)
    assert np.allclose(plain, images / 255.0)  # val/test never see it
    assert np.abs(augmented - plain).mean() > 0.005
    assert augmented.min() == 0.0 and augmented.max() == 1.0  # pushed past the range: clipped
    if "noise" in augment:  # GaussianNoise is a training-only layer even when called directly
        assert np.array_equal(augmenter(plain, training=False), plain)


def _train(images: np.ndarray, labels: np.ndarray, seed: int = 0, **kwargs) -> tf.data.Dataset:
    options = {"binary": True, "image_size": 28, "channels": 1, "batch_size": 32}
    options.update(kwargs)
    return make_dataset(images, labels, training=True, seed=seed, **options)


def test_mixup_is_seeded_and_leaves_eval_alone(val_images) -> None:
    images, labels = val_images
    first, again = (next(iter(_train(images, labels, mixup=0.4))) for _ in range(2))
    assert np.array_equal(first[0], again[0]) and np.array_equal(first[1], again[1])
    other = next(iter(_train(images, labels, seed=1, mixup=0.4)))
    assert not np.array_equal(first[1], other[1])
    plain = next(iter(_train(images, labels)))  # same shuffle: mixup is the only difference
    assert not np.array_equal(first[0], plain[0])
    steps = math.ceil(100 / 32)
    later = [b[0].numpy() for b in _train(images, labels, mixup=0.4).take(steps + 1)][steps]
    replain = [b[0].numpy() for b in _train(images, labels).take(steps + 1)][steps]
    assert not np.array_equal(later, replain)  # mixes again after the first epoch
    y = first[1].numpy()
    assert y.dtype == np.float32 and y.min() >= 0.0 and y.max() <= 1.0
    assert np.any((y > 0.0) & (y < 1.0))  # soft labels where a normal met a pneumonia image
    x = first[0].numpy()
    assert x.min() >= 0.0 and x.max() <= 1.0
    # eval splits get no mixup even when asked: exact pixels and hard labels
    x_val, y_val = next(iter(_eval(images, labels, batch_size=100, mixup=0.4)))
    assert np.allclose(x_val, images / 255.0) and np.array_equal(y_val, labels)


def test_mixup_mixes_images_and_labels_with_the_same_weight(val_images) -> None:
    images, labels = val_images
    x = tf.constant(images[:32] / 255.0, tf.float32)
    y = tf.constant(labels[:32], tf.float32)
    mixed_x, mixed_y = (t.numpy() for t in mixup_batch(x, y, 0.4, tf.constant([7, 0], tf.int64)))
    flat, rows = x.numpy().reshape(32, -1), mixed_x.reshape(32, -1)
    soft = 0
    for i in range(32):
        # x_i' = x_j + w (x_i - x_j) for some partner j and weight w in [0, 1]: find them
        fits = []
        for j in range(32):
            step = flat[i] - flat[j]
            w = 1.0 if j == i else float(step @ (rows[i] - flat[j]) / (step @ step))
            fits.append((np.abs(flat[j] + w * step - rows[i]).max(), j, w))
        error, j, w = min(fits)
        assert error < 1e-5 and -1e-6 <= w <= 1 + 1e-6
        assert mixed_y[i] == pytest.approx(w * labels[i] + (1 - w) * labels[j], abs=1e-5)
        soft += 0.0 < mixed_y[i] < 1.0
    assert soft > 0


def test_mixup_refuses_class_indices_and_bad_alphas(val_images) -> None:
    images, labels = val_images
    with pytest.raises(ValueError, match="mixup needs binary"):
        _train(images, labels, binary=False, mixup=0.2)
    for bad in (-0.1, "strong", True):
        with pytest.raises(ValueError, match="mixup must be a number >= 0"):
            _train(images, labels, mixup=bad)


@pytest.mark.parametrize("channels", [1, 3])
def test_png_gif_bmp_decode_like_jpeg(
    tmp_path: Path, chest_xray_sample_files: list[Path], channels: int
) -> None:
    from PIL import Image

    from data.loaders import find_undecodable

    with Image.open(chest_xray_sample_files[0]) as image:
        small = image.convert("L").resize((96, 80))
    paths = []
    for fmt in ("png", "gif", "bmp", "webp", "jpeg"):
        paths.append(tmp_path / f"x.{fmt}")
        small.save(paths[-1])
    assert find_undecodable(paths) == []
    dataset = make_dataset(
        np.array([str(p) for p in paths]), np.array([0, 1, 0, 1, 0]), binary=True,
        image_size=32, channels=channels, batch_size=5, training=False, seed=0,
    )  # fmt: skip
    x = next(iter(dataset))[0].numpy()
    assert x.shape == (5, 32, 32, channels)
    # lossless formats agree exactly; JPEG within its compression error
    assert np.array_equal(x[0], x[1]) and np.array_equal(x[0], x[2])
    assert np.abs(x[0] - x[4]).mean() < 0.02
