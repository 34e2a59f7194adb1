"""The client through timeouts, outages, reconnects and shutdown."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest

from hitl_service.app import App
from hitl_service.client import HitlClient, InvalidArgumentError, RetryPolicy
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.conftest import start_app
from tests.e2e.helpers import free_port
from tests.support import wait_for
from tests.test_client import Follower

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
