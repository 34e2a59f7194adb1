"""StreamEvents: replay by cursor, live follow, filters, reconnects, limits."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import grpc
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hitl_service.app import App
from hitl_service.clock import SystemClock
from hitl_service.core.hub import PAGE_BYTES
from hitl_service.domain import LogEvent
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.logs import SecretRedactor, configure_logging
from providers.types import (
    Agent,
    AgentAssigned,
    AgentMessage,
    Author,
    Card,
    CardButton,
    InboundEvent,
    Message,
    Transferred,
    WebhookBatch,
)
from tests.conftest import scripted_on_clock, start_app
from tests.scripted import ScriptedProvider, create
from tests.support import (
    TIMEOUT,
    EventCollector,
    ShiftedClock,
    expect_error,
    make_user,
    start_session,
    wait_for,
)

if TYPE_CHECKING:
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub

AGENT = Agent(id="jane@acme.test", name="Jane", avatar_url="https://a.example/j.png")
BOB = Agent(id="bob@acme.test", name="Bob")


def say(text: str) -> AgentMessage:
    return AgentMessage(Message(body=text, author=Author.AGENT), AGENT)


async def read(stub: Stub, count: int, **request: str) -> list[pb.Event]:
    """Reads exactly ``count`` events from a fresh stream, then cancels it."""
    call = stub.StreamEvents(pb.StreamEventsRequest(**request))
    out: list[pb.Event] = []
    try:
        async with asyncio.timeout(TIMEOUT):
            async for event in call:
                out.append(event)
                if len(out) == count:
                    break
    finally:
        call.cancel()
    return out


class TestReplayAndFollow:
    async def test_replay_from_zero_then_live_events(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        session = await start_session(scripted_stub, user.id)
        await scripted.push(session.external_chat_id, say("hi"), "m1")
        async with EventCollector(scripted_stub, session_id=session.id, after="0") as events:
            await wait_for(lambda: len(events.events) >= 4, what="replayed events")
            await scripted.push(session.external_chat_id, say("live"), "m2")
            await wait_for(lambda: len(events.events) >= 5, what="the live event")
        assert events.kinds() == [
            "started",
            "queued",
            "agent_assigned",
            "agent_message",
            "agent_message",
        ]
        cursors = [int(e.cursor) for e in events.events]
        assert cursors == sorted(cursors)
        assert len(set(cursors)) == len(cursors)
        assert events.events[-1].agent_message.message.text == "live"
        assert events.events[-1].agent_message.agent.name == "Jane"
        assert events.events[-1].agent_message.message.author == pb.AUTHOR_AGENT

    async def test_empty_cursor_means_from_now(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        session = await start_session(scripted_stub, user.id)
        # Once the initial metadata arrived, nothing after it can be missed.
        async with EventCollector(scripted_stub, after="") as events:
            await scripted.push(session.external_chat_id, say("after subscribe"), "m1")
            await wait_for(lambda: len(events.events) >= 2, what="live events")
        assert events.kinds() == ["agent_assigned", "agent_message"]

    async def test_resume_from_a_cursor_misses_nothing_and_repeats_nothing(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        session = await start_session(scripted_stub, user.id)
        for i in range(10):
            await scripted.push(session.external_chat_id, say(f"m{i}"), f"k{i}")
        first = await read(scripted_stub, 5, after_cursor="0")
        # More events while "disconnected".
        for i in range(10, 15):
            await scripted.push(session.external_chat_id, say(f"m{i}"), f"k{i}")
        rest = await read(scripted_stub, 18 - 5, after_cursor=first[-1].cursor)
        whole = first + rest
        assert [int(e.cursor) for e in whole] == list(range(1, 19))
        texts = [e.agent_message.message.text for e in whole if e.HasField("agent_message")]
        assert texts == [f"m{i}" for i in range(15)]

    async def test_an_event_of_a_newer_release_is_streamed_with_no_kind_and_stops_nothing(
        self, service_env: dict[str, str], scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """A kind this release cannot read (a newer one wrote it, then a
        rollback) stopped the hub at that row: no stream got another live
        event, on any session."""
        user = await make_user(scripted_stub)
        session = await start_session(scripted_stub, user.id)
        async with EventCollector(scripted_stub, session_id=session.id, after="0") as live:
            db = sqlite3.connect(service_env["HITL_STORE_URL"].removeprefix("sqlite:///"))
            try:
                with db:
                    db.execute(
                        "INSERT INTO events (session_id, user_id, occurred_at, kind, data) "
                        "VALUES (?, ?, '2026-01-01T00:00:00.000000Z', 'recalled', '{}')",
                        (session.id, user.id),
                    )
            finally:
                db.close()
            await scripted.push(session.external_chat_id, say("after it"), "m1")
            await wait_for(lambda: len(live.events) >= 5, what="live events")
        replayed = await read(scripted_stub, 5, after_cursor="0", session_id=session.id)
        for events in (live.events, replayed):
            assert [e.WhichOneof("kind") for e in events] == [
                "started",
                "queued",
                None,
                "agent_assigned",
                "agent_message",
            ]
            assert (events[2].session_id, events[2].user_id) == (session.id, user.id)
            assert [int(e.cursor) for e in events] == sorted(int(e.cursor) for e in events)

    async def test_session_filter(self, scripted_stub: Stub, scripted: ScriptedProvider) -> None:
        a = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        b = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        await scripted.push(a.external_chat_id, say("to a"), "a1")
        await scripted.push(b.external_chat_id, say("to b"), "b1")
        only_b = await read(scripted_stub, 4, after_cursor="0", session_id=b.id)
        assert {e.session_id for e in only_b} == {b.id}
        assert only_b[-1].agent_message.message.text == "to b"
        everything = await read(scripted_stub, 8, after_cursor="0")
        assert {e.session_id for e in everything} == {a.id, b.id}
        assert all(e.user_id for e in everything)

    async def test_slow_reader_behind_the_buffer_still_gets_everything_in_order(
        self, service_env: dict[str, str]
    ) -> None:
        async with _behind_a_small_buffer(service_env) as (_app, provider, stub, session):
            for i in range(100):
                await provider.push(session.external_chat_id, say(f"m{i}"), f"k{i}")
            events = await read(stub, 103, after_cursor="0")
        assert [int(e.cursor) for e in events] == list(range(1, 104))

    async def test_a_reader_behind_the_buffer_holds_a_short_page_of_the_store(
        self, service_env: dict[str, str]
    ) -> None:
        """A stream behind the buffer writes out a page of the store, and a
        client that stops reading keeps that page for as long as its stream
        is open. Pages were read_batch (512) events whatever their size: a
        Node client that replayed a log of long agent messages from "0" and
        paused held 8 MB of the server per stream. A page is now about
        PAGE_BYTES (and at least one event)."""
        async with _behind_a_small_buffer(service_env) as (app, provider, stub, session):
            long_text = "x" * 100_000
            for i in range(60):
                await provider.push(session.external_chat_id, say(f"{i} {long_text}"), f"k{i}")
            # A subscriber that took one long message and reads no more.
            hub = app.core.hub
            await wait_for(lambda: hub.head == 63)
            floor = hub.head - 2 * 16  # the buffer holds at most this far back
            stalled = hub.subscribe(0, session.id)
            while not isinstance((await anext(stalled)).kind, AgentMessage):
                pass
            held = _held_up_to(floor)
            await stalled.aclose()
            events = await read(stub, 63, session_id=session.id, after_cursor="0")
        assert held <= PAGE_BYTES + 100_010, f"a stalled subscriber holds {held} characters"
        assert [int(e.cursor) for e in events] == list(range(1, 64))  # all, in order
        assert [e.agent_message.message.text.split()[0] for e in events[3:]] == [
            str(i) for i in range(60)
        ]

    async def test_a_reader_that_stops_in_the_buffer_keeps_no_copy_of_it(
        self, service_env: dict[str, str]
    ) -> None:
        """A stream within the buffer took a copy of the buffer's tail (up
        to 2 x HITL_STREAM_BUFFER events) and wrote it out: a client that
        stopped reading kept that copy, and the events in it, for as long as
        its stream was open, even after the buffer had dropped them. Each
        such stream held its own stretch of the log: 11 clients that read one
        event each, started 1,100 events apart behind 1,000 agent messages
        of 16,000 characters, took the process from 120 to 274 MB. A stream
        now holds the event it is writing, not the rest of the buffer."""
        async with _behind_a_small_buffer(service_env) as (app, provider, _stub, session):
            long_text = "x" * 100_000
            hub = app.core.hub
            for i in range(20):
                await provider.push(session.external_chat_id, say(f"{i} {long_text}"), f"a{i}")
            await wait_for(lambda: hub.head == 23)
            # A client that reads one event of a stretch of the buffer, then
            # no more: its server side is soon blocked in a write (gRPC's
            # flow control), 2 MB of events from where it started.
            async with grpc.aio.insecure_channel(
                f"127.0.0.1:{app.grpc_port}", options=[("grpc.http2.bdp_probe", 0)]
            ) as channel:
                call = pb_grpc.HitlServiceStub(channel).StreamEvents(
                    pb.StreamEventsRequest(session_id=session.id, after_cursor="3")
                )
                first = await call.read()
                assert isinstance(first, pb.Event)
                assert first.agent_message.message.text.startswith("0 ")
                # The buffer moves on past everything that stream has seen.
                for i in range(40):
                    await provider.push(session.external_chat_id, say(f"{i} {long_text}"), f"b{i}")
                await wait_for(lambda: hub.head == 63)
                floor = hub.head - 2 * 16  # the buffer holds at most this far back

                # At most the one the stream is writing (the copy: 20 of them).
                await wait_for(
                    lambda: _held_up_to(floor) <= 100_010, what="the events a stalled stream holds"
                )
                call.cancel()

    async def test_a_client_leaving_a_stream_blocked_in_a_write_is_a_warning(
        self, service_env: dict[str, str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """grpc.aio logged ERROR "ExecuteBatchError raised in core by servicer
        method", with a traceback, when a client left while its stream was
        blocked in a write (a reader that stopped, then went away): the
        client's doing, told by the call's rpc.done line, but an error-level
        alert. It is one warning line, without gRPC's internals."""
        root = logging.getLogger()
        handlers, level = root.handlers[:], root.level
        lines: list[dict[str, Any]] = []

        def logged(event: str) -> list[dict[str, Any]]:
            lines.extend(map(json.loads, capsys.readouterr().err.splitlines()))
            return [line for line in lines if event in line["event"]]

        def at_least(count: Callable[[], float], least: float) -> Callable[[], bool]:
            return lambda: count() >= least

        try:
            configure_logging(
                log_format="json", level="info", redactor=SecretRedactor([]), cache=False
            )
            async with _behind_a_small_buffer(service_env) as (app, provider, _stub, session):
                for i in range(6):
                    await provider.push(
                        session.external_chat_id, say(f"{i} {'x' * 1_000_000}"), f"k{i}"
                    )
                await wait_for(lambda: app.core.hub.head == 9)
                sent = app.metrics.grpc_msg_sent.labels(
                    "server_stream", "hitl.v1.HitlService", "StreamEvents"
                )
                # Most often gRPC's core fails the held write (the line); now
                # and then, on a loaded machine, the call's cancellation
                # reaches the handler first (no line): a few tries.
                for tries in range(1, 9):
                    before = sent._value.get()
                    async with grpc.aio.insecure_channel(
                        f"127.0.0.1:{app.grpc_port}", options=[("grpc.http2.bdp_probe", 0)]
                    ) as channel:
                        call = pb_grpc.HitlServiceStub(channel).StreamEvents(
                            pb.StreamEventsRequest(session_id=session.id, after_cursor="0")
                        )
                        assert isinstance(await call.read(), pb.Event)
                        # Events 1-3 are short; the 4th (counted before its
                        # write), 1 MB, is more than gRPC's window and buffers
                        # take: its write waits for the reader.
                        await wait_for(at_least(sent._value.get, before + 4), what="a write")
                        call.cancel()
                    # gRPC logs the failed write before the handler ends.
                    await wait_for(
                        at_least(lambda: len(logged("rpc.done")), tries + 2), what="the end"
                    )
                    if logged("ExecuteBatchError"):
                        break
        finally:
            root.handlers[:] = handlers
            root.setLevel(level)
            structlog.reset_defaults()
        (line,) = logged("ExecuteBatchError")
        assert (line["logger"], line["level"]) == ("grpc._cython.cygrpc", "warning"), line
        assert "exception" not in line, line
        assert "StreamEvents" in line["event"]


class TestOrderWithinASession:
    async def test_a_message_reported_after_the_requeue_does_not_reassign_its_writer(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """LiveChat does not order webhooks across actions (and retries them
        late; catch-up finds lost ones later still): the last line Jane wrote
        before she transferred the chat to the queue may come after the
        transfer. It is her message, not a sign that she took the chat back:
        the stream must not say so, nor the session."""
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        chat = session.external_chat_id
        await scripted.push(chat, AgentAssigned(AGENT), "join")
        written = scripted_app.core.ctx.clock.now() - timedelta(minutes=1)
        await scripted.push(chat, Transferred(to_group_id="7", reason="billing"), "transfer")
        late = InboundEvent(chat, say("billing will take over"), "late", occurred_at=written)
        await scripted.sink.deliver(WebhookBatch(action="push", events=(late,)))
        # Bob takes it; his join is not reported, his first message is.
        await scripted.push(chat, AgentMessage(Message("Bob here", Author.AGENT), BOB), "bob")
        events = await read(scripted_stub, 7, after_cursor="0", session_id=session.id)
        assert [e.WhichOneof("kind") for e in events] == [
            "started",
            "queued",
            "agent_assigned",
            "transferred",
            "agent_message",
            "agent_assigned",
            "agent_message",
        ]
        assert events[4].agent_message.agent.id == AGENT.id
        assert events[5].agent_assigned.agent.id == BOB.id
        got = await scripted_stub.GetSession(pb.GetSessionRequest(session_id=session.id))
        assert got.session.agent.id == BOB.id

    async def test_the_late_message_leaves_the_session_in_the_queue(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        chat = session.external_chat_id
        await scripted.push(chat, AgentAssigned(AGENT), "join")
        written = scripted_app.core.ctx.clock.now() - timedelta(minutes=1)
        await scripted.push(chat, Transferred(to_group_id="7", reason="billing"), "transfer")
        late = InboundEvent(chat, say("billing will take over"), "late", occurred_at=written)
        await scripted.sink.deliver(WebhookBatch(action="push", events=(late,)))
        got = await scripted_stub.GetSession(pb.GetSessionRequest(session_id=session.id))
        assert got.session.state == pb.SESSION_STATE_QUEUED
        assert not got.session.HasField("agent")


class TestErrors:
    async def test_bad_cursor(self, stub: Stub) -> None:
        for cursor in ("abc", "-1", "1.5", "9" * 30):
            error = await expect_error(
                read(stub, 1, after_cursor=cursor), grpc.StatusCode.INVALID_ARGUMENT
            )
            assert "after_cursor" in error.violations

    async def test_cursor_ahead_of_the_log(self, stub: Stub) -> None:
        error = await expect_error(
            read(stub, 1, after_cursor="1000"), grpc.StatusCode.INVALID_ARGUMENT
        )
        assert "ahead" in error.violations["after_cursor"]

    async def test_unknown_session(self, stub: Stub) -> None:
        await expect_error(read(stub, 1, session_id="ses_nope"), grpc.StatusCode.NOT_FOUND)


class TestLifetime:
    async def test_shutdown_ends_streams_with_unavailable_and_a_resumable_cursor(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_PROVIDER"] = "scripted"
        app = await start_app(service_env, provider_factory=create)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            session = await start_session(stub, (await make_user(stub)).id)
            collector = EventCollector(stub, after="0")
            async with collector:
                await wait_for(lambda: len(collector.events) >= 2, what="events")
                await app.stop(grace=2)
                await wait_for(lambda: collector.error is not None, what="the stream to end")
        assert collector.error is not None
        assert collector.error.code() == grpc.StatusCode.UNAVAILABLE
        assert collector.events[-1].cursor == "2"
        assert session.id

    async def test_streams_end_after_their_maximum_lifetime(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_STREAM_MAX_SECONDS"] = "1s"
        app = await start_app(service_env)
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                call = channel.unary_stream(
                    "/hitl.v1.HitlService/StreamEvents",
                    request_serializer=pb.StreamEventsRequest.SerializeToString,
                    response_deserializer=pb.Event.FromString,
                )(pb.StreamEventsRequest(), timeout=TIMEOUT)
                received = [event async for event in call]
                assert received == []
                assert await call.code() == grpc.StatusCode.OK
        finally:
            await app.stop(grace=1)

    async def test_a_stream_that_stays_behind_still_ends_at_its_lifetime(
        self, service_env: dict[str, str]
    ) -> None:
        """A reader slower than the log never catches up; its stream must end
        at HITL_STREAM_MAX_SECONDS all the same (right after an event, so it
        resumes from its cursor), or it would stay on one replica forever."""
        service_env["HITL_STREAM_MAX_SECONDS"] = "60s"
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (_app, stub, provider):
            session = await start_session(stub, (await make_user(stub)).id)
            backlog = 300  # 30 MB: far more than gRPC sends ahead of the reader
            for i in range(backlog):
                await provider.push(session.external_chat_id, say(f"{i}" + "x" * 100_000), f"{i}")
            call = stub.StreamEvents(pb.StreamEventsRequest(after_cursor="0"))
            first = await call.read()
            assert isinstance(first, pb.Event)
            clock.offset = 61  # the lifetime passes while the reader is behind
            cursors = [int(first.cursor)]
            while isinstance(event := await call.read(), pb.Event):
                cursors.append(int(event.cursor))
            assert await call.code() == grpc.StatusCode.OK
            assert cursors == list(range(1, len(cursors) + 1))  # in order, no gap
            assert len(cursors) < 3 + backlog, "the stream ran on through the backlog"
            rest = await read(stub, 3 + backlog - len(cursors), after_cursor=str(cursors[-1]))
            assert int(rest[0].cursor) == cursors[-1] + 1
            assert int(rest[-1].cursor) == 3 + backlog


class TestOversizedEvent:
    async def test_an_event_over_the_message_limit_is_shortened_not_fatal(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """An event that encodes to more than the 1 MiB gRPC message limit
        (a third-party provider, or HITL_HTTP_MAX_BODY raised) must not fail
        every stream that reaches it, and every resume after it."""
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        chat = session.external_chat_id
        await scripted.push(chat, say("y" * (1100 * 1024)), "big")
        await scripted.push(chat, say("after"), "after")
        events = await read(scripted_stub, 5, after_cursor="0")
        assert [int(e.cursor) for e in events] == [1, 2, 3, 4, 5]
        big, after = events[3], events[4]
        text = big.agent_message.message.text
        assert text.startswith("yyyy")
        assert text.endswith("[truncated]")
        assert big.ByteSize() <= 1024 * 1024
        assert after.agent_message.message.text == "after"

    async def test_a_shortened_event_keeps_its_ids_and_cursor(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """Its bulk in many short strings (a third-party provider's card with
        thousands of buttons): shortening must never cut the ids that name
        the event, and must end below the limit."""
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        buttons = tuple(CardButton("t" * 100, value="v" * 100) for _ in range(12_000))
        card = AgentMessage(Message(Card(title="Pick one", buttons=buttons), Author.AGENT), AGENT)
        await scripted.push(session.external_chat_id, card, "big-card")
        async with EventCollector(scripted_stub, session_id=session.id, after="0") as events:
            big = await events.wait_for_kind("agent_message")
        assert events.error is None
        assert big.session_id == session.id
        assert big.cursor.isdigit()
        assert big.ByteSize() <= 1024 * 1024


async def test_stream_metrics_count_subscribers(scripted_app: App, scripted_stub: Stub) -> None:
    gauge = scripted_app.metrics.stream_subscribers
    async with EventCollector(scripted_stub):
        await wait_for(lambda: gauge._value.get() == 1, what="one subscriber")
    await wait_for(lambda: gauge._value.get() == 0, what="no subscriber")


async def test_health_watch_streams_the_serving_status(app: App) -> None:
    """grpc's Health.Watch sends with context.write(); the interceptor must
    await it, not iterate it (clients with health checking call Watch)."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types lack Watch
        call = health.Watch(
            health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"), timeout=TIMEOUT
        )
        first = await call.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        call.cancel()


async def test_health_watch_ends_after_telling_the_shutdown(service_env: dict[str, str]) -> None:
    """A client with health checking keeps a Watch open; at shutdown it must
    get NOT_SERVING and then the end of its stream, as StreamEvents streams
    end, not hold the server until HITL_GRACE_SECONDS cancels it."""
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)  # the stubs' types lack Watch
            call = health.Watch(health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"))
            assert (await call.read()).status == health_pb2.HealthCheckResponse.SERVING
            stopping = asyncio.create_task(app.stop(grace=3 * TIMEOUT))
            assert (await call.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert await call.read() is grpc.aio.EOF
            assert await call.code() == grpc.StatusCode.OK
            await stopping
    finally:
        await app.stop(grace=1)


def test_the_documented_keepalive_policy_is_the_servers() -> None:
    """A client pinging more often than the server allows loses its connection
    (GOAWAY too_many_pings), which grpc-js reports as RESOURCE_EXHAUSTED, a
    code errors.md gave only to requests over 1 MiB. The proto and errors.md
    must give the server's numbers."""
    from pathlib import Path

    from hitl_service.server import GRPC_OPTIONS

    options = dict(GRPC_OPTIONS)
    allowed = (
        f"more often than every {options['grpc.http2.min_ping_interval_without_data_ms'] // 1000} s"
    )
    pings = f"pings idle connections every {options['grpc.keepalive_time_ms'] // 1000} s"
    root = Path(__file__).resolve().parents[1]
    proto = " ".join(
        line.strip().removeprefix("//").strip()
        for line in (root / "proto/hitl/v1/hitl_service.proto").read_text().splitlines()
    )
    errors = (root / "docs/errors.md").read_text()
    assert allowed in proto
    assert pings in proto
    assert allowed in errors
    assert pings in errors


def _held_up_to(floor: int) -> int:
    """Characters of the agent messages numbered up to ``floor`` still alive."""
    gc.collect()
    return sum(
        len(o.kind.message.body)
        for o in gc.get_objects()
        if isinstance(o, LogEvent)
        and o.seq <= floor
        and isinstance(o.kind, AgentMessage)
        and isinstance(o.kind.message.body, str)
    )


@asynccontextmanager
async def _behind_a_small_buffer(
    service_env: dict[str, str],
) -> AsyncIterator[tuple[App, ScriptedProvider, Stub, pb.Session]]:
    """A service on the scripted provider whose stream buffer (16 events) is
    far smaller than the backlogs the tests write, a stub, and a session."""
    service_env["HITL_STREAM_BUFFER"] = "16"
    service_env["HITL_PROVIDER"] = "scripted"
    app = await start_app(service_env, provider_factory=create)
    try:
        provider = app.provider
        assert isinstance(provider, ScriptedProvider)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub = pb_grpc.HitlServiceStub(channel)
            session = await start_session(stub, (await make_user(stub)).id)
            yield app, provider, stub, session
    finally:
        await app.stop(grace=1)
