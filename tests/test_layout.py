"""The tree shows the architecture: each package imports only what its layer may (the rules are stated in the
packages' ``__init__.py``), no import runs in a circle, and every package says in a paragraph what it holds.

Imports are read from the source (every ``import`` statement, those inside functions included), so the rules hold
for code paths that the other tests do not reach.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "simulations")
PLUMBING = {"common.config", "common.atomic", "common.audit", "common.weights", "common.metrics", "common.secagg",
            "common.deployment", "common.processes", "common.dlib_weights"}

# (importing package prefix, forbidden imported prefixes)
RULES = [
    ("common", ("client", "server", "simulations")),
    ("common.data", ("common.models", "common.anonymization")),
    ("common.models", ("common.data", "common.anonymization")),
    ("common.anonymization", ("common.models",)),
    ("client", ("server", "simulations")),
    ("server", ("simulations",)),
    ("server.deployment", ("client",)),
]


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """The facefl modules ``path`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in MODULES}
    return found


def _within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_every_package_says_what_it_holds():
    for name, path in MODULES.items():
        if path.name == "__init__.py":
            doc = ast.get_docstring(ast.parse(path.read_text()))
            assert doc and len(doc.split()) >= 20, f"{path} needs a paragraph on what it holds and may import"


def test_the_tree_has_the_layout_the_readme_describes():
    assert {"common.data", "common.models", "common.anonymization", "server.report", "server.deployment"} <= set(MODULES)
    for flat in ("common/datasets.py", "common/anonymize.py", "common/svgplot.py", "simulations/deploy_run.py"):
        assert not (REPO / flat).exists(), flat
    readme = (REPO / "README.md").read_text()
    for path in MODULES.values():
        rel = path.relative_to(REPO).as_posix()
        if path.name != "__init__.py":
            assert f"\n{rel} " in readme, f"README's layout section has no line for {rel}"


@pytest.mark.parametrize("importer,forbidden", RULES)
def test_no_import_runs_back_up_a_layer(importer, forbidden):
    bad = [(name, target) for name, path in MODULES.items() if _within(name, importer)
           for target in _imports(path) for f in forbidden if _within(target, f)]
    assert not bad, f"{importer} may not import {', '.join(forbidden)}: {bad}"


def test_plumbing_imports_no_subsystem():
    bad = [(name, target) for name in PLUMBING for target in _imports(MODULES[name]) if target not in PLUMBING]
    assert not bad, bad


def test_no_import_circle():
    graph = {name: {t for t in _imports(path) if t != name} for name, path in MODULES.items()}
    # Imports inside functions count too: a circle through a lazy import is still a circle.
    done: set[str] = set()

    def visit(node: str, stack: list[str]) -> None:
        if node in stack:
            pytest.fail("import circle: " + " -> ".join(stack[stack.index(node):] + [node]))
        if node in done:
            return
        for nxt in sorted(graph.get(node, ())):
            visit(nxt, stack + [node])
        done.add(node)

    for name in sorted(graph):
        visit(name, [])


def test_every_error_class_is_a_value_error_the_command_line_turns_into_one_line():
    """`facefl`'s entry point catches ValueError (it imports no subsystem for its error classes, so that a command
    with a bad argument answers before torch loads): every ``class ...Error`` of the packages for bad input must be
    one. Failures of a running federation (QuorumError: too few sites) are RuntimeErrors, and stay so."""
    import importlib

    found = []
    for path in sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                module = ".".join(path.relative_to(REPO).with_suffix("").parts)
                found.append(getattr(importlib.import_module(module), node.name))
    assert len(found) >= 5
    assert [c for c in found if not issubclass(c, (ValueError, FileNotFoundError, KeyError, RuntimeError))] == []
    assert len([c for c in found if issubclass(c, ValueError)]) >= 5
