"""Transfer-learning classifiers on Keras applications, plus Grad-CAM model building.

The model takes [0, 1]-scaled images with 1 or 3 channels and is built from serializable
layers only (no Lambda), so `.keras` files load under `safe_mode=True`:

    image -> [to_rgb] -> preprocess -> backbone (nested keras.Model named "backbone")
          -> head_pool -> [head_dropout0] -> [head_dense -> head_dropout1] -> output

ImageNet weights come from the local Keras cache ($KERAS_HOME/models, default
~/.keras/models). A file not there is fetched by Keras' own ``get_file`` (its progress bar,
into that cache) unless ``allow_download=False`` (air-gapped sites); offline, the download
fails within seconds with a message that says what to copy where.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from models.cnn import check_num_classes, output_layer

BACKBONE_LAYER_NAME = "backbone"
MIN_INPUT_SIZE = 32  # every supported application's `min_size` without its top
POOLINGS = ("avg", "max")

# ImageNet statistics used by the applications' own preprocessing (keras imagenet_utils).
CAFFE_BGR_MEANS = (103.939, 116.779, 123.68)
EFFICIENTNET_MEAN_RGB = (0.485, 0.456, 0.406)
EFFICIENTNET_STDDEV_RGB = (0.229, 0.224, 0.225)
_WEIGHTS_URL = "https://storage.googleapis.com/tensorflow/keras-applications/"


@dataclass(frozen=True)
class Backbone:
    """How to build one application and what its input preprocessing is."""

    constructor: Callable[..., keras.Model]
    preprocessing: str  # caffe | tf | raw255 (see `_preprocess`)
    notop_file: Callable[[int], str]  # input size -> no-top weights file name
    url_folder: str  # where that file lives on a connected machine


def _mobilenetv2_file(size: int) -> str:
    # MobileNetV2 has ImageNet weights per input size; Keras falls back to 224 for others.
    rows = size if size in (96, 128, 160, 192, 224) else 224
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_{rows}_no_top.h5"


BACKBONES: dict[str, Backbone] = {
    "vgg19": Backbone(
        keras.applications.VGG19,
        "caffe",
        lambda size: "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _WEIGHTS_URL + "vgg19/",
    ),
    "resnet50": Backbone(
        keras.applications.ResNet50,
        "caffe",
        lambda size: "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
        _WEIGHTS_URL + "resnet/",
    ),
    "mobilenetv2": Backbone(
        keras.applications.MobileNetV2, "tf", _mobilenetv2_file, _WEIGHTS_URL + "mobilenet_v2/"
    ),
    "efficientnetb0": Backbone(
        keras.applications.EfficientNetB0,
        "raw255",
        lambda size: "efficientnetb0_notop.h5",
        "https://storage.googleapis.com/keras-applications/",
    ),
}


def keras_cache_dir() -> Path:
    """Folder Keras caches application weights in: $KERAS_HOME/models, else ~/.keras/models.

    Read at call time (Keras reads KERAS_HOME once, at import) and mirrors Keras' fallback
    to /tmp/.keras when the home folder is not writable.
    """
    home = os.environ.get("KERAS_HOME")
    if not home:
        base = os.path.expanduser("~")
        if not os.access(base, os.W_OK):
            base = "/tmp"
        home = os.path.join(base, ".keras")
    return Path(home) / "models"


DOWNLOAD_TIMEOUT_S = 30  # per socket operation: an unreachable host fails fast, not never


def imagenet_weights_path(backbone: str, image_size: int, allow_download: bool = True) -> Path:
    """Path of the no-top ImageNet weights: cached, or downloaded by Keras into its cache.

    Raises:
        FileNotFoundError: not cached and downloads are off, or the download failed; the
            message names the file, the cache folder and the ways out.
    """
    spec = BACKBONES[backbone]
    file_name = spec.notop_file(image_size)
    path = keras_cache_dir() / file_name
    if path.is_file():
        return path
    url = f"{spec.url_folder}{file_name}"
    how = (
        f"On a connected machine download {url} (for example `curl -LO {url}`) and copy it "
        f"to {str(path)!r} (set KERAS_HOME to use another cache); or use model.weights=none "
        "or model.weights=/path/to/weights.h5"
    )
    if not allow_download:
        raise FileNotFoundError(
            f"model.weights='imagenet' needs {file_name!r} in {str(path.parent)!r}, and "
            f"model.allow_download=false. {how}"
        )
    import socket

    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:  # Keras' own download: progress bar, temp file removed on failure
        # get_file falls back to /tmp/.keras for a cache folder that does not exist yet.
        path.parent.mkdir(parents=True, exist_ok=True)
        fetched = keras.utils.get_file(
            file_name, url, cache_dir=str(path.parent.parent), cache_subdir=path.parent.name
        )
    except Exception as error:  # noqa: BLE001 - urllib, HTTP and OS errors alike
        raise FileNotFoundError(
            f"model.weights='imagenet' needs {file_name!r} in {str(path.parent)!r}, and Keras "
            f"could not download it ({type(error).__name__}: {error}); this machine looks "
            f"offline. {how}"
        ) from error
    finally:
        socket.setdefaulttimeout(previous)
    return Path(fetched)


def _resolve_weights(
    weights: str | None, backbone: str, image_size: int, allow_download: bool = True
) -> Path | None:
    if weights is None or str(weights).lower() in ("none", "null", ""):
        return None
    if weights == "imagenet":
        return imagenet_weights_path(backbone, image_size, allow_download)
    path = Path(os.path.expanduser(str(weights)))
    if not path.is_file():
        raise FileNotFoundError(
            f"model.weights={weights!r} is neither 'none', 'imagenet' nor an existing weights "
            f"file (looked for {str(path.resolve())!r})"
        )
    return path


def preprocess(x: keras.KerasTensor, backbone: str, imagenet: bool) -> keras.KerasTensor:
    """Map [0, 1] RGB into what the backbone was trained on, with serializable layers only."""
    mode = BACKBONES[backbone].preprocessing
    if mode == "caffe":
        # caffe mode: x*255, RGB -> BGR, minus ImageNet BGR means. One frozen 1x1 conv does all
        # three (a permutation matrix scaled by 255, bias = -means); its weights are saved.
        conv = keras.layers.Conv2D(3, 1, trainable=False, name="preprocess")
        x = conv(x)
        conv.set_weights([255.0 * np.eye(3)[::-1].reshape(1, 1, 3, 3), -np.array(CAFFE_BGR_MEANS)])
        return x
    if mode == "tf":
        return keras.layers.Rescaling(2.0, offset=-1.0, name="preprocess")(x)  # [-1, 1]
    if imagenet:
        # EfficientNet rescales 0..255 itself, then Normalization (mean m, variance s**2 from
        # the weights file). Keras appends Rescaling(1/sqrt(s)) after it for ImageNet weights,
        # which we cannot insert into the nested backbone; feeding 255*(u/sqrt(s) + m*(1 -
        # 1/sqrt(s))) instead gives the same (u - m) / (s*sqrt(s)) exactly.
        root = np.sqrt(EFFICIENTNET_STDDEV_RGB)
        return keras.layers.Rescaling(
            (255.0 / root).tolist(),
            offset=(255.0 * np.array(EFFICIENTNET_MEAN_RGB) * (1.0 - 1.0 / root)).tolist(),
            name="preprocess",
        )(x)
    return keras.layers.Rescaling(255.0, name="preprocess")(x)


def _set_trainable(backbone: keras.Model, trainable_layers: int) -> None:
    """Freeze all (0), fine-tune the top k layers with BatchNorm frozen (k > 0), or train all (-1).

    Frozen BatchNorm layers run in inference mode in Keras 3, so fine-tuning a few layers on
    a small dataset cannot wreck the ImageNet statistics (Keras transfer-learning guide).
    """
    if trainable_layers == 0:
        backbone.trainable = False
        return
    backbone.trainable = True
    if trainable_layers == -1:
        return
    for layer in backbone.layers[: len(backbone.layers) - trainable_layers]:
        layer.trainable = False
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False


def build_transfer(
    input_shape: tuple[int, int, int],
    num_classes: int,
    backbone: str = "mobilenetv2",
    weights: str | None = "none",
    trainable_layers: int = 0,
    pooling: str = "avg",
    dense_units: int = 128,
    dropout_rate: float = 0.3,
    name: str | None = None,
    allow_download: bool = True,
) -> keras.Model:
    """Build a classifier on a Keras application for images already scaled to [0, 1].

    Args:
        input_shape: (height, width, channels) with 1 (grayscale) or 3 (RGB) channels.
        num_classes: 2 gives one sigmoid unit; more gives a softmax over the classes.
        backbone: vgg19 | resnet50 | mobilenetv2 | efficientnetb0 (no top).
        weights: "none" (random init), "imagenet" (the Keras cache, downloaded there by
            Keras when missing) or a path to a weights file, loaded as-is.
        trainable_layers: 0 = frozen backbone; k > 0 = only the top k entries of
            `backbone.layers` trainable (weightless layers count), BatchNorm kept frozen;
            -1 = everything trainable (BatchNorm included, e.g. training from scratch).
        pooling: avg | max global pooling of the backbone's feature map.
        dense_units: Units of the relu dense layer before the output; 0 skips it.
        dropout_rate: Dropout before and after that dense layer; 0 disables it.
        name: Model name; defaults to "transfer_<backbone>".
        allow_download: False: ImageNet weights only from the cache (air-gapped sites).

    Returns:
        An uncompiled `keras.Model` whose backbone is the nested model "backbone".

    Raises:
        ValueError: A knob is out of range or the image is smaller than 32x32.
        FileNotFoundError: The ImageNet weights are not cached, or the weights path is missing.
    """
    check_num_classes(num_classes)
    if backbone not in BACKBONES:
        raise ValueError(f"model.backbone={backbone!r} is not valid; allowed: {list(BACKBONES)}")
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape={input_shape!r} must be (height, width, channels)")
    height, width, channels = (int(d) for d in input_shape)
    if channels not in (1, 3):
        raise ValueError(f"input_shape={input_shape!r} has {channels} channels; allowed: 1 or 3")
    if min(height, width) < MIN_INPUT_SIZE:
        raise ValueError(
            f"data.image_size={height}x{width} is below the {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} "
            f"minimum of model.backbone={backbone}; use data.image_size >= {MIN_INPUT_SIZE} "
            f"or model=cnn"
        )
    if pooling not in POOLINGS:
        raise ValueError(f"model.pooling={pooling!r} is not valid; allowed: {list(POOLINGS)}")
    if isinstance(dense_units, bool) or not isinstance(dense_units, int) or dense_units < 0:
        raise ValueError(f"model.dense_units={dense_units!r} is not valid; allowed: an int >= 0")
    if not 0.0 <= float(dropout_rate) < 1.0:
        raise ValueError(f"model.dropout_rate={dropout_rate!r} is not valid; allowed: [0, 1)")
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
        raise ValueError(
            f"model.trainable_layers={trainable_layers!r} is not valid; allowed: an int >= -1"
        )
    weights_path = _resolve_weights(weights, backbone, min(height, width), allow_download)

    base = BACKBONES[backbone].constructor(
        include_top=False, weights=None, input_shape=(height, width, 3), name=BACKBONE_LAYER_NAME
    )
    if not -1 <= trainable_layers <= len(base.layers):
        raise ValueError(
            f"model.trainable_layers={trainable_layers!r} is not valid; allowed: -1 (all), "
            f"0 (frozen) or 1..{len(base.layers)} (top layers of {backbone})"
        )
    if weights_path is not None:
        try:
            base.load_weights(str(weights_path))
        except Exception as error:  # h5py/Keras raise many types; name the file and cause
            raise ValueError(
                f"model.weights={weights!r}: could not load {str(weights_path)!r} into "
                f"{backbone} (include_top=False): {error}"
            ) from error
    elif trainable_layers != -1:
        warnings.warn(
            f"model.weights=none with model.trainable_layers={trainable_layers} trains a head "
            f"on (partly) frozen random features; use trainable_layers=-1 or imagenet weights",
            stacklevel=2,
        )
    _set_trainable(base, trainable_layers)

    inputs = keras.Input(shape=(height, width, channels), name="image")
    x = inputs
    if channels == 1:
        x = keras.layers.Concatenate(axis=-1, name="to_rgb")([x, x, x])
    x = preprocess(x, backbone, imagenet=weights == "imagenet")
    # A frozen or partly frozen backbone runs in inference mode (as the Keras guide does);
    # only full training (-1) lets its BatchNorm and dropout layers follow the training flag.
    x = base(x) if trainable_layers == -1 else base(x, training=False)
    pool = keras.layers.GlobalAveragePooling2D if pooling == "avg" else keras.layers.GlobalMaxPool2D
    x = pool(name="head_pool")(x)
    if dropout_rate > 0:
        x = keras.layers.Dropout(dropout_rate, name="head_dropout0")(x)
    if dense_units > 0:
        x = keras.layers.Dense(dense_units, activation="relu", name="head_dense")(x)
        if dropout_rate > 0:
            x = keras.layers.Dropout(dropout_rate, name="head_dropout1")(x)
    outputs = output_layer(num_classes)(x)
    return keras.Model(inputs, outputs, name=name or f"transfer_{backbone}")


@dataclass(frozen=True)
class FrozenSplit:
    """A transfer model cut where its frozen part ends; every layer is shared with it.

    Attributes:
        bottom: image -> the backbone's output at the cut (all frozen, inference mode).
        head: that output -> predictions: the rest of the backbone, then the head.
        cut: Name of the backbone layer whose output `bottom` returns.
    """

    bottom: keras.Model
    head: keras.Model
    cut: str


def frozen_cut(backbone: keras.Model, trainable_layers: int) -> int:
    """Index of the last backbone layer that is frozen and whose output alone feeds every
    layer above it (a residual block's inside is no cut: its shortcut also crosses).

    0 (the input) means nothing frozen is worth caching; -1 (all trainable) raises.
    """
    if trainable_layers == -1:
        raise ValueError("model.trainable_layers=-1 trains the whole backbone: no frozen part")
    layers = backbone.layers
    index = {id(layer): i for i, layer in enumerate(layers)}
    # lowest layer each layer reads from; a cut c is valid when no layer above it reads below c
    lowest = [min((index[id(t._keras_history.operation)] for node in layer._inbound_nodes[:1]
                   for t in node.input_tensors), default=i) for i, layer in enumerate(layers)]
    last_frozen = len(layers) - 1 - trainable_layers
    above = len(layers)  # min of `lowest` over the layers above the candidate
    for c in range(len(layers) - 1, -1, -1):
        if c <= last_frozen and above >= c:
            return c
        above = min(above, lowest[c])
    return 0


def split_frozen(model: keras.Model, trainable_layers: int) -> FrozenSplit:
    """Cut a `build_transfer` model at `frozen_cut`: `head(bottom(x))` computes `model(x)`.

    Both pieces reuse the model's own layers, so training `head` trains `model`. The
    backbone runs in inference mode in both, as it does in `model` when not fully trainable.
    """
    base = model.get_layer(BACKBONE_LAYER_NAME)
    cut = frozen_cut(base, trainable_layers)
    cut_output = base.layers[cut].output
    image = keras.Input(shape=model.input_shape[1:], name="image")
    x = image
    for layer in model.layers[1:model.layers.index(base)]:  # to_rgb, preprocess
        x = layer([x, x, x]) if layer.name == "to_rgb" else layer(x)
    to_cut = keras.Model(base.input, cut_output, name=f"{BACKBONE_LAYER_NAME}_to_cut")
    bottom = keras.Model(image, to_cut(x, training=False), name=f"{model.name}_bottom")
    features = keras.Input(shape=tuple(cut_output.shape[1:]), name="features")
    x = features
    if cut < len(base.layers) - 1:  # Keras makes an Input for the inner tensor, layers shared
        rest = keras.Model(cut_output, base.output, name=f"{BACKBONE_LAYER_NAME}_from_cut")
        x = rest(x, training=False)
    for layer in model.layers[model.layers.index(base) + 1:]:  # build_transfer's head: a chain
        x = layer(x)
    return FrozenSplit(bottom, keras.Model(features, x, name=f"{model.name}_head"),
                       base.layers[cut].name)


# Layers whose 4D output is not a "conv feature map" for Grad-CAM: they only resample,
# pad or drop what the last conv/activation produced.
_NOT_FEATURE_MAPS = (
    keras.layers.InputLayer,
    keras.layers.MaxPooling2D,
    keras.layers.AveragePooling2D,
    keras.layers.Dropout,
    keras.layers.SpatialDropout2D,
    keras.layers.ZeroPadding2D,
    keras.layers.Cropping2D,
)


def last_conv_layer_name(model: keras.Model) -> str:
    """Name of the last conv feature map, "/"-joined through nested models.

    The rule: the last layer (topological order) with a 4D output that is not pooling,
    dropout or padding; a nested model (the transfer backbone) is searched inside.
    CNN -> "block2_act0" (or "block2_bn0"); transfer -> e.g. "backbone/out_relu",
    "backbone/block5_conv4" (vgg19), "backbone/conv5_block3_out", "backbone/top_activation".
    """
    for layer in reversed(model.layers):
        if isinstance(layer, keras.Model):
            try:
                return f"{layer.name}/{last_conv_layer_name(layer)}"
            except ValueError:
                continue
        if isinstance(layer, _NOT_FEATURE_MAPS):
            continue
        if len(layer.output.shape) == 4:
            return layer.name
    raise ValueError(f"model {model.name!r} has no layer with a 4D (conv) output")


def build_gradcam_model(model: keras.Model, layer_name: str | None = None) -> keras.Model:
    """Model mapping the input to [feature_map, predictions] in one forward pass.

    Grad-CAM takes the gradient of a class score with respect to that feature map. A layer at
    the top level (the CNN) is tapped directly. For a layer inside a nested model (the
    transfer backbone) the outer graph is replayed with `keras.models.clone_model`, reusing
    every layer (shared weights), and the nested model is swapped for a view of itself that
    also returns the inner layer's output.

    Args:
        model: A functional model from `build_cnn` or `build_transfer` (built or loaded).
        layer_name: Layer to tap, "outer/inner" for nested models; defaults to
            `last_conv_layer_name(model)`.

    Returns:
        A `keras.Model` with outputs [feature_map (batch, h, w, c), predictions].
    """
    path = (layer_name or last_conv_layer_name(model)).split("/")
    if len(path) == 1:
        feature_map = model.get_layer(path[0]).output
        return keras.Model(model.input, [feature_map, model.output], name=f"{model.name}_gradcam")
    if len(path) != 2:
        raise ValueError(f"layer_name={layer_name!r}: at most one nesting level is supported")
    nested = model.get_layer(path[0])
    tapped = keras.Model(
        nested.input,
        [nested.get_layer(path[1]).output, nested.output],
        name=f"{nested.name}_tapped",
    )
    taps: list[keras.KerasTensor] = []

    def call(layer: keras.layers.Layer, *args: object, **kwargs: object) -> object:
        if layer is nested:
            feature_map, output = tapped(*args, **kwargs)
            taps.append(feature_map)
            return output
        return layer(*args, **kwargs)

    replay = keras.models.clone_model(model, clone_function=lambda layer: layer, call_function=call)
    return keras.Model(replay.input, [taps[0], replay.output], name=f"{model.name}_gradcam")
