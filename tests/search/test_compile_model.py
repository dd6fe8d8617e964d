"""Label smoothing: train targets only, binary only, values checked."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from search.training.fit import smooth_labels
from search.training.model_setup import check_label_smoothing


def test_smoothing_moves_train_targets_as_keras_loss_would():
    x = np.zeros((4, 2), dtype="float32")
    y = np.array([0, 1, 1, 0], dtype="float32")
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(4)
    [(_, smoothed)] = list(smooth_labels(batches, 0.1).as_numpy_iterator())
    np.testing.assert_allclose(smoothed, [0.05, 0.95, 0.95, 0.05], rtol=1e-6)
    # Keras' own smoothing gives the same loss on these targets
    import keras

    p = np.array([0.2, 0.7, 0.9, 0.4], dtype="float32")
    ours = keras.losses.BinaryCrossentropy()(smoothed, p)
    theirs = keras.losses.BinaryCrossentropy(label_smoothing=0.1)(y, p)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-5)
    assert smooth_labels(batches, 0.0) is batches  # off: the dataset untouched


def test_k_class_label_smoothing_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"trainer\.label_smoothing=0\.05 works with two classes"):
        check_label_smoothing(0.05, 3)
    assert check_label_smoothing(0.0, 3) == 0.0 and check_label_smoothing(0.1, 2) == 0.1


@pytest.mark.parametrize("bad", [-0.1, 1.0, "some", True])
def test_bad_label_smoothing_is_refused(bad):
    with pytest.raises(ValueError, match=r"trainer\.label_smoothing=.*a number in \[0, 1\)"):
        check_label_smoothing(bad, 2)
