"""The configurable CNN: a few meaningful architecture knobs a sampler can learn.

Layout: `depth` blocks of `convs_per_block` convolutions, one 2x2 pooling per block,
optional dropout after chosen blocks, then a flatten/GAP head with `dense_layers` dense
layers and a sigmoid (binary) or softmax output. Layers get predictable names so tests,
Grad-CAM and humans can find them:

    block{i}_conv{j}, block{i}_bn{j}, block{i}_act{j}, block{i}_pool, block{i}_dropout,
    head_flatten | head_gap, dense{k}, dense{k}_dropout, output
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import keras

FILTER_HIERARCHIES = ("increasing", "constant", "decreasing")
DENSE_HIERARCHIES = ("constant", "decreasing", "increasing")
BATCH_NORM_PLACEMENTS = ("none", "before_activation", "after_activation")
POOLINGS = ("max", "avg")
HEADS = ("flatten", "gap")
CONV_DROPOUT_PATTERNS = ("none", "last", "all", "every_other")
CONV_DROPOUT_ALLOWED = f"{list(CONV_DROPOUT_PATTERNS)} or a list of 0-based block indices"


def _bad(key: str, value: Any, allowed: Any) -> ValueError:
    return ValueError(f"model.{key}={value!r} is not valid; allowed: {allowed}")


def max_depth(input_shape: Sequence[int]) -> int:
    """Largest depth whose 2x2 poolings keep the feature map at least 1x1.

    Each pool floors the size (`valid` padding): 28 -> 14 -> 7 -> 3 -> 1, so 28x28 allows 4.
    """
    size = min(int(input_shape[0]), int(input_shape[1]))
    depth = 0
    while size // 2 >= 1:
        size //= 2
        depth += 1
    return depth


def block_filters(depth: int, base_filters: int, filter_hierarchy: str) -> list[int]:
    """Filters per block: increasing base*2**i, constant base, decreasing base*2**(depth-1-i).

    `decreasing` is the exact reverse of `increasing` (base 32, depth 3: 128 -> 64 -> 32), so
    both hierarchies span the same widths and differ only in where the capacity sits.
    """
    if filter_hierarchy == "increasing":
        return [base_filters * 2**i for i in range(depth)]
    if filter_hierarchy == "constant":
        return [base_filters] * depth
    if filter_hierarchy == "decreasing":
        return [base_filters * 2 ** (depth - 1 - i) for i in range(depth)]
    raise _bad("filter_hierarchy", filter_hierarchy, list(FILTER_HIERARCHIES))


def dense_widths(dense_layers: int, dense_units: int, dense_hierarchy: str) -> list[int]:
    """Units per dense layer: constant, decreasing (halve each layer) or increasing (double)."""
    if dense_hierarchy == "constant":
        widths = [dense_units] * dense_layers
    elif dense_hierarchy == "decreasing":
        widths = [dense_units // 2**k for k in range(dense_layers)]
    elif dense_hierarchy == "increasing":
        widths = [dense_units * 2**k for k in range(dense_layers)]
    else:
        raise _bad("dense_hierarchy", dense_hierarchy, list(DENSE_HIERARCHIES))
    if widths and min(widths) < 1:
        raise ValueError(
            f"model.dense_units={dense_units} halved over model.dense_layers={dense_layers} "
            f"gives {widths}; every layer needs >= 1 unit: raise dense_units or lower dense_layers"
        )
    return widths


def dropout_blocks(conv_dropout: str | Sequence[int] | None, depth: int) -> list[int]:
    """0-based indices of the blocks followed by dropout.

    `every_other` counts back from the last block (depth 4: blocks 1 and 3), so it always
    includes the deepest, widest block, like `last` does.
    """
    if conv_dropout is None or conv_dropout == "none":
        return []
    if isinstance(conv_dropout, str):
        if conv_dropout == "last":
            return [depth - 1]
        if conv_dropout == "all":
            return list(range(depth))
        if conv_dropout == "every_other":
            return sorted(range(depth - 1, -1, -2))
        raise _bad("conv_dropout", conv_dropout, CONV_DROPOUT_ALLOWED)
    # Anything iterable (list, tuple, Hydra ListConfig) is an explicit list of block indices.
    try:
        indices = list(conv_dropout)
    except TypeError:
        raise _bad("conv_dropout", conv_dropout, CONV_DROPOUT_ALLOWED) from None
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < depth:
            raise ValueError(
                f"model.conv_dropout={indices!r} holds {index!r}; block indices must be ints in "
                f"[0, {depth - 1}] for model.depth={depth}"
            )
    return sorted(set(indices))


def _check_rate(key: str, rate: float) -> None:
    if not 0.0 <= float(rate) < 1.0:
        raise _bad(key, rate, "a rate in [0, 1)")


def _check_int(key: str, value: int, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _bad(key, value, f"an int >= {minimum}")


def build_cnn(
    input_shape: tuple[int, int, int],
    num_classes: int,
    depth: int = 3,
    convs_per_block: int = 1,
    base_filters: int = 32,
    filter_hierarchy: str = "increasing",
    kernel_size: int = 3,
    activation: str = "relu",
    batch_norm: str = "none",
    pooling: str = "max",
    conv_dropout: str | Sequence[int] = "none",
    conv_dropout_rate: float = 0.25,
    head: str = "flatten",
    dense_layers: int = 1,
    dense_units: int = 128,
    dense_hierarchy: str = "constant",
    head_dropout_rate: float = 0.5,
    l2: float = 0.0,
    head_l2: float | None = None,
    bn_momentum: float = 0.9,
    name: str = "cnn",
) -> keras.Model:
    """Build the configurable CNN (functional API) for images already scaled to [0, 1].

    Args:
        input_shape: (height, width, channels).
        num_classes: 2 gives one sigmoid unit; more gives a softmax over the classes.
        depth: Number of conv blocks; each ends in a 2x2 pooling.
        convs_per_block: Convolutions per block ("same" padding).
        base_filters: Filters of the narrowest block.
        filter_hierarchy: increasing | constant | decreasing (see `block_filters`).
        kernel_size: Square kernel size of every convolution.
        activation: Any Keras activation name (relu, elu, gelu, swish, ...).
        batch_norm: none | before_activation (Conv without bias -> BN -> act)
            | after_activation (Conv -> act -> BN).
        pooling: max | avg.
        conv_dropout: none | last | all | every_other, or a list of 0-based block indices;
            the dropout follows that block's pooling.
        conv_dropout_rate: Rate of those dropout layers.
        head: flatten | gap (GlobalAveragePooling2D).
        dense_layers: Dense layers between the head and the output (0 allowed).
        dense_units: Width of the first dense layer.
        dense_hierarchy: constant | decreasing (halve per layer) | increasing (double).
        head_dropout_rate: Dropout after each dense layer; 0 disables it.
        l2: L2 penalty on conv and dense kernels; 0 disables it.
        head_l2: L2 penalty on the dense head's kernels instead of `l2` (the output layer
            excepted, as with `l2`); None uses `l2`. The head holds most of the weights and
            over-fits first, so it may want a stronger penalty than the convolutions.
        bn_momentum: moving-statistics momentum of the batch-norm layers. 0.9, not Keras'
            0.99: at ~70 steps per epoch the 0.99 averages still lag after several epochs
            (benchmarks/bn_momentum.py: val predictions collapse to one class for the first
            epochs), so early epochs look hopeless and get pruned.
        name: Model name.

    Returns:
        An uncompiled `keras.Model`.

    Raises:
        ValueError: A knob is out of range, or `depth` pools the image below 1x1.
    """
    if len(tuple(input_shape)) != 3:
        raise ValueError(f"input_shape={input_shape!r} must be (height, width, channels)")
    input_shape = tuple(int(d) for d in input_shape)
    _check_int("depth", depth, 1)
    _check_int("convs_per_block", convs_per_block, 1)
    _check_int("base_filters", base_filters, 1)
    _check_int("kernel_size", kernel_size, 1)
    _check_int("dense_layers", dense_layers, 0)
    _check_int("dense_units", dense_units, 1)
    _check_rate("conv_dropout_rate", conv_dropout_rate)
    _check_rate("head_dropout_rate", head_dropout_rate)
    check_num_classes(num_classes)
    if batch_norm not in BATCH_NORM_PLACEMENTS:
        raise _bad("batch_norm", batch_norm, list(BATCH_NORM_PLACEMENTS))
    if pooling not in POOLINGS:
        raise _bad("pooling", pooling, list(POOLINGS))
    if head not in HEADS:
        raise _bad("head", head, list(HEADS))
    if float(l2) < 0:
        raise _bad("l2", l2, "a penalty >= 0")
    if head_l2 is not None and (
        isinstance(head_l2, bool) or not isinstance(head_l2, int | float) or head_l2 < 0
    ):
        raise _bad("head_l2", head_l2, "a penalty >= 0, or null for model.l2")
    try:
        keras.activations.get(activation)
    except (ValueError, TypeError):
        raise _bad(
            "activation", activation, "a Keras activation name, e.g. relu, elu, gelu, swish"
        ) from None
    limit = max_depth(input_shape)
    if depth > limit:
        raise ValueError(
            f"model.depth={depth} pools a {input_shape[0]}x{input_shape[1]} image below 1x1; "
            f"the max depth for this input size is {limit} (each block halves it)"
        )
    filters = block_filters(depth, base_filters, filter_hierarchy)
    widths = dense_widths(dense_layers, dense_units, dense_hierarchy)
    drop_after = set(dropout_blocks(conv_dropout, depth))

    def regularizer(penalty: float = l2) -> keras.regularizers.Regularizer | None:
        return keras.regularizers.L2(float(penalty)) if penalty else None

    dense_l2 = l2 if head_l2 is None else head_l2

    pool_layer = keras.layers.MaxPooling2D if pooling == "max" else keras.layers.AveragePooling2D
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, block_width in enumerate(filters):
        for j in range(convs_per_block):
            # BN right after the conv makes the conv bias redundant (BN's beta replaces it).
            x = keras.layers.Conv2D(
                block_width,
                kernel_size,
                padding="same",
                use_bias=batch_norm != "before_activation",
                kernel_regularizer=regularizer(),
                name=f"block{i}_conv{j}",
            )(x)
            if batch_norm == "before_activation":
                x = keras.layers.BatchNormalization(
                    momentum=bn_momentum, name=f"block{i}_bn{j}"
                )(x)
            x = keras.layers.Activation(activation, name=f"block{i}_act{j}")(x)
            if batch_norm == "after_activation":
                x = keras.layers.BatchNormalization(
                    momentum=bn_momentum, name=f"block{i}_bn{j}"
                )(x)
        x = pool_layer(pool_size=2, name=f"block{i}_pool")(x)
        if i in drop_after and conv_dropout_rate > 0:
            x = keras.layers.Dropout(conv_dropout_rate, name=f"block{i}_dropout")(x)

    if head == "flatten":
        x = keras.layers.Flatten(name="head_flatten")(x)
    else:
        x = keras.layers.GlobalAveragePooling2D(name="head_gap")(x)
    for k, units in enumerate(widths):
        x = keras.layers.Dense(
            units, activation=activation, kernel_regularizer=regularizer(dense_l2), name=f"dense{k}"
        )(x)
        if head_dropout_rate > 0:
            x = keras.layers.Dropout(head_dropout_rate, name=f"dense{k}_dropout")(x)
    outputs = output_layer(num_classes)(x)
    return keras.Model(inputs, outputs, name=name)


def output_layer(num_classes: int) -> keras.layers.Dense:
    """The classification head shared by both builders, named "output".

    Binary tasks get one sigmoid unit (binary cross-entropy, one threshold to tune);
    float32 keeps probabilities exact under a mixed-precision policy.
    """
    check_num_classes(num_classes)
    if num_classes == 2:
        return keras.layers.Dense(1, activation="sigmoid", dtype="float32", name="output")
    return keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="output")


def check_num_classes(num_classes: int) -> None:
    """Raise unless there are at least two classes (one class is not a classification task)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes={num_classes!r} must be an int >= 2")
