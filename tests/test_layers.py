"""The package's layers, read from its own imports: no cycle, and no import against the layer order.

Layers, bottom up: ``backend`` (op registry and dispatch) → ``ops`` (the operations, their torch
reference and schema) → ``kernels`` (Triton implementations registered into the ops) → ``engine``
(model layers, calibration, pipeline, CorDA++, adapters, caches) → front ends (``peft``,
``finetune``, ``cli``).
A module may import its own layer or any layer below; the package root and ``__main__`` only
gather. The engine reaches kernels only through the ops' dispatch, never by import.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "corda_kernels"
LAYERS = {"backend": 0, "ops": 1, "kernels": 2, "engine": 3, "peft": 4, "finetune": 4, "cli": 4}
GATHERERS = {"corda_kernels", "corda_kernels.__main__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path, *, top_level_only: bool) -> set[str]:
    """The ``corda_kernels`` modules ``path`` imports (relative imports resolved)."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py", top_level_only=top_level_only)


def imports_in(source: str, name: str, is_package: bool, *, top_level_only: bool) -> set[str]:
    package = name if is_package else name.rsplit(".", 1)[0]
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.startswith("corda_kernels"):
                found.add(target)
                for alias in node.names:  # `from . import cache` imports a module
                    if (PACKAGE.parent / (target + "." + alias.name).replace(".", "/")).exists() or (
                        PACKAGE.parent / ((target + "." + alias.name).replace(".", "/") + ".py")
                    ).exists():
                        found.add(f"{target}.{alias.name}")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("corda_kernels"))
    found.discard(name)
    return found


def layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.get(parts[1]) if len(parts) > 1 else None


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def test_no_import_against_the_layer_order() -> None:
    wrong = []
    for name, path in all_modules().items():
        if name in GATHERERS:
            continue
        mine = layer(name)
        assert mine is not None, f"{name} belongs to no layer: add it to LAYERS"
        for target in imports(path, top_level_only=False):
            theirs = layer(target)
            if target in GATHERERS:
                wrong.append(f"{name} imports the package root {target}")
            elif theirs is not None and theirs > mine:
                wrong.append(f"{name} (layer {mine}) imports {target} (layer {theirs})")
            elif theirs == 2 and mine == 3:
                wrong.append(f"{name} imports the kernels directly: {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycle() -> None:
    modules = all_modules()
    graph = {name: {t for t in imports(p, top_level_only=True) if t in modules} for name, p in modules.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            # a package's __init__ importing its own submodules is how a package gathers, not a cycle
            if node != "corda_kernels" and nxt.startswith(node + ".") and modules[node].name == "__init__.py":
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_walker_resolves_relative_imports() -> None:
    """What an engine module importing a front end would look like to the checks above."""
    source = "from ..peft import preprocess_corda\nfrom ..ops import damping\nfrom .layers import in_features\n"
    found = imports_in(source, "corda_kernels.engine.probe", False, top_level_only=True)
    assert found == {
        "corda_kernels.peft",
        "corda_kernels.ops",
        "corda_kernels.ops.damping",
        "corda_kernels.engine.layers",
    }
    assert layer("corda_kernels.peft") > layer("corda_kernels.engine.probe")
