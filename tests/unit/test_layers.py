"""The layering of docs/design.md §3, checked on the source: a module imports only from its own layer
or below; topology and transport never import node; pure modules never import asyncio or zmq."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "demuon"

#: The layer of every module of the package, declared once (docs/design.md §3 and the README
#: point here). A package entry (``demuon.topology``) covers its modules.
LAYERS: dict[str, int] = {
    "demuon.config": 1,
    "demuon.errors": 1,
    "demuon.atomic": 1,
    "demuon.results": 2,
    "demuon.topology": 2,
    "demuon.workloads": 2,
    "demuon.configs": 2,
    "demuon.transport.wire": 2,
    "demuon.transport.wire_errors": 2,
    "demuon.transport.codecs": 2,
    "demuon.transport.kernels": 2,
    "demuon.transport.native": 2,
    "demuon.node.optim": 2,
    "demuon.node.newton_schulz": 2,
    "demuon.node.algorithms": 2,
    "demuon.node.reference": 2,
    "demuon.node.membership": 2,
    "demuon.node.ef21": 2,
    "demuon.transport.base": 3,
    "demuon.transport.zeromq": 3,
    "demuon.transport.inproc": 3,
    "demuon.transport.faults": 3,
    "demuon.transport.security": 3,
    "demuon.node.peer": 4,
    "demuon.node.rounds": 4,
    "demuon.node.observe": 4,
    "demuon.node.gossip": 5,
    "demuon.node.exchange": 5,
    "demuon.node.telemetry": 5,
    "demuon.node.prometheus": 5,
    "demuon.node.checkpoint": 5,
    "demuon.node.status": 5,
    "demuon.node.daemon": 6,
    "demuon.app": 6,
    "demuon.__main__": 6,
}
#: Package markers: matched exactly, never as a prefix, and they import nothing of the package.
MARKERS = ("demuon", "demuon.node", "demuon.transport")
PURE_FORBIDDEN = ("asyncio", "zmq", "uvloop", "aiomqtt")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> int | None:
    if module in MARKERS:
        return 1
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    return None


def imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            raise AssertionError(f"{path}: relative import (write demuon.… so this test sees it)")
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer_of_its_own_or_of_its_package() -> None:
    assert [module_name(p) for p in SOURCES if layer_of(module_name(p)) is None] == []
    # every entry names a module or package that exists (no stale rows)
    names = {module_name(p) for p in SOURCES}
    assert [m for m in LAYERS if m not in names] == []
    assert [
        m
        for m in MARKERS
        if [
            i for i in imports(PACKAGE.parent / m.replace(".", "/") / "__init__.py") if i.startswith("demuon")
        ]
    ] == []


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_a_module_imports_only_from_its_layer_or_below(path: Path) -> None:
    own = layer_of(module_name(path))
    assert own is not None
    upward = sorted(
        name for name in imports(path) if name.startswith("demuon.") and (layer_of(name) or 0) > own
    )
    assert upward == [], f"{module_name(path)} (layer {own}) imports from above: {upward}"


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_pure_modules_do_no_io_and_topology_and_transport_never_import_node(path: Path) -> None:
    name = module_name(path)
    found = imports(path)
    if layer_of(name) == 2:
        assert not [i for i in found if i.split(".")[0] in PURE_FORBIDDEN], f"{name} imports async I/O"
    if name.startswith(("demuon.topology", "demuon.transport")):
        assert not [i for i in found if i.startswith("demuon.node")], f"{name} imports demuon.node"
