"""The project's edges (README, Development), read from the source with `ast` — no import, no Ray:

- the package is in layers, and no module imports a module of a higher layer (function-level imports
  included). Bottom to top (LAYERS below names every module):
  1. foundation: what every layer shares, Ray-free — the package (its version), config, mode_ray/run_root/
     (a run's layout, file systems and markers, ownership, the registry of experts in service, model names,
     training-compute bookkeeping), mode_ray/samples/ (reading shards, the sample rules, reject reasons),
     mode_ray/console/progress (the console, stage lines), mode_ray/ray_env/resources (what a stage asks of a
     cluster);
  2. algorithms: plain-Python computation, Ray-free — mode_ray/models/, mode_ray/train/ but ray_adapter,
     mode_ray/eval/, kmeans, mode_ray/routing/ (the weights and the task router), encoders,
     samples/hash_sample, mode_ray/demo/ (the demo datasets);
  3. Ray adapters: what puts the algorithms on Ray — ray_env/runtime (the cluster), console/progress_bars (a
     named actor the workers report to), train/ray_adapter (Ray Train's worker entry), mode_ray/data/ (Ray
     Data: reads, the decoded-input cache, rank streams, MCL plans), mode_ray/serve/ (the Serve app);
  4. runner: the job plans, the DAG of jobs and one job's trial, mode_ray/runner/;
  5. stages: the Ray drivers of the pipeline's stages, mode_ray/stages/;
  6. entry points: pipeline, cli;
- Ray is imported only by the Ray adapters, the runner and the stages (and jobs/, outside the package);
- mode_ray/serve/ never imports mode_ray.stages;
- no import cycle between mode_ray's modules, function-level imports included (those under
  `if TYPE_CHECKING:` never run, so they do not count);
- no function or method in mode_ray/ is longer than 60 lines.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.conftest import REPO

PACKAGE = "mode_ray"
ROOT = Path(REPO) / PACKAGE
# Bottom to top (the docstring says what each holds). A name stands for a module and, for a package, every
# module under it; the longest name that matches wins (mode_ray.train.ray_adapter over mode_ray.train), and
# the package itself, `mode_ray`, stands only for its __init__.
LAYERS: dict[str, tuple[str, ...]] = {
    "foundation": (
        "mode_ray",
        "mode_ray.config",
        "mode_ray.console",  # but progress_bars
        "mode_ray.ray_env",  # resources; runtime is an adapter
        "mode_ray.run_root",
        "mode_ray.samples",  # but hash_sample
    ),
    "algorithms": (
        "mode_ray.demo",
        "mode_ray.encoders",
        "mode_ray.eval",
        "mode_ray.kmeans",
        "mode_ray.models",
        "mode_ray.routing",
        "mode_ray.samples.hash_sample",
        "mode_ray.train",
    ),
    "Ray adapters": (
        "mode_ray.console.progress_bars",
        "mode_ray.data",
        "mode_ray.ray_env.runtime",
        "mode_ray.serve",
        "mode_ray.train.ray_adapter",
    ),
    "runner": ("mode_ray.runner",),
    "stages": ("mode_ray.stages",),
    "entry points": ("mode_ray.cli", "mode_ray.pipeline"),
}
RAY_ALLOWED = (*LAYERS["Ray adapters"], *LAYERS["runner"], *LAYERS["stages"])
MAX_FUNCTION_LINES = 60


@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    file: str  # its path, relative to the repository
    line: int
    target: str  # the imported module as written (`from a.b import c`: a.b.c when that is a module, else a.b)


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@cache
def sources() -> dict[str, tuple[str, ast.Module]]:
    """module name → (file relative to the repository, its syntax tree), for every module of the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        out[module_name(path)] = (str(path.relative_to(REPO)), ast.parse(path.read_text(), filename=str(path)))
    return out


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(node: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement under `node`, at any depth, except the bodies of `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import | ast.ImportFrom):
            found.append(child)
        elif isinstance(child, ast.If) and _type_checking(child):
            found += _import_nodes(ast.Module(body=child.orelse, type_ignores=[]))
        else:
            found += _import_nodes(child)
    return found


def _base(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    """The absolute module a `from … import` names, relative imports resolved."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    anchor = parts if is_package else parts[:-1]
    anchor = anchor[: len(anchor) - (node.level - 1)]
    return ".".join([*anchor, *([node.module] if node.module else [])])


@cache
def imports() -> list[Import]:
    """Every import of every module of the package (`from __future__` left out)."""
    modules = sources()
    out = []
    for module, (file, tree) in modules.items():
        is_package = file.endswith("__init__.py")
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                out += [Import(module, file, node.lineno, alias.name) for alias in node.names]
                continue
            base = _base(module, node, is_package)
            if base == "__future__":
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append(Import(module, file, node.lineno, sub if sub in modules else base))
    return out


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _listing(rows: list[str]) -> str:
    return "\n  " + "\n  ".join(rows)


def _layer(module: str) -> int | None:
    """The index in LAYERS of the layer that holds `module`, None if none does."""
    best, found = -1, None
    for index, members in enumerate(LAYERS.values()):
        for name in members:
            holds = module == name or (name != PACKAGE and module.startswith(name + "."))
            if holds and len(name) > best:
                best, found = len(name), index
    return found


def test_every_module_is_in_a_layer():
    modules = sources()
    unplaced = [m for m in modules if _layer(m) is None]
    stale = [name for members in LAYERS.values() for name in members if name not in modules]
    assert not unplaced, "modules in no layer (add each to LAYERS, and to the docstring):" + _listing(unplaced)
    assert not stale, "LAYERS names modules that do not exist:" + _listing(stale)


def test_no_import_points_up_the_layers():
    names = list(LAYERS)
    offenders = []
    for i in imports():
        mine, theirs = _layer(i.module), _layer(i.target)  # the target by its name: it may be gone (moved)
        if mine is not None and theirs is not None and theirs > mine:
            offenders.append(f"{i.file}:{i.line}: {i.module} ({names[mine]}) imports {i.target} ({names[theirs]})")
    offenders = list(dict.fromkeys(offenders))
    title = "imports pointing up the layers (" + " < ".join(names) + "), function-level ones included:"
    assert not offenders, title + _listing(offenders)


def test_ray_is_imported_only_by_the_ray_layers():
    offenders = list(
        dict.fromkeys(
            f"{i.file}:{i.line}: {i.module} imports {i.target}"
            for i in imports()
            if _within(i.target, ("ray",)) and not _within(i.module, RAY_ALLOWED)
        )
    )
    allowed = ", ".join(RAY_ALLOWED)
    assert not offenders, f"Ray imported outside {allowed} (algorithms stay plain Python):" + _listing(offenders)


def test_serve_never_imports_stages():
    offenders = [
        f"{i.file}:{i.line}: {i.module} imports {i.target}"
        for i in imports()
        if _within(i.module, ("mode_ray.serve",)) and _within(i.target, ("mode_ray.stages",))
    ]
    assert not offenders, "mode_ray/serve/ imports mode_ray.stages:" + _listing(offenders)


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
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
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def test_no_import_cycles():
    modules = sources()
    edges = [i for i in imports() if i.target in modules]
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for i in edges:
        graph[i.module].add(i.target)
    cycles = [c for c in _strongly_connected(graph) if len(c) > 1 or c[0] in graph[c[0]]]
    rows = []
    for component in cycles:
        members = set(component)
        rows.append("cycle: " + " ↔ ".join(component))
        rows += list(
            dict.fromkeys(
                f"  {i.file}:{i.line}: {i.module} imports {i.target}"
                for i in edges
                if i.module in members and i.target in members
            )
        )
    assert not cycles, "import cycles between mode_ray modules (function-level imports included):" + _listing(rows)


def test_no_function_is_longer_than_60_lines():
    offenders = []
    for file, tree in sources().values():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    offenders.append(f"{file}:{node.lineno}: {node.name} ({length} lines)")
    title = f"functions over {MAX_FUNCTION_LINES} lines (split them into named helpers):"
    assert not offenders, title + _listing(offenders)


def test_the_checks_see_the_edges():
    """The checks above read what they should: function-level imports, submodules named by `from … import`,
    imports under TYPE_CHECKING left out."""
    found = {(i.module, i.target) for i in imports()}
    assert ("mode_ray.stages.evaluate", "ray") in found  # imported inside functions
    assert ("mode_ray.stages.evaluate", "mode_ray.eval.moe_usage") in found  # `from mode_ray.eval import moe_usage`
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import hidden\nelse:\n    import shown\n"
        "def f():\n    import inner\n"
    )
    assert [getattr(n, "module", None) or n.names[0].name for n in _import_nodes(tree)] == ["typing", "shown", "inner"]
    assert _strongly_connected({"a": {"b"}, "b": {"a", "c"}, "c": set()}) == [["c"], ["a", "b"]]
    layers = list(LAYERS)
    assert layers[_layer("mode_ray")] == "foundation" and layers[_layer("mode_ray.train.loop")] == "algorithms"
    assert layers[_layer("mode_ray.train.ray_adapter")] == "Ray adapters" and _layer("mode_ray_other") is None
