"""The documentation holds: the API docs pages load nothing from outside (an offline gateway
shows them); every link in the Markdown resolves; the README stays short; every setting is
in docs/settings.md; every guarantee names tests that exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import httpx
from fastapi import FastAPI

from bridge.http.api_docs import install_docs


async def test_docs_pages_use_only_their_own_assets() -> None:
    app = FastAPI(title="t", docs_url=None, redoc_url=None)
    install_docs(app)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                 base_url="http://gw") as client:
        for page in ("/docs", "/redoc"):
            html = (await client.get(page)).text
            urls = re.findall(r'(?:src|href)="([^"]+)"|url: *[\'"]([^\'"]+)', html)
            flat = [u for pair in urls for u in pair if u]
            assert flat, page
            assert all(u.startswith("/") for u in flat), (page, flat)  # nothing external
            for url in flat:
                if url.startswith("/static/"):
                    r = await client.get(url)
                    assert r.status_code == 200 and len(r.content) > 500, url


# --- The documents themselves: README.md, CHANGELOG.md, docs/ and the READMEs beside code.

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md")),
             ROOT / "bench/README.md", ROOT / "systemd/README.md",
             ROOT / "certs.example/README.md"]
FENCE = re.compile(r"^(```|~~~)")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


def prose(path: Path) -> list[str]:
    """The lines outside code fences (a `# comment` in a shell block is not a heading)."""
    lines, fenced = [], False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def anchors(path: Path) -> set[str]:
    """The heading anchors GitHub makes: lower case, punctuation dropped, spaces as
    hyphens, a repeated one suffixed -1, -2, ..."""
    seen: dict[str, int] = {}
    out = set()
    for line in prose(path):
        heading = re.match(r"#{1,6} +(.*?) *#* *$", line)
        if not heading:
            continue
        slug = re.sub(r"[^\w\- ]", "", heading.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_every_relative_link_in_the_documents_resolves() -> None:
    broken, checked = [], 0
    for doc in DOCUMENTS:
        for line in prose(doc):
            for target in LINK.findall(line):
                if re.match(r"[a-z][\w+.-]*:", target):  # https:, mailto:, file:
                    continue
                checked += 1
                file, _, anchor = target.partition("#")
                dest = (doc.parent / file).resolve() if file else doc
                found = dest.exists() and (not anchor or (dest.suffix == ".md"
                                                          and anchor in anchors(dest)))
                if not found:
                    broken.append(f"{doc.relative_to(ROOT)}: {target}")
    assert checked > 100 and broken == []


def test_the_readme_is_what_a_newcomer_needs() -> None:
    """Under 300 lines, the two commands first, and a link to every docs page."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 300
    assert "## First two commands" in text and "make run" in text and "make test" in text
    unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md"))
                if f"(docs/{p.name})" not in text]
    assert unlinked == []


def test_every_setting_is_in_docs_settings() -> None:
    """Each environment name either service reads, and each alias, has its row or line."""
    from callback_server import settings as cloud
    from edge_agent import settings as edge
    text = (ROOT / "docs/settings.md").read_text(encoding="utf-8")
    names = {*edge.ENV_MAP, *edge.ALIASES, *cloud.ENV_MAP, *cloud.ALIASES}
    assert len(names) > 60
    assert sorted(n for n in names if f"`{n}`" not in text) == []


# `tests/x.py`, `tests/x.py::test_y`, and `::test_z` continuing the last file named.
TEST_REFERENCE = re.compile(r"`(tests/[\w/]+\.py)?(?:::(\w+))?`")


def functions_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_guarantee_names_tests_that_exist() -> None:
    """A renamed or deleted test must take its guarantee line with it, and a guarantee
    without a test is not one."""
    text = (ROOT / "docs/guarantees.md").read_text(encoding="utf-8")
    missing: list[str] = []
    named = 0
    current: Path | None = None
    for match in TEST_REFERENCE.finditer(text):
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
    guaranteed = text.split("## What is guaranteed", 1)[1].split("\n## ", 1)[0]
    bullets = re.split(r"(?m)^- ", guaranteed)[1:]
    assert len(bullets) > 40
    assert [b[:60] for b in bullets if not re.search(r"`tests/[\w/]+\.py", b)] == []
