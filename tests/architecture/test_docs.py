"""docs/architecture.md stays true to the code: its layer tables are the import-linter contracts,
it names every module of the operator and the trainer, every contract and every name of the Job
contract, and no document or comment in the repository points at a file or a section that does
not exist.
"""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from devcluster.cluster import REPO_ROOT

DOC = REPO_ROOT / "docs" / "architecture.md"
OPERATOR = REPO_ROOT / "operator" / "fedtune_operator"
TRAINER = REPO_ROOT / "trainer-image" / "fedtune_trainer"
SEARCHED = ("README.md", "Makefile", "pyproject.toml", "docs", "charts", "operator",
            "trainer-image", "tools/devcluster", "tests", "bench")  # fmt: skip
"""What the reference check reads: the project's own files (not tools/go, .venv, ...)."""
SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".tpl", ".json", ".txt", ".sh", ""}


def importlinter() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]


def section(title: str, level: int = 2, text: str | None = None) -> str:
    """The text under the heading `title` of this level, up to the next heading as high."""
    text = DOC.read_text() if text is None else text
    mark = "#" * level
    start = text.index(f"\n{mark} {title}\n")
    ends = [text.find(f"\n{'#' * n} ", start + 1) for n in range(2, level + 1)]
    end = min((e for e in ends if e != -1), default=-1)
    return text[start : end if end != -1 else None]


def subsection(parent: str, title: str) -> str:
    return section(title, 3, section(parent))


def tables(text: str) -> list[list[list[str]]]:
    """Each Markdown table in `text`, as the cells of its body rows (header and rule dropped)."""
    found: list[list[str]] = []
    current: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return [
        [[c.strip() for c in re.split(r"(?<!\\)\|", row.strip())[1:-1]] for row in table[2:]]
        for table in found
    ]


def backticked(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


LAYER_TABLES = {"operator-layers": "The operator", "trainer-layers": "The trainer"}
"""Each layers contract, and the heading under "Layers" whose first table is that contract."""


def test_every_layers_contract_has_its_table() -> None:
    layered = {c["id"] for c in importlinter()["contracts"] if c["type"] == "layers"}
    assert layered == set(LAYER_TABLES)


@pytest.mark.parametrize(("contract_id", "heading"), sorted(LAYER_TABLES.items()))
def test_the_layer_table_is_the_contract(contract_id: str, heading: str) -> None:
    (contract,) = (c for c in importlinter()["contracts"] if c["id"] == contract_id)
    layers_table = tables(subsection("Layers", heading))[0]
    documented = [sorted(backticked(cells[1])) for cells in layers_table]
    declared = [sorted(m.strip() for m in layer.split("|")) for layer in contract["layers"]]
    assert documented == declared


def test_every_contract_is_explained() -> None:
    contracts_table = tables(subsection("Layers", "The contracts"))[0]
    documented = {backticked(cells[0])[0] for cells in contracts_table}
    missing = [c["id"] for c in importlinter()["contracts"] if c["id"] not in documented]
    assert not missing, f"contracts missing from the table in docs/architecture.md: {missing}"


def mapped_modules(package_heading: str) -> set[str]:
    text = section("Where each rule lives")
    start = text.index(package_heading)
    end = text.find("\n**", start + len(package_heading))
    names = set()
    for table in tables(text[start : end if end != -1 else None]):
        for cells in table:
            names.update(backticked(cells[0]))
    return names


def docstring_only(path: Path) -> bool:
    """A package's __init__.py that says what the package holds and holds nothing itself."""
    body = ast.parse(path.read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def package_modules(root: Path) -> set[str]:
    """Every module with code, by path under `root` (not __main__, not docstring-only inits)."""
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if p.name != "__main__.py" and not (p.name == "__init__.py" and docstring_only(p))
    }


@pytest.mark.parametrize(
    ("heading", "root"), [("**Operator**", OPERATOR), ("**Trainer**", TRAINER)]
)
def test_the_module_map_names_every_module(heading: str, root: Path) -> None:
    assert mapped_modules(heading) == package_modules(root)


def test_the_contract_table_names_every_name_of_the_contract() -> None:
    contract = TRAINER / "wire" / "contract.py"
    declared = {
        node.target.id
        for node in ast.parse(contract.read_text()).body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    text = section("The Job contract")
    table = tables(text[text.index("**`wire/contract.py`") :])[0]
    documented = {name for cells in table for name in backticked(cells[0])}
    assert declared == documented


def project_files() -> Iterator[Path]:
    for name in SEARCHED:
        path = REPO_ROOT / name
        candidates = [path] if path.is_file() else path.rglob("*")
        for p in candidates:
            if p.is_file() and p.suffix in SUFFIXES and "__pycache__" not in p.parts:
                yield p


MD_REFERENCE = re.compile(r"(?<![\w./:\"'-])((?:\.\./|\./)*[\w-]+(?:/[\w.-]+)*\.md)\b")
"""A relative path ending in .md, in prose: the look-behind keeps URLs (`https://host/a.md`) and
path pieces in code (`"docs" / "api.md"`) out."""
SECTION_CITATION = re.compile(r"docs/architecture\.md, \"([^\"]+)\"")


def test_references_point_at_files_and_sections_that_exist() -> None:
    """Every `something.md` a file names exists (from the repository root or beside the file),
    and every `docs/architecture.md, "Section"` citation names a heading of that page."""
    headings = set(re.findall(r"^#{2,3} (.+)$", DOC.read_text(), re.M))
    missing = []
    for path in project_files():
        if path == Path(__file__):
            continue  # this file's docstrings show the forms it looks for
        text = path.read_text(errors="replace")
        where = path.relative_to(REPO_ROOT)
        for match in MD_REFERENCE.finditer(text):
            name = match.group(1)
            if not ((REPO_ROOT / name).exists() or (path.parent / name).exists()):
                missing.append(f"{where}: {name}")
        missing += [f'{where}: "{s}"' for s in SECTION_CITATION.findall(text) if s not in headings]
    assert not missing, f"references to what the repository lacks: {missing}"
