"""The package's layers: every import points down (docs/architecture.md), and no import cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "qcache_jax"
# Lower rank = lower layer. A module may import its own rank or below.
RANKS = {
    "errors": 0, "_files": 0, "config": 0, "kernels": 0, "images": 0, "host_memory": 0,
    "nn": 1,
    "lazy": 2,
    "runtime": 3, "io": 3,
    "api": 4, "__init__": 4,
    "tools": 5, "serve": 5,
    "demo": 6,
    "cli": 7,
}


def _unit(module: str) -> str:
    """qcache_jax.lazy.stack -> 'lazy'; qcache_jax.api -> 'api'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _is_module(dotted: str) -> bool:
    path = ROOT.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _imports():
    """(importing module, imported qcache_jax module) for every import, also inside functions."""
    out = []
    for path in sorted(ROOT.rglob("*.py")):
        if "kernels" in path.relative_to(ROOT).parts:
            continue  # kernels/ imports nothing of qcache_jax (checked below)
        rel = path.relative_to(ROOT.parent).with_suffix("")
        module = ".".join(rel.parts)
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        if path.name == "__init__.py":
            module = module.rsplit(".", 1)[0] if module.endswith("__init__") else module
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1] if node.level > 1 else base
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.startswith("qcache_jax"):
                    names = [target]
                    if node.module is None:  # `from . import x`: a submodule, or a name of the package
                        names = [f"{target}.{a.name}" if _is_module(f"{target}.{a.name}") else target for a in node.names]
                    out.extend((module, t) for t in names)
            elif isinstance(node, ast.Import):
                out.extend((module, a.name) for a in node.names if a.name.startswith("qcache_jax"))
    return out


def test_imports_point_down():
    bad = []
    for src, dst in _imports():
        s, d = _unit(src.replace(".__init__", "")), _unit(dst)
        if s not in RANKS or d not in RANKS:
            bad.append(f"{src} -> {dst} (unknown layer)")
        elif RANKS[d] > RANKS[s]:
            bad.append(f"{src} ({s}) imports {dst} ({d})")
    assert bad == []


def test_no_import_cycle_between_modules():
    graph: dict[str, set[str]] = {}
    for src, dst in _imports():
        graph.setdefault(src, set()).add(dst)
    seen, stack, cycles = set(), [], []

    def visit(node):
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for nxt in graph.get(node, ()):
            visit(nxt)
        stack.pop()

    for node in list(graph):
        visit(node)
    # A package importing its own submodules is not a cycle of logic.
    real = [c for c in cycles if len({m for m in c}) > 1 and not all(m.startswith(c[0]) or c[0].startswith(m) for m in c)]
    assert real == []


def test_kernels_import_nothing_of_the_model():
    kernels = Path(__file__).resolve().parents[1] / "kernels"
    for path in kernels.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                assert not (node.module or "").startswith("qcache_jax"), path
            if isinstance(node, ast.ImportFrom) and node.level > 1:
                raise AssertionError(f"{path} imports from outside kernels/")
