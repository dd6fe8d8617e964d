"""MLflow tag keys have one owner: `search/tracking/tags.py`. No other module under `search/`
spells a tag key as a string literal (a set_tag key, a tags dict, a `tags.get(...)`, a search
filter such as ``tags.`optuna.study` = '...'``, a ``tracking.tags={...}`` override)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from search.tracking import tags as tag_keys

ROOT = Path(__file__).resolve().parents[2]
OWNER = "search/tracking/tags.py"

# Every key and prefix tags.py defines.
KEYS = {value for name, value in vars(tag_keys).items()
        if name.isupper() and isinstance(value, str)}
PREFIXES = {key for key in KEYS if key.endswith(".")}
VALUES = KEYS - PREFIXES
# Keys distinctive enough to be a tag key wherever they appear. The others (class_names,
# threshold, calibration, run_id, ...) are also field names of model_metadata.json and
# model_info.json, so they count only where a tag is written or read.
DISTINCTIVE = {key for key in VALUES if "." in key} | {tag_keys.BEST_RUN_ID,
                                                       tag_keys.BEST_MODEL_URI}
DICTS = (ast.Dict, ast.DictComp)
TAG_SETTERS = {"set_tag", "set_experiment_tag", "set_model_version_tag",
               "set_registered_model_tag", "delete_tag", "delete_model_version_tag"}


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                found.add(id(body[0].value))
    return found


def _is_tags(node: ast.AST) -> bool:
    """`tags`, `run_tags`, `run.data.tags`, `mv.tags`: an expression holding tags."""
    if isinstance(node, ast.Name):
        return "tags" in node.id
    return isinstance(node, ast.Attribute) and node.attr == "tags"


def _text(node: ast.AST) -> str | None:
    """A string literal, or an f-string's literal parts with `{}` for each field."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def _tag_positions(tree: ast.AST) -> list[ast.AST]:
    """Nodes in tag-key position: set_tag keys, tags[...] / tags.get(...) / `in tags`,
    keys of a dict that is a `tags=` argument, assigned to a *tag* name or built in a
    *tag* function."""
    found: list[ast.AST] = []
    tag_dicts: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and "tag" in node.name:
            tag_dicts |= {id(n) for n in ast.walk(node) if isinstance(n, DICTS)}
        named = isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and "tag" in t.id for t in node.targets)
        if named or isinstance(node, ast.keyword) and node.arg == "tags":
            tag_dicts.add(id(node.value))
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in TAG_SETTERS:
                found += node.args[:-1] + [k.value for k in node.keywords if k.arg == "key"]
            elif node.func.attr == "get" and _is_tags(node.func.value) and node.args:
                found.append(node.args[0])
            elif node.func.attr == "startswith":  # a prefix of tag keys
                found += node.args
        elif isinstance(node, ast.Subscript) and _is_tags(node.value):
            found.append(node.slice)
        elif isinstance(node, ast.Compare) and any(
                isinstance(op, ast.In | ast.NotIn) for op in node.ops) and any(
                _is_tags(c) for c in node.comparators):
            found.append(node.left)
        elif isinstance(node, ast.Dict) and id(node) in tag_dicts:
            found += [k for k in node.keys if k is not None]
        elif isinstance(node, ast.DictComp) and id(node) in tag_dicts:
            found.append(node.key)
    return found


def literal_keys(source: str) -> list[tuple[int, str]]:
    """(line, key) of every tag key spelt as a literal in `source`."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    hits: list[tuple[int, str]] = []
    for node in _tag_positions(tree):
        text = _text(node)
        if text in VALUES:
            hits.append((node.lineno, text))
        elif text is not None and any(text.startswith(p) for p in PREFIXES):
            hits.append((node.lineno, next(p for p in PREFIXES if text.startswith(p))))
    for node in ast.walk(tree):
        text = _text(node)
        if text is None or id(node) in skip:
            continue
        if text in DISTINCTIVE:
            hits.append((node.lineno, text))
        for key in VALUES:  # search filters and tracking.tags={key: ...} overrides
            if re.search(rf"tags\.`?{re.escape(key)}(?![\w.])", text) or (
                    "tracking.tags=" in text and re.search(
                        rf"(?<![\w.]){re.escape(key)}\s*:", text)):
                hits.append((node.lineno, key))
    return sorted(set(hits))


def scan() -> dict[str, list[tuple[int, str]]]:
    """Tag-key literals per file of `search/`, outside the owner."""
    found = {}
    for path in sorted((ROOT / "search").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel != OWNER:
            hits = literal_keys(path.read_text())
            if hits:
                found[rel] = hits
    return found


@pytest.mark.parametrize("source", [
    'mlflow.set_tag("optuna.study", s)',
    'client.set_tag(run_id, "best_run_id", r)',
    'client.set_model_version_tag(name, v, "class_names", x)',
    'run.data.tags.get("threshold")',
    'tags["calibration"] = x',
    'ok = "optuna.trial_state" in run.data.tags',
    'tags = {"sweep.parent": "true"}',
    'mlflow.start_run(tags={"run_id": r})',
    'def version_tags(): return {"config_hash": h}',
    'q = f"tags.`optuna.trial_number` = \'{n}\'"',
    'q = f"tags.mlflow.parentRunId = \'{p}\'"',
    'o = f"++tracking.tags={{cv.fold: \'{i}\', cv.of_run: {r}}}"',
    'client.set_model_version_tag(name, v, f"cv.{metric}", text)',
    'promotion = [k for k in tags if k.startswith("promotion.")]',
    'x = "promotion.metric"',
    'tags = {f"version.{k}": v for k, v in versions.items()}',
    'extra = {k: v for k, v in attrs.items() if k.startswith("keras_tuner.")}',
])
def test_a_literal_key_is_found(source: str) -> None:
    assert literal_keys(source), source


@pytest.mark.parametrize("source", [
    'mlflow.set_tag(tag_keys.OPTUNA_STUDY, s)',
    'q = f"tags.`{tag_keys.OPTUNA_STUDY}` = \'{s}\'"',
    'meta = {"class_names": names, "threshold": t, "calibration": c, "run_id": r}',
    'def f():\n    """Reads the `best_run_id` tag."""\n',
    'log.info("the sweep has no best_run_id")',
    'params = {"sweeper.sampler": f"keras_tuner.{name}"}',
])
def test_other_strings_are_not_keys(source: str) -> None:
    assert not literal_keys(source), source


def test_tag_keys_are_literals_only_in_their_owner() -> None:
    found = {f"{rel}:{line} {key!r}" for rel, hits in scan().items() for line, key in hits}
    assert not found, ("tag keys spelt outside search/tracking/tags.py (use its constants): "
                       + ", ".join(sorted(found)))


def test_every_key_says_what_it_holds() -> None:
    lines = (ROOT / OWNER).read_text().splitlines()
    for i, line in enumerate(lines):
        if re.match(r"[A-Z_]+ = ", line) and not line.startswith("VERSION_JSON_TAGS"):
            assert lines[i - 1].startswith("#"), f"{OWNER}:{i + 1} needs a comment: {line}"
