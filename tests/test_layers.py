"""The import graph: the package's layers (cxr/__init__.py) import only downward, and no modules import each other
in a cycle. Imports inside functions count: they are how a layer reaches another at run time."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "cxr"
# Lowest first; a module may import its own layer and those before it. `errors`, `atomic` and `progress` are the base.
LAYERS = [("cxr.errors", "cxr.atomic", "cxr.progress"), ("cxr.data",), ("cxr.model",), ("cxr.evaluate",), ("cxr.bundle",),
          ("cxr.monitor",),
          ("cxr.training",), ("cxr.commands",), ("cxr.cli", "cxr.__main__")]


def module_names():
    names = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def import_graph():
    """{module: {cxr modules it imports}}: `from cxr.a import b` counts as cxr.a.b where that is a module."""
    names = module_names()

    def known(name):
        while name not in names:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in names.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {known(a.name) for a in node.names if a.name.startswith("cxr.")}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("cxr"):
                targets |= {known(f"{node.module}.{a.name}") for a in node.names}
        graph[name] = targets - {name, "cxr"}
    return graph


def layer(module):
    for index, roots in enumerate(LAYERS):
        if any(module == root or module.startswith(root + ".") for root in roots):
            return index
    raise AssertionError(f"{module} is in no layer: add it to tests/test_layers.py's LAYERS")


def test_every_import_goes_down_the_layers():
    upward = [f"{module} -> {target}" for module, targets in import_graph().items() if module != "cxr"
              for target in targets if layer(target) > layer(module)]
    assert not upward, upward


def test_no_import_cycles():
    graph = import_graph()
    cycles = []

    def visit(module, path):
        for target in sorted(graph[module]):
            if target in path:
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in done:
                visit(target, path + [target])
        done.add(module)

    done = set()
    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    assert not cycles, sorted(set(cycles))


def test_the_commands_and_the_saved_model_never_import_training():
    graph = import_graph()
    reach = {}

    def reachable(module):
        if module not in reach:
            reach[module] = set()
            for target in graph[module]:
                reach[module] |= {target} | reachable(target)
        return reach[module]

    for module in graph:
        if module.startswith(("cxr.commands", "cxr.bundle")):
            assert not {m for m in reachable(module) if m.startswith("cxr.training")}, module


def test_the_old_module_names_still_import():
    import warnings

    from cxr import MOVED

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from cxr.config import Config
        from cxr.population import Population
        from cxr.run import evaluate, train
        from cxr.saved_model import SavedModel
    from cxr.bundle.saved_model import SavedModel as moved
    from cxr.commands.evaluate import evaluate as evaluate_moved
    from cxr.model.population import Population as population_moved
    from cxr.training.config import Config as config_moved
    from cxr.training.run import train as train_moved

    assert (SavedModel, evaluate, train, Config, Population) == (moved, evaluate_moved, train_moved, config_moved,
                                                                 population_moved)
    assert all((PACKAGE / (home.replace(".", "/") + ".py")).is_file() for homes in MOVED.values() for home in homes)


def test_no_function_takes_more_than_seven_parameters():
    """More, and they belong grouped in the object they describe (`evaluate.Checks`, `subgroups.Scored`,
    `listen.Node`)."""
    crowded = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args
                names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
                if len([n for n in names if n not in ("self", "cls")]) > 7:
                    crowded.append(f"{path.relative_to(PACKAGE)}:{node.lineno} {node.name}")
    assert not crowded, crowded
