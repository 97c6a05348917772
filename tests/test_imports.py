"""The packages' layers: every import points down (or sideways), module-level imports form no circle, and every
module imports alone in a fresh interpreter.

A layer may import from its own layer and the layers below it, never from above, not even inside a function (an
import hidden in a function is how circles came back before). The order is the architecture of docs/architecture.md.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: lowest first; a module belongs to the longest prefix listed
LAYERS = {
    "zorro_kernels": [
        ["zorro_kernels._version", "zorro_kernels.caching"],
        ["zorro_kernels.tilemap"],
        ["zorro_kernels.mask"],
        ["zorro_kernels.bias"],
        ["zorro_kernels.reference"],
        ["zorro_kernels.backends"],
        ["zorro_kernels._checks", "zorro_kernels._ops"],
        ["zorro_kernels.auto"],
        ["zorro_kernels.attention"],
        ["zorro_kernels.testing", "zorro_kernels.integrations"],
        ["zorro_kernels"],
    ],
    "zorro_models": [
        ["zorro_models.utils"],
        ["zorro_models.models", "zorro_models.data"],
        ["zorro_models.training"],
        ["zorro_models.commands"],
        ["zorro_models.cli", "zorro_models.train"],
        ["zorro_models"],
    ],
}


def _modules() -> list:
    out = []
    for pkg in LAYERS:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def _layer(module: str) -> int:
    pkg = module.split(".")[0]
    best, level = -1, None
    for i, prefixes in enumerate(LAYERS[pkg]):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, level = len(p), i
    assert level is not None, f"{module} is in no layer of tests/test_imports.py"
    return level


def _imports(module: str, path: Path):
    """``(target module, line, at module level)`` for every import of our own packages in ``path``."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    top_level = {id(n) for n in tree.body}
    for stmt in tree.body:  # `if TYPE_CHECKING:` / try-except blocks at module level are module level too
        if isinstance(stmt, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target] if node.module else [f"{target}.{a.name}" for a in node.names]
            if node.module:  # `from pkg import submodule` names a module too
                names += [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] in LAYERS:
                yield name, node.lineno, id(node) in top_level


def _resolve(name: str, known: set) -> str:
    """The module an import name refers to: itself if it is a module, else its parent (``from m import attr``)."""
    while name not in known and "." in name:
        name = name.rpartition(".")[0]
    return name


def test_imports_point_down():
    mods = dict(_modules())
    known = set(mods)
    bad = []
    for module, path in mods.items():
        for target, line, _ in _imports(module, path):
            target = _resolve(target, known)
            if target.split(".")[0] != module.split(".")[0] or target == module:
                continue
            if module.startswith(target + ".") and target in LAYERS:
                continue  # `from zorro_kernels import X` inside the package is caught below, not by this rule
            if _layer(target) > _layer(module):
                bad.append(
                    f"{path.relative_to(ROOT)}:{line} imports {target} (layer {_layer(target)}) from layer "
                    f"{_layer(module)}"
                )
    assert not bad, "imports that climb to a higher layer:\n" + "\n".join(bad)


def test_no_package_root_imports_inside_the_package():
    """``from zorro_kernels import X`` inside zorro_kernels runs the whole package's __init__ first: a circle."""
    bad = []
    for module, path in _modules():
        root = module.split(".")[0]
        for target, line, _ in _imports(module, path):
            if target == root and module != root:
                bad.append(f"{path.relative_to(ROOT)}:{line}")
    assert not bad, "imports of the package root from inside it:\n" + "\n".join(bad)


def test_module_level_imports_form_no_circle():
    mods = dict(_modules())
    known = set(mods)
    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for target, _, top in _imports(module, path):
            target = _resolve(target, known)
            # a package's __init__ importing its own submodules is how packages re-export; it is not a circle
            if top and target != module and target in graph and not target.startswith(module + "."):
                graph[module].add(target)
    # Tarjan's strongly connected components: any component of more than one module is a circle
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, f"module-level import circles: {circles}"


def test_every_module_imports_alone():
    """One fresh interpreter; before each module, every zorro module is dropped from sys.modules, so each is imported
    as if it were the first thing a user imports."""
    names = [m for m, _ in _modules() if not m.endswith("__main__")]
    code = (
        "import importlib, sys, traceback\n"
        f"names = {names!r}\n"
        "bad = []\n"
        "for n in names:\n"
        "    for m in [m for m in sys.modules if m.split('.')[0] in ('zorro_kernels', 'zorro_models')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(n)\n"
        "    except Exception as e:\n"
        "        bad.append(f'{n}: {type(e).__name__}: {e}')\n"
        "print('\\n'.join(bad))\n"
        "sys.exit(1 if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"modules that fail to import alone:\n{out.stdout}{out.stderr[-2000:]}"


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_every_module_has_a_layer(package):
    for module, _ in _modules():
        if module.split(".")[0] == package:
            _layer(module)


def test_tests_and_benchmarks_share_only_the_kit():
    """No test module imports another test module, and no benchmark imports from tests/: what they share is
    zorro_kernels.testing (and, among tests only, helper modules such as tests/helpers.py)."""
    bad = []
    for folder in ("tests", "benchmarks"):
        for path in sorted((ROOT / folder).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom):
                    base = ("tests." if node.level and folder == "tests" else "") + (node.module or "")
                    names = [base] + [f"{base}.{a.name}".lstrip(".") for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                else:
                    continue
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "tests" and (folder == "benchmarks" or parts[-1].startswith("test_")):
                        bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {name}")
    assert not bad, "imports of test modules (use zorro_kernels.testing or tests/helpers.py):\n" + "\n".join(bad)
