"""Helpers shared by the service tests: waiting on conditions, reading rich
gRPC errors, collecting stream events."""

from __future__ import annotations

import ast
import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb

if TYPE_CHECKING:
    from hitl_service.clock import Clock
    from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

T = TypeVar("T")
TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parent.parent


def source_strings() -> set[str]:
    """Every string literal in the service and provider packages."""
    found: set[str] = set()
    for package in ("hitl_service", "providers"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    found.add(node.value)
    return found


def settings_read_by_source() -> set[str]:
    """The ``HITL_*`` names in the source: the settings it reads."""
    return {s for s in source_strings() if re.fullmatch(r"HITL_[A-Z0-9_]*[A-Z0-9]", s)}


async def wait_for(
    predicate: Callable[[], Any],
    *,
    timeout: float = TIMEOUT,
    what: str = "condition",
) -> Any:
    """Polls ``predicate`` until it returns something truthy; never a fixed sleep."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = predicate()
        if asyncio.iscoroutine(value) or isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(delay)
        delay = min(delay * 2, 0.1)


@dataclass
class RichError:
    """The parts of a rich gRPC error tests look at."""

    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    violations: dict[str, str]


def rich_error(exc: grpc.aio.AioRpcError) -> RichError:
    """Decodes ErrorInfo and BadRequest from an error's trailers."""
    reason = domain = ""
    metadata: dict[str, str] = {}
    violations: dict[str, str] = {}
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                reason, domain, metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations = {v.field: v.description for v in bad.field_violations}
    return RichError(exc.code(), exc.details() or "", reason, domain, metadata, violations)


async def expect_error(call: Awaitable[Any], code: grpc.StatusCode) -> RichError:
    """Awaits a call that must fail with ``code``; returns the decoded error."""
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        error = rich_error(exc)
        assert error.code == code, f"expected {code}, got {error.code}: {error.message}"
        assert "Traceback" not in error.message
        return error
    raise AssertionError(f"expected {code}, the call succeeded")


def rid() -> str:
    """A fresh request id."""
    return str(uuid.uuid4())


async def make_user(
    stub: pb_grpc.HitlServiceAsyncStub, name: str = "Ada", external_id: str = ""
) -> pb.User:
    """Creates a user through the API."""
    response = await stub.CreateUser(
        pb.CreateUserRequest(name=name, external_id=external_id or rid()), timeout=TIMEOUT
    )
    return response.user


async def start_session(
    stub: pb_grpc.HitlServiceAsyncStub, user_id: str, **fields: Any
) -> pb.Session:
    """Starts a handoff through the API."""
    fields.setdefault("request_id", rid())
    fields.setdefault("title", "Refund for order #123")
    response = await stub.StartHitl(pb.StartHitlRequest(user_id=user_id, **fields), timeout=TIMEOUT)
    return response.session


class EventCollector:
    """Follows StreamEvents in the background and keeps what arrives."""

    def __init__(
        self, stub: pb_grpc.HitlServiceAsyncStub, *, session_id: str = "", after: str = "0"
    ) -> None:
        self.events: list[pb.Event] = []
        self.ready = asyncio.Event()
        self.error: grpc.aio.AioRpcError | None = None
        self._call = stub.StreamEvents(
            pb.StreamEventsRequest(session_id=session_id, after_cursor=after)
        )
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._call.initial_metadata()
            self.ready.set()
            async for event in self._call:
                self.events.append(event)
        except grpc.aio.AioRpcError as exc:
            self.error = exc
            self.ready.set()

    async def __aenter__(self) -> EventCollector:
        await asyncio.wait_for(self.ready.wait(), TIMEOUT)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    def kinds(self, session_id: str = "") -> list[str]:
        """Event kinds in arrival order (optionally of one session)."""
        return [
            str(e.WhichOneof("kind"))
            for e in self.events
            if not session_id or e.session_id == session_id
        ]

    async def wait_for_kind(self, kind: str, session_id: str = "") -> pb.Event:
        """The first event of ``kind`` (waits for it)."""

        def find() -> pb.Event | None:
            for event in self.events:
                if event.WhichOneof("kind") == kind and (
                    not session_id or event.session_id == session_id
                ):
                    return event
            return None

        found: pb.Event = await wait_for(find, what=f"a {kind} event")
        return found


class ShiftedClock:
    """The service's clock, moved forward by the test (wall and monotonic alike)."""

    def __init__(self, base: Clock) -> None:
        self._base = base
        self.offset = 0.0

    def now(self) -> datetime:
        return self._base.now() + timedelta(seconds=self.offset)

    def monotonic(self) -> float:
        return self._base.monotonic() + self.offset

    async def sleep(self, seconds: float) -> None:
        await self._base.sleep(seconds)


def install_providers(site: Path, dist: str, entry_points: dict[str, str]) -> Path:
    """Writes an installed distribution ``dist`` into ``site`` whose
    ``hitl_service.providers`` entry points are ``entry_points`` (name →
    ``module:factory``), as a third party's package would; returns ``site``
    (put it on ``sys.path`` or ``PYTHONPATH``)."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[hitl_service.providers]\n{lines}")
    return site


async def read_log(stub: Any) -> list[pb.Event]:
    """The whole event log up to its head when called, in one stream."""
    call = stub.StreamEvents(pb.StreamEventsRequest(after_cursor="0"))
    try:
        head = int(dict(await call.initial_metadata())["x-stream-head"])
        events: list[pb.Event] = []
        if head:
            async for event in call:
                events.append(event)
                if int(event.cursor) >= head:
                    break
        return events
    finally:
        call.cancel()


class SteppedClock:
    """The real clock, whose wall time the test steps as NTP or an operator
    would (``step``: monotonic time goes on unaffected), or moves on as time
    passing would (``advance``: both). Sleeps are real."""

    def __init__(self) -> None:
        self.offset = 0.0  # steps
        self.elapsed = 0.0  # time passed

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset + self.elapsed)

    def monotonic(self) -> float:
        return time.monotonic() + self.elapsed

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    def step(self, seconds: float) -> None:
        """Steps the wall clock ``seconds`` forward (back if negative)."""
        self.offset += seconds

    def advance(self, seconds: float) -> None:
        """Moves wall and monotonic time ``seconds`` on."""
        self.elapsed += seconds
