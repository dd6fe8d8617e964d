"""Override grammar -> Optuna distributions: the parsing table and the conditional rule."""

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from hydra_plugins.optuna_pruning_sweeper._distributions import (
    Param,
    condition_parent,
    config_key,
    distribution_from_override,
    explicit_condition_holds,
    format_value,
    grid_values,
    params_to_overrides,
    parse_search_space,
)


def _parse(line: str):
    return distribution_from_override(OverridesParser.create().parse_override(line))


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("a=choice(adam, sgd)", CategoricalDistribution(["adam", "sgd"])),
        ("a=choice(1, 2.5, true, x)", CategoricalDistribution([1, 2.5, True, "x"])),
        ("a=1,2,3", CategoricalDistribution([1, 2, 3])),
        ("a=range(1, 5)", IntDistribution(1, 4)),
        ("a=range(0, 10, 3)", IntDistribution(0, 9, step=3)),
        ("a=range(5, 1, -1)", IntDistribution(2, 5)),
        ("a=range(0.1, 1.0, 0.2)", FloatDistribution(0.1, 0.9, step=0.2)),
        ("a=shuffle(range(1, 4))", CategoricalDistribution([1, 2, 3])),
        ("a=interval(0, 1)", FloatDistribution(0.0, 1.0)),
        ("a=interval(0.5, 0.99)", FloatDistribution(0.5, 0.99)),
        ("a=int(interval(2, 5))", IntDistribution(2, 5)),
        ("a=tag(log, interval(1e-4, 1e-1))", FloatDistribution(1e-4, 1e-1, log=True)),
        ("a=tag(log, int(interval(8, 128)))", IntDistribution(8, 128, log=True)),
        ("a=tag(log, range(1, 10))", IntDistribution(1, 9, log=True)),
        ("a=5", None),
        ("a=adam", None),
        ("+a=[1,2]", None),
    ],
)
def test_override_to_distribution(line, expected):
    got = _parse(line)
    if expected is None or isinstance(expected, CategoricalDistribution):
        assert got == expected
    else:  # float ranges: compare bounds approximately
        assert type(got) is type(expected)
        assert got.low == pytest.approx(expected.low)
        assert got.high == pytest.approx(expected.high)
        assert got.log == expected.log
        assert got.step == pytest.approx(expected.step)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("a=tag(log, range(1, 10, 2))", "cannot have a step"),
        ("a=tag(log, choice(1, 2))", "needs an interval or a range"),
        ("a=range(3, 3)", "empty range"),
        ("a=glob(*)", "not supported"),
    ],
)
def test_unsupported_sweeps_are_refused(line, message):
    with pytest.raises(ValueError, match=message):
        _parse(line)


def test_parse_search_space_splits_fixed_and_later_wins():
    space = parse_search_space(
        ["x=interval(0, 1)", "y=choice(a, b)", "trainer.epochs=3", "x=0.5", "y=choice(c, d)"]
    )
    assert set(space.params) == {"y"}
    assert space.params["y"].distribution == CategoricalDistribution(["c", "d"])
    assert {k: f.line for k, f in space.fixed.items()} == {
        "trainer.epochs": "trainer.epochs=3",
        "x": "x=0.5",
    }


def test_params_mapping_with_explicit_condition():
    lines, conditions = params_to_overrides(
        {
            "lr": "tag(log, interval(1e-4, 1e-1))",
            "epochs": 3,
            "model.dropout_rate": {"values": "interval(0, 0.5)", "when": {"model.dropout": True}},
        }
    )
    assert lines == [
        "lr=tag(log, interval(1e-4, 1e-1))",
        "epochs=3",
        "model.dropout_rate=interval(0, 0.5)",
    ]
    assert conditions == {"model.dropout_rate": {"model.dropout": ["true"]}}
    space = parse_search_space(lines, conditions)
    assert space.params["model.dropout_rate"].when == {"model.dropout": ["true"]}
    with pytest.raises(ValueError, match="needs 'values'"):
        params_to_overrides({"a": {"when": {"b": 1}}})


def test_fingerprint_is_order_independent():
    a = parse_search_space(["x=interval(0, 1)", "y=choice(a, b)", "e=3"]).fingerprint()
    b = parse_search_space(["e=3", "y=choice(a, b)", "x=interval(0, 1)"]).fingerprint()
    c = parse_search_space(["e=3", "y=choice(a, b)", "x=interval(0, 2)"]).fingerprint()
    assert a == b
    assert a != c


@pytest.mark.parametrize(
    ("key", "groups", "parent"),
    [
        ("lr_schedule.decay_rate", ["lr_schedule", "optimizer"], "lr_schedule"),
        ("optimizer.momentum", ["lr_schedule", "optimizer"], "optimizer"),
        ("optimizer", ["optimizer"], None),
        ("optimizer_name", ["optimizer"], None),
        ("model.backbone.width", ["model", "model.backbone"], "model.backbone"),
        ("seed", ["model"], None),
    ],
)
def test_condition_parent(key, groups, parent):
    assert condition_parent(key, groups) == parent


def test_explicit_condition_and_helpers():
    when = {"model.dropout": ["true"], "optimizer": ["sgd", "rmsprop"]}
    assert explicit_condition_holds(when, {"model.dropout": True, "optimizer": "sgd"})
    assert not explicit_condition_holds(when, {"model.dropout": False, "optimizer": "sgd"})
    assert not explicit_condition_holds(when, {"optimizer": "sgd"})  # not sampled
    assert config_key("+model/backbone@x") == "model.backbone"
    assert [format_value(v) for v in (True, None, 0.1, 3, "a")] == ["true", "null", "0.1", "3", "a"]


def test_grid_values():
    def p(line):
        return Param(name="a", key="a", distribution=_parse(line))

    assert grid_values(p("a=choice(x, y)")) == ["x", "y"]
    assert grid_values(p("a=range(0, 10, 3)")) == [0, 3, 6, 9]
    assert grid_values(p("a=range(0.0, 1.0, 0.25)")) == [0.0, 0.25, 0.5, 0.75]
    with pytest.raises(ValueError, match="grid sampler needs discrete params"):
        grid_values(p("a=interval(0, 1)"))
