"""The code keeps the layout the README describes: imports run one way, files and functions stay small.

Read from the source with `ast`, as a newcomer would follow the imports.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = ["gantry", "chat", "models_admin", "gateway", "tabby", "bench", "harness"]
DJANGO_SIDE = {"gantry", "chat", "models_admin", "gateway", "django", "rest_framework", "channels", "celery"}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if "migrations" in path.parts:
                continue
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported(name: str, path: Path) -> set[str]:
    """Every module name `path` imports, and `module.attribute` for each `from module import attribute`."""
    names: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: {other for other in imported(name, path) if other in found and other != name} for name, path in found.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in edges:
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.append(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(sorted(group))
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(edges[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def top(name: str) -> str:
    return name.split(".")[0]


def test_no_import_circle_between_files() -> None:
    assert circles(graph()) == []


def test_no_import_is_hidden_inside_a_function() -> None:
    """On the Django side, where a late import would only dodge a circle. (Django's AppConfig.ready() is
    where signal receivers are connected; the model server imports its engines, and what only one
    command needs, when they are chosen.)"""
    hidden = []
    for name, path in modules().items():
        if top(name) == "tabby":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "ready":
                local = [n for n in ast.walk(node) if isinstance(n, ast.ImportFrom) and top(n.module or "") in FOLDERS]
                hidden += [f"{name}.{node.name} imports {n.module}" for n in local]
    assert hidden == []


@pytest.mark.parametrize("folder", FOLDERS)
def test_files_and_functions_stay_small(folder: str) -> None:
    too_long = []
    for name, path in modules().items():
        if top(name) != folder:
            continue
        source = path.read_text(encoding="utf-8")
        if (lines := len(source.splitlines())) > MAX_FILE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {lines} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{path.relative_to(ROOT)}: {node.name} has {length} lines")
    assert too_long == []


def test_imports_run_one_way_between_folders() -> None:
    wrong = []
    for name, path in modules().items():
        tops = {top(other) for other in imported(name, path)}
        if top(name) == "tabby" and tops & DJANGO_SIDE:
            wrong.append(f"{name} (the model server) imports {sorted(tops & DJANGO_SIDE)}")
        if top(name) == "models_admin" and "chat" in tops:
            wrong.append(f"{name} imports chat")
        # The OpenAI-compatible gateway is built on chat's queue; nothing below it knows it.
        if top(name) in ("chat", "models_admin", "gantry") and "gateway" in tops:
            wrong.append(f"{name} imports gateway")
        if top(name) in ("bench", "harness", "gantry", "chat", "models_admin", "gateway") and "tests" in tops:
            wrong.append(f"{name} imports tests")
        if top(name) == "harness" and "bench" in tops:
            wrong.append(f"{name} imports bench")
        # The project package's plumbing serves both apps and imports neither; only the entry point wires them.
        if top(name) == "gantry" and name != "gantry.asgi" and tops & {"chat", "models_admin"}:
            wrong.append(f"{name} imports {sorted(tops & {'chat', 'models_admin'})}")
    assert wrong == []


def test_chat_modules_import_one_way() -> None:
    """services -> queue -> generation -> streaming: a lower layer never imports a higher one."""
    order = ["chat.services", "chat.queue", "chat.generation", "chat.streaming"]
    edges = graph()
    upward = [(low, high) for i, high in enumerate(order) for low in order[i + 1 :] if high in edges[low]]
    assert upward == []


def test_the_origin_is_checked_in_one_place() -> None:
    reads = re.compile(r"HTTP_ORIGIN|headers\.get\(\s*[\"']Origin[\"']|b[\"']origin[\"']")
    readers = sorted(str(path.relative_to(ROOT)) for path in modules().values() if reads.search(path.read_text(encoding="utf-8")))
    assert readers == ["gantry/origins.py"]


def test_one_middleware_stack_serves_every_view() -> None:
    """Nothing builds a handler with other middleware than the settings' (a middleware added there
    would silently skip some views)."""
    swapped = [
        str(path.relative_to(ROOT))
        for path in modules().values()
        if re.search(r"settings\.MIDDLEWARE\s*=", path.read_text(encoding="utf-8"))
    ]
    assert swapped == []
