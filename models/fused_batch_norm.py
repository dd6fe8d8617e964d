"""TensorFlow's fused batch-norm kernel for the training steps of Keras' BatchNormalization.

Why by hand: Keras 3 computes batch-norm on the TensorFlow backend from separate ops (cast
to float32, mean, squared difference, normalise, scale, shift, cast back), each a pass over
the activation and each with its own gradient op. Keras 2 called TensorFlow's fused kernel
(`FusedBatchNormV3`: one pass forward, one backward, bfloat16 in and out). On a 2-core CPU
the unfused layer is most of the practitioners' 224 px CNN's step (benchmarks/step_cost.py),
and XLA, which would fuse the ops, is slower still there. Neither Keras nor TensorFlow offers
a switch back, so `fuse_batch_norm` gives each eligible layer instance a training `call` that
uses the fused kernel with Keras' own maths (batch statistics, biased variance in the moving
average, the layer's epsilon and momentum). Inference, masks, renorm and other backends keep
Keras' code. The layers stay plain `BatchNormalization`: saved models, MLflow models and
safe-mode loading do not change.
"""

from __future__ import annotations

import types
from typing import Any

import keras


def _eligible(layer: keras.layers.Layer) -> bool:
    """Plain BatchNormalization over the last axis; the call checks the input's rank."""
    return (type(layer) is keras.layers.BatchNormalization and layer.axis in (-1, 3)
            and not layer.renorm and not layer.synchronized)


def _fused_call(self: keras.layers.BatchNormalization, inputs: Any, training: Any = None,
                mask: Any = None) -> Any:
    import tensorflow as tf

    if not (training and self.trainable) or mask is not None or len(inputs.shape) != 4:
        return keras.layers.BatchNormalization.call(self, inputs, training=training, mask=mask)
    channels = inputs.shape[-1]
    gamma = self.gamma if self.scale else tf.ones((channels,), tf.float32)
    beta = self.beta if self.center else tf.zeros((channels,), tf.float32)
    if inputs.dtype not in (tf.float32, tf.bfloat16, tf.float16):
        inputs = tf.cast(inputs, tf.float32)
    outputs, mean, variance = tf.compat.v1.nn.fused_batch_norm(
        inputs, tf.cast(gamma, tf.float32), tf.cast(beta, tf.float32),
        epsilon=self.epsilon, data_format="NHWC", is_training=True,
    )
    # The kernel returns the Bessel-corrected variance for running averages; Keras averages
    # the biased one. Undo the correction so the moving statistics are Keras' own.
    count = tf.cast(tf.reduce_prod(tf.shape(inputs)[:-1]), tf.float32)
    variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
    momentum = self.momentum
    self.moving_mean.assign(self.moving_mean * momentum + mean * (1.0 - momentum))
    self.moving_variance.assign(self.moving_variance * momentum + variance * (1.0 - momentum))
    return tf.cast(outputs, self.compute_dtype)


def fuse_batch_norm(model: keras.Model) -> int:
    """Give `model`'s eligible batch-norm layers the fused training kernel; return how many.

    Only on the TensorFlow backend; nested models (a transfer backbone) are included.
    """
    if keras.backend.backend() != "tensorflow":
        return 0
    count = 0
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if _eligible(layer):
            layer.call = types.MethodType(_fused_call, layer)
            count += 1
    return count
