"""The client through timeouts, outages, reconnects and shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from hitl_service.app import App
from hitl_service.client import (
    DEFAULT_TIMEOUT,
    HitlClient,
    HitlRpcError,
    InvalidArgumentError,
    RetryPolicy,
    UnavailableError,
)
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.conftest import start_app
from tests.ports import free_port
from tests.processes import ServiceProcess
from tests.support import wait_for
from tests.test_client import Follower, Recorder

FAST = RetryPolicy(attempts=50, initial_backoff=0.02, max_backoff=0.2)
QUICK_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


class HoldReconnect(grpc.aio.UnaryStreamClientInterceptor):
    """Lets the first StreamEvents call through and holds every later one
    until ``release`` is set, so a test can act between two streams."""

    def __init__(self) -> None:
        self.calls = 0
        self.release = asyncio.Event()

    async def intercept_unary_stream(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        self.calls += 1
        if self.calls > 1:
            await self.release.wait()
        return await continuation(client_call_details, request)


async def test_live_stream_misses_nothing_across_a_reconnect(
    service_env: dict[str, str],
) -> None:
    """events(after="") follows live events; when the server ends a quiet
    stream (HITL_STREAM_MAX_SECONDS) the iterator must resume from the head
    the server reported (x-stream-head), not from "now" again."""
    service_env["HITL_STREAM_MAX_SECONDS"] = "1s"
    app = await start_app(service_env)
    hold = HoldReconnect()
    target = f"127.0.0.1:{app.grpc_port}"
    try:
        async with (
            HitlClient(target, retry=FAST, interceptors=[hold]) as follower_client,
            HitlClient(target, retry=FAST) as client,
        ):
            follower = Follower(follower_client.events(after=""))
            try:
                # The first stream ends (status OK) with nothing in it; the
                # reconnect is held while a handoff starts.
                await wait_for(lambda: hold.calls >= 2, what="the reconnect")
                user = await client.create_user("Lea")
                session = await client.start_hitl(user.id)
                hold.release.set()
                gauge = app.metrics.stream_subscribers
                await wait_for(lambda: gauge._value.get() == 1, what="the second stream")
                await client.stop_hitl(session.id)
                await wait_for(lambda: "ended" in follower.kinds(), what="the ended event")
            finally:
                await follower.close()
    finally:
        await app.stop(grace=1)
    assert follower.kinds() == ["started", "queued", "ended"]


async def test_a_read_that_timed_out_does_not_break_the_iterator(app: App) -> None:
    """Waiting for the next event with a timeout (asyncio.wait_for or
    asyncio.timeout around anext) is a common polling loop. grpc cancels the
    call with the cancelled read; the iterator must reconnect after its
    cursor on the next read, not raise CancelledError (in a task nobody
    cancelled) on every later read."""
    async with HitlClient(f"127.0.0.1:{app.grpc_port}", retry=FAST) as client:
        user = await client.create_user("Max")
        session = await client.start_hitl(user.id)
        async with client.events(session_id=session.id, after="0") as stream:
            kinds = [(await anext(stream)).WhichOneof("kind") for _ in range(2)]
            # Nothing else happens in the session, so this read times out.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(anext(stream), 0.2)
            await client.stop_hitl(session.id)
            kinds.append((await asyncio.wait_for(anext(stream), 10)).WhichOneof("kind"))
    assert kinds == ["started", "queued", "ended"]


async def test_closing_the_client_ends_its_iterators(app: App) -> None:
    """close() (leaving ``async with HitlClient``) while a task follows
    events: the iterator ends like aclose() makes it end, instead of raising
    CancelledError in a task nobody cancelled (whoever awaits that task would
    then look cancelled itself)."""
    client = HitlClient(f"127.0.0.1:{app.grpc_port}", retry=FAST)
    stream = client.events(after="0")
    seen: list[pb.Event] = []

    async def follow() -> str:
        async for event in stream:
            seen.append(event)
        return "ended"

    task = asyncio.create_task(follow())
    gauge = app.metrics.stream_subscribers
    await wait_for(lambda: gauge._value.get() == 1, what="the stream to subscribe")
    await client.close()
    await asyncio.wait({task}, timeout=10)
    assert task.done()
    assert not task.cancelled(), "the follower ended with CancelledError"
    assert task.result() == "ended"


async def test_breaking_out_of_the_loop_closes_the_stream(app: App) -> None:
    """EventStream's docstring: "break out of the loop (or call aclose())
    when done". Breaking out of ``async for event in hitl.events(...)`` must
    not leave the call (and the server's subscription) open until the
    client closes or HITL_STREAM_MAX_SECONDS (an hour) pass."""
    gauge = app.metrics.stream_subscribers
    async with HitlClient(f"127.0.0.1:{app.grpc_port}", retry=FAST) as client:
        user = await client.create_user("Nia")
        session = await client.start_hitl(user.id)
        for _ in range(3):
            async for event in client.events(session_id=session.id, after="0"):
                assert event.HasField("started")
                break
        await wait_for(lambda: gauge._value.get() == 0, what="the streams to close")


async def test_the_iterator_keeps_reconnecting_through_a_long_outage() -> None:
    """While the service is down the iterator backs off (capped) and tries
    again, for as long as it takes: it "never ends by itself". The backoff
    bound is computed as initial * multiplier ** (failures - 1), which
    overflows a float at 1025 consecutive failures (about an hour at the
    default 5 s cap), and the iterator died with OverflowError. A fast
    policy gets there in a couple of seconds."""
    policy = RetryPolicy(initial_backoff=0.0001, max_backoff=0.0005)
    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    async with HitlClient(target, retry=policy) as client:
        stream = client.events(after="0")
        task = asyncio.create_task(anext(stream))
        try:
            await wait_for(
                lambda: stream.reconnects >= 1100 or task.done(),
                timeout=60,
                what="1100 reconnect attempts",
            )
            assert not task.done(), f"the iterator ended: {task.exception()!r}"
        finally:
            await stream.aclose()
            with pytest.raises((StopAsyncIteration, OverflowError)):
                await task


def test_backoff_of_a_very_long_outage_is_the_cap() -> None:
    # An int multiplier, as people write it, makes an int power: the
    # product with the float overflows then, not the power.
    for multiplier in (2.0, 2):
        policy = RetryPolicy(initial_backoff=0.2, max_backoff=5.0, multiplier=multiplier)
        for failures in (1024, 1025, 1100, 10_000):
            assert 2.5 <= policy.backoff(failures) <= 5.0


async def test_a_bad_request_id_is_the_services_invalid_argument(app: App) -> None:
    """A caller's own request_id (README: request_id=f"refund-{ticket_id}")
    that breaks the contract must come back as InvalidArgumentError with the
    request_id violation, as docs/errors.md says, not as grpc's internal
    ExecuteBatchError raised by the x-request-id header the client adds."""
    async with HitlClient(f"127.0.0.1:{app.grpc_port}", retry=FAST) as client:
        user = await client.create_user("Ole")
        with pytest.raises(InvalidArgumentError) as caught:
            await client.start_hitl(user.id, request_id="refund-Åsa-1")
        assert "request_id" in caught.value.fields


class _Backlogged:
    """A HitlService on its own thread and event loop whose gRPC core drops
    calls it has not handed to the service yet, as that of a replica short
    of CPU does once about 1000 wait (``grpc.server.max_pending_requests``;
    here 0 and a queue of one): while a call holds the loop, a new call gets
    CANCELLED from the core itself, never reaching a handler."""

    def __init__(self) -> None:
        self.held = threading.Event()  # a call is blocking the server's loop
        self.release = threading.Event()
        self.port = 0
        self.handled: list[str] = []  # the request_ids that reached SendMessage
        self._started = threading.Event()
        self._done: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._serve(),), daemon=True)

    def __enter__(self) -> _Backlogged:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()
        if self._loop is not None and self._done is not None:
            self._loop.call_soon_threadsafe(self._done.set_result, None)
        self._thread.join(10)

    async def _serve(self) -> None:
        backlogged = self

        class Servicer(pb_grpc.HitlServiceServicer):
            async def SendMessage(self, request: Any, context: Any) -> pb.SendMessageResponse:
                if request.request_id == "hold":
                    backlogged.held.set()
                    backlogged.release.wait(10)  # the loop does nothing else meanwhile
                backlogged.handled.append(request.request_id)
                return pb.SendMessageResponse(message_id="msg_1")

            async def StreamEvents(self, request: Any, context: Any) -> AsyncIterator[pb.Event]:
                yield pb.Event(cursor="7", session_id="ses_1")
                await asyncio.Event().wait()  # open until the client goes

        server = grpc.aio.server(
            options=(
                ("grpc.server.max_pending_requests", 0),
                ("grpc.server.max_pending_requests_hard_limit", 0),
            )
        )
        # Only SendMessage: the others answer UNIMPLEMENTED, as the base class does.
        servicer: Any = Servicer
        pb_grpc.add_HitlServiceServicer_to_server(servicer(), server)
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._loop = asyncio.get_running_loop()
        self._done = self._loop.create_future()
        self._started.set()
        await self._done
        await server.stop(0)

    async def hold(self, stub: pb_grpc.HitlServiceAsyncStub) -> Awaitable[Any]:
        """Blocks the server's loop and fills the core's queue, until a call
        is dropped; returns the calls that hold them."""
        held = stub.SendMessage(pb.SendMessageRequest(request_id="hold"), timeout=20)
        await wait_for(self.held.is_set, what="the server's loop held")
        queued = stub.SendMessage(pb.SendMessageRequest(request_id="queued"), timeout=20)

        async def dropped() -> bool:
            try:
                await stub.SendMessage(pb.SendMessageRequest(request_id="probe"), timeout=0.2)
            except grpc.aio.AioRpcError as exc:
                return exc.code() is grpc.StatusCode.CANCELLED
            return False

        await wait_for(dropped, what="a call the gRPC core dropped")
        return asyncio.gather(held, queued)


async def test_calls_the_servers_grpc_core_drops_are_retried() -> None:
    """A replica whose loop cannot keep up leaves calls in its gRPC core,
    which drops them (CANCELLED, before the service saw them) beyond about
    1000: 1800 concurrent SendMessage calls on one replica had a third
    answered so at once, far below HITL_RPC_MAX_IN_FLIGHT, and HitlClient
    raised HitlRpcError(CANCELLED) for them instead of retrying them as it
    does UNAVAILABLE."""
    recorder = Recorder()
    with _Backlogged() as server:
        target = f"127.0.0.1:{server.port}"
        async with (
            grpc.aio.insecure_channel(target) as channel,
            HitlClient(target, retry=FAST, interceptors=[recorder]) as client,
        ):
            stub: pb_grpc.HitlServiceAsyncStub = pb_grpc.HitlServiceStub(channel)
            holding = await server.hold(stub)
            sending = asyncio.create_task(client.send_message("ses_1", "hi", request_id="r-1"))
            await wait_for(
                lambda: recorder.of("SendMessage") or sending.done(), what="a dropped send"
            )
            server.release.set()
            sent = await asyncio.wait_for(sending, 10)
            await holding
    attempts = recorder.of("SendMessage")
    assert attempts[0].code == grpc.StatusCode.CANCELLED
    assert attempts[-1].code == grpc.StatusCode.OK
    assert {a.request_id for a in attempts} == {"r-1"}
    assert sent.message_id == "msg_1"
    assert server.handled.count("r-1") == 1


async def test_streams_the_servers_grpc_core_drops_reconnect() -> None:
    """The same for event iterators, which "never end by themselves": of
    3500 streams opened together on one replica (as after a restart, when
    its streams all reconnect), 362 were dropped so, and each such
    iterator raised HitlRpcError(CANCELLED)."""
    with _Backlogged() as server:
        target = f"127.0.0.1:{server.port}"
        async with (
            grpc.aio.insecure_channel(target) as channel,
            HitlClient(target, retry=FAST) as client,
        ):
            stub: pb_grpc.HitlServiceAsyncStub = pb_grpc.HitlServiceStub(channel)
            holding = await server.hold(stub)
            # Some wait in the core's queue; the others are dropped.
            streams = [client.events(session_id="ses_1", after="0") for _ in range(5)]
            reading = [asyncio.create_task(anext(stream)) for stream in streams]
            await wait_for(
                lambda: any(s.reconnects for s in streams) or any(r.done() for r in reading),
                what="a dropped stream",
            )
            server.release.set()
            events = await asyncio.wait_for(asyncio.gather(*reading), 10)
            for stream in streams:
                await stream.aclose()
            await holding
    assert [event.cursor for event in events] == ["7"] * 5
    assert any(stream.reconnects for stream in streams)


async def test_the_default_policy_rides_out_a_restart(
    service_env: dict[str, str], tmp_path: Path
) -> None:
    """A one-process (SQLite) deployment is unreachable for a few seconds
    at every deploy. A caller with the default policy (and default channel
    options) must see its call through a restart of the real process on the
    same port and file; the old default gave up after about 1.4 s of pauses."""
    env = {
        **service_env,
        "HITL_GRPC_ADDR": f"127.0.0.1:{free_port()}",
        "HITL_HTTP_ADDR": f"127.0.0.1:{free_port()}",
    }
    service = await ServiceProcess(env, cwd=tmp_path).start()
    recorder = Recorder()
    try:
        async with HitlClient(service.grpc_target, interceptors=[recorder]) as client:
            user = await client.create_user("Pia", external_id="crm-pia")
            assert await service.terminate() == 0
            starting = asyncio.create_task(client.start_hitl(user.id, title="during a deploy"))
            await wait_for(lambda: recorder.of("StartHitl"), what="an attempt on the stopped port")
            # A deploy's outage: the new process comes up 3 s after the call
            # first failed (a slow start: image pull, migrations, a busy host).
            failing_since = time.monotonic()
            await wait_for(
                lambda: starting.done() or time.monotonic() - failing_since >= 3.0,
                what="3 s of outage",
            )
            assert not starting.done(), f"the call gave up in the outage: {starting.exception()!r}"
            await service.start()
            session = await asyncio.wait_for(starting, 30)
    finally:
        await service.terminate()
    attempts = recorder.of("StartHitl")
    assert attempts[-1].code == grpc.StatusCode.OK
    assert {a.code for a in attempts[:-1]} == {grpc.StatusCode.UNAVAILABLE}
    assert len({a.request_id for a in attempts}) == 1
    assert session.user_id == user.id


def test_the_default_policy_retries_for_at_least_ten_seconds() -> None:
    """The restart test above holds 3 s; a deploy can take longer. Even at
    the jitter's lowest, the default's pauses add up to over 10 s, and at
    its highest they stay within the default deadline."""
    policy = RetryPolicy()
    bounds = [
        min(policy.max_backoff, policy.initial_backoff * policy.multiplier ** (n - 1))
        for n in range(1, policy.attempts)
    ]
    assert sum(bounds) / 2 >= 10.0
    assert sum(bounds) < DEFAULT_TIMEOUT


async def test_retries_stop_at_the_calls_deadline() -> None:
    """timeout= bounds the whole call: each attempt gets what is left of
    it, and no pause ends past it, so a caller's deadline holds however many
    attempts the policy allows."""
    recorder = Recorder()
    timeouts: list[float] = []

    class Deadlines(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(
            self,
            continuation: Callable[[Any, Any], Awaitable[Any]],
            client_call_details: grpc.aio.ClientCallDetails,
            request: Any,
        ) -> Any:
            timeouts.append(float(client_call_details.timeout or 0.0))
            return await continuation(client_call_details, request)

    target = f"127.0.0.1:{free_port()}"  # nothing listens there
    policy = RetryPolicy(attempts=1000, initial_backoff=0.05, max_backoff=0.1)
    async with HitlClient(target, retry=policy, interceptors=[Deadlines(), recorder]) as client:
        loop = asyncio.get_running_loop()
        began = loop.time()
        with pytest.raises(UnavailableError):
            await client.get_session("ses_x", timeout=1.5)
        elapsed = loop.time() - began
    assert 2 <= len(timeouts) < 1000
    assert timeouts == sorted(timeouts, reverse=True)
    assert all(0 < t <= 1.5 for t in timeouts)
    assert elapsed < 1.5 + 1.0  # generous: the deadline, not 1000 attempts


async def test_the_callers_channel_options_replace_the_clients_defaults(app: App) -> None:
    """gRPC keeps the first of repeated channel options: the caller's must
    come first, or one of the client's own (here its 1 MiB receive limit)
    silently wins."""
    target = f"127.0.0.1:{app.grpc_port}"
    small = [("grpc.max_receive_message_length", 64)]
    async with HitlClient(target, default_timeout=10, options=small) as client:
        with pytest.raises(HitlRpcError) as caught:
            await client.create_user("A" * 100, external_id="crm-big")
    assert caught.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
