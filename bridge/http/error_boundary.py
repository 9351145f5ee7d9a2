"""The one HTTP error boundary of every app: exception tree -> status, and one body shape.

Every error any app answers, FastAPI's own validation errors and 404/405 included, is
``{"status": "error", "message": str, "timestamp": int, "field"?: str}``. The map from
the exception tree to status lives in ``status_for`` and nowhere else.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from bridge.errors import (
    AuthError,
    BodyTooLargeError,
    CapacityError,
    CommandTimeoutError,
    ConflictError,
    FleetError,
    ForbiddenError,
    InputError,
    MalformedBodyError,
    NotConnectedError,
    NotFoundError,
    OutboxError,
    OutboxFullError,
    OutboxUnwritableError,
    PayloadError,
    PayloadTooLargeError,
    PubackTimeoutError,
    RateLimitedError,
    StoreError,
    StoreFullError,
    TopicError,
    TopicNotAllowedError,
    TransportError,
)

__all__ = ["RETRY_AFTER_SECONDS", "ErrorBody", "describe_errors", "error_body",
           "error_response", "install", "internal_error_response", "json_body", "status_for"]

log = logging.getLogger(__name__)

#: What a 503 asks the client to wait; the outbox or database is expected back by then.
RETRY_AFTER_SECONDS = 5

# Most specific first: the first class ``exc`` is an instance of decides.
_STATUS: tuple[tuple[type[FleetError], int], ...] = (
    (MalformedBodyError, 400),
    (AuthError, 401),
    (ForbiddenError, 403),
    (NotFoundError, 404),
    (ConflictError, 409),
    (BodyTooLargeError, 413),
    (RateLimitedError, 429),
    (CapacityError, 503),
    (InputError, 422),
    (TopicNotAllowedError, 403),
    (TopicError, 422),
    (PayloadTooLargeError, 413),
    (PayloadError, 422),
    (CommandTimeoutError, 504),
    (PubackTimeoutError, 504),
    (NotConnectedError, 503),
    (TransportError, 502),
    (OutboxError, 503),
    (StoreError, 503),
)


class ErrorBody(BaseModel):
    """The one error body, as the OpenAPI schema of every error status."""

    status: Literal["error"]
    message: str
    timestamp: int
    field: str | None = None


#: What each error status means wherever a route does not say it better.
_MEANING = {400: "Body unreadable (not JSON, too deep, bad bytes)",
            401: "No key, or one this server does not know",
            403: "The key may not do this (its role or its orgs)",
            404: "Not found (or another org's: never confirmed)",
            409: "Conflicts with the current state",
            413: "Body too large", 422: "A parameter or body field is invalid",
            429: "Too many requests", 500: "A bug (logged with its traceback)",
            502: "The broker refused it", 503: "Unavailable now; retry after Retry-After",
            504: "Timed out waiting for an answer"}
_ERROR_REF = {"$ref": "#/components/schemas/ErrorBody"}
_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait before retrying",
                                "schema": {"type": "integer", "minimum": 1}}}


def describe_errors(schema: dict[str, Any], common: Iterable[int] = (),
                    public: Iterable[str] = ()) -> dict[str, Any]:
    """``schema`` (an app's OpenAPI, changed in place) with the boundary's truth: every
    error status has the one body shape (a 503 its ``Retry-After``), every operation may
    answer 422 and 500, one with a path parameter 404, and the ``common`` statuses (the
    key checks) on every path not in ``public``. Done once per app, so no route repeats
    it."""
    schema.setdefault("components", {}).setdefault("schemas", {})["ErrorBody"] = \
        ErrorBody.model_json_schema()
    schemas = schema["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)  # FastAPI's {"detail": [...]}: this boundary never sends it
    public = set(public)
    for path, operations in schema.get("paths", {}).items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            wanted = [422, 500, *(() if path in public else common)]
            if "{" in path:
                wanted.append(404)  # the path names something: it may not be there
            for status in wanted:
                responses.setdefault(str(status), {})
            for status, response in list(responses.items()):
                if not status.isdigit() or int(status) < 400:
                    continue
                # a copy: a route's openapi_extra is merged in by reference, and a router
                # mounted on two apps would otherwise share it between their schemas
                response = responses[status] = dict(response)
                response.setdefault("description", _MEANING.get(int(status), "Error"))
                if not response["description"] or response["description"] == \
                        "Validation Error":
                    response["description"] = _MEANING.get(int(status), "Error")
                response["content"] = {"application/json": {"schema": _ERROR_REF}}
                if status == "503":
                    response["headers"] = _RETRY_AFTER
    return schema


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its JSON body itself (bounded, strict,
    ``bridge.http.body``): the body is required and has ``model``'s schema,
    self-contained; and the route may answer what that reading answers, 400 (not JSON,
    too deep) and 413 (past the route's limit), described by ``describe_errors``."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": inline_schema(model)}}},
        "responses": {"400": {}, "413": {}}}


def inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its nested models written in place: pydantic points
    them at ``#/$defs/...`` of its own document, which an OpenAPI document placed inline
    does not have (ReDoc stopped on "Invalid reference token: $defs")."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved


def status_for(exc: FleetError) -> int:
    """The HTTP status for one of our exceptions (500: a bug, not the client's fault)."""
    for kind, status in _STATUS:
        if isinstance(exc, kind):
            return status
    return 500


def _message(exc: FleetError, status: int) -> str:
    if isinstance(exc, InputError):
        return exc.message
    if isinstance(exc, OutboxError) and not isinstance(
            exc, (OutboxFullError, OutboxUnwritableError)):
        return "callback could not be stored; retry later"
    if isinstance(exc, StoreError) and not isinstance(exc, StoreFullError):
        return "database unavailable; retry later"
    if status == 500:
        return "internal error"
    return str(exc)


def _field(exc: FleetError) -> str | None:
    if isinstance(exc, InputError):
        return exc.field
    if isinstance(exc, TopicError):
        return "topic"
    return getattr(exc, "field", None)


def error_body(message: str, field: str | None = None) -> dict[str, Any]:
    """The one error body shape."""
    body: dict[str, Any] = {"status": "error", "message": message, "timestamp": int(time.time())}
    if field:
        body["field"] = field
    return body


def _respond(status: int, message: str, field: str | None = None,
             headers: dict[str, str] | None = None) -> JSONResponse:
    if status == 503:
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS), **(headers or {})}
    return JSONResponse(error_body(message, field), status_code=status, headers=headers)


def error_response(exc: FleetError) -> JSONResponse:
    """``exc`` as the response every app sends for it."""
    status = status_for(exc)
    if status == 500:
        log.error("unexpected error", exc_info=exc)
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, AuthError) and exc.bearer \
        else None
    return _respond(status, _message(exc, status), _field(exc), headers)


def internal_error_response() -> JSONResponse:
    """The answer to a bug (the caller logs it with its traceback)."""
    return _respond(500, "internal error")


def _validation_field(loc: Any) -> str | None:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or None


def install(app: FastAPI, common: Iterable[int] = (), public: Iterable[str] = ()) -> None:
    """Route every error ``app`` can answer through the one body shape, and say so in its
    OpenAPI (``describe_errors``: ``common`` statuses on every path not in ``public``)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = describe_errors(build(), common, public)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    @app.exception_handler(FleetError)
    async def _fleet(request: Request, exc: FleetError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        message = "; ".join(
            f"{_validation_field(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}"
            for e in errors[:5]) or "invalid request"
        field = _validation_field(errors[0].get("loc", ())) if errors else None
        return _respond(422, message, field)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request refused"
        return _respond(exc.status_code, message, headers=dict(exc.headers or {}))

    @app.exception_handler(ClientDisconnect)
    async def _gone(request: Request, exc: ClientDisconnect) -> Response:
        # The client left mid-body (or was cut off by the body timeout): nobody to answer,
        # and not a bug to log with a traceback each time a client chooses to do it.
        return Response(status_code=400)

    @app.exception_handler(Exception)
    async def _bug(request: Request, exc: Exception) -> JSONResponse:
        log.error("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
        return internal_error_response()
