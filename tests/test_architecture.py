"""The house rules that a reader cannot see at a glance: imports go down the layers that
docs/architecture.md draws, no import cycles between querytune's modules, imports inside functions
included (only ``if TYPE_CHECKING:`` imports are left out), and export and serving reach methods
through their contract only."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "querytune"

# docs/architecture.md's layers, top to bottom, by the part of querytune a module is in (``querytune.service.app``
# is in ``service``; ``querytune`` is the package's own __init__): a module imports from its own layer or lower ones.
LAYERS = [
    {"querytune", "__main__", "cli"},
    {"service", "bench", "export"},
    {"serve", "grid", "measure", "suite", "report"},
    {"run"},
    {"settings", "train", "runfolder", "trunk", "methods"},
    {"backbones"},
    {"data", "recipes", "runlog", "options", "files", "errors", "progress", "distributed", "version"},
]


def module_name(path: Path) -> str:
    parts = ["querytune", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The querytune modules ``path`` imports anywhere in it, except under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):  # drop type-checking-only imports
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    package = module_name(path).split(".") if path.name == "__init__.py" else module_name(path).split(".")[:-1]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            target = ".".join(base + (node.module.split(".") if node.module else []))
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return found & modules


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(module: str) -> int:
    """The index in LAYERS of the layer ``module`` belongs to (0 is the top)."""
    part = module.split(".")[1] if "." in module else module
    return next(index for index, names in enumerate(LAYERS) if part in names)


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Every import of a module by one in a lower layer, as 'importer -> imported'."""
    return [f"{source} -> {target}" for source in sorted(graph) for target in sorted(graph[source])
            if layer(target) < layer(source)]


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def test_no_import_cycles():
    graph = import_graph()
    assert "querytune.trunk.features" in graph["querytune.trunk.cache.entry"]  # the graph sees relative imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_every_module_has_a_layer():
    parts = {module.split(".")[1] if "." in module else module for module in import_graph()}
    assert parts <= set().union(*LAYERS), f"place {sorted(parts - set().union(*LAYERS))} in LAYERS and the docs"


def test_imports_go_down_the_layers():
    graph = import_graph()
    assert "querytune.trunk.cache" in graph["querytune.cli.printing"]  # the graph sees imports inside functions
    assert upward_imports(graph) == []


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_upward_import_is_found():
    graph = {"querytune.cli.app": {"querytune.run"}, "querytune.trunk.cache.entry": {"querytune.service.app"}}
    assert upward_imports(graph) == ["querytune.trunk.cache.entry -> querytune.service.app"]


def test_export_and_serving_ask_methods_through_the_contract_only():
    """What a method allows export and serving is said by its hooks (``Method.to_peft``, ``shared_rows``):
    they import no method module, only the contract and the registry."""
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    allowed = {"querytune.methods.base", "querytune.methods.registry"}
    for client in ("querytune.export", "querytune.serve"):
        methods = {name for name in imported_modules(files[client], set(files)) if name.startswith("querytune.methods")}
        assert methods and methods <= allowed, f"{client} imports {sorted(methods - allowed)}"
