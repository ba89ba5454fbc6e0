"""The layers' import rules (ARCHITECTURE.md), read from every module's source.

Each module's imports are taken from its syntax tree (imports inside functions
too), so a rule can't be broken by an import that runs late.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "primed"

#: Package -> the primed packages and top-level modules it may import.
ALLOWED: dict[str, set[str]] = {
    "primed.errors": set(),
    "primed.formats": {"primed.errors"},
    "primed.wire": {"primed.errors", "primed.wire"},
    "primed.fdpass": {"primed.errors", "primed.wire"},
    "primed.kernel": {"primed.errors", "primed.formats", "primed.wire", "primed.kernel"},
    "primed.daemon": {
        "primed.errors", "primed.formats", "primed.wire", "primed.fdpass", "primed.kernel",
        "primed.daemon",
    },
    "primed.client": {
        "primed.errors", "primed.formats", "primed.wire", "primed.fdpass", "primed.kernel",
        "primed.client",
    },
    "primed.service": {
        "primed.errors", "primed.formats", "primed.wire", "primed.fdpass", "primed.kernel",
        "primed.daemon", "primed.client", "primed.service",
    },
}  # fmt: skip

#: Modules with no I/O in them: what they must never import, of the standard library
#: and of primed. Their rules are testable with byte strings and objects alone.
IO_MODULES = {"trio", "socket", "os", "fcntl", "mmap", "select", "selectors", "asyncio"}
#: The daemon's modules that touch sockets, signals or the kernel.
_DAEMON_IO = {
    "primed.fdpass", "primed.kernel.drm", "primed.kernel.backends", "primed.kernel.heap",
    "primed.kernel.udmabuf", "primed.kernel.dmabuf", "primed.daemon.transport",
    "primed.daemon.process", "primed.daemon.lean", "primed.daemon.systemd",
}  # fmt: skip
SANS_IO: dict[str, set[str]] = {
    "primed.wire": IO_MODULES | {"primed.fdpass", "primed.kernel"},
    "primed.formats": IO_MODULES,
    "primed.kernel.allocation": IO_MODULES | {"primed.kernel.drm", "primed.kernel.backends"},
    "primed.daemon.core": IO_MODULES | _DAEMON_IO,
    "primed.daemon.sessions": IO_MODULES | _DAEMON_IO,
    "primed.daemon.policy": IO_MODULES,
    "primed.daemon.ratelimit": IO_MODULES | _DAEMON_IO,
    "primed.daemon.fairness": IO_MODULES | _DAEMON_IO,
    "primed.client.core": {"trio", "socket", "select", "selectors", "asyncio"}
    | {"primed.client.blocking", "primed.client.trio"},
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports when it runs, as dotted names (``from a import b``
    gives a and a.b). Imports under ``if TYPE_CHECKING:`` never run: they are left out."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in _TYPE_CHECKING:
            for branch in node.orelse:
                visit(branch)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


_TYPE_CHECKING = {"TYPE_CHECKING", "typing.TYPE_CHECKING"}


MODULES = {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _within(name: str, prefixes: set[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer(module: str) -> str | None:
    return next((p for p in ALLOWED if _within(module, {p})), None)


def _target(name: str) -> str | None:
    """The layer an imported name belongs to: ``primed.kernel.drm.Version`` -> primed.kernel."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "primed" and len(parts) > 1 else None


@pytest.mark.parametrize("module", sorted(MODULES))
def test_layer_imports_only_what_it_may(module: str) -> None:
    layer = _layer(module)
    if layer is None:  # primed itself, primed.__main__ and primed.cli may use anything
        return
    targets = {_target(name) for name in _imports(MODULES[module])}
    wrong = sorted(t for t in targets if t is not None and t not in ALLOWED[layer])
    assert not wrong, f"{module} ({layer}) imports {wrong}; see ARCHITECTURE.md"


@pytest.mark.parametrize("prefix", sorted(SANS_IO))
def test_sans_io_modules_do_no_io(prefix: str) -> None:
    modules = [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]
    assert modules, f"no module {prefix}: ARCHITECTURE.md and this test name it"
    for module in modules:
        bad = sorted(n for n in _imports(MODULES[module]) if _within(n, SANS_IO[prefix]))
        assert not bad, f"{module} must do no I/O but imports {bad}"


def test_the_checker_sees_a_violation(tmp_path: Path) -> None:
    """The rules would catch a breach: a module importing trio and the client."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import socket\n"
        "def f():\n    import trio\n    from primed.client import blocking\n"
    )
    found = _imports(sample)
    assert "trio" in found
    assert "socket" not in found  # a type-only import does not run
    assert _target("primed.client.blocking") not in ALLOWED["primed.wire"]
    assert {n for n in found if _within(n, SANS_IO["primed.wire"])} == {"trio"}
