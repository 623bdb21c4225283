"""The layering of ARCHITECTURE.md, read from the sources' import statements (nothing is imported).

Every import statement counts, at module level or inside a function (or under `if TYPE_CHECKING:`): a deferred
import is still a dependency that a reader follows and a change can break, and deferring one is how a circle
hides (sim.step_time built the profile model by a function-level import of the module that subclassed it).
"""

from __future__ import annotations

import ast
import graphlib
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("engine", "sim", "kernels", "workbench")
OURS = "servebench"


@dataclass(frozen=True, slots=True)
class Import:
    module: str  # the importing module
    target: str  # the module imported, or from which names are imported
    names: tuple[str, ...]  # names of a `from target import ...`; () for `import target`
    line: int
    relative: bool = False  # `from .x import y`: `target` is then only the part after the dots

    def where(self) -> str:
        return f"{self.module}:{self.line}"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join((OURS, *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _imports_of(path: Path) -> list[Import]:
    module = module_name(path)
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [Import(module, alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = tuple(alias.name for alias in node.names)
            found.append(Import(module, node.module or "", names, node.lineno, relative=node.level > 0))
    return found


SOURCES = {module_name(p): p for folder in FOLDERS for p in sorted((REPO / folder).rglob("*.py"))}
IMPORTS = [imp for path in SOURCES.values() for imp in _imports_of(path)]


def _under(name: str, *packages: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def _imported_modules(imp: Import) -> set[str]:
    """Our modules an import loads: the target, and each imported name that is itself a module."""
    return {m for m in (imp.target, *(f"{imp.target}.{n}" for n in imp.names)) if m in SOURCES}


def test_imports_are_absolute():
    """A relative import would slip past the checks below, which know our modules by their full names."""
    assert not [imp.where() for imp in IMPORTS if imp.relative]


def test_the_sources_are_found():
    assert {"servebench.engine.core.scheduler", "servebench.sim.simulator", "servebench.kernels.attention",
            "servebench.workbench.experiment"} <= set(SOURCES)


# (who, what it may import of ours); anything else of ours it imports breaks the layering
LAYERS = [
    ("servebench.engine.core", ("servebench.engine.core",)),
    ("servebench.sim", ("servebench.sim", "servebench.engine.core")),
    ("servebench.kernels", ("servebench.kernels",)),
    ("servebench.engine", ("servebench.engine", "servebench.kernels")),
]


@pytest.mark.parametrize(("layer", "allowed"), LAYERS, ids=[layer for layer, _ in LAYERS])
def test_each_layer_imports_only_the_layers_below(layer: str, allowed: tuple[str, ...]):
    bad = [f"{imp.where()} imports {imp.target}" for imp in IMPORTS
           if _under(imp.module, layer) and _under(imp.target, OURS) and not _under(imp.target, *allowed)]
    assert not bad, f"{layer} may import only {', '.join(allowed)} of ours:\n" + "\n".join(bad)


def test_engine_core_needs_only_the_standard_library():
    """So the simulator runs it without torch, and its code is the same object on both backends."""
    bad = [f"{imp.where()} imports {imp.target}" for imp in IMPORTS
           if _under(imp.module, "servebench.engine.core") and not _under(imp.target, OURS)
           and imp.target.split(".")[0] not in sys.stdlib_module_names]
    assert not bad, "\n".join(bad)


def test_no_private_name_is_imported_from_another_module():
    """A leading underscore says "only this module uses it": another module that needs it needs a public
    name (or the code belongs elsewhere)."""
    bad = [f"{imp.where()} imports {name} from {imp.target}" for imp in IMPORTS if _under(imp.target, OURS)
           for name in imp.names if name.startswith("_") and not name.startswith("__")
           and imp.target != imp.module]
    assert not bad, "\n".join(bad)


def test_no_private_attribute_of_another_module_is_read():
    """The same rule for `import servebench.x as m; m._name` and `from servebench import x; x._name`."""
    bad = []
    for module, path in SOURCES.items():
        tree = ast.parse(path.read_text(), str(path))
        aliases = {}  # a local name -> our module it is bound to
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                aliases |= {a.asname: a.name for a in node.names if a.asname and a.name in SOURCES}
            elif isinstance(node, ast.ImportFrom) and node.module:
                aliases |= {a.asname or a.name: f"{node.module}.{a.name}" for a in node.names
                            if f"{node.module}.{a.name}" in SOURCES}
        bad += [f"{module}:{node.lineno} reads {node.value.id}.{node.attr}" for node in ast.walk(tree)
                if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and aliases.get(node.value.id, module) != module
                and node.attr.startswith("_") and not node.attr.startswith("__")]
    assert not bad, "\n".join(bad)


def test_no_import_circles():
    """Modules in a circle can only be understood, tested and changed together; one idea per file needs
    a graph without them. Names a package's `__init__` re-exports count as imports of the package."""
    graph: dict[str, set[str]] = {m: set() for m in SOURCES}
    for imp in IMPORTS:
        graph[imp.module] |= _imported_modules(imp) - {imp.module}
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as e:
        # graphlib lists the circle along "is imported by": reversed, each module imports the next
        pytest.fail(f"import circle: {' imports '.join(reversed(e.args[1]))}")
