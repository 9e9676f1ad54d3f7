"""The layout of accelops.train: no module imports another that imports it back (counting
the imports inside functions too: a lazy import hides a cycle, it does not remove it), every
module imports on its own, and no module reaches into another's private names."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import accelops.train

ROOT = os.path.dirname(accelops.train.__file__)
PACKAGE = "accelops.train"


def _modules() -> dict[str, str]:
    """{dotted name: file} of every module under accelops/train (a package as its __init__)."""
    out = {}
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = os.path.relpath(folder, ROOT)
        prefix = PACKAGE if rel == "." else f"{PACKAGE}.{rel.replace(os.sep, '.')}"
        for name in files:
            if name.endswith(".py"):
                out[prefix if name == "__init__.py" else f"{prefix}.{name[:-3]}"] = os.path.join(folder, name)
    return out


def _imports(name: str, path: str, modules) -> list[tuple[str, list[str]]]:
    """(module imported, names taken from it) for every import in the file, relative ones
    resolved; only modules under accelops.train count."""
    package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [a.name for a in node.names]
            for n in names:  # `from . import x` / `from .pkg import mod`: the submodule too
                if f"{target}.{n}" in modules:
                    found.append((f"{target}.{n}", []))
            found.append((target, names))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return [(t, n) for t, n in found if t in modules and t != name]


def _graph():
    modules = _modules()
    return modules, {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_module_under_accelops_train_imports_itself_back():
    modules, graph = _graph()
    # The package's __init__ gathers the public names; a submodule importing the package
    # itself would close a loop through it, so it counts like any other module.
    edges = {name: sorted({t for t, _ in imports}) for name, imports in graph.items()}
    cycles = []
    state = {}

    def visit(node, stack):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_strategies_and_checkpoints_do_not_know_the_trainer():
    # They talk to it through the Strategy protocol and the Checkpointer's arguments.
    _, graph = _graph()
    apart = (f"{PACKAGE}.parallel", f"{PACKAGE}.checkpoint")
    leaks = [
        name
        for name, imports in graph.items()
        if name.startswith(apart) and any(t == f"{PACKAGE}.trainer" for t, _ in imports)
    ]
    assert not leaks, leaks


def test_no_private_names_cross_modules():
    _, graph = _graph()
    crossing = [
        f"{name} takes {n} from {target}"
        for name, imports in graph.items()
        for target, names in imports
        for n in names
        if n.startswith("_") and not n.startswith("__")
    ]
    assert not crossing, crossing


def test_every_module_imports_first_in_a_fresh_interpreter():
    # One interpreter (torch is slow to import), in which every accelops.train module is
    # dropped before the next one is imported, so each is imported first, from scratch
    # (a cycle shows as a partly initialised module there).
    names = sorted(n for n in _modules() if not n.endswith("__main__"))
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'accelops.train' or m.startswith('accelops.train.')]:\n"
        "        del sys.modules[m]\n"
        "    importlib.import_module(name)\n"
        "print('ok', len(sys.modules))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                p for p in (os.path.dirname(os.path.dirname(ROOT)), os.environ.get("PYTHONPATH")) if p
            ),
        ),
    )
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
