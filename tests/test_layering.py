"""The package's shape: folders in layers, each importing only the layers below it, no
import cycles, and no imports inside functions except the heavy optional dependencies
loaded on first use."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "dit_compress"

# lowest first; a module may import its own layer and the layers before it
LAYERS = [
    {"errors", "progress", "report", "hashing", "torchfiles"},
    {"checks", "outputs"},
    {"config"},
    {"assets"},
    {"model"},
    {"diffusion"},
    {"data"},
    {"formats"},
    {"train"},
    {"compress"},
    {"evaluate"},
    {"commands"},
    {"pipeline"},
    {"cli"},
]
LEVEL = {name: i for i, layer in enumerate(LAYERS) for name in layer}
# imported on first use only: heavy to import and needed by few code paths
LAZY_OK = {"diffusers", "torchdiffeq", "torch_fidelity", "matplotlib", "peft", "sklearn", "huggingface_hub",
           "accelerate", "psutil", "transformers", "tokenizers"}


def _modules():
    for p in sorted(PKG.rglob("*.py")):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        ispkg = parts[-1] == "__init__"
        if ispkg:
            parts = parts[:-1]
        yield ".".join(parts), ispkg, ast.parse(p.read_text())


def _imports(mod: str, ispkg: bool, tree):
    """(target module, line, at module top) for every import; targets resolved to names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, node.lineno, node.col_offset == 0
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".")[: len(mod.split(".")) - (node.level - (1 if ispkg else 0))]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for a in node.names:  # `from . import hub` imports the submodule
                yield (f"{target}.{a.name}" if node.module is None else target), node.lineno, node.col_offset == 0


def _top(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if parts[0] == "dit_compress" and len(parts) > 1 else None


def test_every_folder_is_in_a_layer():
    names = {p.stem if p.is_file() else p.name for p in PKG.iterdir() if not p.name.startswith(("_", "."))
             and (p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").exists()))}
    assert names <= set(LEVEL), f"not in a layer: {sorted(names - set(LEVEL))}"


def test_no_upward_imports_and_no_function_level_imports():
    problems = []
    for mod, ispkg, tree in _modules():
        src_top = _top(mod)
        for target, line, at_top in _imports(mod, ispkg, tree):
            if not at_top and target.split(".")[0] not in LAZY_OK:
                problems.append(f"{mod}:{line} imports {target} inside a function")
            dst_top = _top(target)
            if src_top is None or dst_top is None:  # the package facade may import anything
                continue
            if LEVEL[dst_top] > LEVEL[src_top]:
                problems.append(f"{mod}:{line} imports {target} from a higher layer")
    assert not problems, "\n".join(problems)


def test_no_import_cycles():
    graph = {}
    known = set()
    for mod, ispkg, tree in _modules():
        known.add(mod)
        graph[mod] = {t for t, _, _ in _imports(mod, ispkg, tree) if t.startswith("dit_compress.")}
    # an import of a name inside a module resolves to that module
    graph = {m: {t if t in known else t.rsplit(".", 1)[0] for t in ts} & known for m, ts in graph.items()}
    graph.pop("dit_compress", None)
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if n == "dit_compress":
                continue
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
