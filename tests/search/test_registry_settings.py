"""The registry and evaluation defaults are written once, in `conf/<group>/default.yaml`:
the schemas (`registry_settings`, `evaluation_settings`) give keys and types only, and the
code takes its fallbacks from the YAML-loaded `DEFAULTS`, never from a literal of its own."""

from __future__ import annotations

import ast
import dataclasses
import shutil
import typing
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from omegaconf import OmegaConf

from search import config_checks
from search.evaluation import evaluation_settings, intervals
from search.model_registry import heldout, model_store, registration, registry_settings

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = {"registry": registry_settings, "evaluation": evaluation_settings}
# "test" is also the split's name all over search/: that value is matched by its key only.
COMMON_WORDS = {"test"}


def written(group: str) -> dict[str, Any]:
    """`conf/<group>/default.yaml` as plain values."""
    return OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / group / "default.yaml"))


def leaves(section: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in section.items():
        if isinstance(value, dict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def schemas(cls: type) -> Iterator[type]:
    """A schema dataclass and the dataclasses nested in it."""
    yield cls
    for hint in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(hint):
            yield from schemas(hint)


@pytest.mark.parametrize("group", SECTIONS)
def test_the_schemas_write_no_values(group: str) -> None:
    top = type(SECTIONS[group].DEFAULTS)
    found = list(schemas(top))
    assert len(found) > 1  # the nested sections are checked too
    for cls in found:
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING, f"{cls.__name__}.{f.name} has a value"
            assert f.default_factory is dataclasses.MISSING, f"{cls.__name__}.{f.name}"


@pytest.mark.parametrize("group", SECTIONS)
def test_defaults_are_the_yaml(group: str) -> None:
    assert asdict(SECTIONS[group].DEFAULTS) == written(group)


@pytest.mark.parametrize("group", SECTIONS)
def test_the_composed_sections_are_the_defaults(compose_cfg, group: str) -> None:
    cfg = compose_cfg()  # nothing registered: composition reads conf/ alone
    assert OmegaConf.to_container(cfg[group]) == asdict(SECTIONS[group].DEFAULTS)


def test_the_code_takes_its_defaults_from_the_yaml() -> None:
    registry, evaluation = registry_settings.DEFAULTS, evaluation_settings.DEFAULTS
    gate = heldout.GateSpec()
    assert (gate.rule, gate.min_per_class, gate.compare_on) == (
        registry.gate, registry.min_per_class, registry.compare_on)
    assert heldout.GateSpec.from_config({}) == gate
    assert registry.metric == heldout.DEFAULT_METRIC
    assert registry.tie_break == heldout.DEFAULT_TIE_BREAK
    assert registry.model_name == model_store.DEFAULT_MODEL_NAME
    assert registration.registry_options({}) == {
        "enabled": registry.enabled, "model_name": registry.model_name,
        "metric": registry.metric, "tie_break": registry.tie_break}
    assert asdict(intervals.BootstrapSpec()) == asdict(evaluation.bootstrap)
    assert intervals.BootstrapSpec.from_config({}) == intervals.BootstrapSpec()
    assert evaluation.threshold_rule == config_checks.DEFAULT_THRESHOLD_RULE


@pytest.mark.parametrize(("line", "replacement", "key", "reason"), [
    ("min_per_class: 10", "min_per_class: many", "registry.min_per_class", "Integer"),
    ("  repeats: 2", "  repeats: twice", "registry.final_stage.repeats", "Integer"),
    ("cv_folds: 0 ", "cv_fold: 0 ", "registry.cv_fold", "not in"),
    ("gate: paired_bootstrap", "", "registry.gate", "missing"),
])
def test_a_wrong_yaml_fails_naming_the_file_and_key(tmp_path: Path, monkeypatch, line: str,
                                                     replacement: str, key: str,
                                                     reason: str) -> None:
    copy = tmp_path / "registry" / "default.yaml"
    copy.parent.mkdir()
    shutil.copy(ROOT / "conf" / "registry" / "default.yaml", copy)
    text = copy.read_text()
    assert line in text
    copy.write_text(text.replace(line, replacement))
    monkeypatch.setattr(evaluation_settings, "CONF_DIR", tmp_path)
    with pytest.raises(ValueError) as error:
        evaluation_settings.load_defaults(registry_settings.RegistrySettings, "registry")
    message = str(error.value)
    assert str(copy) in message and f"{key}:" in message and reason in message
    monkeypatch.undo()  # the real file still loads
    assert evaluation_settings.load_defaults(
        registry_settings.RegistrySettings, "registry") == registry_settings.DEFAULTS


# ---------------------------------------------------------------------------------------------
# No default value written a second time in search/


def _key_of(call: ast.AST) -> str | None:
    """The last dotted part of the key a `.get("k", ...)` / `select(cfg, "a.k", ...)` reads."""
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)):
        return None
    position = {"get": 0, "pop": 0, "setdefault": 0, "select": 1}.get(call.func.attr)
    if position is None or len(call.args) <= position:
        return None
    arg = call.args[position]
    if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
        return arg.value.rsplit(".", 1)[-1]
    return None


def default_positions(tree: ast.AST) -> Iterator[tuple[ast.AST, str | None]]:
    """(expression, the key it is the default of, if known) for every place Python code writes
    a default: parameter defaults, class-body fields, `default=`, `.get(k, d)`, `x or d`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            args = node.args
            yield from ((d, None) for d in [*args.defaults, *args.kw_defaults] if d is not None)
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, ast.AnnAssign) and stmt.value is not None:
                    target = stmt.target.id if isinstance(stmt.target, ast.Name) else None
                    yield stmt.value, target
        elif isinstance(node, ast.Call):
            if _key_of(node) is not None and node.func.attr != "select" and len(node.args) == 2:
                yield node.args[1], _key_of(node)
            yield from ((kw.value, _key_of(node)) for kw in node.keywords if kw.arg == "default")
        elif isinstance(node, ast.BoolOp) and isinstance(node.op, ast.Or):
            yield node.values[-1], _key_of(node.values[0])


def duplicates(tree: ast.AST) -> list[str]:
    """Literal defaults equal to a YAML value: a distinctive string anywhere, or any value
    given as the fallback of the same key."""
    values = {f"{group}.{k}": v for group in SECTIONS for k, v in leaves(written(group))}
    strings = {v for v in values.values() if isinstance(v, str)} - COMMON_WORDS
    by_key: dict[str, set] = {}
    for name, value in values.items():
        if value is not None and not isinstance(value, list):
            by_key.setdefault(name.rsplit(".", 1)[-1], set()).add((type(value), value))
    found = []
    for expression, key in default_positions(tree):
        if not isinstance(expression, ast.Constant):
            continue
        value = expression.value
        if (isinstance(value, str) and value in strings) or \
                (type(value), value) in by_key.get(key, set()):
            line = expression.lineno
            found.append((line, f"{line}: {key or 'default'} = {value!r}"))
    return [hit for _, hit in sorted(found)]


def test_the_scan_finds_a_written_default() -> None:
    code = ('def f(name="pneumonia-cnn"): ...\n'
            'class Gate:\n    rule: str = "paired_bootstrap"\n'
            'k = section.get("min_per_class", 10)\n'
            'c = section.get("compare_on") or "test"\n'
            'n = OmegaConf.select(cfg, "registry.cv_folds", default=0)\n'
            'p.add_argument("--metric", default="roc_auc")\n'
            'ok = section.get("compare_on") == "test" or section.get("top_k", 5)\n')
    assert duplicates(ast.parse(code)) == [
        "1: default = 'pneumonia-cnn'", "3: rule = 'paired_bootstrap'", "4: min_per_class = 10",
        "5: compare_on = 'test'", "6: cv_folds = 0", "7: default = 'roc_auc'"]


def test_no_default_value_is_written_twice_in_search() -> None:
    found = [f"{path.relative_to(ROOT)}:{hit}"
             for path in sorted((ROOT / "search").rglob("*.py"))
             for hit in duplicates(ast.parse(path.read_text(), str(path)))]
    assert found == [], "write these as registry_settings/evaluation_settings.DEFAULTS.<key>"
