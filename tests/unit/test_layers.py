"""The package's layers, from the imports themselves: a module imports only from its own layer or
the ones below it (docs/layout.md). Every module of resist_mpi must be placed in a layer, so a new
module says where it belongs; an import upward (a strategy reaching into the checkpoint machinery,
the comm layer into a strategy) fails here with the line that does it."""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "resist_mpi"

# lowest first; a module (dotted, without the package) or a subpackage ending in ".*"
LAYERS = [
    ("plan", ["errors", "partition", "routing", "groups", "models.*"]),  # pure: no communication
    ("comm", ["comm.*"]),  # backends, byte accounting, the thread world
    ("parts", ["compression", "averaging", "blocks", "exchange", "evaluation"]),  # what strategies are made of
    ("strategies", ["strategies.*"]),
    ("run", ["config", "data", "metrics", "preempt", "watchdog", "checkpoint", "traffic", "trainer", "train"]),
    ("tools", ["__init__", "plot", "check", "cluster"]),  # the package's face and its side programs
]


def _modules():
    return sorted(".".join(p.relative_to(PACKAGE).with_suffix("").parts) for p in PACKAGE.rglob("*.py"))


def _layer_of(module):
    if module.endswith(".__init__") and module != "__init__":
        module = module[: -len(".__init__")]
    for level, (_, members) in enumerate(LAYERS):
        for m in members:
            if module == m or (m.endswith(".*") and (module == m[:-2] or module.startswith(m[:-1]))):
                return level
    return None


def _imports(module):
    """(line, imported module within the package) for every import of resist_mpi code in module."""
    path = PACKAGE.joinpath(*module.split(".")).with_suffix(".py")
    package = module.split(".")[:-1]  # where a relative import starts from (a package's __init__: itself)
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = base + (node.module.split(".") if node.module else [])
            elif node.module and node.module.split(".")[0] == "resist_mpi":
                target = node.module.split(".")[1:]
            else:
                continue
            names = [a.name for a in node.names]
            for name in names:  # `from . import partition` names a module; `from .x import y` names x
                sub = ".".join(target + [name])
                out.append((node.lineno, sub if _layer_of(sub) is not None and not node.module else ".".join(target)))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "resist_mpi":
                    out.append((node.lineno, ".".join(a.name.split(".")[1:])))
    return [(line, t or "__init__") for line, t in out]


def test_every_module_has_a_layer():
    assert [m for m in _modules() if _layer_of(m) is None] == []


@pytest.mark.parametrize("module", _modules())
def test_imports_go_only_down(module):
    mine = _layer_of(module)
    upward = [f"{module}.py:{line} imports {target} ({LAYERS[_layer_of(target)][0]} is above {LAYERS[mine][0]})"
              for line, target in _imports(module) if _layer_of(target) is not None and _layer_of(target) > mine]
    assert upward == []


def test_the_check_sees_an_upward_import():
    """The rule itself: the strategies' old import of the checkpoint module would be refused."""
    assert _layer_of("checkpoint") > _layer_of("strategies.resist")
    assert _layer_of("comm.mpi") < _layer_of("averaging") < _layer_of("strategies.base") < _layer_of("trainer")
    found = dict((t, line) for line, t in _imports("strategies.resist"))
    assert "strategies.shard" in found and "exchange" in found and "partition" in found
