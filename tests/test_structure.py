"""The project's own modules import each other without a circle (top-level and function-level imports alike),
and no integration imports another one."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"deqfusion_core": "deqfusion_core", "deqfusion_adapters": "adapters", "deqfusion_patches": "patches",
            "deqfusion_compat": "compat"}


def modules() -> dict[str, Path]:
    found = {}
    for name, folder in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [name, *path.relative_to(ROOT / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports anywhere in its file (``from x import y`` counts x.y if a module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in known and t != name}
    return out


def test_no_import_circle():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    # a package's __init__ importing its own submodules is not a circle of the submodules' making
    graph = {n: {t for t in ts if not (found[n].name == "__init__.py" and t.startswith(n + "."))} for n, ts in graph.items()}
    state, cycles = {}, []

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import circles: " + "; ".join(" -> ".join(c) for c in cycles)
    assert len(graph) > 40                     # the walk found the project's modules


def test_integrations_import_only_the_core_and_compat():
    found = modules()
    for name, path in found.items():
        top = name.split(".")
        if top[0] not in ("deqfusion_adapters", "deqfusion_patches") or len(top) < 2:
            continue
        own = ".".join(top[:2])
        for target in imports(name, path, set(found)):
            assert target.startswith((own, "deqfusion_core", "deqfusion_compat")), f"{name} imports {target}"
    for name, path in found.items():         # the core imports no integration and no shim
        if name.startswith("deqfusion_core"):
            assert all(t.startswith("deqfusion_core") for t in imports(name, path, set(found))), name
