"""The fused batch-norm kernel computes Keras' own batch-norm, and saved models do not change."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.cnn import build_cnn
from models.fused_batch_norm import fuse_batch_norm


def _pair(policy: str = "float32") -> tuple[keras.Model, keras.Model]:
    keras.config.set_dtype_policy(policy)
    try:
        keras.utils.set_random_seed(0)
        plain = build_cnn((32, 32, 1), 2, depth=2, batch_norm="before_activation",
                          conv_dropout="none", head_dropout_rate=0.0)
        fused = keras.models.clone_model(plain)
    finally:
        keras.config.set_dtype_policy("float32")
    fused.set_weights(plain.get_weights())
    return plain, fused


def _step(model: keras.Model, x: tf.Tensor) -> tuple[np.ndarray, list[np.ndarray]]:
    with tf.GradientTape() as tape:
        out = model(x, training=True)
        loss = tf.reduce_mean(tf.cast(out, tf.float32) ** 2)
    return out.numpy(), [g.numpy() for g in tape.gradient(loss, model.trainable_weights)]


@pytest.fixture(scope="module")
def batch() -> tf.Tensor:
    return tf.constant(np.random.default_rng(1).random((16, 32, 32, 1), dtype=np.float32) * 3)


def test_training_step_matches_keras_batch_norm(batch):
    plain, fused = _pair()
    assert fuse_batch_norm(fused) == 2 and fuse_batch_norm(keras.Sequential()) == 0
    out_plain, grads_plain = _step(plain, batch)
    out_fused, grads_fused = _step(fused, batch)
    np.testing.assert_allclose(out_fused, out_plain, atol=1e-5)
    scale = max(float(np.abs(g).max()) for g in grads_plain)
    for g_plain, g_fused in zip(grads_plain, grads_fused, strict=True):
        np.testing.assert_allclose(g_fused, g_plain, atol=1e-3 * scale)
    # moving statistics: Keras' biased batch variance, not the kernel's Bessel-corrected one
    for w_plain, w_fused in zip(plain.non_trainable_weights, fused.non_trainable_weights,
                                strict=True):
        np.testing.assert_allclose(w_fused.numpy(), w_plain.numpy(), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain.get_layer("block0_bn0").moving_variance.numpy(), 1.0)


def test_bfloat16_inputs_and_inference_path(batch):
    plain, fused = _pair("mixed_bfloat16")
    fuse_batch_norm(fused)
    out_plain, _ = _step(plain, batch)
    out_fused, _ = _step(fused, batch)
    assert out_fused.dtype == out_plain.dtype
    np.testing.assert_allclose(out_fused.astype(np.float32), out_plain.astype(np.float32),
                               atol=2e-2)  # bfloat16 keeps 8 bits of mantissa
    # inference uses Keras' own code on both: identical for identical weights
    fused.set_weights(plain.get_weights())
    np.testing.assert_array_equal(fused(batch, training=False).numpy(),
                                  plain(batch, training=False).numpy())


def test_saved_model_keeps_plain_batch_norm(tmp_path, batch):
    _, fused = _pair()
    fuse_batch_norm(fused)
    path = tmp_path / "m.keras"
    fused.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    layer = loaded.get_layer("block0_bn0")
    assert type(layer) is keras.layers.BatchNormalization and "call" not in vars(layer)
    np.testing.assert_allclose(loaded(batch).numpy(), fused(batch).numpy(), atol=1e-6)


def test_renorm_layers_keep_keras_code():
    inputs = keras.Input((8, 8, 2))
    outputs = keras.layers.BatchNormalization(renorm=True)(inputs)
    assert fuse_batch_norm(keras.Model(inputs, outputs)) == 0
