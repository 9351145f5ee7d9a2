"""Request bodies from outside: read within a size limit, parsed bounded and strict.

FastAPI's own body parsing calls ``json.loads`` unbounded (a 2 KB body nested 1,000
levels deep raises RecursionError, a 500) and takes NaN; every JSON body any app
accepts is therefore read and parsed here instead, then validated by pydantic.
"""

from __future__ import annotations

from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from bridge import strictjson
from bridge.errors import InputError, MalformedBodyError, PayloadError, PayloadTooLargeError

__all__ = ["parse_model", "read_body"]

M = TypeVar("M", bound=BaseModel)


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (413) past ``limit`` without buffering the rest."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise PayloadTooLargeError(int(declared), limit, "request body")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise PayloadTooLargeError(len(body), limit, "request body")
    return bytes(body)


def parse_model(model: type[M], body: bytes) -> M:
    """The body as ``model``: bounded strict JSON first (400 names the limit; a NaN is
    refused with 422, the caller can fix it), then pydantic (422 names the field)."""
    try:
        parsed = strictjson.loads(body)
    except PayloadError as exc:
        raise MalformedBodyError(f"body is {exc}") from None
    if parsed.notes:
        raise InputError(f"body is not strict JSON: {parsed.notes[0]}",
                         field=parsed.notes[0].split(":", 1)[0])
    try:
        return model.model_validate(parsed.value)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        field = ".".join(str(part) for part in errors[0]["loc"]) if errors else None
        message = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in errors[:5]
        )
        raise InputError(message, field=field or None) from exc
