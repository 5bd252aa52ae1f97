"""The layering and size rules of the code, read from the source with `ast` (no module is imported, so an
import hidden inside a function counts as much as one at the top of a file).

Rules, over the packages service/, worker/, arch/ and results/ (a package not in the tree yet is skipped; its
rules apply as soon as it exists):

1. No import cycle among the first-party modules. The graph has an edge A → B when A imports B anywhere, in its
   module body or inside a function: a lazy import only hides a circle of dependencies, it does not remove it.
   Imports under `if TYPE_CHECKING:` are left out (they never run; annotations may name each other). Relative
   imports are resolved against the importing module's package; `from x import y` is an edge to the module
   `x.y` when that is a first-party module, else to `x`. Edges go to the named module only, not its parent
   packages: a parent is already in `sys.modules` while its submodules load, so a submodule importing a
   sibling is no cycle.
2. Forbidden imports, anywhere in a file (function level included), `importlib.import_module("…")` and
   `__import__("…")` with a literal name too: worker/engine/ (a library: DESIGN invariant 6) imports neither
   service nor pydantic_settings, celery, fastapi, sqlalchemy; service/ (the light HTTP process, invariants 5
   and 8) never imports worker or torch; arch/ and results/ (pure Python) import neither torch, service nor worker.
3. No Python file over 400 lines. Exempt: anything under a `migrations` directory, and generated files,
   which say so with the marker `@generated` in their first 5 lines.
4. No function or method longer than 60 lines, counted from the first statement after its docstring to its
   last line, unless its docstring says why it is long with the words "Long because" (for example
   "Long because the report's nine sections are filled in one place, in reading order.").

Each checker is a plain function of a root directory; the `*_is_caught` tests run it on a tiny tree in
`tmp_path` that breaks the rule, so every rule is shown to fail.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "worker", "arch", "results")
FORBIDDEN = {
    "worker/engine": ("service", "pydantic_settings", "celery", "fastapi", "sqlalchemy"),
    "service": ("worker", "torch"),
    "arch": ("torch", "service", "worker"),
    "results": ("torch", "service", "worker"),
}
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60
LONG_FUNCTION_REASON = "Long because"
GENERATED_MARKER = "@generated"


@dataclass(frozen=True)
class Import:
    path: Path  # the importing file
    line: int
    module: str  # absolute dotted name of what is imported
    type_only: bool  # under `if TYPE_CHECKING:`: never runs


def python_files(root: Path, package: str) -> list[Path]:
    """The package's .py files, migrations left out; none when the package is not in the tree."""
    directory = root / package
    return sorted(
        p
        for p in directory.rglob("*.py")
        if "migrations" not in p.relative_to(root).parts and "__pycache__" not in p.parts
    )


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def first_party_modules(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    return {module_name(root, path): path for package in packages for path in python_files(root, package)}


def file_imports(root: Path, path: Path, known: set[str] | dict[str, Path]) -> list[Import]:
    """Every import in the file, resolved to absolute module names (module docstring, rule 1)."""
    module = module_name(root, path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: list[Import] = []

    def target(base: str, name: str) -> str:
        submodule = f"{base}.{name}" if base else name
        return submodule if submodule in known else base

    def visit(node: ast.AST, type_only: bool) -> None:
        if isinstance(node, ast.Import):
            found.extend(Import(path, node.lineno, alias.name, type_only) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            found.extend(Import(path, node.lineno, target(base, alias.name), type_only) for alias in node.names)
        elif isinstance(node, ast.Call) and _literal_import_call(node):
            found.append(Import(path, node.lineno, node.args[0].value, type_only))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, type_only)
            return
        for child in ast.iter_child_nodes(node):
            visit(child, type_only)

    visit(ast.parse(path.read_text(), filename=str(path)), False)
    return found


def _literal_import_call(node: ast.Call) -> bool:
    function = node.func
    name = function.attr if isinstance(function, ast.Attribute) else getattr(function, "id", None)
    return (
        name in ("import_module", "__import__")
        and bool(node.args)
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    )


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_cycles(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[list[str]]:
    """One cycle (a list of modules, first = last) per strongly connected group of modules in the import graph
    (every import that can run, function level included), found with Tarjan's algorithm."""
    modules = first_party_modules(root, packages)
    graph = {
        name: sorted(
            {
                i.module
                for i in file_imports(root, path, modules)
                if not i.type_only and i.module in modules and i.module != name
            }
        )
        for name, path in modules.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            connect(name)
    return [_cycle_through(graph, set(component), component[0]) for component in components]


def _cycle_through(graph: dict[str, list[str]], component: set[str], start: str) -> list[str]:
    """The shortest path start → … → start inside one strongly connected component (breadth first)."""
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for successor in graph[node]:
                if successor not in component:
                    continue
                if successor == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if successor not in previous:
                    previous[successor] = node
                    following.append(successor)
        frontier = following
    raise AssertionError(f"{start} is in a strongly connected component without a cycle through it")


def forbidden_imports(root: Path, directory: str, banned: tuple[str, ...]) -> list[str]:
    """'file:line imports module', once each, for every import (function level included) of a banned package or
    its submodules by a file under `directory`."""
    package = directory.split("/")[0]
    modules = first_party_modules(root, (package,))
    found = []
    for path in python_files(root, directory):
        for i in file_imports(root, path, modules):
            if i.module.split(".")[0] in banned:
                found.append(f"{path.relative_to(root)}:{i.line} imports {i.module}")
    return list(dict.fromkeys(found))  # `from x import a, b` is one line to fix, not two


def long_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    found = []
    for package in packages:
        for path in python_files(root, package):
            lines = path.read_text().splitlines()
            if len(lines) > MAX_FILE_LINES and not any(GENERATED_MARKER in line for line in lines[:5]):
                found.append(f"{path.relative_to(root)}: {len(lines)} lines")
    return found


def long_functions(root: Path, packages: tuple[str, ...] = PACKAGES) -> list[str]:
    found = []
    for package in packages:
        for path in python_files(root, package):
            for node in _functions(ast.parse(path.read_text(), filename=str(path))):
                docstring = ast.get_docstring(node) or ""
                body = node.body[1:] if docstring and len(node.body) > 1 else node.body
                length = node.end_lineno - body[0].lineno + 1
                if length > MAX_FUNCTION_LINES and LONG_FUNCTION_REASON not in docstring:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {length} lines")
    return found


def _functions(tree: ast.AST) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node


# ---------------------------------------------------------------------------------------------------
# The rules, on this repository


def test_no_import_cycles():
    cycles = import_cycles(ROOT)
    assert not cycles, "import cycles:\n" + "\n".join(" → ".join(cycle) for cycle in cycles)


@pytest.mark.parametrize("directory", sorted(FORBIDDEN))
def test_forbidden_imports(directory):
    if not (ROOT / directory).is_dir():
        pytest.skip(f"{directory}/ is not in this tree yet")
    found = forbidden_imports(ROOT, directory, FORBIDDEN[directory])
    assert not found, f"{directory}/ must not import {', '.join(FORBIDDEN[directory])}:\n" + "\n".join(found)


def test_no_file_over_400_lines():
    found = long_files(ROOT)
    assert not found, f"files over {MAX_FILE_LINES} lines (split them):\n" + "\n".join(found)


def test_no_function_over_60_lines_without_a_reason():
    found = long_functions(ROOT)
    assert not found, (
        f"functions over {MAX_FUNCTION_LINES} lines; split them, or say why in the docstring with "
        f"'{LONG_FUNCTION_REASON}':\n" + "\n".join(found)
    )


# ---------------------------------------------------------------------------------------------------
# Each checker catches a constructed violation


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_a_cycle_through_relative_and_submodule_imports_is_caught(tmp_path):
    root = write(
        tmp_path,
        {
            "service/__init__.py": "",
            "service/a.py": "from . import b\n",  # relative: service.b
            "service/b.py": "from service.sub import c\n",  # c is a submodule: service.sub.c
            "service/sub/__init__.py": "",
            "service/sub/c.py": "from ..a import VALUE\nVALUE = 1\n",  # service.a, VALUE is not a module
        },
    )
    assert import_cycles(root) == [["service.a", "service.b", "service.sub.c", "service.a"]]


def test_type_checking_imports_make_no_cycle_but_lazy_ones_do(tmp_path):
    files = {
        "worker/__init__.py": "",
        "worker/a.py": "import worker.b\n",
        "worker/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import worker.a\n",
    }
    assert import_cycles(write(tmp_path / "typing", files)) == []
    files["worker/b.py"] += "def late():\n    import worker.a\n"
    assert import_cycles(write(tmp_path / "lazy", files)) == [["worker.a", "worker.b", "worker.a"]]


@pytest.mark.parametrize(
    ("directory", "source", "line", "expected"),
    [
        ("worker/engine", "from service.settings import Settings\n", 1, "service.settings"),
        ("worker/engine", "def f():\n    import celery\n", 2, "celery"),
        ("worker/engine", "from pydantic_settings import BaseSettings\n", 1, "pydantic_settings"),
        ("service", "class A:\n    def f(self):\n        from torch import nn\n", 3, "torch"),
        ("service", "from ..worker import tasks\n", 1, "worker"),  # relative, resolved out of the package
        ("service", "import importlib\nimportlib.import_module('worker.tasks')\n", 2, "worker.tasks"),
        ("arch", "import torch.nn\n", 1, "torch.nn"),
        ("results", "from service import models\n", 1, "service"),
    ],
)
def test_a_forbidden_import_is_caught(tmp_path, directory, source, line, expected):
    package = directory.split("/")[0]
    root = write(
        tmp_path, {f"{package}/__init__.py": "", f"{directory}/__init__.py": "", f"{directory}/module.py": source}
    )
    assert forbidden_imports(root, directory, FORBIDDEN[directory]) == [
        f"{directory}/module.py:{line} imports {expected}"
    ]


def test_an_allowed_import_is_not_reported(tmp_path):
    root = write(
        tmp_path,
        {
            "worker/__init__.py": "",
            "worker/engine/__init__.py": "",
            "worker/engine/module.py": "import numpy\nfrom worker.engine import errors\n",
            "worker/engine/errors.py": "",
            "service/__init__.py": "",
            "service/module.py": "from service import db\nimport pydantic\n",
        },
    )
    assert forbidden_imports(root, "worker/engine", FORBIDDEN["worker/engine"]) == []
    assert forbidden_imports(root, "service", FORBIDDEN["service"]) == []


def test_a_long_file_is_caught_unless_generated_or_a_migration(tmp_path):
    body = "x = 1\n" * (MAX_FILE_LINES + 1)
    root = write(
        tmp_path,
        {
            "results/big.py": body,
            "results/fits.py": "x = 1\n" * MAX_FILE_LINES,
            "results/made.py": f"# {GENERATED_MARKER} by a tool\n" + body,
            "results/migrations/versions/0001.py": body,
        },
    )
    assert long_files(root) == [f"results/big.py: {MAX_FILE_LINES + 1} lines"]


def test_a_long_function_is_caught_unless_its_docstring_says_why(tmp_path):
    too_long = "    x = 1\n" * (MAX_FUNCTION_LINES + 1)
    source = (
        f'def long():\n    """A long docstring\n\n    does not count."""\n{too_long}'
        f'def fits():\n    """Docstring."""\n'
        + "    x = 1\n" * MAX_FUNCTION_LINES
        + f'def explained():\n    """{LONG_FUNCTION_REASON} the table is one list."""\n{too_long}'
        + "class Model:\n    async def method(self):\n"
        + too_long.replace("    ", "        ")
    )
    root = write(tmp_path, {"arch/module.py": source})
    method_line = source.splitlines().index("    async def method(self):") + 1
    assert long_functions(root) == [
        f"arch/module.py:1 long: {MAX_FUNCTION_LINES + 1} lines",
        f"arch/module.py:{method_line} method: {MAX_FUNCTION_LINES + 1} lines",
    ]
