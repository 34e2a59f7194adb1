"""A hostile or broken network client against the gRPC port and the sidecar."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from uvicorn.protocols.http.h11_impl import H11Protocol

from hitl_service import sidecar
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.server import MAX_METADATA_BYTES
from hitl_service.sidecar import MAX_HEAD_BYTES
from tests.conftest import start_app
from tests.support import EventCollector, make_user, start_session, wait_for

WAIT = 20.0  # a generous bound on waiting for a state, never asserted on


async def exchange(port: int, data: bytes) -> bytes:
    """Sends ``data`` on a new connection; all the server answers, until it closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()


async def test_unauthenticated_health_watch_cannot_park_large_requests(
    service_env: dict[str, str],
) -> None:
    """Health needs no token, so its Watch must not let anyone park a 1 MiB
    service name on the server for as long as they like (about 4 MB of
    server memory per stream, measured): unknown services are refused."""
    service_env["HITL_API_TOKENS"] = "first-token-1234"
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{app.grpc_port}", options=[("grpc.max_send_message_length", 2 << 20)]
        ) as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            known = health.Watch(health_pb2.HealthCheckRequest(service="hitl.v1.HitlService"))
            first = await asyncio.wait_for(known.read(), WAIT)
            assert first.status == health_pb2.HealthCheckResponse.SERVING
            known.cancel()

            parked = health.Watch(health_pb2.HealthCheckRequest(service="x" * 1_000_000))
            try:
                answer = await asyncio.wait_for(parked.read(), WAIT)
            except grpc.aio.AioRpcError as exc:
                answer = exc.code()
            finally:
                parked.cancel()
            assert answer == grpc.StatusCode.NOT_FOUND, f"the Watch stayed open: {answer!r}"
    finally:
        await app.stop(grace=1)


@pytest.mark.parametrize(
    ("partial", "expected"),
    [
        pytest.param(b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"", id="headers"),
        pytest.param(
            b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n" + b" " * 50_000,
            b"HTTP/1.1 408 ",
            id="body",
        ),
    ],
)
async def test_a_request_that_never_completes_is_dropped(
    service_env: dict[str, str], partial: bytes, expected: bytes
) -> None:
    """An unauthenticated client that sends part of a webhook and stalls
    holds a connection, a task and up to HITL_HTTP_MAX_BODY of buffered
    body for as long as it likes (200 stalled bodies: +193 MB RSS, kept):
    the sidecar must give up on it after HITL_HTTP_REQUEST_TIMEOUT."""
    service_env["HITL_HTTP_REQUEST_TIMEOUT"] = "1s"
    app = await start_app(service_env)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
        writer.write(partial)
        await writer.drain()
        try:
            answer = await asyncio.wait_for(reader.read(), WAIT)  # until the server closes
        except TimeoutError:
            answer = None
        finally:
            writer.close()
        assert answer is not None, "the sidecar still holds the stalled request"
        assert answer.startswith(expected), answer[:80]
    finally:
        await app.stop(grace=1)


async def test_request_headers_beyond_the_limit_are_refused(service_env: dict[str, str]) -> None:
    """uvicorn's httptools protocol keeps a request's headers in memory
    without a limit until they end: one unauthenticated connection sending
    a header that never ends grew the process by 400 MB in a second. Past
    MAX_HEAD_BYTES the sidecar answers 431 (h11: 400) and closes."""
    app = await start_app(service_env)
    try:
        # No more than this, then stop: what the server has not read when it
        # closes would reset the connection and could drop its answer.
        head = b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        answer = await exchange(app.http_port, head + b"a" * (MAX_HEAD_BYTES + 16_384 - len(head)))
        assert answer.startswith((b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")), answer[:80]
        # A request within the limit is served.
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            response = await http.get("/healthz", headers={"X-Big": "a" * 30_000})
        assert response.status_code == 200
        # A pipelined request's head arriving with much of the body before it
        # is not counted as head.
        body = b"{}" + b" " * 300_000
        first = b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        first += b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body)
        second = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        answers = await exchange(app.http_port, first + body + second)
        assert answers.startswith(b"HTTP/1.1 404 "), answers[:80]  # local takes no webhooks
        assert answers.count(b"HTTP/1.1 ") == 2, answers
        assert b"HTTP/1.1 200 " in answers, answers
    finally:
        await app.stop(grace=1)


@pytest.mark.parametrize("size", [40_000, MAX_HEAD_BYTES + 16_384])
async def test_without_httptools_the_head_limit_is_the_same(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, size: int
) -> None:
    """httptools is an extra (``speed``): without it uvicorn parses with h11,
    whose own limit (16 KiB by default) refused heads the documented 64 KiB
    allow. Within MAX_HEAD_BYTES an unfinished head waits (until the request
    timeout closes the connection without an answer); beyond it, h11
    answers 400 with a JSON reason."""
    monkeypatch.setattr(sidecar, "AutoHTTPProtocol", H11Protocol)
    service_env["HITL_HTTP_REQUEST_TIMEOUT"] = "1s"
    app = await start_app(service_env)
    try:
        head = b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: "
        answer = await exchange(app.http_port, head + b"a" * (size - len(head)))
        if size <= MAX_HEAD_BYTES:
            assert answer == b"", answer[:80]
            return
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert json.loads(body)["error"], body
    finally:
        await app.stop(grace=1)


@pytest.mark.parametrize("parser", ["httptools", "h11"])
@pytest.mark.parametrize(
    "size",
    # Not far beyond: the protocol may refuse a much larger head before it
    # has all been read, and closing with data unread resets the connection
    # (the answer may be lost).
    [MAX_HEAD_BYTES, MAX_HEAD_BYTES + 1, 100_000],
    ids=["at-the-limit", "one-byte-over", "100k"],
)
async def test_a_whole_head_beyond_the_limit_is_refused_however_it_arrives(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, parser: str, size: int
) -> None:
    """The protocol counts a head after each read: a complete head that came
    in one read (up to 256 KiB) was served (100,000 bytes: 200). The limit is
    the same for a head sent whole: at most MAX_HEAD_BYTES, then 431."""
    if parser == "h11":
        monkeypatch.setattr(sidecar, "AutoHTTPProtocol", H11Protocol)
    app = await start_app(service_env)
    try:
        start = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nX-Big: "
        end = b"\r\n\r\n"
        request = start + b"a" * (size - len(start) - len(end)) + end
        assert len(request) == size
        answer = await exchange(app.http_port, request)
        head, _, body = answer.partition(b"\r\n\r\n")
        if size <= MAX_HEAD_BYTES:
            assert head.startswith(b"HTTP/1.1 200 "), answer[:80]
            return
        # h11 refuses on its own (400) a head still incomplete past the limit,
        # if the head happened to arrive in pieces.
        accepted = (
            (b"HTTP/1.1 431 ",) if parser == "httptools" else (b"HTTP/1.1 431 ", b"HTTP/1.1 400 ")
        )
        assert head.startswith(accepted), answer[:80]
        assert json.loads(body)["error"], body
        if size == MAX_HEAD_BYTES + 1:
            assert head.startswith(b"HTTP/1.1 431 "), answer[:80]  # never incomplete past it
    finally:
        await app.stop(grace=1)


async def test_a_request_the_http_parser_refuses_gets_a_json_reason(
    service_env: dict[str, str],
) -> None:
    app = await start_app(service_env)
    try:
        answer = await exchange(
            app.http_port,
            b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\nBad Header: x\r\n\r\n",
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 400 "), answer[:80]
        assert b"content-type: application/json" in head.lower(), head
        assert json.loads(body)["error"], body
    finally:
        await app.stop(grace=1)


async def test_one_client_cannot_open_streams_without_end(service_env: dict[str, str]) -> None:
    """Every StreamEvents stream costs memory (2000 idle streams: +32 MB)
    and a wake-up per event: a process keeps at most HITL_STREAM_MAX_OPEN."""
    service_env["HITL_STREAM_MAX_OPEN"] = "5"
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub: Any = pb_grpc.HitlServiceStub(channel)
            streams = [stub.StreamEvents(pb.StreamEventsRequest()) for _ in range(8)]
            opened = 0
            for stream in streams:
                metadata = await asyncio.wait_for(stream.initial_metadata(), WAIT)
                opened += any(key == "x-stream-head" for key, _ in metadata)
            refused = [s for s in streams if s.done()]
            codes = [await s.code() for s in refused]
            for stream in streams:
                stream.cancel()
        assert opened == 5, f"{opened} streams open"
        assert codes == [grpc.StatusCode.UNAVAILABLE] * 3
    finally:
        await app.stop(grace=1)


async def test_one_client_cannot_open_health_watches_without_end(
    service_env: dict[str, str],
) -> None:
    """Health needs no API token, and each open Watch costs about 20 KB
    (6480 of them: +140 MB): a process keeps at most HITL_STREAM_MAX_OPEN,
    and a closed one makes room for another."""
    service_env["HITL_API_TOKENS"] = "first-token-1234"
    service_env["HITL_STREAM_MAX_OPEN"] = "3"
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            health: Any = health_pb2_grpc.HealthStub(channel)
            request = health_pb2.HealthCheckRequest(service="")
            watches = [health.Watch(request) for _ in range(3)]
            for watch in watches:
                first = await asyncio.wait_for(watch.read(), WAIT)
                assert first.status == health_pb2.HealthCheckResponse.SERVING
            refused = health.Watch(request)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(refused.read(), WAIT)
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            watches.pop().cancel()

            async def reopened() -> Any:
                while True:  # the server learns of the cancellation in its own time
                    again = health.Watch(request)
                    try:
                        return await again.read()
                    except grpc.aio.AioRpcError as exc:
                        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                    finally:
                        watches.append(again)

            answer = await asyncio.wait_for(reopened(), WAIT)
            assert answer.status == health_pb2.HealthCheckResponse.SERVING
            for watch in watches:
                watch.cancel()
    finally:
        await app.stop(grace=1)


# A client's HTTP/2 preface and an empty SETTINGS frame: a connection that
# has finished its handshake and then opens no call.
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


async def _closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Reads (a GOAWAY, say) until the server closes the connection."""
    try:
        while await reader.read(65536):
            pass
    except ConnectionError:
        pass
    return True


class _Flood:
    """Raw TCP connections to one port, each watched until the server closes
    it: ``closed[i]`` is done once the i-th connection opened is."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._writers: list[asyncio.StreamWriter] = []
        self.closed: list[asyncio.Task[bool]] = []

    async def open(self, count: int, first: bytes = b"") -> None:
        """Opens ``count`` more connections, each sending ``first``."""
        for _ in range(count):
            reader, writer = await asyncio.open_connection("127.0.0.1", self._port)
            writer.write(first)
            self._writers.append(writer)
            self.closed.append(asyncio.create_task(_closed_by_server(reader)))

    def close(self) -> None:
        """Closes them all, from the client's side."""
        for task in self.closed:
            task.cancel()
        for writer in self._writers:
            writer.close()
        self._writers.clear()


def _fresh_channel(port: int) -> grpc.aio.Channel:
    """A channel with a connection of its own (channels in one process share
    connections to the same target otherwise)."""
    return grpc.aio.insecure_channel(
        f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
    )


async def test_a_connection_flood_on_the_grpc_port_takes_only_that_port(
    service_env: dict[str, str],
) -> None:
    """Idle connections to the gRPC port were never closed or counted:
    20,000 of them took every file descriptor the process had (ulimit -n
    20000), and then no webhook, database file or provider call could open
    one. Beyond HITL_GRPC_MAX_CONNECTIONS a new connection is closed at
    once: the flood degrades the gRPC port only, and the sidecar, the store
    and a stream already open go on."""
    service_env["HITL_GRPC_MAX_CONNECTIONS"] = "20"
    service_env["HITL_GRPC_HANDSHAKE_TIMEOUT"] = "1h"  # the flood stays
    app = await start_app(service_env)
    flood = _Flood(app.grpc_port)
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http,
        ):
            stub: Any = pb_grpc.HitlServiceStub(channel)
            session = await start_session(stub, (await make_user(stub)).id)
            async with EventCollector(stub, session_id=session.id) as stream:
                await flood.open(40, H2_PREFACE)  # one connection is the stream's
                await wait_for(
                    lambda: sum(w.done() for w in flood.closed) >= 21,
                    timeout=WAIT,
                    what="the connections beyond the cap closed",
                )
                async with _fresh_channel(app.grpc_port) as extra:
                    extra_health: Any = health_pb2_grpc.HealthStub(extra)
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await extra_health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
                    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

                # The rest of the process: the sidecar, the store, the stream.
                assert (await http.get("/readyz")).status_code == 200
                chat = session.external_chat_id
                for action, body in (("take", {}), ("reply", {"text": "still here"})):
                    answer = await http.post(
                        f"/console/api/conversations/{chat}/{action}",
                        json={"agent": "Alex", **body},
                    )
                    assert answer.status_code == 200, answer.text
                message = await stream.wait_for_kind("agent_message", session.id)
                assert message.agent_message.message.text == "still here"
                assert stream.error is None
            assert sum(w.done() for w in flood.closed) == 21, "the cap let more in"

            flood.close()

            async def served() -> bool:
                async with _fresh_channel(app.grpc_port) as again:
                    health: Any = health_pb2_grpc.HealthStub(again)
                    try:
                        await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
                    except grpc.aio.AioRpcError:
                        return False  # the server has not seen every close yet
                    return True

            await wait_for(served, timeout=WAIT, what="a new connection once the flood left")
    finally:
        flood.close()
        await app.stop(grace=1)


@pytest.mark.parametrize(
    "sent", [pytest.param(b"", id="nothing"), pytest.param(H2_PREFACE[:10], id="part-preface")]
)
async def test_a_connection_that_never_speaks_http2_is_closed(
    service_env: dict[str, str], sent: bytes
) -> None:
    """A connection that never finishes its handshake holds a descriptor
    and a place under HITL_GRPC_MAX_CONNECTIONS: it is closed after
    HITL_GRPC_HANDSHAKE_TIMEOUT (it stayed a minute)."""
    service_env["HITL_GRPC_HANDSHAKE_TIMEOUT"] = "0.5s"
    app = await start_app(service_env)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.grpc_port)
        writer.write(sent)
        try:
            closed = await asyncio.wait_for(_closed_by_server(reader), WAIT)
        except TimeoutError:
            closed = False
        finally:
            writer.close()
        assert closed, "the server still holds the silent connection"
    finally:
        await app.stop(grace=1)


async def test_an_idle_grpc_connection_is_closed_and_its_client_reconnects(
    service_env: dict[str, str],
) -> None:
    """A connection with no call open for HITL_GRPC_IDLE_TIMEOUT is told
    GOAWAY and closed (they stayed for good, each holding a descriptor and a
    place under the cap): a client's next call reconnects by itself, and a
    stream open on a connection is a call, so the stream goes on."""
    service_env["HITL_GRPC_IDLE_TIMEOUT"] = "0.5s"
    app = await start_app(service_env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub: Any = pb_grpc.HitlServiceStub(channel)
            session = await start_session(stub, (await make_user(stub)).id)
            async with EventCollector(stub, session_id=session.id) as stream:
                # Opened after the stream's: its idle time ends later.
                async with _fresh_channel(app.grpc_port) as idle:
                    health: Any = health_pb2_grpc.HealthStub(idle)
                    await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
                    reader, writer = await asyncio.open_connection("127.0.0.1", app.grpc_port)
                    writer.write(H2_PREFACE)
                    try:
                        await asyncio.wait_for(_closed_by_server(reader), WAIT)
                    finally:
                        writer.close()
                    await wait_for(
                        lambda: idle.get_state() == grpc.ChannelConnectivity.IDLE,
                        timeout=WAIT,
                        what="the idle channel's connection closed by the server",
                    )
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING

                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
                    chat = session.external_chat_id
                    taken = await http.post(
                        f"/console/api/conversations/{chat}/take", json={"agent": "Alex"}
                    )
                    assert taken.status_code == 200, taken.text
                await stream.wait_for_kind("agent_assigned", session.id)
                assert stream.error is None
    finally:
        await app.stop(grace=1)


def _shed(app: Any, closed: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "hitl_http_connections_shed_total", {"closed": closed}
    )
    return float(value or 0.0)


@pytest.mark.parametrize("parser", ["auto", "h11"])
async def test_a_connection_flood_on_the_http_port_takes_only_that_port(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, parser: str
) -> None:
    """Connections to the sidecar were not counted, and an idle one stayed
    HITL_HTTP_REQUEST_TIMEOUT: 2,500 of them took every descriptor of a
    2,000 limit, and gRPC, the store and provider calls could open none.
    At HITL_HTTP_MAX_CONNECTIONS a new connection closes the oldest idle
    one (so a flood of idle ones cannot lock probes out), or, when every
    open one has a request in progress, is closed itself: the flood
    degrades the webhook port only."""
    if parser == "h11":  # without the speed extra's httptools
        monkeypatch.setattr(sidecar, "AutoHTTPProtocol", H11Protocol)
    cap = 6
    service_env["HITL_HTTP_MAX_CONNECTIONS"] = str(cap)
    service_env["HITL_HTTP_REQUEST_TIMEOUT"] = "1h"  # the flood stays
    app = await start_app(service_env)
    flood = _Flood(app.http_port)
    try:
        assert (_shed(app, "idle"), _shed(app, "new")) == (0.0, 0.0)  # exported at zero
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            stub: Any = pb_grpc.HitlServiceStub(channel)
            session = await start_session(stub, (await make_user(stub)).id)
            async with EventCollector(stub, session_id=session.id) as stream:
                await flood.open(3 * cap)
                await wait_for(
                    lambda: all(w.done() for w in flood.closed[: 2 * cap]),
                    timeout=WAIT,
                    what="the oldest idle connections closed for the newer ones",
                )
                # A probe in the flood is served: it closes the oldest idle one.
                async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
                    assert (await http.get("/readyz")).status_code == 200
                await wait_for(
                    lambda: flood.closed[2 * cap].done(), timeout=WAIT, what="room for the probe"
                )
                assert not any(w.done() for w in flood.closed[2 * cap + 1 :]), "closed too many"
                assert _shed(app, "idle") == 2 * cap + 1

                # The rest of the process: gRPC calls, a new gRPC connection, the stream.
                async with _fresh_channel(app.grpc_port) as extra:
                    health: Any = health_pb2_grpc.HealthStub(extra)
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=WAIT)
                    assert answer.status == health_pb2.HealthCheckResponse.SERVING
                await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=WAIT)
                await stream.wait_for_kind("ended", session.id)
                assert stream.error is None
            flood.close()

            # Every connection busy (webhooks whose body has not come): a new
            # one is closed at once, without taking a busy one's place.
            await flood.open(
                cap,
                b"POST /webhooks/local HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n",
            )
            await wait_for(
                lambda: app.activity.http == cap, timeout=WAIT, what="every connection busy"
            )
            reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
            try:
                writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert await asyncio.wait_for(reader.read(), WAIT) == b""
            finally:
                writer.close()
            assert _shed(app, "new") == 1
            assert app.activity.http == cap  # the busy ones go on

            flood.close()

            async def served() -> bool:
                try:
                    async with httpx.AsyncClient() as http:
                        url = f"http://127.0.0.1:{app.http_port}/healthz"
                        return (await http.get(url)).status_code == 200
                except httpx.TransportError:
                    return False  # the server has not seen every close yet

            await wait_for(served, timeout=WAIT, what="a new connection once the flood left")
    finally:
        flood.close()
        await app.stop(grace=1)


async def test_a_calls_metadata_has_one_limit_not_a_chance(app: Any) -> None:
    """gRPC's defaults refuse a call's metadata beyond 8 KiB only at random
    (a soft limit, more often the closer to 16 KiB): with 12 KB of headers
    (a long token, tracing baggage) the same GetSession passed 17 times in
    40 and failed 23 with RESOURCE_EXHAUSTED. Now up to MAX_METADATA_BYTES
    always passes, and beyond it always fails, as docs/errors.md says."""
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{app.grpc_port}", options=[("grpc.max_metadata_size", 1 << 20)]
    ) as channel:
        stub: Any = pb_grpc.HitlServiceStub(channel)

        async def code(header_bytes: int) -> grpc.StatusCode:
            try:
                await stub.GetSession(
                    pb.GetSessionRequest(session_id="nope"),
                    metadata=(("x-baggage", "v" * header_bytes),),
                    timeout=WAIT,
                )
            except grpc.aio.AioRpcError as exc:
                return exc.code()
            return grpc.StatusCode.OK

        # Within the limit with the call's own headers (HPACK counts each
        # entry as name + value + 32 bytes).
        within = [await code(MAX_METADATA_BYTES - 1024) for _ in range(20)]
        beyond = [await code(MAX_METADATA_BYTES + 1) for _ in range(5)]
    assert within == [grpc.StatusCode.NOT_FOUND] * 20
    assert beyond == [grpc.StatusCode.RESOURCE_EXHAUSTED] * 5


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return (
        len(payload).to_bytes(3, "big") + bytes((kind, flags)) + stream.to_bytes(4, "big") + payload
    )


async def _read_h2_frame(reader: asyncio.StreamReader) -> tuple[int, int, bytes]:
    head = await asyncio.wait_for(reader.readexactly(9), WAIT)
    payload = await asyncio.wait_for(reader.readexactly(int.from_bytes(head[:3], "big")), WAIT)
    return head[3], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload


async def test_one_connection_carries_at_most_the_calls_the_process_takes(
    service_env: dict[str, str],
) -> None:
    """gRPC's default lets one connection carry any number of calls at once
    (no HTTP/2 MAX_CONCURRENT_STREAMS). A client that opened streams and
    reset them at once ("rapid reset", 330,000 in 15 s on one connection)
    filled the queue of calls gRPC's core keeps for the service: 75 of 85
    GetSession calls of another client were answered CANCELLED meanwhile.
    The server now announces HITL_STREAM_MAX_OPEN + HITL_RPC_MAX_IN_FLIGHT
    and refuses streams beyond it, which also arms gRPC's pushback against
    such resets (the same flood: 0 to 3 in 250 calls CANCELLED)."""
    service_env["HITL_STREAM_MAX_OPEN"] = "4"
    service_env["HITL_RPC_MAX_IN_FLIGHT"] = "2"
    app = await start_app(service_env)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", app.grpc_port)
        writer.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0))
        kind, _, payload = await _read_h2_frame(reader)
        assert kind == 4  # the server's SETTINGS come first
        settings = {
            int.from_bytes(payload[i : i + 2], "big"): int.from_bytes(payload[i + 2 : i + 6], "big")
            for i in range(0, len(payload), 6)
        }
        assert settings.get(3) == 6, f"MAX_CONCURRENT_STREAMS: {settings.get(3)}"
        # Seven calls that never send their request: the seventh is refused
        # (RST_STREAM) by gRPC, not queued for the service.
        headers = b"".join(
            b"\x00" + bytes((len(name),)) + name + bytes((len(value),)) + value
            for name, value in (
                (b":method", b"POST"),
                (b":scheme", b"http"),
                (b":path", b"/hitl.v1.HitlService/GetSession"),
                (b":authority", b"127.0.0.1"),
                (b"content-type", b"application/grpc"),
                (b"te", b"trailers"),
            )
        )
        writer.write(_h2_frame(4, 1, 0))  # acknowledge the server's SETTINGS
        writer.write(b"".join(_h2_frame(1, 4, 2 * i + 1, headers) for i in range(7)))
        await writer.drain()
        reset: list[int] = []
        while not reset:
            kind, stream, _ = await _read_h2_frame(reader)
            if kind == 3:  # RST_STREAM
                reset.append(stream)
        writer.close()
        assert reset == [13]
    finally:
        await app.stop(grace=1)
