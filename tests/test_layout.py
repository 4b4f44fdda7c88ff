"""The layout keeps its rules (docs/architecture.md): rooms of a readable size, no import cycle, strategy knowledge
only in lit_webssl/distributed/, private APIs of dependencies only in lit_webssl/compat/."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = {
    "lit_webssl": "lit_webssl",
    "objectives": "lit_webssl.objectives",
    "datamodules": "lit_webssl.datamodules",
    "callbacks": "lit_webssl.callbacks",
}
STRATEGY_WORDS = re.compile(
    r"deepspeed|fsdp|zero-?3|zero[-_ ]?offload|zero stage|\bzero-?[12]\b|dtensor|ds_tensor", re.IGNORECASE
)
STRATEGY_ROOMS = ("lit_webssl/distributed/", "lit_webssl/compat/")


def library_files() -> dict[str, Path]:
    """Every library module by its import name."""
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((REPO / folder).rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join((package, *parts))] = path
    return out


FILES = library_files()


def test_no_module_is_over_500_lines():
    big = {name: n for name, path in FILES.items() if (n := len(path.read_text().splitlines())) > 500}
    assert not big, f"modules over 500 lines: {big}"


def module_imports(name: str, path: Path) -> set[str]:
    """The library modules ``name`` imports when it is imported (module level, TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]

    def visit(nodes):
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                visit(getattr(node, "finalbody", []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
                subs = {f"{base}.{a.name}" for a in node.names}
                found.update(subs & FILES.keys() or {base})  # `from pkg import submodule` imports the submodule

    visit(tree.body)
    return {m for m in found if m in FILES and m != name}


def test_no_import_cycle():
    graph = {name: module_imports(name, path) for name, path in FILES.items()}
    state: dict[str, int] = {}

    def cycle_from(node: str, stack: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack, node, nxt]
            if nxt not in state and (found := cycle_from(nxt, [*stack, node])):
                return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state and (found := cycle_from(name, [])):
            pytest.fail("import cycle: " + " -> ".join(found[found.index(found[-1]) :]))


def test_strategy_names_only_in_the_distributed_rooms():
    hits = []
    for path in FILES.values():
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith(STRATEGY_ROOMS):
            continue
        hits += [f"{rel}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1) if STRATEGY_WORDS.search(line)]
    assert not hits, f"strategy names outside lit_webssl/distributed/: {hits}"


def private_uses(path: Path) -> list[str]:
    """``x._name`` on anything but ``self``/``cls`` and imports of ``_private`` names or modules of dependencies."""
    tree = ast.parse(path.read_text())
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            if not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls")):
                uses.append(f"{node.lineno}: .{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module and not node.module.startswith(("lit_webssl", "__")):
            private = [a.name for a in node.names if a.name.startswith("_")]
            if private or any(p.startswith("_") for p in node.module.split(".")):
                uses.append(f"{node.lineno}: from {node.module} import {', '.join(a.name for a in node.names)}")
    return uses


def test_private_apis_of_dependencies_only_in_compat():
    hits = {
        path.relative_to(REPO).as_posix(): uses
        for path in FILES.values()
        if not path.relative_to(REPO).as_posix().startswith("lit_webssl/compat/") and (uses := private_uses(path))
    }
    assert not hits, f"private APIs outside lit_webssl/compat/: {hits}"


def test_objectives_import_only_the_ema_teacher_from_distributed():
    for name, path in FILES.items():
        if not name.startswith("lit_webssl.objectives"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_webssl.distributed"):
                assert (node.module, [a.name for a in node.names]) == ("lit_webssl.distributed", ["EMATeacher"]), name
            if isinstance(node, ast.Import):
                assert not any(a.name.startswith("lit_webssl.distributed") for a in node.names), name
