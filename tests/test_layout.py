"""The package layout's rule: ptune's packages import only packages below them (ptune/__init__.py's order), with no
import circle between modules, and every package says in its docstring what it may import."""

from __future__ import annotations

import ast
import importlib

from tests.conftest import REPO

# Lowest first, as ptune/__init__.py and the README's "Layout" list them.
LAYERS = (
    "utils",
    "data",
    "quantization",
    "chatglm2",
    "model",
    "checkpoints",
    "inference",
    "evaluation",
    "training",
    "frontends",
    "serve",
    "cli",
)


def _ptune_imports() -> dict[str, set[str]]:
    """Every ``ptune.*`` module each ptune module imports, at the top or inside a function (``from ptune.pkg import
    module`` counts as importing that module)."""
    root = REPO / "ptune"
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        modules[".".join(("ptune", *parts[: -1 if parts[-1] == "__init__" else None]))] = path
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ptune"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    deps.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {alias.name for alias in node.names if alias.name.startswith("ptune.")}
        graph[name] = deps - {name}
    return graph


def test_no_import_circles_between_ptune_modules():
    graph = _ptune_imports()
    assert {"ptune.chatglm2.conversion", "ptune.checkpoints.format", "ptune.model.base"} <= set(graph)
    circles = []
    for start in sorted(graph):
        stack = [[start]]
        while stack:
            path = stack.pop()
            for dep in sorted(graph.get(path[-1], ())):
                if dep == start:
                    circles.append(" -> ".join([*path, dep]))
                elif dep not in path:
                    stack.append([*path, dep])
    assert circles == []


def _layer(module: str) -> int:
    """The rank in ``LAYERS`` of the package (or top-level module) that ``module`` belongs to."""
    return LAYERS.index(module.split(".")[1])


def test_every_ptune_module_lives_in_a_listed_package():
    graph = _ptune_imports()
    loose = sorted(name for name in graph if name != "ptune" and name.split(".")[1] not in LAYERS)
    assert loose == [], "add the package to LAYERS, ptune/__init__.py and the README's Layout, or move the module"


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """``module -> dep`` for every import of a package higher in ``LAYERS`` than the importing module's."""
    return [
        f"{module} -> {dep}"
        for module, deps in sorted(graph.items())
        if module != "ptune"
        for dep in sorted(deps)
        if dep != "ptune" and _layer(dep) > _layer(module)
    ]


def test_packages_import_only_lower_packages():
    assert upward_imports(_ptune_imports()) == []


def test_the_rule_sees_an_upward_import():
    graph = {"ptune.data.reading": {"ptune.training.recipe", "ptune.utils.paths"}, "ptune.serve.app": {"ptune.cli"}}
    assert upward_imports(graph) == ["ptune.data.reading -> ptune.training.recipe", "ptune.serve.app -> ptune.cli"]


def test_every_package_says_what_it_may_import():
    for package in LAYERS[:-1]:
        doc = importlib.import_module(f"ptune.{package}").__doc__ or ""
        assert "import" in doc.lower(), f"ptune/{package}/__init__.py: say what the package may import"
    listed = [
        line.split()[0] for line in (importlib.import_module("ptune").__doc__ or "").splitlines() if line[:4] == " " * 4
    ]
    assert listed == list(LAYERS)
