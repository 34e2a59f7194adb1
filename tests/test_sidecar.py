"""The HTTP sidecar: health, readiness, metrics and the generic webhook
route (verified, committed before 200, deduplicated, bad input → 4xx)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import asyncpg
import grpc
import httpx
import pytest
import structlog
from grpc_health.v1 import health_pb2, health_pb2_grpc
from structlog.contextvars import merge_contextvars

from hitl_service.clock import SystemClock
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.types import (
    Agent,
    AgentAssigned,
    InboundEvent,
    ProviderChat,
    ProviderUser,
    StartRequest,
    StartResult,
    WebhookBatch,
)
from tests.conftest import scripted_on_clock, start_app
from tests.scripted import SECRET, Fault, ScriptedProvider
from tests.support import TIMEOUT, EventCollector, make_user, start_session, wait_for

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Sequence

    from hitl_service.app import App
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub


@pytest.fixture
async def hook(scripted_app: App) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{scripted_app.http_port}") as c:
        yield c


def envelope(chat_id: str, key: str, kind: str = "message", **extra: Any) -> dict[str, Any]:
    return {"secret": SECRET, "chat_id": chat_id, "key": key, "type": kind, **extra}


async def post(client: httpx.AsyncClient, body: object) -> httpx.Response:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return await client.post(
        "/webhooks/scripted", content=raw, headers={"content-type": "application/json"}
    )


class TestHealth:
    async def test_healthz_readyz_metrics(self, http: httpx.AsyncClient) -> None:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        ready = await http.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["status"] == "ready"
        metrics = await http.get("/metrics")
        assert metrics.status_code == 200
        assert "grpc_server_handled_total" in metrics.text
        assert "hitl_outbox_pending" in metrics.text

    async def test_readyz_is_not_ready_from_the_first_moment_of_the_shutdown(
        self, app: App
    ) -> None:
        """gRPC health says NOT_SERVING as the shutdown begins; /readyz
        answered 200 until the sidecar's listener closed (0.1-0.2 s later
        under load, measured), telling a probe or a load balancer to send
        more to a replica on its way out. It answers 503 from then on. Here a
        webhook in progress keeps the sidecar draining, and /readyz is asked
        behind the listener."""
        reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
        sidecar = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app.sidecar), base_url="http://sidecar"
        )
        stopping: asyncio.Task[None] | None = None
        try:
            assert (await sidecar.get("/readyz")).status_code == 200
            writer.write(
                b"POST /webhooks/local HTTP/1.1\r\nHost: hitl\r\nContent-Length: 2\r\n"
                b"Expect: 100-continue\r\n\r\n"
            )
            await writer.drain()
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 ")
            stopping = asyncio.create_task(app.stop(grace=1))
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                health: Any = health_pb2_grpc.HealthStub(channel)

                async def not_serving() -> bool:
                    answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                    return bool(answer.status == health_pb2.HealthCheckResponse.NOT_SERVING)

                await wait_for(not_serving, what="the shutdown to begin")
            response = await sidecar.get("/readyz")
            assert response.status_code == 503
            assert response.json() == {
                "status": "unavailable",
                "problems": {"service": "shutting down"},
            }
            assert not stopping.done()  # the sidecar still serves the webhook
        finally:
            writer.write(b"{}")
            writer.close()
            await sidecar.aclose()
            if stopping is not None:
                await stopping

    async def test_readyz_reports_provider_problems(
        self, hook: httpx.AsyncClient, scripted: ScriptedProvider
    ) -> None:
        scripted.problems.append("HITL_SCRIPTED_TOKEN: refused")
        response = await hook.get("/readyz")
        assert response.status_code == 503
        assert response.json()["problems"]["provider"] == "HITL_SCRIPTED_TOKEN: refused"

    async def test_concurrent_readiness_checks_share_one_probe(
        self,
        scripted_app: App,
        hook: httpx.AsyncClient,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Load balancers and kubelets probing while the provider is slow
        must not each add a call to it (and each wait for their own)."""
        probes = 0
        probe = scripted.probe

        async def counted(*, timeout: float) -> Sequence[str]:
            nonlocal probes
            probes += 1
            return await probe(timeout=timeout)

        monkeypatch.setattr(scripted, "probe", counted)
        gate = scripted.hold("probe")
        checks = [asyncio.create_task(hook.get("/readyz")) for _ in range(5)]
        server = scripted_app._http
        assert server is not None
        # All five are in the server (each runs on the loop alone up to the
        # probe: nothing else it awaits leaves the process).
        await wait_for(lambda: len(server.server_state.tasks) == 5, what="5 checks in progress")
        await wait_for(lambda: scripted.waiting.get("probe", 0) >= 1, what="a probe held")
        gate.set()
        answers = await asyncio.gather(*checks)
        assert [a.status_code for a in answers] == [200] * 5
        assert probes == 1

    async def test_readyz_reports_a_closed_store(
        self, scripted_app: App, hook: httpx.AsyncClient
    ) -> None:
        await scripted_app.store.close()
        response = await hook.get("/readyz")
        assert response.status_code == 503
        assert "store" in response.json()["problems"]

    async def test_readyz_answers_while_the_store_hangs(
        self, scripted_app: App, hook: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A frozen database: probes get their 503 within the check's time
        (not after the ping's own timeout plus a query cancellation), and
        share one ping instead of each holding a connection."""
        pings = 0
        frozen = asyncio.Event()

        async def hung() -> None:
            nonlocal pings
            pings += 1
            await frozen.wait()

        monkeypatch.setattr(scripted_app.store, "ping", hung)
        try:
            answers = await asyncio.gather(*(hook.get("/readyz") for _ in range(3)))
            assert [a.status_code for a in answers] == [503] * 3
            assert all(a.json()["problems"]["store"] == "unavailable" for a in answers)
            assert pings == 1
        finally:
            frozen.set()  # the database answers again

        async def ready() -> bool:
            return (await hook.get("/readyz")).status_code == 200

        await wait_for(ready, what="ready once the database answers")

    async def test_readyz_answers_in_time_while_store_and_provider_hang(
        self,
        scripted_app: App,
        hook: httpx.AsyncClient,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A network partition holds the database and the provider alike:
        the check still answers within its timeout (min(5 s, 2 s) here), not
        the store's timeout and then the probe's: the probe starts while the
        ping is still awaited, before the store is reported unavailable."""
        frozen = asyncio.Event()

        async def hung() -> None:
            await frozen.wait()

        monkeypatch.setattr(scripted_app.store, "ping", hung)
        scripted.fail("probe", Fault("hang"))
        probe = scripted.probe
        store_reported_first: list[bool] = []

        async def watched(*, timeout: float) -> Sequence[str]:
            store_reported_first.append(any(e["event"] == "readyz.store_unavailable" for e in logs))
            return await probe(timeout=timeout)

        monkeypatch.setattr(scripted, "probe", watched)
        try:
            with structlog.testing.capture_logs() as logs:
                answer = await hook.get("/readyz")
        finally:
            frozen.set()
        assert answer.status_code == 503
        assert set(answer.json()["problems"]) == {"store", "provider"}
        assert store_reported_first == [False]  # alongside the ping, not after its timeout

    async def test_unknown_routes_and_methods_answer_json(self, http: httpx.AsyncClient) -> None:
        missing = await http.get("/nope")
        assert missing.status_code == 404
        assert "error" in missing.json()
        wrong = await http.get("/webhooks/local")
        assert wrong.status_code == 405
        assert "error" in wrong.json()


class TestWebhooks:
    async def test_event_is_committed_before_the_answer(
        self, scripted_stub: Stub, hook: httpx.AsyncClient, scripted_app: App
    ) -> None:
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        head_before = await scripted_app.store.head()
        response = await post(hook, envelope(session.external_chat_id, "e1", text="hello"))
        assert response.status_code == 200
        assert response.json() == {"accepted": 2, "duplicates": 0, "ignored": 0}
        # Committed by the time the 200 arrived: readable from the store now.
        events = await scripted_app.store.read_events(after=head_before, limit=10)
        assert [type(e.kind).__name__ for e in events] == ["AgentAssigned", "AgentMessage"]

    async def test_the_request_id_is_echoed(self, hook: httpx.AsyncClient) -> None:
        given = await hook.post(
            "/webhooks/scripted", content=b"{}", headers={"x-request-id": "trace-123"}
        )
        assert given.headers["x-request-id"] == "trace-123"
        generated = await hook.post("/webhooks/scripted", content=b"{}")
        assert len(generated.headers["x-request-id"]) == 16

    async def test_redelivery_is_recorded_once(
        self, scripted_stub: Stub, hook: httpx.AsyncClient
    ) -> None:
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        body = envelope(session.external_chat_id, "dup-1", text="once")
        first, second, third = await asyncio.gather(*(post(hook, body) for _ in range(3)))
        statuses = {first.status_code, second.status_code, third.status_code}
        assert statuses == {200}
        accepted = sum(r.json()["accepted"] for r in (first, second, third))
        assert accepted == 2  # agent_assigned + agent_message, from one delivery only
        async with EventCollector(scripted_stub, session_id=session.id) as events:
            await wait_for(lambda: len(events.events) >= 4, what="the session's events")
        assert events.kinds().count("agent_message") == 1

    async def test_chats_that_are_not_ours_get_200_and_leave_nothing(
        self, hook: httpx.AsyncClient, scripted_app: App
    ) -> None:
        head = await scripted_app.store.head()
        response = await post(hook, envelope("SOMEONE_ELSE", "x1"))
        assert response.status_code == 200
        assert response.json()["accepted"] == 0
        assert await scripted_app.store.head() == head

    @pytest.mark.parametrize(
        ("body", "status"),
        [
            (b"not json", 400),
            (b"[1, 2]", 400),
            ({"chat_id": "C", "key": "k", "type": "message"}, 401),
            ({"secret": "wrong", "chat_id": "C", "key": "k"}, 401),
            ({"secret": SECRET, "key": "k"}, 400),
        ],
    )
    async def test_bad_deliveries_get_4xx_with_a_json_reason(
        self, hook: httpx.AsyncClient, body: object, status: int, scripted_app: App
    ) -> None:
        head = await scripted_app.store.head()
        response = await post(hook, body)
        assert response.status_code == status
        assert response.json()["error"]
        assert await scripted_app.store.head() == head

    async def test_body_over_the_limit_is_413(self, hook: httpx.AsyncClient) -> None:
        response = await post(hook, b"x" * (1024 * 1024 + 1))
        assert response.status_code == 413
        assert "larger" in response.json()["error"]

    async def test_chunked_body_over_the_limit_is_413(self, hook: httpx.AsyncClient) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            for _ in range(300):
                yield b"y" * 4096

        response = await hook.post("/webhooks/scripted", content=chunks())
        assert response.status_code == 413

    async def test_unknown_provider_is_404(self, hook: httpx.AsyncClient) -> None:
        response = await post(hook, envelope("C", "k"))
        assert response.status_code == 200
        other = await hook.post("/webhooks/livechat", content=b"{}")
        assert other.status_code == 404
        assert "livechat" in other.json()["error"]

    async def test_an_unknown_provider_name_is_logged_and_answered_shortened(
        self, hook: httpx.AsyncClient
    ) -> None:
        with structlog.testing.capture_logs(processors=[merge_contextvars]) as logs:
            other = await hook.post("/webhooks/" + "x" * 50_000, content=b"{}")
        assert other.status_code == 404
        assert len(other.content) < 200
        [done] = [entry for entry in logs if entry["event"] == "webhook.done"]
        assert done["provider"] == "x" * 63 + "…"

    async def test_an_unknown_path_is_answered_shortened(self, hook: httpx.AsyncClient) -> None:
        """As the webhook's provider name: any route's 404 or 405."""
        for method, path, status in (
            ("GET", "/" + "x" * 50_000, 404),
            ("POST", "/webhooks/a/" + "x" * 50_000, 404),
            ("GET", "/webhooks/" + "x" * 50_000, 405),
        ):
            response = await hook.request(method, path)
            assert response.status_code == status
            assert len(response.content) < 400, response.content[:80]

    async def test_unknown_action_is_ignored_with_200(self, hook: httpx.AsyncClient) -> None:
        response = await post(hook, envelope("C", "k", kind="typing"))
        assert response.status_code == 200
        assert response.json()["accepted"] == 0

    async def test_a_payload_that_fails_to_process_is_kept_for_inspection(
        self, scripted_stub: Stub, hook: httpx.AsyncClient, scripted_app: App
    ) -> None:
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        response = await post(hook, envelope(session.external_chat_id, "boom", kind="explode"))
        assert response.status_code == 500
        error_id = response.json()["error_id"]
        assert "Traceback" not in response.text
        (letter,) = await scripted_app.store.list_dead_letters(10)
        assert letter.id == error_id
        assert session.external_chat_id.encode() in letter.body
        assert SECRET.encode() not in letter.body
        # The service is still healthy and takes the next delivery.
        ok = await post(hook, envelope(session.external_chat_id, "after", text="still here"))
        assert ok.status_code == 200

    async def test_webhook_metrics_count_outcomes(
        self, scripted_stub: Stub, hook: httpx.AsyncClient, scripted_app: App
    ) -> None:
        session = await start_session(scripted_stub, (await make_user(scripted_stub)).id)
        await post(hook, envelope(session.external_chat_id, "m1"))
        await post(hook, envelope(session.external_chat_id, "m1"))
        await post(hook, {"secret": "bad"})
        registry = scripted_app.metrics.registry

        def count(outcome: str) -> float:
            value = registry.get_sample_value(
                "hitl_webhook_requests_total", {"provider": "scripted", "outcome": outcome}
            )
            return value or 0.0

        assert (count("accepted"), count("duplicate"), count("rejected")) == (1, 1, 1)


@dataclass
class Held:
    """A request sent over a raw connection up to half its body, then held."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    rest: bytes

    @classmethod
    async def open(cls, port: int, path: str, body: bytes) -> Held:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        half = len(body) // 2
        writer.write(head.encode() + body[:half])
        await writer.drain()
        return cls(reader, writer, body[half:])

    async def finish(self) -> bytes:
        """Sends the rest of the body; the status line of the answer."""
        self.writer.write(self.rest)
        await self.writer.drain()
        return await asyncio.wait_for(self.reader.readline(), TIMEOUT)

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def overloaded(app: App) -> float:
    value = app.metrics.registry.get_sample_value(
        "hitl_webhook_requests_total", {"provider": app.provider.name, "outcome": "overloaded"}
    )
    return value or 0.0


class TestInFlightLimit:
    """HITL_HTTP_MAX_IN_FLIGHT: slow or concurrent bodies beyond it are not
    read (each may hold up to HITL_HTTP_MAX_BODY); probes still get through."""

    @pytest.fixture
    def service_env(self, service_env: dict[str, str]) -> dict[str, str]:
        service_env["HITL_HTTP_MAX_IN_FLIGHT"] = "2"
        return service_env

    async def test_a_webhook_beyond_the_limit_gets_503_and_probes_still_answer(
        self, scripted_app: App, hook: httpx.AsyncClient
    ) -> None:
        assert overloaded(scripted_app) == 0.0  # exported at zero from the start
        port = scripted_app.http_port
        body = json.dumps(envelope("SOMEONE_ELSE", "held")).encode()
        held = [await Held.open(port, "/webhooks/scripted", body) for _ in range(2)]
        try:
            await wait_for(lambda: scripted_app.activity.http == 2, what="2 webhooks held")
            refused = await post(hook, envelope("SOMEONE_ELSE", "third"))
            assert refused.status_code == 503
            assert refused.json()["error"].startswith("too many requests in progress")
            assert refused.headers["retry-after"] == "1"
            assert refused.headers["x-request-id"]
            assert (await hook.get("/healthz")).status_code == 200
            metrics = await hook.get("/metrics")
            assert metrics.status_code == 200
            assert (
                'hitl_webhook_requests_total{outcome="overloaded",provider="scripted"} 1.0'
                in metrics.text
            )
            assert (await hook.get("/readyz")).status_code == 200
            assert scripted_app.activity.http == 2  # none of these counted

            assert (await held[0].finish()).startswith(b"HTTP/1.1 200 ")
            await wait_for(lambda: scripted_app.activity.http == 1, what="one webhook done")
            accepted = await post(hook, envelope("SOMEONE_ELSE", "fourth"))
            assert accepted.status_code == 200
            assert overloaded(scripted_app) == 1.0
        finally:
            for request in held:
                await request.close()
        await wait_for(lambda: scripted_app.activity.http == 0, what="all requests done")

    async def test_the_providers_own_routes_count_until_their_answer_starts(
        self, app: App, http: httpx.AsyncClient
    ) -> None:
        """Console actions count and are refused like webhooks; the console's
        event stream stops counting once it streams (it holds no body)."""
        port = app.http_port
        action = "/console/api/conversations/NOPE/take"
        held = [await Held.open(port, action, b'{"agent": "Ann"}') for _ in range(2)]
        try:
            await wait_for(lambda: app.activity.http == 2, what="2 console actions held")
            refused = await http.post(action, json={"agent": "Bob"})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            assert "too many requests" in refused.json()["error"]
            webhook = await http.post("/webhooks/local", content=b"{}")
            assert webhook.status_code == 503
            assert (await http.get("/healthz")).status_code == 200
            assert (await held[0].finish()).startswith(b"HTTP/1.1 404 ")  # no chat NOPE
            await wait_for(lambda: app.activity.http == 1, what="one action done")
            async with http.stream("GET", "/console/api/stream") as stream:
                assert stream.status_code == 200
                lines = stream.aiter_lines()
                assert (await asyncio.wait_for(anext(lines), TIMEOUT)).startswith("data: ")
                assert app.activity.http == 1  # the held action only
                assert (await http.get("/console/api/state")).status_code == 200
        finally:
            for request in held:
                await request.close()
        await wait_for(lambda: app.activity.http == 0, what="all requests done")


@pytest.mark.parametrize(("connections", "warned"), [("8", True), ("9", False)])
async def test_a_connection_cap_not_above_the_in_flight_limit_is_warned_at_start(
    service_env: dict[str, str], connections: str, warned: bool
) -> None:
    # At 8 connections and 8 in flight, 8 slow webhooks fill the connection
    # cap, so a probe is closed unanswered before the in-flight 503 is due.
    env = {**service_env, "HITL_HTTP_MAX_IN_FLIGHT": "8", "HITL_HTTP_MAX_CONNECTIONS": connections}
    with structlog.testing.capture_logs() as logs:
        app = await start_app(env)
        await app.stop(grace=0)
    assert "service.ready" in [e["event"] for e in logs]
    low = [e for e in logs if e["event"] == "service.http_connections_low"]
    assert len(low) == int(warned)
    if warned:
        assert low[0]["log_level"] == "warning"
        assert (low[0]["http_max_connections"], low[0]["http_max_in_flight"]) == (8, 8)
        assert "HITL_HTTP_MAX_CONNECTIONS (8)" in low[0]["problem"]


class TestStartRace:
    async def test_events_for_a_chat_reported_before_its_start_commits_are_kept(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """The provider may report on a new chat before StartHitl has stored its id."""
        user = await make_user(scripted_stub)
        gate, start = await _start_held_at_the_provider(scripted_stub, scripted, user.id)
        # While the start is held, the chat CHAT0001 gets an agent.
        added = await scripted.push(
            "CHAT0001", AgentAssigned(Agent("jane@acme.test", "Jane")), "early"
        )
        assert added == 0  # parked, not applied yet
        gate.set()
        session = await start
        assert session.external_chat_id == "CHAT0001"
        assert session.state == pb.SESSION_STATE_ASSIGNED
        assert session.agent.name == "Jane"

    @pytest.mark.postgres
    async def test_an_event_parked_while_the_start_commits_is_not_left_behind(
        self, service_env: dict[str, str], postgres_dsn: str
    ) -> None:
        """On PostgreSQL a webhook's transaction runs beside the start's: one
        that read the chat as nobody's before the start committed must not
        park its event after the start took the parked ones (nothing would
        ever apply it, and its dedupe key is spent)."""
        service_env["HITL_STORE_URL"] = postgres_dsn
        observer = await asyncpg.connect(postgres_dsn)
        holder = await asyncpg.connect(postgres_dsn)
        try:
            async with scripted_on_clock(service_env, SystemClock()) as (_, stub, scripted):
                user = await make_user(stub)
                gate, start = await _start_held_at_the_provider(stub, scripted, user.id)
                # Another transaction holds the event's dedupe key for now:
                # the webhook's transaction, having found no session for the
                # chat, waits there until this one rolls back.
                held = holder.transaction()
                await held.start()
                await holder.execute(
                    "INSERT INTO dedupe_keys (provider, key, created_at) "
                    "VALUES ('scripted', 'early', now())"
                )
                push = asyncio.create_task(
                    scripted.push(
                        "CHAT0001", AgentAssigned(Agent("jane@acme.test", "Jane")), "early"
                    )
                )

                await wait_for(lambda: _waiting_on_locks(observer, 1), what="the webhook to wait")
                gate.set()
                # The start commits now, or waits for the webhook's transaction.
                await wait_for(
                    lambda: start.done() or _waiting_on_locks(observer, 2),
                    what="the start to commit or wait",
                )
                await held.rollback()
                await push
                session = await start
                assert session.external_chat_id == "CHAT0001"
                got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id))
                assert got.session.state == pb.SESSION_STATE_ASSIGNED
                assert got.session.agent.name == "Jane"
                assert await observer.fetchval("SELECT count(*) FROM parked_events") == 0
        finally:
            await holder.close()
            await observer.close()

    @pytest.mark.postgres
    async def test_an_event_for_a_resumed_chat_finds_the_session_that_resumed_it(
        self, service_env: dict[str, str], postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A returning user's handoff gets a new thread of the same chat. A
        webhook about that thread that waited on the chat's previous session
        while the start committed must find the new session (PostgreSQL
        hands it the previous one, which it locked, after the wait)."""
        service_env["HITL_STORE_URL"] = postgres_dsn
        observer = await asyncpg.connect(postgres_dsn)
        holder = await asyncpg.connect(postgres_dsn)
        try:
            async with scripted_on_clock(service_env, SystemClock()) as (_, stub, scripted):
                threads = iter(["T1", "T2"])
                plain = scripted.start

                async def threaded(
                    request: StartRequest, user: ProviderUser, *, timeout: float
                ) -> StartResult:
                    result = await plain(request, user, timeout=timeout)
                    chat = ProviderChat(result.chat.external_chat_id, {"thread_id": next(threads)})
                    return replace(result, chat=chat)

                monkeypatch.setattr(scripted, "start", threaded)
                user = await make_user(stub)
                first = await start_session(stub, user.id)
                await stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
                gate, start = await _start_held_at_the_provider(stub, scripted, user.id)
                # The start's commit will wait on the user's provider identity,
                # holding the chat's previous session.
                held = holder.transaction()
                await held.start()
                await holder.execute(
                    "SELECT 1 FROM provider_users WHERE user_id = $1 FOR UPDATE", user.id
                )

                gate.set()
                await wait_for(lambda: _waiting_on_locks(observer, 1), what="the start to wait")
                event = InboundEvent(
                    first.external_chat_id,
                    AgentAssigned(Agent("jane@acme.test", "Jane")),
                    "T2-assigned",
                    thread_id="T2",
                )
                push = asyncio.create_task(
                    scripted.sink.deliver(WebhookBatch(action="push", events=(event,)))
                )
                await wait_for(lambda: _waiting_on_locks(observer, 2), what="the webhook to wait")
                await held.rollback()
                await push
                session = await start
                assert session.external_chat_id == first.external_chat_id
                got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id))
                assert got.session.state == pb.SESSION_STATE_ASSIGNED
                assert got.session.agent.name == "Jane"
        finally:
            await holder.close()
            await observer.close()

    async def test_a_failed_provider_call_does_not_leak_into_the_readiness(
        self, hook: httpx.AsyncClient, scripted: ScriptedProvider
    ) -> None:
        scripted.fail("probe", Fault("unavailable"))
        response = await hook.get("/readyz")
        assert response.status_code == 503
        assert "cannot reach the provider" in response.json()["problems"]["provider"]


async def _start_held_at_the_provider(
    stub: Stub, scripted: ScriptedProvider, user_id: str
) -> tuple[asyncio.Event, asyncio.Task[pb.Session]]:
    """A StartHitl of ``user_id`` that has reached the provider, which holds
    it until the returned gate is set."""
    gate = scripted.hold("start")
    start = asyncio.create_task(start_session(stub, user_id))
    await wait_for(lambda: scripted.waiting.get("start"), what="the start to reach the provider")
    return gate, start


async def _waiting_on_locks(observer: asyncpg.Connection, count: int) -> bool:
    """Whether at least ``count`` sessions of this database wait on a lock."""
    found = await observer.fetchval(
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )
    return bool(found >= count)


@pytest.mark.parametrize("declared", ["\u00b2", "1" * 5000, "99999999999999999999"])
async def test_a_content_length_no_one_meant_reads_no_further(declared: str) -> None:
    """The limit check reads the header itself: '²' (which int() takes for 2
    or refuses) and 5000 digits (past what int() parses) raised ValueError,
    a 500 if the HTTP parser let them through; a huge one is over the limit."""
    from starlette.requests import Request

    from hitl_service.sidecar import BodyTooLarge, read_body

    body = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive() -> dict[str, Any]:
        return body.pop(0)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/webhooks/x",
        "headers": [(b"content-length", declared.encode("latin-1"))],
    }
    request = Request(scope, receive)
    if declared.isascii():
        with pytest.raises(BodyTooLarge):
            await read_body(request, 1024)
    else:
        assert await read_body(request, 1024) == b"{}"  # the stream's own count decides
