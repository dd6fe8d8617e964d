"""The README and docs/ stay true to the code: short README, no dead link, no stale path,
every module in the architecture page's map.

Fast and file-only: nothing here imports TensorFlow or runs a command. The docs' sweep
commands themselves are dry-run by tests/search/test_sweep_mixes.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.search.test_sweep_mixes import DOC_PAGES, doc_sweeps

REPO = Path(__file__).resolve().parents[1]
ARCHITECTURE = REPO / "docs" / "architecture.md"
# The folders whose packages and modules the architecture page maps.
MAPPED_ROOTS = ("search", "models", "data", "hydra_plugins")
README_MAX_LINES = 220
# Repository files named in prose or commands: `search/run.py`, `conf/experiment/nightly.yaml`...
REPO_PATH = re.compile(r"(?<![\w/.-])((?:search|models|data|hydra_plugins|tests|benchmarks|conf"
                       r"|docs)/[\w./-]*\.(?:py|yaml|md))\b")
# Python modules named by their dotted path: `python -m search.tracking.store_move`.
DOTTED = re.compile(r"(?<![\w.])((?:search|models|hydra_plugins)(?:\.\w+)+)")


def pages() -> list[Path]:
    """The README, docs/*.md and the benchmarks' README (whose figures the docs cite)."""
    return [REPO / page for page in (*DOC_PAGES, "benchmarks/README.md")]


def without_code(text: str) -> str:
    """The Markdown text outside fenced blocks and inline code (where links are links)."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.sub(r"`[^`\n]*`", "", text)


def code_spans(text: str) -> list[str]:
    """Fenced blocks and inline code: where commands and file paths are written."""
    fenced = re.findall(r"^```.*?^```", text, flags=re.MULTILINE | re.DOTALL)
    rest = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return fenced + re.findall(r"`([^`\n]+)`", rest)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def modules_on_disk() -> set[str]:
    """Every package (`search/training/`) and module (`search/training/trainer.py`)."""
    found: set[str] = set()
    for root in MAPPED_ROOTS:
        for path in (REPO / root).rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            rel = path.relative_to(REPO)
            found.add(rel.parent.as_posix() + "/" if path.name == "__init__.py"
                      else rel.as_posix())
    return found


def modules_in_map() -> set[str]:
    """The first column of the tables under the page's `## Module map` section."""
    text = ARCHITECTURE.read_text()
    start = text.index("\n## Module map")
    end = text.find("\n## ", start + 1)
    section = text[start:end if end != -1 else None]
    return set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE))


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move sections to docs/"


def test_readme_keeps_the_ci_test_command() -> None:
    # .ci/run and the CI workflow run "the README's test command": it must be there verbatim.
    command = ('python3.11 -m venv .venv && .venv/bin/pip install -e ".[test]" '
               "--config-settings editable_mode=compat && .venv/bin/python -m pytest")
    assert command in (REPO / "README.md").read_text().splitlines()
    assert command in (REPO / ".ci" / "run").read_text().splitlines()


def test_every_module_is_in_the_architecture_map() -> None:
    missing = sorted(modules_on_disk() - modules_in_map())
    assert not missing, (f"add a row for each to docs/architecture.md's module map: {missing}")


def test_the_architecture_map_names_no_module_that_is_gone() -> None:
    gone = sorted(modules_in_map() - modules_on_disk())
    assert not gone, f"docs/architecture.md's module map names modules not on disk: {gone}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_point_to_existing_files(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", without_code(page.read_text())):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(target)
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{page.name}: {broken}"


@pytest.mark.parametrize("page", pages(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_files_and_modules_exist(page: Path) -> None:
    """A moved or renamed module leaves no stale path in the docs."""
    stale = []
    for span in code_spans(page.read_text()):
        stale += [p for p in REPO_PATH.findall(span) if not (REPO / p).exists()]
        stale += [name for name in DOTTED.findall(span) if not resolves(name)]
    assert not stale, f"{page.name} names what is not in the repository: {sorted(set(stale))}"


def resolves(dotted: str) -> bool:
    """Whether `a.b.c.attr` names a package path that ends in an existing module."""
    path = REPO
    for part in dotted.split("."):
        if (path / part / "__init__.py").exists() or (path / part).is_dir():
            path = path / part
        else:
            return (path / f"{part}.py").exists()
    return True


def test_sweep_commands_are_collected_from_the_readme_and_docs() -> None:
    """The dry-run suite sees the docs pages' sweeps, not only the README's."""
    pages_with_sweeps = {page for page, _ in doc_sweeps()}
    assert {"README.md", "docs/sweeps.md", "docs/training.md"} <= pages_with_sweeps
