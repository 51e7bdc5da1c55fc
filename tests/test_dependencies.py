"""Honest dependencies: every third-party module firetitan imports is declared in
pyproject.toml (runtime dependencies, or the ``local`` extra for the torch engine),
and every declared runtime dependency is imported somewhere in firetitan."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _declared(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!\[; ]", r, maxsplit=1)[0].lower() for r in requirements}


def _imported_distributions() -> dict[str, set[str]]:
    """Distribution -> the firetitan modules importing it (any import, lazy included)."""
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {}
    for path in (ROOT / "firetitan").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                # _typeshed: the standard library's type stubs (for annotations only)
                if top in ("firetitan", "_typeshed") or top in sys.stdlib_module_names:
                    continue
                # google is a namespace that several distributions share
                dists = ["protobuf"] if name.startswith("google.protobuf") else owners.get(top)
                assert dists, f"{path}: {name} belongs to no installed distribution"
                for dist in dists:
                    found.setdefault(dist.lower(), set()).add(str(path.relative_to(ROOT)))
    return found


def test_imports_and_declarations_agree() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = _declared(project["dependencies"])
    local = _declared(project["optional-dependencies"]["local"])
    imported = _imported_distributions()
    undeclared = {d: sorted(m) for d, m in imported.items() if d not in runtime | local}
    assert undeclared == {}
    unused = sorted(runtime - set(imported))
    assert unused == [], f"declared but imported nowhere in firetitan: {unused}"
