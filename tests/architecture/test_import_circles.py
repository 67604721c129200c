"""No import circle anywhere in the three source trees: the operator, the trainer, the devcluster.

The layers contracts (pyproject.toml) keep imports flowing down between packages; a circle
between two modules of one layer would still pass them. This finds every circle in the module
graph grimp builds (import-linter's own), which counts imports inside functions too, so a
circle cannot hide behind a lazy import either.
"""

from __future__ import annotations

from pathlib import Path

import grimp
import pytest

PACKAGES = ("fedtune_operator", "fedtune_trainer", "devcluster")


def circles(graph: grimp.ImportGraph) -> list[list[str]]:
    """The import graph's strongly connected components of more than one module (Tarjan's
    algorithm, iterative: the graph is small, but recursion depth should not depend on it)."""
    modules = graph.modules
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            nxt = next(edges, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    imported = graph.find_modules_directly_imported_by(nxt) & modules
                    work.append((nxt, iter(sorted(imported))))
                elif nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_module_of_the_three_trees_is_in_an_import_circle() -> None:
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    assert len(graph.modules) > 100  # the three trees, not an empty graph
    assert circles(graph) == []


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # a -> b -> a, the second import inside a function: still a circle
        (
            {"a.py": "from pkg import b\n", "b.py": "def f():\n    from pkg import a\n"},
            [["pkg.a", "pkg.b"]],
        ),
        # a -> b -> c -> a: one circle of three
        (
            {"a.py": "import pkg.b\n", "b.py": "import pkg.c\n", "c.py": "import pkg.a\n"},
            [["pkg.a", "pkg.b", "pkg.c"]],
        ),
        # a -> b, a -> c, b -> c: a diamond, no circle
        ({"a.py": "import pkg.b, pkg.c\n", "b.py": "import pkg.c\n", "c.py": ""}, []),
    ],
    ids=["two, one lazy", "three", "diamond"],
)
def test_a_circle_is_found_however_it_is_imported(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    files: dict[str, str],
    expected: list[list[str]],
) -> None:
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name, text in files.items():
        (package / name).write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert circles(grimp.build_graph("pkg", cache_dir=None)) == expected
