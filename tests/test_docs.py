"""The API docs pages load nothing from outside (an offline gateway shows them)."""

from __future__ import annotations

import re

import httpx
from fastapi import FastAPI

from bridge.docs import install_docs


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
