"""hitl_service.client against a real service: deadlines, retries with the
same request_id, the resuming event iterator, decoded errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from structlog.contextvars import merge_contextvars
from structlog.testing import capture_logs

from hitl_service.app import App
from hitl_service.client import (
    EventStream,
    FailedPreconditionError,
    HitlClient,
    HitlRpcError,
    InvalidArgumentError,
    NotFoundError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.store.sqlite import SqliteTx
from tests.conftest import start_app
from tests.ports import free_port
from tests.scripted import ScriptedProvider
from tests.support import wait_for

FAST = RetryPolicy(attempts=50, initial_backoff=0.02, max_backoff=0.2)
# Reconnect to a restarted server quickly (gRPC's own default starts at 1 s).
QUICK_RECONNECT = (
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
)


@dataclass
class Attempt:
    method: str
    request_id: str
    code: grpc.StatusCode


class Recorder(grpc.aio.UnaryUnaryClientInterceptor):
    """Sees every attempt the client makes, with its request_id and outcome."""

    def __init__(self) -> None:
        self.attempts: list[Attempt] = []

    async def intercept_unary_unary(
        self,
        continuation: Callable[[Any, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(client_call_details, request)
        code = await call.code()
        method: str | bytes = client_call_details.method  # bytes at run time
        name = (method.decode() if isinstance(method, bytes) else method).rsplit("/", 1)[-1]
        self.attempts.append(Attempt(name, getattr(request, "request_id", ""), code))
        return call

    def of(self, method: str) -> list[Attempt]:
        return [a for a in self.attempts if a.method == method]


@pytest.fixture
async def client(app: App) -> AsyncIterator[HitlClient]:
    async with HitlClient(f"127.0.0.1:{app.grpc_port}", default_timeout=10, retry=FAST) as c:
        yield c


async def console(http: httpx.AsyncClient, chat_id: str, action: str, **body: str) -> None:
    """Acts as the agent through the local provider's console API."""
    response = await http.post(
        f"/console/api/conversations/{chat_id}/{action}", json={"agent": "Jane", **body}
    )
    assert response.status_code == 200, response.text


class Follower:
    """Runs an EventStream in the background and keeps what it returns."""

    def __init__(self, stream: EventStream) -> None:
        self.stream = stream
        self.events: list[pb.Event] = []
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.stream:
            self.events.append(event)

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("kind")) for e in self.events]

    def texts(self) -> list[str]:
        return [e.agent_message.message.text for e in self.events if e.HasField("agent_message")]

    async def wait_kind(self, kind: str, count: int = 1) -> None:
        await wait_for(lambda: self.kinds().count(kind) >= count, what=f"{count} {kind} event(s)")

    async def close(self) -> None:
        await self.stream.aclose()
        await asyncio.wait_for(self._task, 10)


class TestHandoff:
    async def test_full_handoff_through_the_client(
        self, client: HitlClient, http: httpx.AsyncClient
    ) -> None:
        user = await client.create_user("Ada", email="ada@example.com", external_id="crm-1")
        again = await client.create_user("Ada L.", external_id="crm-1")
        assert again.id == user.id
        assert again.name == "Ada L."
        session = await client.start_hitl(
            user.id,
            title="Refund",
            history=[pb.Message(text="I want a refund", author=pb.AUTHOR_USER)],
            metadata={"order": "123"},
        )
        assert session.state == pb.SESSION_STATE_QUEUED
        sent = await client.send_message(session.id, "Hello, anyone?")
        assert sent.message_id
        stream = client.events(session_id=session.id)
        follower = Follower(stream)
        try:
            await console(http, session.external_chat_id, "take")
            await console(http, session.external_chat_id, "reply", text="Hi Ada, Jane here")
            await console(http, session.external_chat_id, "end", reason="done")
            await follower.wait_kind("ended")
        finally:
            await follower.close()
        assert follower.kinds() == [
            "started",
            "queued",
            "agent_assigned",
            "agent_message",
            "ended",
        ]
        assert follower.texts() == ["Hi Ada, Jane here"]
        assert follower.events[-1].ended.by == pb.ENDED_BY_AGENT
        assert stream.cursor == follower.events[-1].cursor
        ended = await client.get_session(session.id)
        assert ended.state == pb.SESSION_STATE_ENDED
        page = await client.list_sessions(user_id=user.id)
        assert [s.id for s in page.sessions] == [session.id]
        assert page.next_page_token == ""

    async def test_stop_hitl_and_the_event_stream_as_a_context_manager(
        self, client: HitlClient
    ) -> None:
        user = await client.create_user("Bo")
        session = await client.start_hitl(user.id)
        stopped = await client.stop_hitl(session.id, "bot resumed")
        assert stopped.state == pb.SESSION_STATE_ENDED
        assert (await client.stop_hitl(session.id)).state == pb.SESSION_STATE_ENDED
        async with client.events(session_id=session.id) as stream:
            kinds = []
            async for event in stream:
                kinds.append(event.WhichOneof("kind"))
                if event.HasField("ended"):
                    assert event.ended.by == pb.ENDED_BY_CALLER
                    break
        assert kinds == ["started", "queued", "ended"]


class TestRetries:
    @pytest.fixture
    def service_env(self, service_env: dict[str, str]) -> dict[str, str]:
        # The service answers DELIVERY_PENDING after 0.5 s, well within the
        # client's deadline (which covers the retries too).
        service_env["HITL_REQUEST_BUDGET"] = "0.5s"
        return service_env

    async def test_send_message_is_retried_with_the_same_request_id(
        self, scripted_app: App, scripted: ScriptedProvider
    ) -> None:
        recorder = Recorder()
        target = f"127.0.0.1:{scripted_app.grpc_port}"
        async with HitlClient(
            target, default_timeout=5.0, retry=FAST, interceptors=[recorder]
        ) as client:
            user = await client.create_user("Cy")
            session = await client.start_hitl(user.id)
            gate = scripted.hold("send")  # the provider does not answer...
            with capture_logs(processors=[merge_contextvars]) as logs:
                sending = asyncio.create_task(client.send_message(session.id, "are you there?"))
                # ...so the first attempt runs out of time (DELIVERY_PENDING or the
                # deadline); the client tries again with the same request_id.
                await wait_for(lambda: recorder.of("SendMessage"), what="a failed first attempt")
                gate.set()
                sent = await asyncio.wait_for(sending, 10)
        attempts = recorder.of("SendMessage")
        assert len(attempts) >= 2
        assert attempts[0].code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert attempts[-1].code == grpc.StatusCode.OK
        assert len({a.request_id for a in attempts}) == 1
        request_id = attempts[0].request_id
        assert request_id
        # The provider was asked with that one request id only, and the agent
        # got the message once.
        assert {rid for _, _, rid, _ in scripted.calls.sends} == {request_id}
        assert list(scripted.calls.delivered) == [request_id]
        assert sent.external_message_id == f"ev-{request_id}"
        # The service logged every attempt under that id (x-request-id).
        done = [e for e in logs if e["event"] == "rpc.done" and e.get("rpc") == "SendMessage"]
        assert len(done) >= 2
        assert {e["request_id"] for e in done} == {request_id}

    async def test_a_failed_send_names_its_request_id_for_the_callers_retry(
        self, scripted_app: App, scripted: ScriptedProvider
    ) -> None:
        """The deadline runs out while the message is pending: the caller
        learns the generated request_id from the error, and its own retry
        with it delivers the message once (a new id would send it twice)."""
        target = f"127.0.0.1:{scripted_app.grpc_port}"
        async with HitlClient(target, default_timeout=10.0, retry=FAST) as client:
            user = await client.create_user("Flo")
            session = await client.start_hitl(user.id)
            gate = scripted.hold("send")
            with pytest.raises(HitlRpcError) as caught:
                await client.send_message(session.id, "still there?", timeout=1.0)
            assert caught.value.code in (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNAVAILABLE,  # DELIVERY_PENDING
            )
            request_id = caught.value.request_id
            assert request_id
            gate.set()
            sent = await client.send_message(session.id, "still there?", request_id=request_id)
            again = await client.send_message(session.id, "still there?", request_id=request_id)
        assert again.message_id == sent.message_id
        assert {rid for _, _, rid, _ in scripted.calls.sends} == {request_id}
        assert list(scripted.calls.delivered) == [request_id]

    async def test_an_expired_message_record_is_not_retried(self, scripted_app: App) -> None:
        """MESSAGE_EXPIRED is UNAVAILABLE, but permanent: the record of the
        request_id is gone, so retrying only took up the caller's deadline
        (12.5-25 s with the default policy) before the same error."""
        recorder = Recorder()
        target = f"127.0.0.1:{scripted_app.grpc_port}"
        async with HitlClient(target, retry=FAST, interceptors=[recorder]) as client:
            user = await client.create_user("Ed")
            session = await client.start_hitl(user.id)
            sent = await client.send_message(session.id, "hello", request_id="rid-expiring-1")
            # As the retention prune leaves it: the request id, no message.
            async with scripted_app.store.transaction() as tx:
                assert isinstance(tx, SqliteTx)
                await tx._exec("DELETE FROM outbox WHERE id = ?", (sent.message_id,))
            with pytest.raises(UnavailableError) as expired:
                await client.send_message(session.id, "hello", request_id="rid-expiring-1")
        assert expired.value.reason == "MESSAGE_EXPIRED"
        assert [a.code for a in recorder.of("SendMessage")] == [
            grpc.StatusCode.OK,
            grpc.StatusCode.UNAVAILABLE,
        ]

    async def test_start_hitl_retries_across_a_restart_with_the_same_request_id(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_GRPC_ADDR"] = f"127.0.0.1:{free_port()}"
        app = await start_app(service_env)
        recorder = Recorder()
        target = service_env["HITL_GRPC_ADDR"]
        async with HitlClient(
            target, retry=FAST, options=QUICK_RECONNECT, interceptors=[recorder]
        ) as client:
            user = await client.create_user("Di", external_id="crm-di")
            await app.stop(grace=1)
            starting = asyncio.create_task(client.start_hitl(user.id, title="after restart"))
            await wait_for(
                lambda: any(a.code == grpc.StatusCode.UNAVAILABLE for a in recorder.attempts),
                what="an attempt against the stopped service",
            )
            app = await start_app(service_env)
            try:
                session = await asyncio.wait_for(starting, 20)
                attempts = recorder.of("StartHitl")
                # The same request id again returns the same session.
                again = await client.start_hitl(
                    user.id, title="after restart", request_id=attempts[0].request_id
                )
            finally:
                await app.stop(grace=1)
        assert [a.code for a in attempts[:-1]] == [grpc.StatusCode.UNAVAILABLE] * (
            len(attempts) - 1
        )
        assert attempts[-1].code == grpc.StatusCode.OK
        assert len({a.request_id for a in attempts}) == 1
        assert again.id == session.id

    async def test_only_idempotent_calls_are_retried(self) -> None:
        recorder = Recorder()
        policy = RetryPolicy(attempts=3, initial_backoff=0.01, max_backoff=0.02)
        target = f"127.0.0.1:{free_port()}"  # nothing listens there
        async with HitlClient(target, retry=policy, interceptors=[recorder]) as client:
            with pytest.raises(UnavailableError):
                await client.create_user("Ed")  # no external_id: a retry could duplicate
            assert len(recorder.of("CreateUser")) == 1
            with pytest.raises(UnavailableError):
                await client.create_user("Ed", external_id="crm-ed")  # an upsert
            assert len(recorder.of("CreateUser")) == 1 + 3
            with pytest.raises(UnavailableError):
                await client.get_session("ses_x")
            assert len(recorder.of("GetSession")) == 3
            with pytest.raises(UnavailableError):
                await client.send_message("ses_x", "hi")
            sends = recorder.of("SendMessage")
            assert len(sends) == 3
            assert len({a.request_id for a in sends}) == 1


class TestEvents:
    async def test_the_iterator_survives_a_restart_and_misses_nothing(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_GRPC_ADDR"] = f"127.0.0.1:{free_port()}"
        service_env["HITL_HTTP_ADDR"] = f"127.0.0.1:{free_port()}"
        target = service_env["HITL_GRPC_ADDR"]
        base_url = f"http://{service_env['HITL_HTTP_ADDR']}"
        app = await start_app(service_env)
        try:
            async with (
                HitlClient(target, retry=FAST, options=QUICK_RECONNECT) as client,
                httpx.AsyncClient(base_url=base_url) as http,
            ):
                user = await client.create_user("Flo")
                session = await client.start_hitl(user.id)
                chat = session.external_chat_id
                follower = Follower(client.events(session_id=session.id, after="0"))
                try:
                    await console(http, chat, "take")
                    await console(http, chat, "reply", text="one")
                    await follower.wait_kind("agent_message")
                    await app.stop(grace=1)
                    await wait_for(
                        lambda: follower.stream.reconnects >= 1, what="the stream to drop"
                    )
                    app = await start_app(service_env)  # same ports, same SQLite file
                    # These may land before the client is back: replayed by cursor.
                    await console(http, chat, "reply", text="two")
                    await console(http, chat, "reply", text="three")
                    await console(http, chat, "end", reason="solved")
                    await follower.wait_kind("ended")
                finally:
                    await follower.close()
        finally:
            await app.stop(grace=1)
        assert follower.kinds() == [
            "started",
            "queued",
            "agent_assigned",
            "agent_message",
            "agent_message",
            "agent_message",
            "ended",
        ]
        assert follower.texts() == ["one", "two", "three"]
        cursors = [int(e.cursor) for e in follower.events]
        assert cursors == list(range(1, len(cursors) + 1))  # no gap, no duplicate
        assert follower.stream.cursor == str(cursors[-1])

    async def test_the_iterator_reconnects_when_the_server_ends_the_stream(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_STREAM_MAX_SECONDS"] = "1s"
        service_env["HITL_PROVIDER"] = "scripted"
        from tests.scripted import create

        app = await start_app(service_env, provider_factory=create)
        try:
            async with HitlClient(f"127.0.0.1:{app.grpc_port}", retry=FAST) as client:
                user = await client.create_user("Gus")
                session = await client.start_hitl(user.id)
                follower = Follower(client.events(after="0"))
                try:
                    await follower.wait_kind("queued")
                    # The server ends the stream (status OK) after a second.
                    await wait_for(lambda: follower.stream.reconnects >= 1, what="a reconnect")
                    await client.stop_hitl(session.id)
                    await follower.wait_kind("ended")
                finally:
                    await follower.close()
        finally:
            await app.stop(grace=1)
        assert follower.kinds() == ["started", "queued", "ended"]
        assert [e.cursor for e in follower.events] == ["1", "2", "3"]

    async def test_resuming_from_a_saved_cursor(self, client: HitlClient) -> None:
        user = await client.create_user("Hal")
        session = await client.start_hitl(user.id)
        async with client.events(session_id=session.id) as first:
            await anext(first)
            saved = first.cursor
        await client.stop_hitl(session.id)
        async with client.events(session_id=session.id, after=saved) as rest:
            kinds = [(await anext(rest)).WhichOneof("kind") for _ in range(2)]
        assert saved == "1"
        assert kinds == ["queued", "ended"]


class TestErrors:
    async def test_bad_input_carries_field_violations(self, client: HitlClient) -> None:
        with pytest.raises(InvalidArgumentError) as caught:
            await client.create_user("", email="not-an-email")
        error = caught.value
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT
        assert error.domain == "hitl.v1"
        assert error.reason
        assert {"name", "email"} <= set(error.fields)

    async def test_unknown_ids_and_wrong_state(self, client: HitlClient) -> None:
        with pytest.raises(NotFoundError) as missing:
            await client.get_session("ses_nope")
        assert missing.value.reason
        assert isinstance(missing.value, HitlRpcError)
        user = await client.create_user("Ida")
        first = await client.start_hitl(user.id)
        with pytest.raises(FailedPreconditionError) as busy:
            await client.start_hitl(user.id)
        assert busy.value.reason == "SESSION_ALREADY_OPEN"
        assert busy.value.metadata["session_id"] == first.id
        await client.stop_hitl(first.id)
        with pytest.raises(FailedPreconditionError) as ended:
            await client.send_message(first.id, "too late")
        assert ended.value.reason == "SESSION_ENDED"

    async def test_an_overlong_request_id_gets_the_field_violation(
        self, client: HitlClient
    ) -> None:
        # Over 128 characters the service answers INVALID_FIELDS on
        # request_id; as an x-request-id header of 8 KiB or more it would
        # instead break gRPC's metadata limit (RESOURCE_EXHAUSTED, no details).
        user = await client.create_user("Long Id")
        for length in (129, 9000, 20000):
            with pytest.raises(InvalidArgumentError) as caught:
                await client.start_hitl(user.id, request_id="r" * length)
            assert "request_id" in caught.value.fields

    async def test_event_stream_errors_are_raised_not_retried(self, client: HitlClient) -> None:
        stream = client.events(session_id="ses_nope")
        with pytest.raises(NotFoundError):
            await anext(stream)
        assert stream.reconnects == 0
        with pytest.raises(InvalidArgumentError) as bad:
            await anext(client.events(after="not-a-cursor"))
        assert "after_cursor" in bad.value.fields

    async def test_api_token(self, service_env: dict[str, str]) -> None:
        service_env["HITL_API_TOKENS"] = "first-token-1234,second-token-456"
        app = await start_app(service_env)
        target = f"127.0.0.1:{app.grpc_port}"
        try:
            async with HitlClient(target, token="second-token-456") as client:
                assert (await client.create_user("Jo")).id
            async with HitlClient(target, token="wrong-token-789") as client:
                with pytest.raises(UnauthenticatedError) as caught:
                    await client.create_user("Jo")
                assert caught.value.reason == "UNAUTHENTICATED"
        finally:
            await app.stop(grace=1)


def test_backoff_is_jittered_and_capped() -> None:
    policy = RetryPolicy(initial_backoff=0.2, max_backoff=1.0, multiplier=2.0)
    for failures, bound in ((1, 0.2), (2, 0.4), (3, 0.8), (4, 1.0), (10, 1.0)):
        for _ in range(50):
            assert bound / 2 <= policy.backoff(failures) <= bound
    assert len({policy.backoff(3) for _ in range(20)}) > 1


async def test_closing_the_iterator_from_another_task_ends_it(app: App, client: HitlClient) -> None:
    stream = client.events(after="")
    seen: list[pb.Event] = []

    async def follow() -> None:
        async for event in stream:
            seen.append(event)

    task = asyncio.create_task(follow())
    gauge = app.metrics.stream_subscribers
    await wait_for(lambda: gauge._value.get() == 1, what="the stream to subscribe")
    await stream.aclose()
    await asyncio.wait_for(task, 10)
    assert seen == []
    await wait_for(lambda: gauge._value.get() == 0, what="the stream to close")


@pytest.mark.parametrize(
    "token", ["token-from-a-file-1234\n", "t\u00f6ken-1234567890123", " pasted-token-12345 "]
)
def test_a_token_no_header_can_carry_is_refused_up_front(token: str) -> None:
    """gRPC fails each call with a token it cannot send with an internal
    ExecuteBatchError, which no ``except HitlRpcError`` catches."""
    with pytest.raises(ValueError, match="token") as caught:
        HitlClient("127.0.0.1:1", token=token)
    assert token.strip() not in str(caught.value)
