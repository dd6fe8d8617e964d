"""Test-time augmentation on hand-checked arrays."""

import numpy as np

from search.evaluation import tta


def test_shift_moves_pixels_and_repeats_the_edge():
    image = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    down = tta.shift(image, 1, 0)[0, ..., 0]
    np.testing.assert_array_equal(down[1:], image[0, :3, :, 0])  # row r came from row r-1
    np.testing.assert_array_equal(down[0], image[0, 0, :, 0])  # the edge repeats, no wrap
    left = tta.shift(image, 0, -1)[0, ..., 0]
    np.testing.assert_array_equal(left[:, :3], image[0, :, 1:, 0])


def test_tta_is_the_mean_over_the_views():
    rng = np.random.default_rng(0)
    images = rng.random((3, 28, 28, 1)).astype(np.float32)
    views = tta.views(images)
    assert len(views) == 6 and all(v.shape == images.shape for v in views)

    def left_half_mean(x):  # not flip-invariant: TTA must change its output
        return x[:, :, :14, 0].mean(axis=(1, 2))[:, None]

    expected = np.mean([left_half_mean(v) for v in views], axis=0)
    np.testing.assert_allclose(tta.tta_predict(left_half_mean, images), expected, rtol=1e-6)
    assert not np.allclose(expected, left_half_mean(images))

    def total(x):  # mirror-invariant; edge-repeating shifts change it only slightly
        return x.mean(axis=(1, 2, 3))[:, None]

    np.testing.assert_allclose(tta.tta_predict(total, images), total(images), atol=0.02)
