"""Size and shape of the Python code: lines per module, the longest functions, and the number
of tuple-packed assignments (``a, b = x, y``), counted on the syntax tree.

    python tools/code_metrics.py [PATH ...]      (default: xllm)
"""
import argparse
import ast
import sys
from pathlib import Path


def python_files(paths):
    for path in map(Path, paths):
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*.py") if "_build" not in p.parts)
        else:
            yield path


def code_lines(text):
    """Lines that hold something other than blanks."""
    return sum(1 for line in text.splitlines() if line.strip())


def is_tuple_packed(node):
    """An assignment that binds several names at once: ``a, b = ...`` or ``a = b = ...``."""
    if isinstance(node, ast.Assign):
        if len(node.targets) > 1:
            return True
        return isinstance(node.targets[0], (ast.Tuple, ast.List))
    return False


def functions(tree):
    """(qualified name, lines) of every function and method."""
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                name = prefix + child.name
                found.append((name, child.end_lineno - child.lineno + 1))
                visit(child, name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
            else:
                visit(child, prefix)
    visit(tree, "")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", default=["xllm"])
    parser.add_argument("--top", type=int, default=5, help="longest functions to list")
    args = parser.parse_args(argv)
    total = 0
    packed = 0
    longest = []
    rows = []
    for path in python_files(args.paths):
        text = path.read_text()
        tree = ast.parse(text)
        lines = code_lines(text)
        total += lines
        packed_here = sum(1 for node in ast.walk(tree) if is_tuple_packed(node))
        packed += packed_here
        rows.append((lines, packed_here, str(path)))
        longest += [(n, f"{path}:{name}") for name, n in functions(tree)]
    for lines, packed_here, path in sorted(rows, reverse=True):
        print(f"{lines:6d} {packed_here:4d}  {path}")
    print(f"{total:6d} {packed:4d}  total (non-blank lines, tuple-packed assignments)")
    print("longest functions (lines):")
    for n, where in sorted(longest, reverse=True)[:args.top]:
        print(f"{n:6d}  {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
