"""The package's import graph: every module imports on its own, there are no import cycles, and
lower layers never import higher ones.

The static graph is read from the source (AST): every ``import`` / ``from ... import`` of an
attnlab module, at module level AND inside functions (a lazy import dodges a cycle at run time but
is still a dependency), plus ``"attnlab.x:func"`` registry strings in modules that use
``importlib``. Imports under ``if TYPE_CHECKING:`` are annotations only and are not edges.
``import attnlab.x`` is an edge to ``attnlab.x`` only (not to the package ``attnlab``).

Layers, low -> high (a module may import its own layer and any lower one):

    base      _version, errors, paths, fsutil, progress (leaves: no torch models, no config)
    config    typed schemas
    quant     pure quantize/dequantize
    cache     cache storage, policies (reads config's attention dims)
    scores    nn/attention/functional.py: pure score math (torch only), shared by the eager
              reference and the kernels' cached reference
    kernels   decode/prefill kernels and dispatch over caches; below nn, because attention
              layers call them with a cache (model code calling kernels is intended)
    nn        layers; model: decoder, stats; summary (terminal tables of model stats)
    data      tokenizers, token files
    train     loop, checkpoints
    runfolder what a run folder holds (config, tokenizer, held-out data, policy, checkpoints);
              under everything that reads one
    infer     decode runtime, generation; verify (teacher/student agreement: uses infer, train)
    convert   HF / llama2.c import-export, surgery
    api       build_model / load any model source (over convert + runfolder)
    manifest  YAML -> Plan (reads model sources through convert)
    bench     benchmarks (load through api, run folders through runfolder)
    report    report folders from run folders and bench records
    run       run, upcycling (run executes plans and hands mode runs to upcycling, passing it
              the trainer), provenance and the package ``attnlab`` itself (re-exports api)
    cli       cli, __main__

``ALLOWED_UPWARD`` lists the few upward edges that exist today, each with its reason.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "attnlab"

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("attnlab._version", "attnlab.errors", "attnlab.paths", "attnlab.fsutil", "attnlab.progress")),
    ("config", ("attnlab.config",)),
    ("quant", ("attnlab.quant",)),
    ("cache", ("attnlab.cache",)),
    ("scores", ("attnlab.nn.attention.functional",)),
    ("kernels", ("attnlab.kernels",)),
    ("nn", ("attnlab.nn",)),
    ("model", ("attnlab.model", "attnlab.summary")),
    ("data", ("attnlab.data",)),
    ("train", ("attnlab.train",)),
    ("runfolder", ("attnlab.runfolder",)),
    ("infer", ("attnlab.infer", "attnlab.verify")),
    ("convert", ("attnlab.convert",)),
    ("api", ("attnlab.api",)),
    ("manifest", ("attnlab.manifest",)),
    ("bench", ("attnlab.bench",)),
    ("report", ("attnlab.report",)),
    ("run", ("attnlab.run", "attnlab.upcycling", "attnlab.provenance", "attnlab")),
    ("cli", ("attnlab.cli", "attnlab.__main__")),
]

#: (importer, imported): why this upward edge is tolerated
ALLOWED_UPWARD = {
    ("attnlab.config.bench", "attnlab.cache.policy"): "a benchmark's policy string is parsed at compile time",
    ("attnlab.config.upcycle", "attnlab.convert.surgery"): "SurgeryConfig.plan() builds convert's SurgeryPlan",
}

#: importing these runs something (``python -m attnlab``)
NOT_IMPORTABLE = {"attnlab.__main__"}


def module_files() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = module_files()


def _known(name: str) -> str | None:
    """The attnlab module ``name`` is, or the closest package/module above it."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> dict[str, int]:
    """attnlab modules imported by ``module`` -> first line number."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: dict[str, int] = {}
    uses_importlib = False

    def add(name: str | None, line: int) -> None:
        target = _known(name) if name else None
        if target and target != module and name.split(".")[0] == "attnlab":
            found.setdefault(target, line)

    def visit(node: ast.AST) -> None:
        nonlocal uses_importlib
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                uses_importlib |= alias.name == "importlib"
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            uses_importlib |= source == "importlib"
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in MODULES else source, node.lineno)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    if uses_importlib:  # registry strings "attnlab.x.y:func" name modules imported on use
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("attnlab."):
                name = node.value.partition(":")[0]
                if name in MODULES:
                    add(name, node.lineno)
    return found


def import_graph() -> dict[str, dict[str, int]]:
    return {module: _imports(module, path) for module, path in MODULES.items()}


def find_cycles(graph: dict[str, dict[str, int]]) -> list[tuple[list[str], list[str]]]:
    """(modules, one cycle through them as a path a -> ... -> a) per strongly connected component
    with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
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
                components.append(component)

    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                connect(v)
    finally:
        sys.setrecursionlimit(old)
    return [(sorted(c), _cycle_in(sorted(c), graph)) for c in components]


def _cycle_in(component: list[str], graph: dict[str, dict[str, int]]) -> list[str]:
    """A shortest cycle through the component's first module (breadth-first)."""
    members, start = set(component), component[0]
    parents: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w == start:  # v -> start closes the cycle
                    path = [v]
                    while parents[path[-1]] is not None:
                        path.append(parents[path[-1]])
                    return path[::-1] + [start]
                if w in members and w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return component  # pragma: no cover - a component always has a cycle


def layer_of(module: str) -> int | None:
    best, best_len = None, -1
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            covers = module == prefix or (prefix != "attnlab" and module.startswith(prefix + "."))
            if covers and len(prefix) > best_len:  # "attnlab" is the package's __init__ only
                best, best_len = rank, len(prefix)
    return best


# ---------------------------------------------------------------- tests
def test_the_graph_sees_lazy_imports():
    """Sanity of the reader: function-level imports count; TYPE_CHECKING ones do not."""
    graph = import_graph()
    assert "attnlab.config.cache" in graph["attnlab.runfolder"]
    assert "attnlab.bench.perplexity" in graph["attnlab.bench.suite"]  # registry string
    assert "attnlab.manifest" not in graph["attnlab.run"]  # TYPE_CHECKING only


def test_no_import_cycles():
    graph = import_graph()
    cycles = find_cycles(graph)
    lines = []
    for component, cycle in cycles:
        steps = [f"{a} -> {b} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])]
        lines.append(f"{len(component)} modules in a cycle ({', '.join(component)}); one of them:\n    "
                     + "\n    ".join(steps))
    assert not cycles, "import cycles among attnlab modules:\n" + "\n".join(lines)


def test_every_module_has_a_layer():
    missing = [m for m in MODULES if layer_of(m) is None]
    assert not missing, f"place these modules in LAYERS (tests/test_layering.py): {missing}"


def test_lower_layers_never_import_higher_ones():
    graph = import_graph()
    bad = []
    for a, targets in sorted(graph.items()):
        for b, line in sorted(targets.items()):
            la, lb = layer_of(a), layer_of(b)
            if la is not None and lb is not None and lb > la and (a, b) not in ALLOWED_UPWARD:
                bad.append(f"{a} ({LAYERS[la][0]}) imports {b} ({LAYERS[lb][0]}) at line {line}")
    assert not bad, "layering violations (low -> high):\n" + "\n".join(bad)


def test_allowed_upward_edges_still_exist():
    """An exception that is no longer needed is removed from the list."""
    graph = import_graph()
    stale = [edge for edge in ALLOWED_UPWARD if edge[1] not in graph.get(edge[0], {})]
    assert not stale, f"remove these from ALLOWED_UPWARD: {stale}"


IMPORT_ALL = r"""
import importlib, sys, traceback
failed = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except BaseException:
        failed.append(name + ":\n" + traceback.format_exc(limit=-3))
print("\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_every_module_imports_in_a_fresh_interpreter():
    """One new interpreter imports every module (in name order, so packages come before their
    modules and a module's first importer varies). Without cycles (above), no module can see a
    partially initialized one, whichever is imported first."""
    names = [m for m in MODULES if m not in NOT_IMPORTABLE]
    proc = subprocess.run([sys.executable, "-c", IMPORT_ALL, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, f"modules that fail to import:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert len(names) > 50  # the walk found the package
