"""The package's shape, checked from its source (docs/architecture.md): the folder tree is the
architecture only as long as imports respect it.

Every import counts, including those inside functions and under TYPE_CHECKING: a function-level
import is still a dependency, it only hides a cycle from the interpreter.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "qrproxy"

# Lower layers never import upper ones; a package may import itself and anything below it.
LAYERS = [
    ("qrproxy.logs", "qrproxy.progress"),  # foundations every package may use
    ("qrproxy.config",),
    ("qrproxy.net",),
    ("qrproxy.store",),
    ("qrproxy.index",),
    ("qrproxy.rules",),
    ("qrproxy.query",),
    ("qrproxy.scu",),
    ("qrproxy.jobs",),
    ("qrproxy.scp",),
    ("qrproxy.ops",),
    ("qrproxy.app",),
    ("qrproxy.cli", "qrproxy.__main__"),
]

# What qrproxy still takes from pynetdicom: its SOP class registry and the lists of storage contexts
# and transfer syntaxes. The wire itself (DUL, DIMSE, ACSE, transport, PDUs) is qrproxy's own (net/),
# and no package, net/ included, imports pynetdicom's association machinery.
PYNETDICOM_PUBLIC = {"pynetdicom", "pynetdicom.sop_class", "pynetdicom.presentation"}
PYNETDICOM_NAMES = {"pynetdicom": {"ALL_TRANSFER_SYNTAXES", "AllStoragePresentationContexts",
                                   "StoragePresentationContexts"},
                    "pynetdicom.presentation": {"StoragePresentationContexts", "AllStoragePresentationContexts"}}


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = modules()


def _resolve(name: str, node: ast.ImportFrom, is_pkg: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = name.split(".")
    if not is_pkg:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str) -> list[tuple[str, list[str], int]]:
    """(imported module, names imported from it, line) for every import statement of module `name`."""
    path = MODULES[name]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, node, path.name == "__init__.py")
            for a in node.names:  # `from pkg import module` depends on the module
                if f"{mod}.{a.name}" in MODULES:
                    out.append((f"{mod}.{a.name}", [], node.lineno))
                else:
                    out.append((mod, [a.name], node.lineno))
    return out


def internal(target: str) -> str | None:
    """The qrproxy module an import refers to (the longest known prefix), or None."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for name in MODULES:
        for target, _, _ in imports(name):
            if target.startswith("qrproxy") and (dep := internal(target)) and dep != name and dep != "qrproxy":
                g[name].add(dep)
    return g


def layer(name: str) -> int:
    for i, prefixes in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return i
    raise AssertionError(f"{name} belongs to no layer: add its package to LAYERS and docs/architecture.md")


def package(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2])


def test_every_module_has_a_layer() -> None:
    for name in MODULES:
        if name != "qrproxy":
            layer(name)


def test_no_import_cycle() -> None:
    g = graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                cycles.append(sorted(scc))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_lower_layers_never_import_upper_ones() -> None:
    wrong = []
    for name in MODULES:
        if name == "qrproxy":
            continue
        for target, _, line in imports(name):
            dep = internal(target) if target.startswith("qrproxy") else None
            if dep and dep != "qrproxy" and layer(dep) > layer(name):
                wrong.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {name} imports {dep}")
    assert not wrong, "upward imports (see LAYERS):\n" + "\n".join(wrong)


def test_only_the_cli_imports_app() -> None:
    wrong = [f"{name} imports qrproxy.app" for name in MODULES if not name.startswith("qrproxy.cli")
             for target, _, _ in imports(name) if internal(target) == "qrproxy.app"]
    assert not wrong, "\n".join(wrong)


def test_private_names_stay_in_their_package() -> None:
    wrong = []
    for name in MODULES:
        for target, names, line in imports(name):
            dep = internal(target) if target.startswith("qrproxy") else None
            if dep is None or package(dep) == package(name):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                wrong.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {', '.join(private)} from {dep}")
    assert not wrong, "private names imported across packages:\n" + "\n".join(wrong)


def test_pynetdicom_only_for_its_registry() -> None:
    """No module reaches pynetdicom's association machinery: only the SOP class registry and the
    context / transfer syntax lists (issue 16: qrproxy owns its upper layer)."""
    wrong = []
    for name in MODULES:
        for target, names, line in imports(name):
            if target.split(".")[0] != "pynetdicom":
                continue
            allowed = PYNETDICOM_NAMES.get(target)
            bad = [n for n in names if n.startswith("_") or (allowed is not None and n not in allowed)]
            if target not in PYNETDICOM_PUBLIC or bad or (target == "pynetdicom" and not names):
                wrong.append(f"{MODULES[name].relative_to(PACKAGE.parent)}:{line}: {target} {bad or ''}")
    assert not wrong, "pynetdicom used beyond its registry:\n" + "\n".join(wrong)


@pytest.mark.parametrize("name", sorted(n for n in MODULES if MODULES[n].name == "__init__.py" and n != "qrproxy"))
def test_each_package_says_what_it_owns(name: str) -> None:
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text())) or ""
    assert len(doc.split()) >= 15 and "import" in doc, (
        f"{name}/__init__.py: the docstring says what the package owns and what it may import")


def test_every_package_ships_in_the_wheel() -> None:
    """pyproject lists packages by name (migrations/ is mapped into the wheel as qrproxy.migrations):
    a new subpackage missing there installs without its modules."""
    import tomllib

    listed = set(tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    present = {name for name, path in MODULES.items() if path.name == "__init__.py"}
    assert present <= listed, f"packages missing from pyproject.toml [tool.setuptools] packages: {present - listed}"
