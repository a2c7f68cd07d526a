"""The package's layers point only down: no import circles, no import that reaches up or sideways.

Read from the source (every import statement, module level or inside a function), so a new
module is held to it without being listed. docs/architecture.md draws the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "migm"

# bottom to top; a module may import its own package and any package of a lower layer
LAYERS = [
    {"files", "__init__"},                # atomic files and the one file error
    {"models", "sampling", "ckpt"},       # base adapters; the one loop; safe .ckpt reading
    {"shortcut"},                         # shortcut networks, their weights, SequenceStep
    {"accel", "data"},                    # the methods; trajectories and collection
    {"training", "evaluation"},           # the LightningModules that train and test
    {"run"},                              # a run's name and the paths that follow from it
    {"commands"},                         # the project's verbs
    {"cli", "gpu_check"},                 # the `migm` program; `make gpu-check`
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports() -> list[tuple[str, str, int]]:
    """(importer, imported, line) for every import of a migm module in src/migm."""
    found = []
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("migm"):
                found.append((name, node.module, node.lineno))
            elif isinstance(node, ast.Import):
                found += [(name, a.name, node.lineno) for a in node.names if a.name.startswith("migm")]
    return found


def test_every_package_has_a_layer():
    packages = {p.stem if p.is_file() else p.name for p in SRC.iterdir()
                if (p.suffix == ".py" or (p / "__init__.py").exists()) and p.name != "assets"}
    assert packages <= set(LAYER), sorted(packages - set(LAYER))


def test_imports_point_down_only():
    bad = [f"{a} -> {b} (line {n})" for a, b, n in imports()
           if package(b) != package(a) and LAYER[package(b)] >= LAYER[package(a)]]
    assert not bad, "imports up or sideways a layer:\n" + "\n".join(bad)


def test_no_import_circles():
    edges: dict[str, set[str]] = {}
    for a, b, _ in imports():
        edges.setdefault(a, set()).add(b)
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            visit(nxt)
        stack.pop()

    for node in sorted(edges):
        visit(node)
    assert not cycles, " ; ".join(" -> ".join(c) for c in cycles)
