"""tf.data pipelines: decode, resize, cache, shuffle, batch, augment, repeat, mixup, prefetch.

Preprocessing contract (predict must do the same; call ``preprocess_for_model``): decode to
uint8 with ``channels`` channels, resize (stretch, no crop) to ``image_size`` with bilinear
antialiased interpolation, round back to uint8, then scale by 1/255 to float32 in [0, 1].
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import keras
import numpy as np
import tensorflow as tf

AUGMENT_DEFAULTS: dict[str, Any] = {
    "flip": False,
    "rotation": 0.0,
    "zoom": 0.0,
    "translation": 0.0,
    "contrast": 0.0,
    "brightness": 0.0,
    "noise": 0.0,
}
# Batches prefetched ahead of the consumer: a fixed size, see _finish.
PREFETCH_BATCHES = 2


def preprocessing_spec(image_size: int, channels: int) -> dict[str, Any]:
    """What must happen to a new image before the model sees it (logged with each run)."""
    return {
        "image_size": image_size,
        "channels": channels,
        "scale": 1.0 / 255.0,
        "resize": "bilinear",
        "antialias": True,
        "aspect": "stretch",
        "dtype_before_scale": "uint8",
    }


# Longest side (px) above which decoded images are area-averaged first (see shrink_huge).
HUGE_SIDE = 4096
# JPEGs are decoded at 1/2, 1/4 or 1/8 scale (libjpeg's DCT scaling) when the short side
# still holds twice the target size at that scale (decode_jpeg_scaled); benchmarks/input_pipeline.py
# measures it against full decoding. Off: every JPEG is decoded at full size.
DCT_SCALING = True


def usable_cpus() -> int:
    """CPUs this process may run on (cgroup/affinity aware, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resize_to_uint8(image: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Convert a uint8 (H, W, C) image to uint8 (image_size, image_size, channels).

    Args:
        image: uint8 tensor with C in {1, 3} (static).
        image_size: Output height and width.
        channels: 1 (grayscale) or 3 (RGB).

    Returns:
        uint8 tensor (image_size, image_size, channels).
    """
    source_channels = image.shape[-1]
    height, width = image.shape[0], image.shape[1]
    if source_channels == channels and height == image_size and width == image_size:
        return image  # nothing to do: keep the exact pixels
    pixels = tf.cast(image, tf.float32)
    if source_channels == 1 and channels == 3:
        pixels = tf.image.grayscale_to_rgb(pixels)
    elif source_channels == 3 and channels == 1:
        pixels = tf.image.rgb_to_grayscale(pixels)
    if height != image_size or width != image_size:
        pixels = tf.image.resize(pixels, (image_size, image_size), "bilinear", antialias=True)
    pixels = tf.clip_by_value(tf.round(pixels), 0.0, 255.0)
    return tf.ensure_shape(tf.cast(pixels, tf.uint8), (image_size, image_size, channels))


def shrink_huge(image: tf.Tensor, image_size: int) -> tf.Tensor:
    """Area-average an image whose longest side passes ``max(HUGE_SIDE, 8 * image_size)``.

    Bounded memory: without it a 10000 x 10000 PNG goes whole through the float gray
    conversion and the antialiased resize. ResizeArea reads uint8 and writes floats only at
    the reduced size; images up to the limit (every usual X-ray) are left as they were.
    """
    limit = max(HUGE_SIDE, 8 * image_size)
    shape = tf.shape(image)
    longest = tf.maximum(shape[0], shape[1])

    def shrink() -> tf.Tensor:
        scale = limit / tf.cast(longest, tf.float32)
        size = tf.cast(tf.round(tf.cast(shape[:2], tf.float32) * scale), tf.int32)
        small = tf.raw_ops.ResizeArea(images=image[tf.newaxis], size=tf.maximum(size, 1))[0]
        return tf.cast(tf.clip_by_value(tf.round(small), 0.0, 255.0), tf.uint8)

    return tf.cond(longest > limit, shrink, lambda: image)


def decode_native(encoded: tf.Tensor, channels: int, image_size: int) -> tf.Tensor:
    """Decode JPEG/PNG/GIF/BMP/WebP bytes to uint8 (H, W, channels) at about their own size.

    CMYK JPEGs are converted (TensorFlow converts CMYK to RGB only when asked for the file's
    own channel count); huge images are area-averaged first (``shrink_huge``).
    """

    def jpeg() -> tf.Tensor:
        def cmyk() -> tf.Tensor:
            rgb = tf.ensure_shape(tf.io.decode_jpeg(encoded, channels=0), (None, None, 3))
            rgb = shrink_huge(rgb, image_size)
            return tf.image.rgb_to_grayscale(rgb) if channels == 1 else rgb

        def plain() -> tf.Tensor:
            return shrink_huge(decode_jpeg_scaled(encoded, channels, image_size), image_size)

        return tf.cond(tf.io.extract_jpeg_shape(encoded)[2] == 4, cmyk, plain)

    def other() -> tf.Tensor:
        # Every format decodes to RGB (GIF and BMP cannot decode straight to one channel).
        rgb = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        rgb = tf.ensure_shape(shrink_huge(rgb, image_size), (None, None, 3))
        return tf.image.rgb_to_grayscale(rgb) if channels == 1 else rgb

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(image, (None, None, channels))


def decode_jpeg_scaled(encoded: tf.Tensor, channels: int, image_size: int) -> tf.Tensor:
    """Decode a JPEG at the smallest DCT scale (1, 1/2, 1/4, 1/8) whose short side is still at
    least twice `image_size`: a 1040 px X-ray bound for 224 px decodes at 1/2 (520 px), a
    quarter of the pixels, and the antialiased resize then starts from 520 px. Scaling happens
    inside the inverse DCT; keeping 2x oversampling for the resize keeps the result within half
    a grey level of full decoding on average (benchmarks/input_pipeline.py), where scaling down
    to the target itself would move small, busy images visibly."""
    if not DCT_SCALING:
        return tf.io.decode_jpeg(encoded, channels=channels)
    short = tf.reduce_min(tf.io.extract_jpeg_shape(encoded)[:2])
    # branch i decodes at 1/2**i; take the largest i with short / 2**i >= 2 * image_size
    index = tf.reduce_sum(tf.cast(short // tf.constant([2, 4, 8]) >= 2 * image_size, tf.int32))
    return tf.switch_case(index, [
        functools.partial(tf.io.decode_jpeg, encoded, channels=channels, ratio=ratio)
        for ratio in (1, 2, 4, 8)
    ])


def decode_to_uint8(encoded: tf.Tensor, image_size: int, channels: int) -> tf.Tensor:
    """Decode JPEG/PNG/GIF/BMP/WebP bytes to uint8 (image_size, image_size, channels)."""
    return resize_to_uint8(decode_native(encoded, channels, image_size), image_size, channels)


def scale_to_unit(images: tf.Tensor) -> tf.Tensor:
    """uint8 -> float32 in [0, 1]."""
    return tf.cast(images, tf.float32) * (1.0 / 255.0)


def preprocess_for_model(image: tf.Tensor | np.ndarray | bytes, image_size: int, channels: int):
    """Preprocess one new image exactly as the training pipeline does.

    Args:
        image: Encoded file bytes, or a uint8 array (H, W), (H, W, 1) or (H, W, 3).
        image_size: ``preprocessing["image_size"]`` of the run.
        channels: ``preprocessing["channels"]`` of the run.

    Returns:
        float32 tensor (image_size, image_size, channels) in [0, 1].
    """
    if isinstance(image, bytes) or (isinstance(image, tf.Tensor) and image.dtype == tf.string):
        return scale_to_unit(decode_to_uint8(tf.convert_to_tensor(image), image_size, channels))
    array = tf.convert_to_tensor(image)
    if array.dtype != tf.uint8:
        raise ValueError(f"expected a uint8 image (0-255), got dtype {array.dtype.name}")
    if array.shape.rank == 2:
        array = array[..., tf.newaxis]
    return scale_to_unit(resize_to_uint8(array, image_size, channels))


def build_augmenter(augment: Mapping[str, Any] | None, seed: int) -> keras.Sequential | None:
    """Keras preprocessing layers for the train split; only the configured ones.

    Args:
        augment: {flip: bool, rotation, zoom, translation, contrast, brightness, noise: float
            in [0, 1)}; missing keys are off. rotation is a fraction of a full turn,
            zoom/translation fractions of the image size, contrast a factor (all as in the
            Keras layers), brightness the largest shift of every pixel (a fraction of the [0, 1]
            range), noise the stddev of additive Gaussian noise on [0, 1] pixels.
        seed: Base seed; each layer gets its own offset so their random draws are independent.

    Returns:
        A ``keras.Sequential`` of the enabled layers, or None when all are off.
    """
    config = dict(AUGMENT_DEFAULTS)
    unknown = sorted(set(augment or {}) - set(AUGMENT_DEFAULTS))
    if unknown:
        raise ValueError(
            f"unknown data.augment key(s) {unknown}; allowed: {sorted(AUGMENT_DEFAULTS)}"
        )
    config.update(augment or {})
    for key in ("rotation", "zoom", "translation", "contrast", "brightness", "noise"):
        value = config[key]
        if value is None:
            config[key] = 0.0
        elif not isinstance(value, int | float) or isinstance(value, bool) or not 0 <= value < 1:
            raise ValueError(f"data.augment.{key} must be a number in [0, 1), got {value!r}")
    layers: list[keras.layers.Layer] = []
    if config["flip"]:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if config["rotation"]:
        layers.append(keras.layers.RandomRotation(config["rotation"], seed=seed + 1))
    if config["zoom"]:
        layers.append(keras.layers.RandomZoom(config["zoom"], seed=seed + 2))
    if config["translation"]:
        t = config["translation"]
        layers.append(keras.layers.RandomTranslation(t, t, seed=seed + 3))
    if config["contrast"]:
        # value_range must match the [0, 1] pixels, else the layer clips to 0-255 semantics.
        layers.append(
            keras.layers.RandomContrast(config["contrast"], value_range=(0.0, 1.0), seed=seed + 4)
        )
    if config["brightness"]:
        # Exposure varies between X-ray machines. value_range=(0, 1): the shift is a fraction of
        # the pixel range and the layer clips its output to [0, 1].
        layers.append(
            keras.layers.RandomBrightness(
                config["brightness"], value_range=(0.0, 1.0), seed=seed + 5
            )
        )
    if config["noise"]:
        # Last, so the noise is not stretched by contrast; GaussianNoise does not clip, and
        # Keras has no clip layer: ReLU(max_value=1) is exactly clip(x, 0, 1).
        layers.append(keras.layers.GaussianNoise(config["noise"], seed=seed + 6))
        layers.append(keras.layers.ReLU(max_value=1.0, name="clip_to_unit"))
    return keras.Sequential(layers, name="augment") if layers else None


def mixup_batch(
    images: tf.Tensor, labels: tf.Tensor, alpha: float, seed: tf.Tensor
) -> tuple[tf.Tensor, tf.Tensor]:
    """Mix each image and its float label with another of the batch (mixup, Zhang et al. 2018).

    Weights w ~ Beta(alpha, alpha) per image, partners a random permutation of the batch:
    ``x = w x_i + (1 - w) x_j``, ``y = w y_i + (1 - w) y_j``. Written here rather than
    ``keras.layers.MixUp``: that layer draws from a stateful SeedGenerator (the draws depend
    on how often it ran before) and broadcasts rank-1 labels into a (batch, batch) matrix;
    this one is stateless, so a (seed, step) pair always gives the same batch.

    Args:
        images: float32 (batch, H, W, C) in [0, 1].
        labels: float32 (batch,) (binary labels: soft labels need a float loss).
        alpha: Beta concentration > 0 (small: most weights near 0 or 1, mild mixing).
        seed: int (2,) stateless seed.

    Returns:
        The mixed (images, labels), images still in [0, 1].
    """
    gamma_a, gamma_b, order = tf.unstack(tf.random.split(seed, 3))
    n = tf.shape(images)[:1]
    # Beta(a, a) = Ga / (Ga + Gb) for Ga, Gb ~ Gamma(a); TF has no stateless Beta sampler.
    a = tf.random.stateless_gamma(n, seed=gamma_a, alpha=alpha)
    b = tf.random.stateless_gamma(n, seed=gamma_b, alpha=alpha)
    weight = tf.math.divide_no_nan(a, a + b)  # both underflow to 0 (tiny alpha): take partner
    partner = tf.random.experimental.stateless_shuffle(tf.range(n[0]), seed=order)
    # x_j + w (x_i - x_j): exact where both are equal (two 0/1 labels stay exactly 0 or 1).
    other_images = tf.gather(images, partner)
    mixed = other_images + weight[:, None, None, None] * (images - other_images)
    other_labels = tf.gather(labels, partner)
    return tf.clip_by_value(mixed, 0.0, 1.0), other_labels + weight * (labels - other_labels)


def _finish(dataset: tf.data.Dataset) -> tf.data.Dataset:
    """Fixed prefetch, autotuning off, deterministic order.

    Measured on this stack: with autotuning on, every fresh iterator (each epoch of a finite
    dataset, each validation pass in fit()) can wait seconds on the autotune thread with the
    CPU idle. Explicit parallelism and a fixed prefetch avoid that wait.
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    options.deterministic = True
    return dataset.prefetch(PREFETCH_BATCHES).with_options(options)


def make_dataset(
    source: np.ndarray,
    labels: np.ndarray,
    *,
    binary: bool,
    image_size: int,
    channels: int,
    batch_size: int,
    training: bool,
    seed: int,
    cache: bool = True,
    shuffle_buffer: int = 10000,
    augmenter: keras.Sequential | None = None,
    mixup: float = 0.0,
    parallel: int | None = None,
    rows: np.ndarray | None = None,
) -> tf.data.Dataset:
    """Build one split's batched dataset of (x float32 [0, 1], y).

    Train (``training=True``): cache -> shuffle (seeded, reshuffled every pass) -> batch ->
    augment -> repeat forever -> mixup. Eval: cache -> batch, finite, in input order.

    Args:
        source: uint8 images (N, H, W, C) or file paths (N,) as strings.
        labels: Integer labels (N,).
        binary: y as float32 (batch,) for 2 classes, else int32 (batch,) (sparse).
        image_size: Output height/width.
        channels: 1 or 3.
        batch_size: Batch size.
        training: Shuffle, augment, repeat and mix up.
        seed: Shuffle and mixup seed.
        cache: Keep decoded uint8 images in memory after the first pass.
        shuffle_buffer: Shuffle buffer size (capped at N).
        augmenter: Layers applied to train batches.
        mixup: Beta alpha of mixup on train batches (``mixup_batch``); 0 = off. Binary only.
        parallel: Decode threads; default: usable CPUs.
        rows: With a memory-mapped uint8 `source` (data/decoded_cache.py) too large for
            memory: the rows of this split, read image by image from the file as needed.

    Returns:
        The dataset.
    """
    parallel = parallel or usable_cpus()
    if isinstance(mixup, bool) or not isinstance(mixup, int | float) or mixup < 0:
        raise ValueError(f"mixup must be a number >= 0 (0 = off), got {mixup!r}")
    if mixup and not binary:
        raise ValueError("mixup needs binary (float) labels; class indices cannot be mixed")
    targets = labels.astype(np.float32 if binary else np.int32)
    mapped = True  # only what a map computed is worth caching; arrays are in memory already
    if rows is not None:
        shape = tuple(source.shape[1:])

        def read(row: tf.Tensor) -> tf.Tensor:  # a copy from the page cache, microseconds
            image = tf.numpy_function(lambda i: np.asarray(source[i]), [row], tf.uint8)
            return tf.ensure_shape(image, shape)

        dataset = tf.data.Dataset.from_tensor_slices((np.asarray(rows), targets))
        dataset = dataset.map(lambda row, y: (read(row), y), num_parallel_calls=parallel)
        mapped = False
    elif source.dtype.kind in "US":
        dataset = tf.data.Dataset.from_tensor_slices((source.astype(str), targets))
        dataset = dataset.map(
            lambda path, y: (decode_to_uint8(tf.io.read_file(path), image_size, channels), y),
            num_parallel_calls=parallel,
        )
    else:
        dataset = tf.data.Dataset.from_tensor_slices((source, targets))
        mapped = source.shape[1:] != (image_size, image_size, channels)
        if mapped:
            dataset = dataset.map(
                lambda x, y: (resize_to_uint8(x, image_size, channels), y),
                num_parallel_calls=parallel,
            )
    if cache and mapped:
        # uint8 in memory: a quarter of float32's footprint; scaling per batch is cheap.
        dataset = dataset.cache()
    if training and len(targets) > 1:
        dataset = dataset.shuffle(
            min(max(shuffle_buffer, 1), len(targets)), seed=seed, reshuffle_each_iteration=True
        )
    dataset = dataset.batch(batch_size)
    dataset = dataset.map(lambda x, y: (scale_to_unit(x), y), num_parallel_calls=parallel)
    if training and augmenter is not None:
        # Sequential on purpose: the layers' seed generators are stateful, and parallel calls
        # would draw from them in a racy order, so the same seed would not give the same run.
        dataset = dataset.map(lambda x, y: (augmenter(x, training=True), y))
    if training:
        dataset = dataset.repeat()
    if training and mixup:
        # After repeat: the step counts on across epochs, so each step of the run gets its own
        # stateless seed (seed, step) and the same seed gives the same batches.
        alpha, base = float(mixup), tf.constant(seed, tf.int64)

        def mix(step: tf.Tensor, batch: tuple[tf.Tensor, tf.Tensor]):
            return mixup_batch(*batch, alpha, tf.stack([base, step]))

        dataset = dataset.enumerate().map(mix, num_parallel_calls=parallel)
    return _finish(dataset)
