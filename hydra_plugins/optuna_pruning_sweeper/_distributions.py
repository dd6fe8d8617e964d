"""Override grammar -> Optuna distributions, as pure functions.

Mapping (``hydra.sweeper.params`` values and sweep overrides on the command line):

=================================  =================================================
``choice(a, b, c)`` / ``a,b,c``    ``CategoricalDistribution([a, b, c])``
``range(a, b[, step])``            ``IntDistribution(a, last, step)``; floats ->
                                   ``FloatDistribution(a, last, step)``; ``last`` is the
                                   last value the range yields (``b`` is exclusive)
``interval(a, b)``                 ``FloatDistribution(a, b)``
``int(interval(a, b))``            ``IntDistribution(a, b)``
``tag(log, interval(a, b))``       ``FloatDistribution(a, b, log=True)``
``tag(log, int(interval(a, b)))``  ``IntDistribution(a, b, log=True)``
``shuffle(range(...))``            ``CategoricalDistribution`` of the range's values
anything else (``key=value``)      a fixed override passed unchanged to every trial
=================================  =================================================

Conditional parameters (the rule; the sampling itself lives in ``_conditions``):

* A *swept group* is a ``choice(...)`` param whose key is a config group
  (``lr_schedule: choice(constant, exponential, cosine, plateau)``).
* A param whose key starts with a swept group's key plus a dot
  (``lr_schedule.decay_rate``) is sampled only when the option chosen for that group has
  the key (the option's composed config is checked); otherwise it is left out of the
  trial's params and overrides, so Optuna sees a conditional space. With nested groups the
  longest matching group decides. Fixed overrides under a swept group follow the same rule.
* Explicit form, for conditions on non-group params::

      model.dropout_rate:
        values: interval(0.0, 0.5)
        when: {model.dropout: [true]}

  is sampled only when ``model.dropout`` was sampled with one of the listed values
  (compared as override text). An explicit ``when`` replaces the automatic rule.

Optuna is imported inside the functions: the public ``sweeper`` imports this module at
Hydra's plugin scan, in every Hydra process, and a plain ``python search/run.py`` should not
pay for Optuna.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
    Transformer,
)

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.trial import Trial


@dataclass(frozen=True)
class Param:
    """One sampled parameter: the override key as written and its distribution."""

    name: str  # key element as written, e.g. "lr_schedule", "+extra", "model/backbone"
    key: str  # dotted config path, e.g. "lr_schedule", "extra", "model.backbone"
    # Any, not BaseDistribution: Optuna stays unimported at plugin-scan time.
    distribution: Any
    when: dict[str, list[str]] | None = None  # explicit condition


@dataclass(frozen=True)
class FixedOverride:
    """A non-sweep override passed to every trial (where its condition holds)."""

    key: str  # dotted config path
    line: str  # the override as written, e.g. "trainer.max_epochs=3"


@dataclass(frozen=True)
class SearchSpace:
    """Parsed ``params`` + command-line overrides."""

    params: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, FixedOverride] = field(default_factory=dict)

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able, order-independent description, stored with the study."""
        from optuna.distributions import distribution_to_json

        params = {}
        for name in sorted(self.params):
            p = self.params[name]
            entry: dict[str, Any] = {"distribution": distribution_to_json(p.distribution)}
            if p.when:
                entry["when"] = {k: list(v) for k, v in sorted(p.when.items())}
            params[name] = entry
        fixed = {k: self.fixed[k].line for k in sorted(self.fixed)}
        return {"params": params, "fixed": fixed}


def config_key(override_key: str) -> str:
    """Dotted config path of an override key: ``+model/backbone@x`` -> ``model.backbone``."""
    key = override_key.lstrip("+~")
    key = key.split("@", 1)[0]
    return key.replace("/", ".")


def _range_values(override: Override) -> list[Any]:
    return list(override.sweep_iterator(transformer=Transformer.encode))


def distribution_from_override(override: Override) -> "BaseDistribution | None":
    """Distribution of a sweep override; None for a plain (fixed) override.

    Raises:
        ValueError: for sweeps Optuna cannot represent (glob, empty range, log with step).
    """
    from optuna.distributions import CategoricalDistribution

    if not override.is_sweep_override():
        return None
    name = override.get_key_element()
    value = override.value()
    log = "log" in (getattr(value, "tags", None) or set())
    shuffled = bool(getattr(value, "shuffle", False))
    if shuffled:
        # Order matters to Optuna (a categorical must equal itself across runs): unshuffle.
        value.shuffle = False

    if isinstance(value, ChoiceSweep):
        choices = list(override.sweep_iterator(transformer=Transformer.encode))
        for c in choices:
            if not isinstance(c, str | int | float | bool | type(None)):
                raise ValueError(f"{name}: choice() values must be scalars, got {c!r}")
        if log:
            raise ValueError(f"{name}: tag(log, ...) needs an interval or a range, not choice()")
        return CategoricalDistribution(choices)
    if isinstance(value, RangeSweep):
        return _range_distribution(override, value, log, shuffled)
    if isinstance(value, IntervalSweep):
        return _interval_distribution(override, value, log)
    raise ValueError(
        f"{name}: {override.input_line!r} is not supported by the Optuna sweeper "
        "(use choice, range, interval, int(interval), tag(log, ...))"
    )


def _range_distribution(
    override: Override, value: RangeSweep, log: bool, shuffled: bool
) -> "BaseDistribution":
    """``range(a, b[, step])``: ints or floats up to the last value the range yields."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    name = override.get_key_element()
    values = _range_values(override)
    if not values:
        raise ValueError(f"{name}: {override.input_line!r} is an empty range")
    if shuffled:
        return CategoricalDistribution(values)
    step = abs(value.step) if value.step is not None else 1
    low = min(values)
    # The last value the range yields, rebuilt from the step to avoid float drift.
    high = low + (len(values) - 1) * step
    is_float = any(isinstance(v, float) for v in (value.start, value.stop, value.step))
    if log and step != 1:
        raise ValueError(f"{name}: tag(log, range(...)) cannot have a step (got {step})")
    if is_float:
        return FloatDistribution(
            float(low), float(high), log=log, step=None if log else float(step)
        )
    return IntDistribution(int(low), int(high), log=log, step=int(step))


def _interval_distribution(
    override: Override, value: IntervalSweep, log: bool
) -> "BaseDistribution":
    """``interval(a, b)`` (int bounds: ``int(interval(...))``), optionally log-scaled."""
    from optuna.distributions import FloatDistribution, IntDistribution

    name = override.get_key_element()
    assert value.start is not None and value.end is not None
    if value.start > value.end:
        raise ValueError(
            f"{name}: {override.input_line!r} has its low bound {value.start} above its "
            f"high bound {value.end}; write interval(low, high)"
        )
    if log and value.start <= 0:
        raise ValueError(
            f"{name}: tag(log, ...) needs a low bound > 0, got {value.start}"
        )
    if isinstance(value.start, int) and isinstance(value.end, int):
        return IntDistribution(value.start, value.end, log=log)
    return FloatDistribution(float(value.start), float(value.end), log=log)


def _normalize_when(name: str, when: Any) -> dict[str, list[str]]:
    if not isinstance(when, Mapping) or not when:
        raise ValueError(f"{name}: 'when' must be a non-empty mapping of key -> allowed values")
    out: dict[str, list[str]] = {}
    for k, allowed in when.items():
        if isinstance(allowed, str) or not isinstance(allowed, Sequence):
            allowed = [allowed]
        out[str(k)] = [format_value(a) for a in allowed]
    return out


def params_to_overrides(
    params: Mapping[str, Any] | None,
) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
    """``hydra.sweeper.params`` -> override lines + explicit conditions by key.

    A value is an override grammar string (or a plain scalar), or a mapping
    ``{values: <grammar>, when: {key: [allowed, ...]}}``.
    """
    lines: list[str] = []
    conditions: dict[str, dict[str, list[str]]] = {}
    for key, value in (params or {}).items():
        key = str(key)
        if isinstance(value, Mapping):
            unknown = set(value) - {"values", "when"}
            if "values" not in value or unknown:
                raise ValueError(
                    f"hydra.sweeper.params.{key}: a mapping needs 'values' (and optionally "
                    f"'when'), got keys {sorted(map(str, value))}"
                )
            conditions[key] = _normalize_when(key, value.get("when"))
            value = value["values"]
        lines.append(f"{key}={format_value(value) if not isinstance(value, str) else value}")
    return lines, conditions


def parse_search_space(
    overrides: Sequence[str],
    conditions: Mapping[str, dict[str, list[str]]] | None = None,
) -> SearchSpace:
    """Parse override lines (``params`` first, then the command line; later wins)."""
    parser = OverridesParser.create()
    params: dict[str, Param] = {}
    fixed: dict[str, FixedOverride] = {}
    for override in parser.parse_overrides(list(overrides)):
        name = override.get_key_element()
        key = config_key(name)
        # A later override of the same key replaces an earlier one, sweep or fixed.
        for existing in [n for n, p in params.items() if p.key == key]:
            del params[existing]
        fixed.pop(key, None)
        dist = distribution_from_override(override)
        if dist is None:
            fixed[key] = FixedOverride(key=key, line=override.input_line)
        else:
            when = (conditions or {}).get(name) or (conditions or {}).get(key)
            params[name] = Param(name=name, key=key, distribution=dist, when=when)
    return SearchSpace(params=params, fixed=fixed)


def format_value(value: Any) -> str:
    """A sampled value as override text (``True`` -> ``true``, ``None`` -> ``null``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            raise ValueError(f"cannot pass {value} as an override")
        return repr(value)
    return str(value)


def format_override(name: str, value: Any) -> str:
    """``name=value`` override line for a sampled value."""
    return f"{name}={format_value(value)}"


def grid_values(param: Param) -> list[Any]:
    """Values of a param for GridSampler.

    Raises:
        ValueError: for a continuous distribution (interval without a step).
    """
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    d = param.distribution
    if isinstance(d, CategoricalDistribution):
        return list(d.choices)
    if isinstance(d, IntDistribution) and not d.log:
        return list(range(d.low, d.high + 1, d.step))
    if isinstance(d, FloatDistribution) and d.step is not None:
        n = int(round((d.high - d.low) / d.step))
        return [round(d.low + i * d.step, 12) for i in range(n + 1)]
    raise ValueError(
        f"The grid sampler needs discrete params: '{param.name}' is {type(d).__name__}"
        f"({d}). Use choice(...) or range(...), or another sampler."
    )


def suggest(trial: "Trial", param: Param) -> Any:
    """Sample ``param`` on ``trial`` through Optuna's public suggest API."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    d = param.distribution
    if isinstance(d, CategoricalDistribution):
        return trial.suggest_categorical(param.name, d.choices)
    if isinstance(d, IntDistribution):
        return trial.suggest_int(param.name, d.low, d.high, step=d.step, log=d.log)
    if isinstance(d, FloatDistribution):
        return trial.suggest_float(param.name, d.low, d.high, step=d.step, log=d.log)
    raise TypeError(f"{param.name}: unsupported distribution {d!r}")


def condition_parent(key: str, group_keys: Sequence[str]) -> str | None:
    """The swept group a dotted ``key`` depends on: the longest ``group_key.`` prefix."""
    best: str | None = None
    for g in group_keys:
        if g != key and key.startswith(g + ".") and (best is None or len(g) > len(best)):
            best = g
    return best


def explicit_condition_holds(when: Mapping[str, Sequence[str]], chosen: Mapping[str, Any]) -> bool:
    """True when every key in ``when`` was sampled with one of its allowed values."""
    for k, allowed in when.items():
        matches = [v for n, v in chosen.items() if n == k or config_key(n) == config_key(k)]
        if not matches or format_value(matches[0]) not in allowed:
            return False
    return True
