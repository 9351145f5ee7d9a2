"""Running a service's main coroutine on the fastest event loop available."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


def run(main: Coroutine[Any, Any, None]) -> None:
    """``asyncio.run`` on uvloop when installed (uvicorn[standard] brings it).

    uvicorn picks uvloop only when it creates the loop itself; our services create it,
    so without this they would serve HTTP on the slower default loop.
    """
    try:
        import uvloop
    except ImportError:
        asyncio.run(main)
        return
    uvloop.run(main)
