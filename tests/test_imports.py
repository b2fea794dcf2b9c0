"""The import graph of the sources goes one way: a module imports only from its own layer or the
layers below it, and no two modules import each other (directly or through others).

The layers, lowest first (the one place this order is written):
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"moshax": ROOT / "src" / "moshax", "data_pipeline": ROOT / "data_pipeline"}

LAYERS = [
    ["data_pipeline"],  # files -> records; knows nothing of models
    ["moshax.config", "moshax.registry", "moshax.host_malloc"],  # typed configs, the model-kind table (lazy names only), the CPU allocator setting
    ["moshax.kernels", "moshax.parallel"],  # attention kernels; mesh, sharding rules, multi-host
    ["moshax.layers"],  # shared blocks (norms, attention, mlp, transformer, convs, losses)
    ["moshax.models"],  # Helium, the Moshi LM, Mimi: compositions of layers
    ["moshax.interop", "moshax.checkpoint", "moshax.inference", "moshax.evaluation"],  # models in use
    ["moshax.serve"],  # the chat server: batched conversations over websockets (inference only)
    ["moshax.training"],  # tasks, trainer, optimizer, metrics, AOT compile of the train step
    ["moshax.launch"],  # TPU VM / GKE launchers
    ["moshax.commands", "moshax.cli", "moshax"],  # the CLI: parse, call the library, print
]
__doc__ += "\n".join(f"    {i}. {', '.join(group)}" for i, group in enumerate(LAYERS))


def _module_name(path: Path) -> str:
    for pkg, root in SOURCES.items():
        if root in path.parents or path.parent == root:
            rel = path.relative_to(root).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            return ".".join(parts)
    raise ValueError(path)


def _imports(path: Path, module: str) -> set[str]:
    """Every project module ``path`` imports, at the top or inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            names = [name] + [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            if n.split(".")[0] in SOURCES:
                out.add(n)
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module_name(p): p for root in SOURCES.values() for p in root.rglob("*.py")}
    graph = {}
    for mod, path in files.items():
        deps = set()
        for name in _imports(path, mod):
            while name and name not in files:  # `from pkg import name` where name is not a module
                name = name.rpartition(".")[0]
            if name and name != mod:
                deps.add(name)
        graph[mod] = deps
    return graph


def _layer(module: str) -> int:
    best, best_len = None, -1
    for i, group in enumerate(LAYERS):
        for prefix in group:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = i, len(prefix)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it there")
    return best


def test_no_upward_imports():
    bad = []
    for mod, deps in sorted(_graph().items()):
        for dep in sorted(deps):
            if dep in ("moshax", "data_pipeline") and mod.startswith(dep):
                continue  # a package's own __init__
            if _layer(dep) > _layer(mod):
                bad.append(f"{mod} (layer {_layer(mod)}) imports {dep} (layer {_layer(dep)})")
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "active"
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "active":
                cycles.append(" -> ".join(stack[stack.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, stack)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


@pytest.mark.parametrize("bad_source, expected", [
    ("from moshax.training.trainer import Trainer\n", "upward"),
])
def test_checker_catches_an_upward_import(tmp_path, monkeypatch, bad_source, expected):
    """The check itself fails on a planted violation (a layer-4 model importing the trainer)."""
    fake_root = tmp_path / "moshax"
    (fake_root / "models").mkdir(parents=True)
    (fake_root / "training").mkdir()
    (fake_root / "__init__.py").write_text("")
    (fake_root / "models" / "__init__.py").write_text("")
    (fake_root / "models" / "bad.py").write_text(bad_source)
    (fake_root / "training" / "__init__.py").write_text("")
    (fake_root / "training" / "trainer.py").write_text("from moshax.models.bad import x\n")
    monkeypatch.setitem(SOURCES, "moshax", fake_root)
    monkeypatch.setitem(SOURCES, "data_pipeline", tmp_path / "none")
    with pytest.raises(AssertionError, match="upward imports"):
        test_no_upward_imports()
    with pytest.raises(AssertionError, match="import cycles"):
        test_no_import_cycles()
