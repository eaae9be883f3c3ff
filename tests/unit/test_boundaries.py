"""The package boundaries of shared/DESIGN.md, checked on the source (every import, including the
ones inside functions): `qat/` imports nothing of ours; `data/` nothing of ours but itself;
`train/` never `sandbox_env/`; no production module imports the tests; no import cycle between
modules, counting function-level imports (they hide cycles from Python, not from readers)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("qat", "data", "sandbox_env", "train")
ALLOWED = {"qat": {"qat"}, "data": {"data"}, "train": {"train", "data", "qat"},
           "sandbox_env": {"sandbox_env", "data", "qat"}}
OURS = set(PACKAGES) | {"tests", "scripts"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports, anywhere in the file (relative imports resolved)."""
    here = _module_name(path).split(".")
    pkg = here if path.name == "__init__.py" else here[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            # `from pkg import mod` imports pkg.mod when that is a module of ours
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if _exists(sub) else base)
    return {m for m in out if m.split(".")[0] in OURS}


def _exists(module: str) -> bool:
    p = ROOT.joinpath(*module.split("."))
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def _graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    return {_module_name(p): _imports(p) for p in files}


def test_packages_import_only_what_the_design_allows():
    bad = [(m, i) for m, imps in _graph().items() for i in sorted(imps)
           if i.split(".")[0] not in ALLOWED[m.split(".")[0]]]
    assert not bad, "imports across the package boundaries of shared/DESIGN.md:\n" + "\n".join(f"  {m} -> {i}" for m, i in bad)


def test_no_import_cycles():
    graph = _graph()

    def resolve(m):  # an import of a package means its __init__; of a name in a module, that module
        while m and m not in graph:
            m = m.rpartition(".")[0]
        return m

    edges = {m: {resolve(i) for i in imps} - {m, ""} for m, imps in graph.items()}
    # a package's __init__ re-exporting its submodules is not a cycle with them
    edges = {m: {i for i in out if not (i.startswith(m + ".") and _exists(m) and (ROOT / m.replace(".", "/")).is_dir())}
             for m, out in edges.items()}
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                cycles.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The scan must find what Python only runs later: an import inside a function, a relative one."""
    p = ROOT / "qat" / "export.py"
    imps = _imports(p)
    assert any(i.startswith("qat.") for i in imps), imps  # qat.export imports its siblings relatively
    src = ROOT / "sandbox_env" / "inference" / "loading.py"
    assert "qat.load" in _imports(src) or any(i.startswith("qat") for i in _imports(src))
