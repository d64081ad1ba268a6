"""The module map (docs/contributing.rst): every module of xllm belongs to one layer, imports go
only to its own layer or lower ones, and no chain of imports comes back to where it started.

Run it alone with ``python -m pytest tests/test_layout.py``."""
import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xllm"

# --- module map: start ---
# Layers from the bottom up. A module may import modules of its own layer and of the layers
# above it in this list, never of a layer below it. A name ending in "." covers a package and
# everything in it.
LAYERS = [
    ("base", ["xllm.errors", "xllm.checks", "xllm.config"]),
    ("kernels", ["xllm._kernels."]),
    ("formats", ["xllm.formats."]),
    ("files", ["xllm.files.", "xllm.hub"]),
    ("tokenizers", ["xllm.tokenizers.", "xllm.chat"]),
    ("model", ["xllm.model."]),
    ("loaders", ["xllm.loaders."]),
    ("engine", ["xllm.engine."]),
    ("api", ["xllm.api", "xllm"]),
    ("commands", ["xllm.generate", "xllm.memory", "xllm.cache", "xllm.random_model",
                  "xllm.serve."]),
]
# --- module map: end ---


def layer_of(module):
    """The index in LAYERS of `module` (a dotted name), or None if no layer names it."""
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or (name.endswith(".") and
                                  (module + ".").startswith(name)):
                return index
    return None


def module_name(path):
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_modules():
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def compiled_modules():
    return {module_name(p) for p in PACKAGE.rglob("*.pyx")}


def is_module(name, modules):
    return name in modules or name in compiled_modules()


def imported_modules(path, name, modules):
    """The xllm modules that `path` (module `name`) imports anywhere in it, functions included."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            # `from pkg import sub` imports the submodule when there is one
            targets = [f"{source}.{alias.name}" if is_module(f"{source}.{alias.name}", modules)
                       else source for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "xllm" or target.startswith("xllm."):
                found.add(target)
    return found


def import_graph():
    modules = python_modules()
    return modules, {name: imported_modules(path, name, modules) for name, path in modules.items()}


def test_every_module_has_a_layer():
    modules, _ = import_graph()
    unmapped = [name for name in modules if layer_of(name) is None]
    assert not unmapped, f"add these modules to LAYERS (and docs/contributing.rst): {unmapped}"


def test_imports_point_down():
    _, graph = import_graph()
    wrong = []
    for name, targets in graph.items():
        for target in targets:
            if layer_of(target) is None or layer_of(target) > layer_of(name):
                wrong.append(f"{name} ({LAYERS[layer_of(name)][0]}) imports {target} "
                             f"({LAYERS[layer_of(target)][0] if layer_of(target) is not None else '?'})")
    assert not wrong, "imports against the module map:\n" + "\n".join(wrong)


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state = {}  # module -> 1 while on the current path, 2 when done
    path = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    _, graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_check_can_fail():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_layer_check_sees_function_level_and_relative_imports(tmp_path):
    source = tmp_path / "xllm" / "model" / "x.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..loaders import thing\n    from . import kv_cache\n")
    found = imported_modules(source, "xllm.model.x", {"xllm.model.kv_cache"})
    assert found == {"xllm.loaders", "xllm.model.kv_cache"}
    assert layer_of("xllm.loaders") > layer_of("xllm.model.x")


KERNEL_SOURCES = sorted((PACKAGE / "_kernels").glob("*.p[xy][xid]")) + \
    sorted((PACKAGE / "_kernels").glob("*.py"))


@pytest.mark.parametrize("path", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernels_import_nothing_of_the_python_layer(path):
    text = path.read_text()
    names = re.findall(r"^\s*(?:from|c?import)\s+(xllm[\w.]*)", text, flags=re.M)
    outside = [n for n in names if not (n == "xllm._kernels" or n.startswith("xllm._kernels."))]
    assert not outside, f"{path.name} imports {outside}"
    relative = re.findall(r"^\s*from\s+(\.\.+)", text, flags=re.M)
    assert not relative, f"{path.name} imports from outside xllm/_kernels"


def test_tests_and_tools_leave_sys_path_alone():
    edits = [str(p.relative_to(ROOT)) for folder in ("tests", "tools")
             for p in sorted((ROOT / folder).glob("*.py"))
             if p.name != "test_layout.py" and re.search(r"sys\.path\.(insert|append)",
                                                        p.read_text())]
    assert not edits, f"these edit sys.path (pyproject.toml's pytest pythonpath covers tools/): {edits}"
