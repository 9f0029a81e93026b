"""Import layout of the package, read from the source with ``ast`` (nothing is imported).

Every ``import`` / ``from ... import`` statement of every module under ``holons/`` counts,
including those inside functions (lazy imports still tie two modules together). Two rules:

(a) no import cycle between holons modules;
(b) imports run one way (DESIGN.md, "Package layout"): ``holons.data`` and ``holons.anatomy``
    (and the shared top-level helpers ``errors``, ``files``, ``config``, ``signals`` and the run
    layer ``runs``) import
    nothing from ``ssl`` / ``finetune`` / ``eval`` / ``study`` / ``cli``; ``ssl`` nothing from
    ``finetune`` / ``eval`` / ``study`` / ``cli``; ``finetune`` nothing from ``eval`` / ``study`` / ``cli``;
    ``eval`` nothing from ``study`` / ``cli``; ``study`` nothing from ``cli``.

An import of a package (``from holons.data import read_image``) is an edge to the package's
``__init__``; the implicit import of parent packages when a submodule is imported is not an edge
(it would make every package with re-exports look cyclic).
"""

from __future__ import annotations

import ast
from pathlib import Path

import holons

PACKAGE_DIR = Path(holons.__file__).resolve().parent

# Rank of each layer: a module may import modules of its own rank or lower, never higher.
LAYERS = {
    "holons.errors": 0,
    "holons.files": 0,
    "holons.config": 0,
    "holons.signals": 0,
    "holons.runs": 0,
    "holons.data": 0,
    "holons.anatomy": 0,
    "holons.ssl": 1,
    "holons.finetune": 2,
    "holons.eval": 3,
    "holons.study": 4,
    "holons.cli": 5,
}

# (importer, imported) pairs allowed against rule (b), each with the reason. None today; add one
# only with a comment saying why it cannot be fixed yet.
KNOWN_LAYER_EXCEPTIONS: set[tuple[str, str]] = set()


def _module_files() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = ("holons",) + path.relative_to(PACKAGE_DIR).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def _targets(module: str, is_package: bool, node: ast.Import | ast.ImportFrom, modules) -> list[str]:
    """The holons modules one import statement names (the longest existing module of each name)."""
    names = []
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:  # relative import: resolve against the importing module's package
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = package[: len(package) - (node.level - 1)]
            source = ".".join(base + ([node.module] if node.module else []))
        else:
            source = node.module or ""
        for alias in node.names:  # `from pkg import sub` imports the submodule `pkg.sub` when there is one
            sub = f"{source}.{alias.name}"
            names.append(sub if sub in modules else source)
    found = []
    for name in names:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the holons modules it imports anywhere in its source (top level or inside functions)."""
    modules = _module_files()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_targets(module, path.name == "__init__.py", node, modules))
        graph[module] = edges
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path a -> ... -> a) per strongly connected group of modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def visit(start: str) -> None:  # Tarjan, iterative so deep graphs cannot hit the recursion limit
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(group)

    for module in sorted(graph):
        if module not in index:
            visit(module)

    cycles = []
    for group in groups:  # walk inside the group from its first member back to it
        start = min(group)
        path, seen = [start], {start}
        while True:
            nxt = sorted(m for m in graph[path[-1]] if m in group)
            if start in nxt:
                cycles.append(path + [start])
                break
            step = next((m for m in nxt if m not in seen), None)
            if step is None:  # dead end: step back (the group is strongly connected, so a way back exists)
                path.pop()
                if not path:
                    cycles.append(sorted(group))
                    break
                continue
            path.append(step)
            seen.add(step)
    return cycles


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        rank = LAYERS.get(".".join(parts[:n]))
        if rank is not None:
            return rank
    return None


def layer_violations(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    bad = set()
    for importer, imported in ((a, b) for a, targets in graph.items() for b in targets):
        low, high = layer_of(importer), layer_of(imported)
        if low is not None and high is not None and high > low:
            bad.add((importer, imported))
    return bad


def test_the_graph_sees_every_module_and_lazy_imports():
    graph = import_graph()
    assert "holons.data.readers" in graph and "holons.cli" in graph
    # read_image dispatches to the DICOM reader through an import inside the function
    assert "holons.data.dicom" in graph["holons.data.readers"]
    assert "holons.data.image" in graph["holons.data.dicom"]


def test_find_cycles_reports_a_cycle_and_accepts_a_tree():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycle_between_holons_modules():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_imports_run_one_way_between_layers():
    violations = layer_violations(import_graph())
    unexpected = sorted(violations - KNOWN_LAYER_EXCEPTIONS)
    assert not unexpected, "imports against the layer order (DESIGN.md):\n" + "\n".join(
        f"{a} imports {b}" for a, b in unexpected
    )
    stale = sorted(KNOWN_LAYER_EXCEPTIONS - violations)
    assert not stale, f"known exceptions that no longer occur, remove them: {stale}"


def test_a_layer_violation_is_detected():
    graph = {"holons.data.cache": {"holons.ssl.trainer"}, "holons.ssl.trainer": {"holons.data.cache"}}
    assert layer_violations(graph) == {("holons.data.cache", "holons.ssl.trainer")}
