"""Transfer models: every backbone, preprocessing, freezing, local-only weights, Grad-CAM."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from hydra.utils import instantiate
from omegaconf import OmegaConf

import models
from models.cnn import build_cnn
from models.transfer import (
    EFFICIENTNET_MEAN_RGB,
    EFFICIENTNET_STDDEV_RGB,
    build_gradcam_model,
    build_transfer,
    last_conv_layer_name,
    preprocess,
)

# What each application's own preprocess_input does to 0..255 RGB images.
KERAS_PREPROCESS = {
    "vgg19": keras.applications.vgg19.preprocess_input,
    "resnet50": keras.applications.resnet50.preprocess_input,
    "mobilenetv2": keras.applications.mobilenet_v2.preprocess_input,
    "efficientnetb0": keras.applications.efficientnet.preprocess_input,  # identity
}


def images(shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random(shape, dtype="float32")


def preprocessed(model: keras.Model, batch: np.ndarray) -> np.ndarray:
    """What the model feeds its backbone."""
    probe = keras.Model(model.input, model.get_layer("preprocess").output)
    return keras.ops.convert_to_numpy(probe(batch))


@pytest.mark.parametrize("backbone", list(KERAS_PREPROCESS))
def test_each_backbone_builds_and_preprocesses_like_keras(backbone: str) -> None:
    rgb = build_transfer((32, 32, 3), 2, backbone=backbone, trainable_layers=-1)
    gray = build_transfer((32, 32, 1), 3, backbone=backbone, trainable_layers=-1)
    assert isinstance(rgb.get_layer("backbone"), keras.Model)
    assert rgb.output.shape == (None, 1) and gray.output.shape == (None, 3)
    assert "to_rgb" in [layer.name for layer in gray.layers]
    assert "to_rgb" not in [layer.name for layer in rgb.layers]

    batch = images((2, 32, 32, 3))
    expected = KERAS_PREPROCESS[backbone](batch * 255.0)
    np.testing.assert_allclose(preprocessed(rgb, batch), expected, rtol=1e-5, atol=1e-3)
    # Grayscale is the same image with R = G = B.
    gray_batch = batch[..., :1]
    expected_gray = KERAS_PREPROCESS[backbone](np.repeat(gray_batch, 3, axis=-1) * 255.0)
    np.testing.assert_allclose(preprocessed(gray, gray_batch), expected_gray, rtol=1e-5, atol=1e-3)


def test_efficientnet_imagenet_fold_matches_keras_extra_rescaling(tmp_path) -> None:
    # Keras' ImageNet EfficientNet computes (u - m) / s / sqrt(s) from u in [0, 1] (via 0..255,
    # its Normalization with variance s**2, and an extra Rescaling we cannot nest).
    mean, std = np.array(EFFICIENTNET_MEAN_RGB), np.array(EFFICIENTNET_STDDEV_RGB)
    inputs = keras.Input((4, 4, 3))
    x = preprocess(inputs, "efficientnetb0", imagenet=True)
    x = keras.layers.Rescaling(1.0 / 255.0)(x)
    x = keras.layers.Normalization(mean=mean, variance=std**2)(x)
    stem = keras.Model(inputs, x)
    batch = images((2, 4, 4, 3))
    np.testing.assert_allclose(stem(batch), (batch - mean) / std / np.sqrt(std), rtol=1e-4)
    # Per-channel scale and offset lists survive a safe_mode round trip.
    stem.save(tmp_path / "stem.keras")
    loaded = keras.models.load_model(tmp_path / "stem.keras", safe_mode=True)
    np.testing.assert_array_equal(loaded(batch), stem(batch))


def test_frozen_backbone_trains_only_the_head() -> None:
    with pytest.warns(UserWarning, match="frozen random features"):
        model = build_transfer((32, 32, 1), 2, trainable_layers=0, dense_units=16)
    assert not model.get_layer("backbone").trainable
    trainable = {w.path for w in model.trainable_weights}
    assert trainable == {"head_dense/kernel", "head_dense/bias", "output/kernel", "output/bias"}


def test_top_k_fine_tuning_keeps_batch_norm_frozen() -> None:
    with pytest.warns(UserWarning):
        model = build_transfer((32, 32, 1), 2, trainable_layers=5, dense_units=0)
    backbone = model.get_layer("backbone")
    # Top 5 of MobileNetV2: block_16_project, its BN, Conv_1, its BN, out_relu.
    trainable_layers = {layer.name for layer in backbone.layers if layer.trainable_weights}
    assert trainable_layers == {"block_16_project", "Conv_1"}
    assert all(
        not layer.trainable
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
    )
    assert len(model.trainable_weights) == 2 + 2  # two conv kernels + output kernel/bias


def test_all_trainable_includes_batch_norm() -> None:
    model = build_transfer((32, 32, 1), 2, trainable_layers=-1)
    backbone = model.get_layer("backbone")
    assert backbone.get_layer("Conv_1_bn").trainable
    assert len(backbone.trainable_weights) == len(
        [w for w in backbone.weights if "moving" not in w.path]
    )


@pytest.mark.parametrize(
    ("backbone", "size", "file_name"),
    [
        ("vgg19", 32, "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("resnet50", 32, "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
        ("mobilenetv2", 32, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
        ("mobilenetv2", 96, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_96_no_top.h5"),
        ("efficientnetb0", 32, "efficientnetb0_notop.h5"),
    ],
)
def test_imagenet_without_cached_file_names_file_and_folder(
    backbone: str, size: int, file_name: str, tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FileNotFoundError) as error:  # air-gapped: never tries the network
        build_transfer(
            (size, size, 1), 2, backbone=backbone, weights="imagenet", allow_download=False
        )
    message = str(error.value)
    assert file_name in message
    assert str(tmp_path / "models") in message
    assert "https://storage.googleapis.com/" in message
    assert "model.allow_download=false" in message


class _WeightsServer:
    """A real HTTP server on 127.0.0.1 serving one folder (no request leaves the machine)."""

    def __init__(self, folder: Path) -> None:
        import functools
        import http.server
        import threading

        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
        handler.log_message = lambda *a: None  # type: ignore[method-assign]
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_imagenet_weights_are_downloaded_by_keras_into_its_cache(tmp_path, monkeypatch) -> None:
    """Connected: Keras' get_file fetches the missing file once; offline: a fast, clear error."""
    import dataclasses
    import time

    from models import transfer

    source = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    served = tmp_path / "served"
    served.mkdir()
    file_name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    source.save(served / file_name)
    home = tmp_path / "keras_home"
    monkeypatch.setenv("KERAS_HOME", str(home))
    server = _WeightsServer(served)
    spec = transfer.BACKBONES["mobilenetv2"]
    try:
        monkeypatch.setitem(
            transfer.BACKBONES, "mobilenetv2", dataclasses.replace(spec, url_folder=server.url)
        )
        model = build_transfer((32, 32, 1), 2, weights="imagenet", trainable_layers=0)
        assert (home / "models" / file_name).is_file()  # into Keras' cache, used next time
        np.testing.assert_array_equal(
            model.get_layer("backbone").get_layer("Conv_1").kernel.numpy(),
            source.get_layer("Conv_1").kernel.numpy(),
        )
    finally:
        server.close()
    (home / "models" / file_name).unlink()
    # Offline: nothing listens there any more; the error comes in seconds, named.
    start = time.monotonic()
    with pytest.raises(FileNotFoundError, match="could not download it.*looks offline"):
        build_transfer((32, 32, 1), 2, weights="imagenet", trainable_layers=0)
    assert time.monotonic() - start < 20
    assert not (home / "models" / file_name).exists()  # no partial file left behind


def test_weights_load_from_the_cache_and_from_a_path(tmp_path, monkeypatch) -> None:
    source = keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(32, 32, 3)
    )
    cache = tmp_path / "models"
    cache.mkdir()
    # The Keras team's files are legacy HDF5, which model.save(".h5") also writes.
    source.save(cache / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5")
    source.save_weights(tmp_path / "mine.weights.h5")
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    expected = source.get_layer("Conv_1").kernel.numpy()
    for weights in ("imagenet", str(tmp_path / "mine.weights.h5")):
        model = build_transfer((32, 32, 1), 2, weights=weights, trainable_layers=0)
        loaded = model.get_layer("backbone").get_layer("Conv_1").kernel.numpy()
        np.testing.assert_array_equal(loaded, expected)


def test_missing_weights_path_is_named(tmp_path) -> None:
    missing = tmp_path / "nope.weights.h5"
    with pytest.raises(FileNotFoundError, match=r"model\.weights=.*nope\.weights\.h5"):
        build_transfer((32, 32, 3), 2, weights=str(missing))


def test_too_small_input_names_data_image_size() -> None:
    with pytest.raises(ValueError, match=r"data\.image_size=28x28.*32"):
        build_transfer((28, 28, 1), 2)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"backbone": "alexnet"}, r"model\.backbone='alexnet'.*mobilenetv2"),
        ({"pooling": "flatten"}, r"model\.pooling='flatten'.*'avg', 'max'"),
        ({"trainable_layers": -2}, r"model\.trainable_layers=-2.*-1 \(all\)"),
        ({"trainable_layers": 10_000}, r"model\.trainable_layers=10000.*1\.\.154"),
        ({"dropout_rate": 1.5}, r"model\.dropout_rate=1\.5"),
        ({"input_shape": (32, 32, 4)}, r"4 channels; allowed: 1 or 3"),
        ({"num_classes": 1}, r"num_classes=1"),
    ],
)
def test_bad_values_raise(overrides: dict, message: str) -> None:
    kwargs = {"input_shape": (32, 32, 1), "num_classes": 2, "trainable_layers": -1, **overrides}
    with pytest.raises(ValueError, match=message):
        build_transfer(**kwargs)


def check_gradcam(model: keras.Model, batch: np.ndarray, fmap_shape: tuple[int, ...]) -> None:
    gradcam = build_gradcam_model(model)
    with tf.GradientTape() as tape:
        feature_map, predictions = gradcam(batch)
        score = predictions[:, 0]
    grads = tape.gradient(score, feature_map)
    assert tuple(feature_map.shape) == fmap_shape
    # Same forward pass as the model, and the class score depends on the feature map.
    np.testing.assert_allclose(predictions, model(batch), rtol=1e-5, atol=1e-6)
    assert grads is not None and float(tf.reduce_max(tf.abs(grads))) > 0


def test_gradcam_on_the_cnn_taps_the_last_block_before_pooling() -> None:
    model = build_cnn((28, 28, 1), 2, depth=3, base_filters=8, batch_norm="after_activation")
    assert last_conv_layer_name(model) == "block2_bn0"
    check_gradcam(model, images((2, 28, 28, 1)), (2, 7, 7, 32))


def test_gradcam_reaches_into_the_nested_backbone() -> None:
    model = build_transfer((64, 64, 1), 3, backbone="mobilenetv2", trainable_layers=-1)
    assert last_conv_layer_name(model) == "backbone/out_relu"
    check_gradcam(model, images((2, 64, 64, 1)), (2, 2, 2, 1280))


def test_gradcam_picks_the_last_conv_not_the_pool_in_vgg19() -> None:
    model = build_transfer((32, 32, 3), 2, backbone="vgg19", trainable_layers=-1)
    assert last_conv_layer_name(model) == "backbone/block5_conv4"


def test_keras_round_trip_under_safe_mode_keeps_predictions_and_freezing(tmp_path) -> None:
    with pytest.warns(UserWarning):
        model = build_transfer((64, 64, 1), 2, backbone="mobilenetv2", trainable_layers=5)
    path = tmp_path / "transfer.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    batch = images((2, 64, 64, 1))
    np.testing.assert_array_equal(loaded.predict(batch, verbose=0), model.predict(batch, verbose=0))
    assert len(loaded.trainable_weights) == len(model.trainable_weights)
    check_gradcam(loaded, batch, (2, 2, 2, 1280))


def test_transfer_yaml_builds_a_fully_trainable_mobilenetv2() -> None:
    path = Path(models.__file__).resolve().parents[1] / "conf" / "model" / "transfer.yaml"
    assert path.read_text().startswith("# ")
    model = instantiate(OmegaConf.load(path), input_shape=(32, 32, 1), num_classes=2)
    assert model.name == "transfer_mobilenetv2"
    assert model.get_layer("backbone").trainable
