"""The README's guarantees name their tests: every test file and test it names exists
(a renamed or deleted test must take its guarantee line with it)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `tests/x.py`, `tests/x.py::test_y`, and `::test_z` continuing the last file named.
REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_the_readme_names_exists() -> None:
    missing: list[str] = []
    named = 0
    current: Path | None = None
    for match in REFERENCE.finditer((ROOT / "README.md").read_text(encoding="utf-8")):
        file, name = match.groups()
        if file is None and name is None:
            continue
        if file is not None:
            current = ROOT / file
            if not current.exists():
                missing.append(file)
                continue
        if name is not None:
            named += 1
            if current is None or not current.exists() or name not in functions_in(current):
                missing.append(f"{current}::{name}")
    assert named > 20 and missing == []
