"""Command / response between the cloud and gateways (docs/design-contracts.md,
"Command / response").

Command on ``.../device/{id}/command``: ``{"messageId", "command", "args"}``; response
on ``.../device/{id}/response``: ``{"messageId", "status", "result"|"error"}``. Every
command gets exactly one response; a command redelivered under QoS 1 is executed once
and answered again with the same result. Commands registered ``durable`` (those with an
effect outside the gateway, such as a Pudu API call) are also kept in a journal by
``messageId`` before they run, so a redelivery after a restart does not run them again.

Answers fit the transport (AWS IoT Core: 128 KiB a payload): a handler that lists things
returns a ``Paged`` and the executor sends as many items as fit, with the cursor to ask
for the rest (``{"items": [...], "next_cursor": str | null}``, the product's list shape);
any other answer too large to publish becomes an ``error`` response saying so, never a
publish that fails (every command still gets exactly one response).
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from pydantic import Field

from bridge import strictjson
from bridge.errors import (
    InputError,
    MalformedCommandError,
    PayloadError,
    TopicError,
    TransportError,
)
from bridge.http.paging import answer
from bridge.service.taskset import TaskSet
from bridge.topic import TopicScheme, every_device_channel, parse_device_topic
from bridge.transport import InboundMessage, Transport

#: How long an HTTP caller may wait for a gateway's answer, in seconds: at least one
#: MQTT round trip (0.1 s), at most an hour (the server's COMMAND_TIMEOUT_MAX caps it
#: further). Without a minimum, a timeout of 5e-324 s was accepted and answered 504.
CommandTimeout = Annotated[float, Field(ge=0.1, le=3600)]

log = logging.getLogger(__name__)

CommandFn = Callable[[dict[str, Any]], Awaitable[Any]]
#: ``pace(topic, payload)`` returns when one more publish fits the connection's limits
#: (the edge's ``OutboxPublisher.pace``: AWS IoT Core counts every publish of a connection,
#: command answers and the REST proxy's too).
Pace = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class Command:
    """A request to a device; ``message_id`` correlates the response."""

    command: str
    args: dict[str, Any] = field(default_factory=dict)
    message_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    def __post_init__(self) -> None:
        if not self.command or not isinstance(self.command, str):
            raise PayloadError("command must be a non-empty string")
        if not isinstance(self.args, dict):
            raise PayloadError("args must be an object")

    def to_json(self) -> bytes:
        return strictjson.dumps(
            {"messageId": self.message_id, "command": self.command, "args": self.args})

    @classmethod
    def from_json(cls, payload: bytes) -> Command:
        """Parse (bounded, strict); PayloadError, with ``message_id`` set when the
        command had a usable one, so even a malformed command gets its answer."""
        try:
            obj = strictjson.loads(payload).value
        except PayloadError as exc:
            raise MalformedCommandError(f"command is {exc}") from None
        message_id = _message_id(obj)
        if message_id is None:
            raise MalformedCommandError("command needs a messageId (a string)")
        try:
            return cls(command=obj.get("command") or "", args=obj.get("args") or {},
                       message_id=message_id)
        except PayloadError as exc:
            raise MalformedCommandError(str(exc), message_id) from None


@dataclass(frozen=True, slots=True)
class Response:
    """The one answer to a command."""

    message_id: str
    status: str  # "success" | "error"
    result: Any = None
    error: str | None = None

    def to_json(self) -> bytes:
        body: dict[str, Any] = {"messageId": self.message_id, "status": self.status}
        if self.status == "success":
            body["result"] = self.result
        else:
            body["error"] = self.error
        # A handler's result is ours but may hold a NaN figure: strict JSON regardless.
        return strictjson.dumps(strictjson.clean(
            json.loads(json.dumps(body, default=str)), "", []))

    @classmethod
    def from_json(cls, payload: bytes) -> Response:
        obj = strictjson.loads(payload).value
        message_id = _message_id(obj)
        if message_id is None:
            raise PayloadError("response needs a messageId (a string)")
        status = "success" if obj.get("status") == "success" else "error"
        error = obj.get("error")
        return cls(message_id, status, obj.get("result"),
                   None if error is None else str(error)[:2000])


def _message_id(obj: object) -> str | None:
    """A usable messageId of a decoded command or response, or None."""
    if not isinstance(obj, dict):
        return None
    value = obj.get("messageId")
    if isinstance(value, str) and value and len(value) <= 128:
        return value
    return None


@dataclass(frozen=True, slots=True)
class Paged:
    """A list answer, cut by the executor to what one response can carry.

    ``items`` in cursor order, from the caller's cursor on; ``cursor_of(item)`` is the
    cursor that resumes after ``item``; ``more``: the handler stopped before the end
    (the caller's ``limit``), so ``next_cursor`` is set even if everything fits."""

    items: list[Any]
    cursor_of: Callable[[Any], str]
    more: bool = False

    def page(self, count: int) -> dict[str, Any]:
        """The first ``count`` items as the product's list shape."""
        rest = self.more or count < len(self.items)
        cursor = self.cursor_of(self.items[count - 1]) if rest and count else None
        return answer(self.items[:count], cursor)


#: Room kept for what the estimate of a page's size leaves out.
_PAGE_SLACK = 256
#: A page is at most this large on every backend (AWS IoT Core's payload limit), so a
#: client sees the same pages whatever the broker, and the answers kept for redelivered
#: commands stay small.
PAGE_BYTES = 128 * 1024


def fit(message_id: str, paged: Paged, limit: int) -> Response:
    """The success response carrying as many of ``paged``'s items as fit in ``limit``
    bytes (estimated item by item, only as far as the page goes, then checked); an error
    response if not even one item fits."""
    room = limit - _PAGE_SLACK - len(Response(
        message_id, "success", result=answer([], "")).to_json())
    used = count = 0
    for item in paged.items:
        used += len(strictjson.dumps(strictjson.clean(
            json.loads(json.dumps(item, default=str)), "", []))) + 1
        if used + len(json.dumps(paged.cursor_of(item))) > room:
            break
        count += 1
    if not paged.items:
        return Response(message_id, "success", result=paged.page(0))
    while count:
        response = Response(message_id, "success", result=paged.page(count))
        if len(response.to_json()) <= limit:
            return response
        count = count * 9 // 10  # the estimate was short: cut more
    return Response(message_id, "error", error=(
        f"one item of this answer is larger than the transport's {limit}-byte limit"))


class CommandJournal(Protocol):
    """Durable command ids (the edge agent keeps them in its outbox database)."""

    async def begin_command(self, message_id: str, command: str) -> Response | None:
        """Mark as begun; the earlier response if this id was seen before."""

    async def finish_command(self, response: Response) -> None:
        """Keep the response for redeliveries."""


class CommandExecutor:
    """Gateway side: runs registered handlers and answers on the response topic."""

    def __init__(self, transport: Transport, scheme: TopicScheme, device_id: str,
                 *, remember: int = 1000, pace: Pace | None = None) -> None:
        self.transport = transport
        #: Waited on before each answer where the connection is paced (the edge agent's
        #: publisher, whose drain shares the connection's limits); None: unpaced.
        self.pace = pace
        self.command_topic = str(scheme.device(device_id, "command"))
        self.response_topic = str(scheme.device(device_id, "response"))
        self.handlers: dict[str, CommandFn] = {}
        self.durable: set[str] = set()
        self.journal: CommandJournal | None = None
        self.executed = 0
        # messageId -> the response (or the running execution) for QoS 1 redelivery
        self._answers: collections.OrderedDict[str, asyncio.Future[Response]] = (
            collections.OrderedDict()
        )
        self._remember = remember
        self._tasks = TaskSet("commands")

    async def aclose(self, grace: float = 5.0) -> None:
        """Stopping: let running commands answer (bounded), then cancel what is left."""
        await self._tasks.drain(grace)

    def register(self, name: str, fn: CommandFn, *, durable: bool = False) -> None:
        """Add or replace the handler for ``name``; ``durable``: run once per messageId
        even across restarts (needs ``journal``)."""
        self.handlers[name] = fn
        if durable:
            self.durable.add(name)

    def on_message(self, message: InboundMessage) -> None:
        self._tasks.spawn(self._handle(message.payload), f"command-{message.topic}")

    async def _handle(self, payload: bytes) -> None:
        try:
            command = Command.from_json(payload)
        except MalformedCommandError as exc:
            message_id = exc.message_id
            log.warning("malformed command%s: %s",
                        f" {message_id}" if message_id else " (no messageId; unanswerable)",
                        exc)
            if message_id is not None:
                await self._answer(Response(message_id, "error", error=f"malformed: {exc}"))
            return
        answer = self._answers.get(command.message_id)
        if answer is None:
            answer = asyncio.get_running_loop().create_future()
            self._answers[command.message_id] = answer
            while len(self._answers) > self._remember:
                self._answers.popitem(last=False)
            answer.set_result(await self._execute(command))
        await self._answer(await answer)

    def sized(self, response: Response) -> bytes:
        """The response's bytes, if the transport can carry them; else an error response
        naming the size and the limit (the caller can ask for less)."""
        payload = response.to_json()
        try:
            self.transport.check_publish(self.response_topic, payload, 1)
        except (PayloadError, TopicError, InputError) as exc:
            log.warning("answer to %s refused before publishing: %s", response.message_id, exc)
            payload = Response(response.message_id, "error", error=(
                f"answer of {len(payload)} bytes not sent: {exc}; ask for less "
                "(a list command takes limit and cursor)")).to_json()
        return payload

    async def _answer(self, response: Response) -> None:
        payload = self.sized(response)
        if self.pace is not None:
            await self.pace(self.response_topic, payload)
        try:
            await self.transport.publish(self.response_topic, payload, qos=1)
        except TransportError as exc:
            log.warning("could not answer command %s: %s", response.message_id, exc)

    async def _execute(self, command: Command) -> Response:
        if command.command not in self.durable or self.journal is None:
            return await self._run(command)
        try:
            earlier = await self.journal.begin_command(command.message_id, command.command)
        except Exception as exc:  # not recorded: running it could repeat after a restart
            log.warning("command %s not journaled: %s", command.message_id, exc)
            return Response(command.message_id, "error",
                            error="could not record the command; not run, retry later")
        if earlier is not None:
            return earlier
        response = await self._run(command)
        try:
            await self.journal.finish_command(response)
        except Exception as exc:
            log.warning("response to %s not journaled: %s", command.message_id, exc)
        return response

    async def _run(self, command: Command) -> Response:
        fn = self.handlers.get(command.command)
        if fn is None:
            return Response(command.message_id, "error",
                            error=f"unknown command {command.command!r}; "
                                  f"known: {sorted(self.handlers)}")
        self.executed += 1
        try:
            result = await fn(command.args)
            if isinstance(result, Paged):
                return fit(command.message_id, result,
                           min(PAGE_BYTES, self.transport.max_payload))
            return Response(command.message_id, "success", result=result)
        except Exception as exc:  # a handler's failure is the command's answer
            log.warning("command %s failed: %s", command.command, exc)
            return Response(command.message_id, "error", error=str(exc) or type(exc).__name__)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # ours: the executor is stopping (aclose)
            # The handler's own (a plug-in cancelled something it awaited and let the
            # CancelledError out): every command gets exactly one response.
            log.warning("command %s was cancelled inside its handler", command.command)
            return Response(command.message_id, "error",
                            error="cancelled inside the command's handler")


@dataclass(frozen=True, slots=True)
class CommandOutcome:
    """What the cloud learned about one command."""

    command: Command
    device_id: str
    org_id: str
    response: Response | None
    sent_at: float
    rtt_ms: float | None

    def answer(self) -> dict[str, Any]:
        """The HTTP answer to a command that got its response (every command route)."""
        r = self.response
        assert r is not None, "a command without a response is a CommandTimeoutError"
        body: dict[str, Any] = {"messageId": r.message_id, "status": r.status,
                                "rtt_ms": self.rtt_ms}
        if r.status == "success":
            body["result"] = r.result
        else:
            body["error"] = r.error
        return body


class CommandClient:
    """Cloud side: publish a command, await the response with the same messageId."""

    def __init__(self, transport: Transport, topic_prefix: str = "") -> None:
        self.transport = transport
        self.topic_prefix = topic_prefix
        self._waiting: dict[str, asyncio.Future[Response]] = {}

    @property
    def response_filter(self) -> str:
        """Subscribe to this (not shared: the replica that asked must hear the answer)."""
        return every_device_channel(self.topic_prefix, "response").value

    def on_message(self, message: InboundMessage) -> None:
        self.on_response(message.payload)

    def on_response(self, payload: bytes) -> None:
        """A response from MQTT or pushed over HTTP; malformed ones are ignored."""
        try:
            response = Response.from_json(payload)
        except PayloadError as exc:
            log.debug("ignoring malformed response: %s", exc)
            return
        fut = self._waiting.get(response.message_id)
        if fut is not None and not fut.done():
            fut.set_result(response)

    async def send(self, org_id: str, device_id: str, command: Command,
                   wait_seconds: float) -> CommandOutcome:
        """Returns the outcome; ``response`` is None when the device did not answer in time."""
        topic = str(TopicScheme(org_id, self.topic_prefix).device(device_id, "command"))
        parse_device_topic(topic, self.topic_prefix)
        fut: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiting[command.message_id] = fut
        sent = time.time()
        started = time.perf_counter()
        try:
            async with asyncio.timeout(wait_seconds):
                await self.transport.publish(topic, command.to_json(), qos=1)
                response = await fut
            rtt = (time.perf_counter() - started) * 1000
            return CommandOutcome(command, device_id, org_id, response, sent, round(rtt, 2))
        except TimeoutError:
            return CommandOutcome(command, device_id, org_id, None, sent, None)
        finally:
            self._waiting.pop(command.message_id, None)
