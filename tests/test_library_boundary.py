"""One owner of library state: outside keylocked/library, code uses the library's public API only
(no private ``Library`` member, no table, audit-chain, key-hash or blob-store module)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "keylocked" / "library"
# The modules that hold the library's state: tables and the write lock, the audit hash chain,
# key hashing, the blob store. Only keylocked/library reaches them (its tests may).
STATE_MODULES = {"db", "audit", "keys", "store"}


def private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")


def imported_module(node: ast.ImportFrom, path: Path) -> str:
    """The absolute module of a ``from X import ...`` in the file at ``path`` (relative ones resolved)."""
    if not node.level:
        return node.module or ""
    package = list(path.relative_to(ROOT).parent.parts)
    package = package[: len(package) - node.level + 1]
    return ".".join([*package, node.module] if node.module else package)


def violations(path: Path, source: str | None = None) -> list[str]:
    """What the file at ``path`` (or ``source`` read as if it were there) reaches of the library's insides."""
    where, found = path.relative_to(ROOT), []
    for node in ast.walk(ast.parse(source if source is not None else path.read_text())):
        if isinstance(node, ast.Attribute) and private(node.attr) and "librar" in ast.unparse(node.value).lower():
            found.append(f"{where}:{node.lineno} uses .{node.attr}")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            else:
                module = imported_module(node, path)
                modules = [module] + [f"{module}.{alias.name}" for alias in node.names]
            for module in modules:
                parts = module.split(".")
                if parts[:2] == ["keylocked", "library"] and len(parts) > 2:
                    if parts[2] in STATE_MODULES or private(parts[2]):
                        found.append(f"{where}:{node.lineno} imports {module}")
    return found


def outside_the_library() -> list[Path]:
    files = [p for p in sorted((ROOT / "keylocked").rglob("*.py")) if LIBRARY not in p.parents]
    return files + sorted((ROOT / "benchmarks").rglob("*.py"))


def test_the_check_finds_what_it_forbids():
    as_if = ROOT / "keylocked" / "serving" / "access.py"  # relative imports resolve from keylocked/serving
    for line in (
        "from ..library.db import write_session",
        "from ..library import audit",
        "from keylocked.library import _Refusal",
        "import keylocked.library.store",
        "caller = self.library._authenticate(session, key, 'http.auth')",
        "state.access.library._operation('x', key, 'use')",
        "Library.open(folder)._check_schema(True)",
    ):
        assert violations(as_if, line), line
    fine = "from ..library import AccessDenied, Library\nfrom ..library.resolve import register_version\n"
    assert violations(as_if, fine + "caller = self.library.authenticate(key)\nencodings._version") == []


def test_nothing_outside_the_library_touches_its_state_or_private_members():
    found = [line for path in outside_the_library() for line in violations(path)]
    assert not found, "\n".join(found)
