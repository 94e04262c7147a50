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
    ("errors", ["errors"]),  # the shared exception types
    ("plan", ["plan.*", "models.*"]),  # pure: no communication
    ("comm", ["comm.*"]),  # backends, byte accounting, background work, fail-fast, the thread world
    ("parts", ["blocks.*", "averaging.*", "evaluation", "data.*"]),  # what strategies and runs are made of
    ("strategies", ["strategies.*"]),  # with the block exchange and the ResIST block store
    ("cli", ["cli.*"]),  # python -m resist_mpi.train: config, trainer, checkpoints, logs, signals
    ("tools", ["tools.*"]),  # traffic model, plot, check, simulated cluster
    ("api", ["__init__", "train", "checkpoint", "traffic", "plot", "check", "cluster"]),  # the face: API, -m entry points
]
# beyond the order: pairs (importer, imported) refused even though imported is lower
FORBIDDEN = [("blocks.*", "comm.*"), ("plan.*", "comm.*"), ("plan.*", "blocks.*"), ("models.*", "comm.*"),
             ("data.*", "comm.*"), ("data.*", "blocks.*"), ("data.*", "averaging.*")]
# imports up that are allowed, each with its reason
ALLOWED_UP = {("tools.check", "__init__"): "the one version string is the package's __version__ (pyproject reads it there)"}
ENTRY_POINTS = ["train", "checkpoint", "traffic", "plot", "check", "cluster"]


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


def _is_module(dotted):
    path = PACKAGE.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


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
                out.append((node.lineno, sub if _is_module(sub) else ".".join(target)))
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
              for line, target in _imports(module) if _layer_of(target) is not None and _layer_of(target) > mine
               and (module, target) not in ALLOWED_UP]
    assert upward == []


def test_the_check_sees_an_upward_import():
    """The rule itself: the strategies' old import of the checkpoint module would be refused."""
    assert _layer_of("cli.checkpoint") > _layer_of("strategies.resist")
    assert _layer_of("comm.mpi") < _layer_of("averaging.rounds") < _layer_of("strategies.base") < _layer_of("cli.trainer")
    found = dict((t, line) for line, t in _imports("strategies.resist"))
    assert "strategies.shard" in found and "strategies.exchange" in found and "plan.partition" in found
    assert _matches("blocks.find", "blocks.*") and not _matches("blockstore", "blocks.*")


def _matches(module, pattern):
    return module == pattern or (pattern.endswith(".*") and (module == pattern[:-2] or module.startswith(pattern[:-1])))


@pytest.mark.parametrize("module", _modules())
def test_no_forbidden_import(module):
    """Blocks, plan, models and data never talk to the comm layer (and plan knows no blocks)."""
    bad = [f"{module}.py:{line} imports {target}" for line, target in _imports(module)
           for importer, imported in FORBIDDEN if _matches(module, importer) and _matches(target, imported)]
    assert bad == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_entry_points_only_delegate(entry):
    """`python -m resist_mpi.<entry>` stays for users; the module is a few lines that run the real main."""
    src = PACKAGE.joinpath(entry + ".py").read_text()
    tree = ast.parse(src)
    imports = [t for _, t in _imports(entry)]
    assert len(src.splitlines()) <= 8 and len(imports) == 1 and imports[0].split(".")[0] in ("cli", "tools")
    assert [type(n).__name__ for n in tree.body] == ["Expr", "Import", "ImportFrom", "If"]


def test_the_folders_are_the_layers():
    """Every module is in a folder of its layer except the few named at the top level."""
    top = [m for m in _modules() if "." not in m]
    assert sorted(top) == sorted(["__init__", "errors", "evaluation"] + ENTRY_POINTS)
