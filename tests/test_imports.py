"""The house's import rules (../shared/DESIGN.md, "The house"), read from the source with `ast`:
every import of a project module counts, at the top of a file or inside a function.

- no import circles between the project's modules;
- imports run one way: `memory` imports nothing of the project, `models` nothing above it
  (`train`, `eval`, `benchmarks`, `colabs`), `train` nothing of `eval`, `benchmarks`, `colabs`,
  and `eval` nothing of `benchmarks` or `colabs`.
"""
import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("memory", "models", "train", "eval", "benchmarks", "colabs")
# package → the packages it must not import
FORBIDDEN = {
    "memory": {"models", "train", "eval", "benchmarks", "colabs"},
    "models": {"train", "eval", "benchmarks", "colabs"},
    "train": {"eval", "benchmarks", "colabs"},
    "eval": {"benchmarks", "colabs"},
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _imports(path: pathlib.Path, modules: dict) -> set[str]:
    """The project modules `path` imports (`from a import b` counts a.b when it is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        for n in names:
            while n and n not in modules:
                n = n.rpartition(".")[0]
            if n:
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    assert _cycles(_graph()) == []


def test_cycle_finder_finds_a_circle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(g) == [["a", "b", "c"]]


def test_imports_run_one_way():
    bad = sorted(f"{m} imports {d}" for m, deps in _graph().items() for d in deps
                 if d.split(".")[0] in FORBIDDEN.get(m.split(".")[0], ()))
    assert bad == []
