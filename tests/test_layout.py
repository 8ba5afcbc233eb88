"""The shape of the source: module and function sizes, import cycles, private names, prose.

These tests read the project's packages (kernels/, trainer/, benchmarks/, each mapped to
`prolix.<folder>`) with `ast` and `tokenize`; nothing is imported. Each failure lists every
offender, so one run shows all there is to fix.
"""

import ast
import io
import re
import tokenize
from collections import deque
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"kernels": "prolix.kernels", "trainer": "prolix.trainer", "benchmarks": "prolix.benchmarks"}
SKIP_DIRS = {"__pycache__", "results", ".venv", "build"}

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
SIZED_FOLDERS = ("kernels", "trainer")
PROSE_FOLDERS = ("kernels", "trainer", "benchmarks", "tests")

# Prose that points at an issue tracker's numbers or at files that live outside the repository.
OUTSIDE_REFERENCES = re.compile(
    r"\bissues?\s*#?\s*\d+|\bshared/|\b(?:DESIGN|STYLE|BENCHMARKS)\.md\b",
    re.IGNORECASE,
)


def _python_files(folder: str) -> list[Path]:
    base = ROOT / folder
    return sorted(p for p in base.rglob("*.py") if not SKIP_DIRS.intersection(p.relative_to(base).parts[:-1]))


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGES[rel.parts[0]], *rel.parts[1:-1]]
    if rel.stem != "__init__":
        parts.append(rel.stem)
    return ".".join(parts)


def _project_modules() -> dict[str, Path]:
    """Every module of the project's packages: dotted name -> file."""
    return {_module_name(path): path for folder in PACKAGES for path in _python_files(folder)}


MODULES = _project_modules()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _package_of(module: str) -> str:
    """The package a module's relative imports start from (a package's own name for its __init__)."""
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _absolute(module: str, node: ast.ImportFrom) -> str:
    """The dotted name that `from <...> import` names, with relative imports resolved."""
    if not node.level:
        return node.module or ""
    base = _package_of(module).split(".")
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owning_module(dotted: str) -> str | None:
    """The longest prefix of a dotted name that is a project module (None outside the project)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        if name in MODULES:
            return name
    return None


def _imports(module: str, tree: ast.Module) -> list[tuple[str, int, str | None]]:
    """Each project module this one imports, anywhere in the file: (target, line, imported name).

    `from pkg import sub` imports the module pkg.sub when there is one; otherwise the name comes
    from pkg itself. The imported name is given for `from` imports of names (not of modules).
    """
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _owning_module(alias.name)
                if target:
                    found.append((target, node.lineno, None))
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    found.append((f"{base}.{alias.name}", node.lineno, None))
                elif (target := _owning_module(base)) is not None:
                    found.append((target, node.lineno, alias.name))
    return found


def _import_graph() -> dict[str, dict[str, int]]:
    """module -> {imported project module: first line}, without a module's edges to its own
    enclosing packages.

    Python initialises every enclosing package before it runs a submodule, so a submodule's
    import of its own package (`from prolix.kernels import x` inside prolix.kernels.y, or
    `from . import x` naming a re-exported object) never starts that package's code: the edge
    cannot close a loop in the order modules load. The package's own imports of its submodules
    (the re-exports in `__init__`) are edges like any other.
    """
    graph: dict[str, dict[str, int]] = {}
    for module, path in MODULES.items():
        edges = graph.setdefault(module, {})
        for target, line, _ in _imports(module, _parse(path)):
            if target == module or module.startswith(target + "."):
                continue
            edges.setdefault(target, line)
    return graph


def _strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Tarjan's strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph[node]:
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _shortest_cycle(graph: dict[str, dict[str, int]], component: list[str]) -> list[str]:
    """A shortest loop through the component's first module, as a chain start -> ... -> start."""
    members = set(component)
    start = component[0]
    parent: dict[str, str] = {}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for succ in sorted(graph[node]):
            if succ == start:
                chain = [node]
                while chain[-1] != start:
                    chain.append(parent[chain[-1]])
                return [*reversed(chain), start]
            if succ in members and succ not in parent:
                parent[succ] = node
                queue.append(succ)
    raise AssertionError(f"no loop through {start} in {component}")


def _format_chain(graph: dict[str, dict[str, int]], chain: list[str]) -> str:
    steps = [f"{a} ({_rel(MODULES[a])}:{graph[a][b]})" for a, b in zip(chain, chain[1:])]
    return " -> ".join([*steps, chain[-1]])


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the first statement after the docstring to the function's last line."""
    body = node.body
    if ast.get_docstring(node, clean=False) is not None:
        body = body[1:]
    if not body:
        return 0
    return node.end_lineno - body[0].lineno + 1


def _private_attribute_uses(module: str, tree: ast.Module) -> list[tuple[int, str]]:
    """`x._y` where `x` names a project module (bound by `import` or `from pkg import module`)."""
    bound: dict[str, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    bound[alias.asname] = alias.name
                elif alias.name.startswith("prolix."):
                    bound["prolix"] = "prolix"
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(module, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in MODULES:
                    bound[alias.asname or alias.name] = f"{base}.{alias.name}"
    uses = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        parts = []
        inner: ast.expr = node
        while isinstance(inner, ast.Attribute):
            parts.append(inner.attr)
            inner = inner.value
        if not isinstance(inner, ast.Name) or inner.id not in bound:
            continue
        dotted = ".".join([bound[inner.id], *reversed(parts)])
        owner = _owning_module(dotted)
        if owner is None or owner == module:
            continue
        name = dotted[len(owner) + 1 :].split(".")[0]
        if name and _is_private(name):
            uses.add((node.lineno, f"{owner}.{name}"))
    return sorted(uses)


def _prose(path: Path) -> list[tuple[int, str]]:
    """Every comment and docstring of a file, with its first line."""
    source = path.read_text(encoding="utf-8")
    found = [
        (tok.start[0], tok.string)
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    ]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            if ast.get_docstring(node, clean=False) is not None:
                found.append((node.body[0].lineno, node.body[0].value.value))
    return found


@pytest.mark.parametrize("folder", SIZED_FOLDERS)
def test_no_module_is_longer_than_500_lines(folder):
    too_long = [
        f"{_rel(path)}: {n} lines"
        for path in _python_files(folder)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    ]
    assert not too_long, f"modules over {MAX_MODULE_LINES} lines:\n" + "\n".join(too_long)


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_no_function_has_more_than_60_lines_of_code(folder):
    too_long = []
    for path in _python_files(folder):
        for node in ast.walk(_parse(path)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if (n := _body_lines(node)) > MAX_FUNCTION_LINES:
                    too_long.append(f"{_rel(path)}:{node.lineno} {node.name}: {n} lines")
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines of code:\n" + "\n".join(too_long)


def test_the_project_modules_import_each_other_without_a_cycle():
    graph = _import_graph()
    cycles = [_format_chain(graph, _shortest_cycle(graph, c)) for c in _strongly_connected(graph)]
    assert not cycles, "import cycles (imports inside functions count):\n" + "\n".join(cycles)


def test_the_import_graph_holds_function_level_imports_and_package_re_exports():
    """The cycle check sees what it must: the CLI's imports of benchmarks inside its functions,
    and a package's re-exports of its submodules (while a submodule's import of its own package
    is no edge)."""
    graph = _import_graph()
    assert any(target.startswith("prolix.benchmarks.") for target in graph["prolix.trainer.cli"])
    assert any(target.startswith("prolix.kernels.") for target in graph["prolix.kernels"])
    assert not [(m, t) for m, targets in graph.items() for t in targets if m.startswith(t + ".")]


def test_the_cycle_finder_reports_each_loop_as_a_chain():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"f": 5}, "f": {"e": 6}}
    components = _strongly_connected(graph)
    assert sorted(components) == [["a", "b", "c"], ["e", "f"]]
    assert [_shortest_cycle(graph, c) for c in sorted(components)] == [["a", "b", "c", "a"], ["e", "f", "e"]]


@pytest.mark.parametrize("folder", list(PACKAGES))
def test_no_module_imports_a_private_name_from_another_module(folder):
    offenders = []
    for path in _python_files(folder):
        module = _module_name(path)
        tree = _parse(path)
        for target, line, name in _imports(module, tree):
            if name is not None and _is_private(name):
                offenders.append(f"{_rel(path)}:{line} imports {name} from {target}")
        for line, dotted in _private_attribute_uses(module, tree):
            offenders.append(f"{_rel(path)}:{line} uses {dotted}")
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)


@pytest.mark.parametrize("folder", PROSE_FOLDERS)
def test_no_docstring_or_comment_cites_an_issue_number_or_a_file_outside_the_repository(folder):
    offenders = []
    for path in _python_files(folder):
        for line, text in _prose(path):
            for match in OUTSIDE_REFERENCES.finditer(text):
                at = line + text.count("\n", 0, match.start())
                offenders.append(f"{_rel(path)}:{at}: {match.group(0)!r}")
    assert not offenders, "prose citing issue numbers or outside files:\n" + "\n".join(offenders)
