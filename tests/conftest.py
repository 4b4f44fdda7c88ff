"""Shared fixtures: per-test TMPDIR (Streaming's lock files), default dtype and process-group hygiene; the test
tiers: ``gpu`` tests are skipped without CUDA, and every test that starts processes gets the ``spawns`` marker."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolate(tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_default_dtype(torch.float32)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models gain nothing from more, and the test machine's cores are shared (with two
    oversubscribed threads a step is several times slower). Modules opt in with ``usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the ``spawns`` tier ------------------------------------------------------------------------------------------
#
# A test spawns when its body, a fixture it uses, or a function it calls (followed through the test files, not
# into the library) starts a process: ``helpers.run_cli``, ``subprocess``, ``torchrun`` (``torch.distributed.run``),
# ``multiprocessing`` / ``torch.multiprocessing`` (``mp.spawn``, ``mp.start_processes``) or a process pool. Found
# from the source (ast), so a test file needs no marker of its own and a new test is classified as it is written.

TESTS = Path(__file__).resolve().parent
_SPAWNING_MODULES = ("subprocess", "multiprocessing", "torch.multiprocessing", "torch.distributed.run")
_SPAWNING_NAMES = {"concurrent.futures.ProcessPoolExecutor", "os.fork", "os.system", "os.posix_spawn", "pty.spawn"}
_SPAWNING_HELPERS = {"run_cli"}  # tests/helpers.py
_SPAWNING_STRINGS = {"torchrun", "torch.distributed.run"}


@functools.cache
def _parse(path: Path) -> tuple[dict[str, ast.AST], dict[str, str]]:
    """Top-level functions and classes of a test file by name, and its module-level import aliases."""
    tree = ast.parse(path.read_text(), filename=str(path))
    defs = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}
    for node in list(defs.values()):  # ``@pytest.fixture(name="x")`` is requested as ``x``
        for deco in getattr(node, "decorator_list", ()):
            for kw in deco.keywords if isinstance(deco, ast.Call) else ():
                if kw.arg == "name" and isinstance(kw.value, ast.Constant) and isinstance(kw.value.value, str):
                    defs.setdefault(kw.value.value, node)
    return defs, _aliases(tree.body)


def _aliases(nodes) -> dict[str, str]:
    """``import a.b as c`` -> {c: a.b}; ``import a.b`` -> {a: a}; ``from a import b as c`` -> {c: a.b}."""
    out = {}
    for node in nodes:
        if isinstance(node, ast.Import):
            for a in node.names:
                out[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for a in node.names:
                out[a.asname or a.name] = f"{node.module}.{a.name}"
    return out


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return ".".join([node.id, *reversed(parts)])


def _test_module(name: str) -> Path | None:
    """The file of a test-side module imported by plain name (``from helpers import ...``), if there is one."""
    hits = [p for p in (TESTS / f"{name}.py", *TESTS.glob(f"*/{name}.py")) if p.is_file()]
    return hits[0] if hits else None


_VISITING: set[tuple[Path, str]] = set()


@functools.cache
def _spawns(path: Path, qualname: str) -> bool:
    """Whether the function (or method, ``Class.name``) ``qualname`` of test file ``path`` starts a process."""
    if (path, qualname) in _VISITING:  # recursion: the answer comes from the other names on the cycle
        return False
    _VISITING.add((path, qualname))
    try:
        return _spawns_uncached(path, qualname)
    finally:
        _VISITING.discard((path, qualname))


def _spawns_uncached(path: Path, qualname: str) -> bool:
    defs, module_aliases = _parse(path)
    head, _, rest = qualname.partition(".")
    node = defs.get(head)
    if rest and isinstance(node, ast.ClassDef):
        node = next((n for n in node.body if getattr(n, "name", None) == rest), None)
    if node is None:
        return False
    aliases = {**module_aliases, **_aliases(ast.walk(node))}
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str) and sub.value in _SPAWNING_STRINGS:
            return True
        dotted = _dotted(sub) if isinstance(sub, ast.Attribute | ast.Name) else None
        if dotted is None:
            continue
        root, _, tail = dotted.partition(".")
        full = ".".join(filter(None, [aliases.get(root, root), tail]))
        if full in _SPAWNING_NAMES or any(full == m or full.startswith(m + ".") for m in _SPAWNING_MODULES):
            if root in aliases:  # a name bound by an import, not a local variable that happens to share it
                return True
        if root in _SPAWNING_HELPERS or aliases.get(root, "").rsplit(".", 1)[-1] in _SPAWNING_HELPERS:
            return True
        if isinstance(sub, ast.Name) and sub.id != head:
            if sub.id in defs and _spawns(path, sub.id):  # a helper of the same file
                return True
            source = aliases.get(sub.id, "")
            module, _, name = source.rpartition(".")
            other = _test_module(module) if module and "." not in module else None
            if other is not None and _spawns(other, name):  # a helper of another test file
                return True
    return False


def _fixture_spawns(item: pytest.Item, name: str) -> bool:
    """A fixture named ``name`` defined in the test's file or a ``conftest.py`` above it that starts a process."""
    path = Path(str(item.path)).resolve()
    imported = {_test_module(m.rpartition(".")[0]) for m in _parse(path)[1].values() if m.count(".") == 1}
    candidates = [path, *(d / "conftest.py" for d in path.parents if d == TESTS or TESTS in d.parents), *imported]
    for candidate in candidates:
        if candidate is not None and candidate.is_file() and name in _parse(candidate)[0]:
            node = _parse(candidate)[0][name]
            return _spawns(candidate, node.name)
    return False


def _item_spawns(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    if function is None or item.path is None:
        return False
    path = Path(str(item.path)).resolve()
    if _spawns(path, function.__qualname__):
        return True
    return any(_fixture_spawns(item, name) for name in getattr(item, "fixturenames", ()))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _item_spawns(item):
            item.add_marker(pytest.mark.spawns)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
