"""The configurable CNN: layer order, widths, heads, guards and safe `.keras` round trips."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

import models
from models.cnn import build_cnn, dropout_blocks, max_depth

SMALL = {"input_shape": (16, 16, 1), "num_classes": 2, "base_filters": 4, "dense_units": 8}


def names(model: keras.Model) -> list[str]:
    return [layer.name for layer in model.layers]


@pytest.mark.parametrize(
    ("batch_norm", "block0"),
    [
        ("none", ["block0_conv0", "block0_act0", "block0_conv1", "block0_act1", "block0_pool"]),
        (
            "before_activation",
            [
                "block0_conv0",
                "block0_bn0",
                "block0_act0",
                "block0_conv1",
                "block0_bn1",
                "block0_act1",
                "block0_pool",
            ],
        ),
        (
            "after_activation",
            [
                "block0_conv0",
                "block0_act0",
                "block0_bn0",
                "block0_conv1",
                "block0_act1",
                "block0_bn1",
                "block0_pool",
            ],
        ),
    ],
)
def test_batch_norm_placement_orders_layers(batch_norm: str, block0: list[str]) -> None:
    model = build_cnn(**SMALL, depth=2, convs_per_block=2, batch_norm=batch_norm)
    layer_names = names(model)
    assert layer_names[1 : 1 + len(block0)] == block0
    # A conv followed by BN has no bias: BN's beta does that job.
    assert model.get_layer("block1_conv0").use_bias is (batch_norm != "before_activation")


@pytest.mark.parametrize(
    ("conv_dropout", "blocks"),
    [
        ("none", []),
        ("last", [3]),
        ("all", [0, 1, 2, 3]),
        ("every_other", [1, 3]),
        ([0, 2], [0, 2]),
    ],
)
def test_conv_dropout_follows_the_chosen_blocks_pooling(conv_dropout, blocks: list[int]) -> None:
    model = build_cnn(**SMALL, depth=4, conv_dropout=conv_dropout, conv_dropout_rate=0.3)
    layer_names = names(model)
    dropped = [i for i in range(4) if f"block{i}_dropout" in layer_names]
    assert dropped == blocks
    for i in blocks:
        assert layer_names.index(f"block{i}_dropout") == layer_names.index(f"block{i}_pool") + 1
        assert model.get_layer(f"block{i}_dropout").rate == pytest.approx(0.3)


def test_every_other_counts_back_from_the_last_block() -> None:
    assert dropout_blocks("every_other", 3) == [0, 2]
    assert dropout_blocks("every_other", 1) == [0]


@pytest.mark.parametrize(
    ("hierarchy", "filters"),
    [("increasing", [32, 64, 128]), ("constant", [32, 32, 32]), ("decreasing", [128, 64, 32])],
)
def test_filter_hierarchy(hierarchy: str, filters: list[int]) -> None:
    model = build_cnn((28, 28, 1), 2, depth=3, base_filters=32, filter_hierarchy=hierarchy)
    assert [model.get_layer(f"block{i}_conv0").filters for i in range(3)] == filters


@pytest.mark.parametrize(
    ("hierarchy", "units"),
    [("constant", [64, 64, 64]), ("decreasing", [64, 32, 16]), ("increasing", [64, 128, 256])],
)
def test_dense_hierarchy_and_head_dropout(hierarchy: str, units: list[int]) -> None:
    model = build_cnn(
        (16, 16, 1),
        2,
        depth=2,
        base_filters=4,
        head="gap",
        dense_layers=3,
        dense_units=64,
        dense_hierarchy=hierarchy,
        head_dropout_rate=0.4,
    )
    assert [model.get_layer(f"dense{k}").units for k in range(3)] == units
    layer_names = names(model)
    assert layer_names[layer_names.index("head_gap") :] == [
        "head_gap",
        "dense0",
        "dense0_dropout",
        "dense1",
        "dense1_dropout",
        "dense2",
        "dense2_dropout",
        "output",
    ]


def test_zero_head_dropout_adds_no_dropout_layers() -> None:
    model = build_cnn(**SMALL, depth=2, head_dropout_rate=0.0, dense_layers=2)
    assert not [n for n in names(model) if "dropout" in n]


def test_binary_output_is_one_sigmoid_unit() -> None:
    output = build_cnn(**SMALL, depth=2).get_layer("output")
    assert (output.units, output.activation.__name__) == (1, "sigmoid")


def test_three_classes_give_a_softmax_over_three() -> None:
    model = build_cnn((16, 16, 1), 3, depth=2, base_filters=4, dense_units=8)
    output = model.get_layer("output")
    assert (output.units, output.activation.__name__) == (3, "softmax")
    probs = model(np.random.default_rng(0).random((4, 16, 16, 1), dtype="float32"))
    np.testing.assert_allclose(np.sum(probs, axis=1), 1.0, rtol=1e-5)


def test_parameter_count_matches_a_hand_count() -> None:
    model = build_cnn(
        (8, 8, 1),
        2,
        depth=2,
        base_filters=4,
        batch_norm="before_activation",
        head="flatten",
        dense_layers=1,
        dense_units=8,
        head_dropout_rate=0.0,
    )
    conv0 = 3 * 3 * 1 * 4  # no bias before BN
    bn0 = 4 * 4  # gamma, beta, moving mean, moving variance
    conv1 = 3 * 3 * 4 * 8
    bn1 = 4 * 8
    dense0 = (2 * 2 * 8) * 8 + 8  # 8x8 pooled twice -> 2x2x8 flattened
    output = 8 * 1 + 1
    assert model.count_params() == conv0 + bn0 + conv1 + bn1 + dense0 + output == 645
    assert sum(int(np.prod(w.shape)) for w in model.non_trainable_weights) == 2 * 4 + 2 * 8


def test_l2_regularizes_conv_and_dense_kernels() -> None:
    model = build_cnn(**SMALL, depth=2, l2=1e-3)
    assert model.get_layer("block0_conv0").kernel_regularizer.l2 == pytest.approx(1e-3)
    assert model.get_layer("dense0").kernel_regularizer.l2 == pytest.approx(1e-3)
    assert len(model.losses) == 3  # two convs, one dense


def test_head_l2_regularizes_the_dense_layers_only() -> None:
    model = build_cnn(**SMALL, depth=2, dense_layers=2, head_l2=1e-2)
    assert model.get_layer("block0_conv0").kernel_regularizer is None
    assert model.get_layer("block1_conv0").kernel_regularizer is None
    for dense in ("dense0", "dense1"):
        assert model.get_layer(dense).kernel_regularizer.l2 == pytest.approx(1e-2)
    assert model.get_layer("output").kernel_regularizer is None
    assert len(model.losses) == 2
    both = build_cnn(**SMALL, depth=2, l2=1e-4, head_l2=1e-2)
    assert both.get_layer("block0_conv0").kernel_regularizer.l2 == pytest.approx(1e-4)
    assert both.get_layer("dense0").kernel_regularizer.l2 == pytest.approx(1e-2)
    off = build_cnn(**SMALL, depth=2, l2=1e-4, head_l2=0.0)  # 0: convs only
    assert off.get_layer("dense0").kernel_regularizer is None and len(off.losses) == 2


def test_max_depth_for_28_pixels_is_4() -> None:
    assert max_depth((28, 28, 1)) == 4
    assert build_cnn((28, 28, 1), 2, depth=4, base_filters=4).get_layer("block3_pool").output.shape[
        1:3
    ] == (1, 1)


def test_depth_guard_names_the_max_depth() -> None:
    with pytest.raises(ValueError, match=r"model\.depth=5.*max depth for this input size is 4"):
        build_cnn((28, 28, 1), 2, depth=5)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_norm": "sometimes"}, r"model\.batch_norm='sometimes'.*before_activation"),
        ({"pooling": "min"}, r"model\.pooling='min'.*'max', 'avg'"),
        ({"filter_hierarchy": "up"}, r"model\.filter_hierarchy='up'.*increasing"),
        ({"dense_hierarchy": "wavy"}, r"model\.dense_hierarchy='wavy'.*decreasing"),
        ({"head": "attention"}, r"model\.head='attention'.*flatten"),
        ({"conv_dropout": "first"}, r"model\.conv_dropout='first'.*every_other"),
        ({"conv_dropout": [0, 7]}, r"model\.conv_dropout=\[0, 7\].*\[0, 1\]"),
        ({"conv_dropout_rate": 1.0}, r"model\.conv_dropout_rate=1\.0.*\[0, 1\)"),
        ({"activation": "wiggle"}, r"model\.activation='wiggle'"),
        ({"depth": 0}, r"model\.depth=0.*>= 1"),
        ({"dense_layers": 5, "dense_hierarchy": "decreasing"}, r"model\.dense_units=8"),
        ({"num_classes": 1}, r"num_classes=1 must be an int >= 2"),
        ({"head_l2": -1e-3}, r"model\.head_l2=-0\.001.*>= 0, or null for model\.l2"),
    ],
)
def test_bad_values_raise_naming_key_value_and_allowed(overrides: dict, message: str) -> None:
    kwargs = {**SMALL, "depth": 2, **overrides}
    with pytest.raises(ValueError, match=message):
        build_cnn(**kwargs)


def test_keras_round_trip_under_safe_mode(tmp_path) -> None:
    model = build_cnn(
        **SMALL,
        depth=2,
        batch_norm="after_activation",
        conv_dropout="all",
        head="gap",
        activation="gelu",
        l2=1e-4,
    )
    images = np.random.default_rng(0).random((3, 16, 16, 1), dtype="float32")
    path = tmp_path / "cnn.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert names(loaded) == names(model)
    expected = model.predict(images, verbose=0)
    np.testing.assert_array_equal(loaded.predict(images, verbose=0), expected)


def test_cnn_yaml_builds_the_documented_default_model() -> None:
    path = Path(models.__file__).resolve().parents[1] / "conf" / "model" / "cnn.yaml"
    assert path.read_text().startswith("# ")
    cfg = OmegaConf.load(path)
    cfg.conv_dropout = [0, 2]  # a list override arrives as a ListConfig
    model = instantiate(cfg, input_shape=[28, 28, 1], num_classes=2)
    layer_names = names(model)
    assert [n for n in layer_names if n.endswith("_dropout")] == [
        "block0_dropout",
        "block2_dropout",
        "dense0_dropout",
    ]
    assert not any(n.endswith("_bn0") for n in layer_names)  # default: no batch norm
    assert model.get_layer("block2_conv0").filters == 128


def test_batch_norm_momentum_is_configurable():
    model = build_cnn((28, 28, 1), 2, depth=2, batch_norm="before_activation", bn_momentum=0.8)
    bns = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert len(bns) == 2
    assert all(bn.momentum == 0.8 for bn in bns)
