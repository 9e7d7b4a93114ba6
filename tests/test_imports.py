"""The import rules of docs/design.md: no cycles between files, imports at the top of modules, the packages' direction.

An import inside a function is allowed only for an optional heavy dependency deferred on purpose (cupy, textual,
torch), or a module of ours that imports one at its top (the Textual app), with a comment on its line or the line
above saying why. `if TYPE_CHECKING:` imports never run and are
left out of the graph.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "rpcnode", "tui")
DEFERRABLE = ("cupy", "cupy_backends", "textual", "torch", "transformers")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
    """Every import that runs, with whether it sits in a function or class body rather than at module level."""

    def walk(node: ast.AST, nested: bool) -> Iterator[tuple[ast.Import | ast.ImportFrom, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                yield from (x for n in child.orelse for x in walk(n, nested))
                continue
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child, nested
            yield from walk(child, nested or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef))

    yield from walk(tree, False)


def _targets(node: ast.Import | ast.ImportFrom, module: str) -> list[str]:
    """The modules an import names (a submodule where `from pkg import sub` names one)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the importing module's package
        package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[: -node.level]
        base = ".".join([*package, *([base] if base else [])])
    subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES]
    return subs or [base]


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _loads_heavy(module: str) -> bool:
    """Whether the module imports a deferrable dependency at its top (the Textual app's modules)."""
    tree = ast.parse(MODULES[module].read_text())
    return any(not nested and any(t.split(".")[0] in DEFERRABLE for t in _targets(node, module))
               for node, nested in _imports(tree))


def _graph() -> tuple[dict[str, set[str]], list[str]]:
    edges: dict[str, set[str]] = {m: set() for m in MODULES}
    misplaced = []
    for module, path in MODULES.items():
        source = path.read_text()
        lines = source.splitlines()
        for node, nested in _imports(ast.parse(source)):
            targets = _targets(node, module)
            for t in targets:
                r = _resolve(t)
                if r and r != module:
                    edges[module].add(r)
            if nested:
                deferrable = all(t.split(".")[0] in DEFERRABLE or (t in MODULES and _loads_heavy(t)) for t in targets)
                commented = "#" in lines[node.lineno - 1] or lines[node.lineno - 2].strip().startswith("#")
                if not (deferrable and commented):
                    misplaced.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return edges, misplaced


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    for root in edges:
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(edges[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_cycles_between_files() -> None:
    edges, _ = _graph()
    assert _cycles(edges) == []


def test_imports_sit_at_the_top_of_modules() -> None:
    _, misplaced = _graph()
    assert misplaced == []


def test_the_packages_import_in_one_direction() -> None:
    """engine reaches workers only through rpcnode.client (and takes the error root from rpcnode.errors, the GGML
    type sizes from rpcnode.ggml_types, which the worker's table reader shares); rpcnode.protocol/client know no
    model; nothing but tui imports tui or textual."""
    edges, _ = _graph()
    for module, targets in edges.items():
        if module.startswith("engine"):
            assert {t for t in targets if t.startswith("rpcnode")} <= {"rpcnode.client", "rpcnode.protocol",
                                                                        "rpcnode.token_file", "rpcnode.errors",
                                                                        "rpcnode.endpoint",
                                                                        "rpcnode.ggml_types"}, module
        if module in ("rpcnode.protocol", "rpcnode.client"):
            assert not any(t.startswith("engine") for t in targets), module
        if not module.startswith("tui"):
            assert not any(t.startswith("tui") for t in targets), module
    for module, path in MODULES.items():
        if not module.startswith("tui"):
            tree = ast.parse(path.read_text())
            names = [t for node, _ in _imports(tree) for t in _targets(node, module)]
            assert not any(n.split(".")[0] == "textual" for n in names), module


def test_the_rules_see_what_they_check() -> None:
    """The graph is not empty and finds a cycle and a misplaced import where there is one."""
    edges, _ = _graph()
    assert "engine.kernels" in edges["engine.quant"] | edges["engine.deepseek2"] or edges["engine.model"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("import os\ndef f():\n    import json\nif TYPE_CHECKING:\n    import sys\n")
    assert [(ast.unparse(n), nested) for n, nested in _imports(tree)] == [("import os", False), ("import json", True)]
