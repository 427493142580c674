"""Layering you can see: imports between the project's modules point one way.

Read from the source with `ast` (nothing is imported, so this runs without TensorFlow):

* no import cycle between the modules of `splitkeras/`, `converters/` and `server_app/`.
  Every import statement is an edge, at module level or inside a function alike (a lazy
  import hides a circle from Python's start-up, not from the design). Imports under
  `if TYPE_CHECKING:` are not edges: they never run. Python's implicit import of a module's
  parent package is not an edge either; `splitkeras/__init__.py` and
  `splitkeras/client/__init__.py` import nothing of the project at module level (their
  public names load lazily), checked below, so that implicit import cannot close a circle.
* the core `splitkeras` imports no web framework, server or HTTP client, nor `server_app`:
  the client's HTTP modules (`splitkeras/client/transport.py`, `retries.py`,
  `local_server.py`) are the only ones that talk HTTP (httpx), and
  `splitkeras serve` starts the server, so `splitkeras/cli/serve.py` imports `server_app`
  and `uvicorn` inside its command function (see EXCEPTIONS).
* `converters` imports from `splitkeras` only `splitkeras.errors`: the core uses the
  converters, never the other way round.
* the CLI command modules import downward only (`splitkeras.cli._common`, the core), never
  `splitkeras.cli` itself, which lists them.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("splitkeras", "converters", "server_app")
WEB = {"fastapi", "starlette", "uvicorn", "httpx"}

# (module, imported top-level name) -> why it is allowed; each only inside a function.
EXCEPTIONS = {
    ("splitkeras.cli.serve", "server_app"): "`splitkeras serve` starts the server; the import is lazy, "
                                            "so the core still runs (and --help works) without it",
    ("splitkeras.cli.serve", "uvicorn"): "`splitkeras serve` runs the server app under uvicorn",
}
# The modules of the core that may import httpx, at any level: the device's HTTP client.
HTTP_CLIENT = frozenset({"splitkeras.client.transport", "splitkeras.client.retries",
                         "splitkeras.client.local_server"})
# Modules of `splitkeras` that `converters` may import.
CONVERTERS_MAY_IMPORT = {"splitkeras.errors"}


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the imported name, absolute (a module, or a package for `from pkg import attr`)
    line: int
    lazy: bool  # inside a function
    type_checking: bool  # under `if TYPE_CHECKING:`


def module_files() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, source: str, is_package: bool, known: Iterable[str] = ()) -> list[Import]:
    """Every import statement of a module. `from pkg import name` targets `pkg.name` when that
    is a module in `known`, else `pkg`; relative imports are made absolute."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool, type_checking: bool) -> None:
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(module, alias.name, node.lineno, lazy, type_checking))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append(Import(module, sub if sub in known else target, node.lineno, lazy, type_checking))
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            for statement in node.body:
                visit(statement, lazy, True)
            for statement in node.orelse:
                visit(statement, lazy, type_checking)
            return
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner, type_checking)

    visit(ast.parse(source), False, False)
    return found


def project_imports() -> list[Import]:
    files = module_files()
    return [imp for name, path in files.items()
            for imp in imports_of(name, path.read_text(encoding="utf-8"), path.name == "__init__.py", files)]


def resolve(target: str, known: Iterable[str]) -> str | None:
    """The project module an import names: the longest known prefix, or None (not ours)."""
    known = set(known)
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in known:
            return name
    return None


def import_graph(imports: Iterable[Import], known: Iterable[str]) -> dict[str, set[str]]:
    known = set(known)
    graph: dict[str, set[str]] = {name: set() for name in known}
    for imp in imports:
        target = resolve(imp.target, known)
        if target is not None and not imp.type_checking:
            graph.setdefault(imp.module, set()).add(target)
    return graph


def find_cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The import cycles of a graph, each as a path that ends where it starts: in every
    strongly connected component (more than one module, or one that imports itself), the
    shortest cycle through each member; deterministic."""
    edges = {node: sorted(set(targets)) for node, targets in graph.items()}
    for targets in list(edges.values()):
        for target in targets:
            edges.setdefault(target, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in edges[node]:
            if target not in index:
                connect(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            connect(node)

    cycles: list[list[str]] = []
    for component in sorted(components):
        members = set(component)
        if len(component) == 1 and component[0] not in edges[component[0]]:
            continue
        for start in component:  # the shortest cycle through each member, found breadth first
            previous: dict[str, str] = {}
            frontier = [start]
            while frontier and start not in previous:
                following = []
                for node in frontier:
                    for target in edges[node]:
                        if target in members and target not in previous:
                            previous[target] = node
                            following.append(target)
                frontier = following
            path = [start]
            while previous[path[-1]] != start:
                path.append(previous[path[-1]])
            loop = [start, *reversed(path[1:])]
            first = loop.index(min(loop))  # the same cycle reads the same from any member
            cycle = [*loop[first:], *loop[:first]]
            if cycle + [cycle[0]] not in cycles:
                cycles.append(cycle + [cycle[0]])
    return cycles


def describe(cycle: list[str], imports: Iterable[Import]) -> str:
    """`a -> b -> a` with the file and line of each import."""
    files = module_files()
    where: dict[tuple[str, str], str] = {}
    for imp in imports:
        target = resolve(imp.target, files)
        if target is not None and not imp.type_checking:
            where.setdefault((imp.module, target), f"{files[imp.module].relative_to(ROOT)}:{imp.line}")
    steps = [f"{a} -> {b} ({where.get((a, b), '?')})" for a, b in zip(cycle, cycle[1:])]
    return "; ".join(steps)


# ---- the cycle finder on graphs made up here (so that the checks below can fail) ------------------------------
def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": ["b"], "b": ["c"], "c": ["a", "d"], "d": []}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]


def test_the_cycle_finder_finds_self_imports_and_each_component() -> None:
    graph = {"a": ["a"], "b": ["c"], "c": ["b"], "d": ["e"], "e": []}
    assert find_cycles(graph) == [["a", "a"], ["b", "c", "b"]]


def test_the_cycle_finder_reports_every_member_of_a_tangle() -> None:
    # the old CLI: cli imported its command modules, which imported cli back
    graph = {"cli": ["cli", "export", "plan"], "export": ["cli"], "plan": ["cli", "errors"], "errors": []}
    assert find_cycles(graph) == [["cli", "cli"], ["cli", "export", "cli"], ["cli", "plan", "cli"]]


def test_the_cycle_finder_accepts_a_dag() -> None:
    assert find_cycles({"a": ["b", "c"], "b": ["c"], "c": []}) == []


def test_lazy_imports_are_edges_and_type_checking_imports_are_not() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from pkg.typed import T\n"
        "def f():\n"
        "    from pkg.lazy import g\n"
    )
    known = {"pkg", "pkg.mod", "pkg.sibling", "pkg.typed", "pkg.lazy"}
    imports = imports_of("pkg.mod", source, False, known)
    assert [(i.target, i.lazy, i.type_checking) for i in imports] == [
        ("typing", False, False), ("pkg.sibling", False, False), ("pkg.typed", False, True),
        ("pkg.lazy", True, False)]
    assert import_graph(imports, known)["pkg.mod"] == {"pkg.sibling", "pkg.lazy"}
    # a lazy import back closes a circle all the same
    back = imports_of("pkg.lazy", "def h():\n    import pkg.mod\n", False, known)
    cycles = find_cycles(import_graph([*imports, *back], known))
    assert cycles == [["pkg.lazy", "pkg.mod", "pkg.lazy"]]


# ---- the project ------------------------------------------------------------------------------------------------
def test_every_package_is_read() -> None:
    files = module_files()
    for expected in ("splitkeras", "splitkeras.engine", "splitkeras.cli", "splitkeras.cli._common",
                     "splitkeras.client.transport", "converters.keras_io", "server_app.main"):
        assert expected in files


def test_no_import_cycles() -> None:
    imports = project_imports()
    cycles = find_cycles(import_graph(imports, module_files()))
    assert not cycles, "import cycles:\n" + "\n".join(describe(c, imports) for c in cycles)


def test_lazy_package_inits_import_nothing_of_the_project_at_module_level() -> None:
    """Submodules read `splitkeras.__version__` and the like; that is safe because these
    packages' `__init__` import no project module while they run."""
    files = module_files()
    for package in ("splitkeras", "splitkeras.client"):
        eager = [imp for imp in project_imports() if imp.module == package and not imp.lazy
                 and not imp.type_checking and resolve(imp.target, files)]
        assert not eager, f"{package}/__init__.py imports {[i.target for i in eager]} at module level"


def core_problems(imports: Iterable[Import]) -> list[str]:
    """Imports of the web stack or the server by the core, less HTTP_CLIENT and EXCEPTIONS."""
    problems = []
    for imp in imports:
        top = imp.target.split(".")[0]
        if imp.module.split(".")[0] != "splitkeras" or top not in WEB | {"server_app"}:
            continue
        if (top == "httpx" and imp.module in HTTP_CLIENT) or ((imp.module, top) in EXCEPTIONS and imp.lazy):
            continue
        problems.append(f"{imp.module} imports {imp.target} (line {imp.line})")
    return sorted(set(problems))


def converters_problems(imports: Iterable[Import]) -> list[str]:
    return sorted({f"{imp.module} imports {imp.target} (line {imp.line})" for imp in imports
                   if imp.module.split(".")[0] == "converters" and imp.target.split(".")[0] == "splitkeras"
                   and imp.target not in CONVERTERS_MAY_IMPORT})


def cli_problems(imports: Iterable[Import], known: Iterable[str]) -> list[str]:
    """Command modules (everything in splitkeras/cli/ but its __init__ and __main__) that
    import `splitkeras.cli` itself."""
    known = set(known)
    return sorted({f"{imp.module} imports {imp.target} (line {imp.line})" for imp in imports
                   if imp.module.startswith("splitkeras.cli.") and imp.module != "splitkeras.cli.__main__"
                   and resolve(imp.target, known) == "splitkeras.cli"})


def test_the_boundary_checks_catch_what_they_are_for() -> None:
    def imp(module: str, target: str, lazy: bool = False) -> Import:
        return Import(module, target, 1, lazy, False)

    known = {"splitkeras", "splitkeras.cli", "splitkeras.cli._common", "splitkeras.cli.serve",
             "splitkeras.cli.split", "splitkeras.errors", "splitkeras.manifest"}
    bad = [imp("splitkeras.segments", "fastapi"), imp("splitkeras.wire", "httpx", lazy=True),
           imp("splitkeras.cli.serve", "server_app"),  # allowed only inside the command function
           imp("splitkeras.cli.split", "server_app.main", lazy=True),
           imp("converters.keras_io", "splitkeras.manifest"), imp("converters.tfjs_config", "splitkeras"),
           imp("splitkeras.cli.split", "splitkeras.cli")]
    good = [imp("splitkeras.client.transport", "httpx"), imp("splitkeras.client.retries", "httpx"),
            imp("splitkeras.cli.serve", "server_app", lazy=True),
            imp("splitkeras.cli.serve", "uvicorn", lazy=True), imp("converters.keras_io", "splitkeras.errors"),
            imp("splitkeras.cli.split", "splitkeras.cli._common"), imp("splitkeras.cli.__main__", "splitkeras.cli"),
            imp("server_app.main", "fastapi"), imp("server_app.service", "splitkeras.manifest")]
    assert core_problems(bad + good) == [
        "splitkeras.cli.serve imports server_app (line 1)", "splitkeras.cli.split imports server_app.main (line 1)",
        "splitkeras.segments imports fastapi (line 1)", "splitkeras.wire imports httpx (line 1)"]
    assert converters_problems(bad + good) == ["converters.keras_io imports splitkeras.manifest (line 1)",
                                               "converters.tfjs_config imports splitkeras (line 1)"]
    assert cli_problems(bad + good, known) == ["splitkeras.cli.split imports splitkeras.cli (line 1)"]


def test_the_core_imports_no_web_stack_and_not_the_server() -> None:
    problems = core_problems(project_imports())
    assert not problems, "\n".join(problems)


def test_the_exceptions_are_still_needed() -> None:
    """An exception that no import uses any more is removed, not kept as a loophole."""
    used = {(imp.module, imp.target.split(".")[0]) for imp in project_imports() if imp.lazy}
    assert set(EXCEPTIONS) <= used, set(EXCEPTIONS) - used


def test_converters_import_only_the_errors_of_the_core() -> None:
    problems = converters_problems(project_imports())
    assert not problems, "\n".join(problems)


def test_cli_command_modules_import_downward() -> None:
    files = module_files()
    commands = [name for name in files if name.startswith("splitkeras.cli.") and name != "splitkeras.cli.__main__"]
    assert "splitkeras.cli._common" in commands and "splitkeras.cli.serve" in commands
    problems = cli_problems(project_imports(), files)
    assert not problems, "\n".join(problems)
