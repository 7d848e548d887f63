"""The package's import graph: no circle, and imports only go down the floors (docs/extending.md).

The graph is read from the sources (every `import`, at the top of a module or inside a function,
since a lazy import that climbs is still a dependency), so a circle that happens not to fire at
import time is caught too; then every module is imported for real in a fresh interpreter."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = {"fastrlhf": "python/fastrlhf", "fastrlhf.kernels": "kernels", "fastrlhf.hybrid_engine": "hybrid_engine"}

# Lower floors never import higher ones. The bundled tasks' own modules are on the ground floor
# (models, data and rewards read the default task's files); the arithmetic and calculator generators
# sit beside `data` (they read its split to keep held-out problems out of training); their
# evaluation runs the engine.
FLOORS = {
    "errors": 0, "utils": 0, "options": 0, "workers": 0,
    "tasks": 0, "tasks.default_task": 0,
    "kernels": 1,
    "ops": 2, "data": 2, "models": 2, "rewards": 2, "config": 2, "tasks.learnability": 2,
    "tasks.arithmetic_task": 2, "tasks.calculator_task": 2,
    "hybrid_engine": 3, "tasks.evaluation": 3, "agents": 3,  # environments and tools: rlhf runs them
    "rlhf": 4, "tasks.registry": 4,
    "cli": 5, "fastrlhf": 5,  # the package's __init__: `fastrlhf.inject`, a facade over the engine
}
# (importer, imported) pairs allowed to climb, each with its reason; at most one
ALLOWED_CLIMBS = {}


def modules():
    """{module name: source file} of every module of the package."""
    found = {}
    for package, folder in SOURCES.items():
        base = os.path.join(ROOT, folder)
        for dirpath, _, files in os.walk(base):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f), base)[:-3].replace(os.sep, ".")
                    rel = "" if rel == "__init__" else rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
                    found[package + ("." + rel if rel else "")] = os.path.join(dirpath, f)
    return found


def import_graph(mods):
    """{module: modules of the package it imports}."""
    def resolve(name):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name

    graph = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package
                    for _ in range(node.level - 1):
                        parent = parent.rpartition(".")[0]
                    base = parent + ("." + node.module if node.module else "")
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names}
        graph[name] = {resolve(t) for t in targets if t.startswith("fastrlhf")} - {name, ""}
    return graph


def floor_of(module: str) -> int:
    parts = module.split(".")[1:] or ["fastrlhf"]
    for key in (".".join(parts[:2]), parts[0]):
        if key in FLOORS:
            return FLOORS[key]
    raise AssertionError(f"{module} is on no floor: add its package to FLOORS in {__file__}")


def cycles(graph):
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_package_has_no_import_circle_and_imports_go_down_the_floors():
    mods = modules()
    assert len(mods) > 60 and "fastrlhf.rlhf.trainer" in mods and "fastrlhf.kernels.norms" in mods
    graph = import_graph(mods)
    assert cycles(graph) == []
    climbs = sorted((a, b) for a, deps in graph.items() for b in deps if floor_of(b) > floor_of(a))
    assert len(ALLOWED_CLIMBS) <= 1
    assert [c for c in climbs if c not in ALLOWED_CLIMBS] == []


def test_the_checks_see_a_circle_and_a_climb():
    graph = {"fastrlhf.config": {"fastrlhf.models.loading"}, "fastrlhf.models.loading": {"fastrlhf.config"},
             "fastrlhf.rlhf.ppo": {"fastrlhf.config"}}
    assert cycles(graph) == [["fastrlhf.config", "fastrlhf.models.loading"]]
    assert floor_of("fastrlhf.errors") < floor_of("fastrlhf.models.paths") < floor_of("fastrlhf.hybrid_engine.loop") \
        < floor_of("fastrlhf.rlhf.pipeline") < floor_of("fastrlhf.cli")


def test_every_module_imports_in_a_fresh_interpreter():
    names = sorted(modules())
    code = "import importlib, sys\nfor m in sys.argv[1:]:\n    importlib.import_module(m)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
