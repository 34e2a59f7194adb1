"""The local provider's agent console over HTTP: take, reply, transfer, end,
each reaching the gRPC event stream; bad requests get a JSON reason; foreign
hosts, cross-site origins and non-JSON actions are refused."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest

from hitl_service.clock import SystemClock
from hitl_service.errors import StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.local import console
from providers.local.console import host_allowed
from providers.types import StartResult
from tests.support import (
    TIMEOUT,
    EventCollector,
    ShiftedClock,
    expect_error,
    make_user,
    rid,
    start_session,
    wait_for,
)

if TYPE_CHECKING:
    from hitl_service.app import App
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub


async def act(
    http: httpx.AsyncClient,
    chat_id: str,
    action: str,
    *,
    headers: dict[str, str] | None = None,
    **body: str,
) -> httpx.Response:
    return await http.post(
        f"/console/api/conversations/{chat_id}/{action}", json=body, headers=headers
    )


async def test_page_and_state_are_served(http: httpx.AsyncClient, stub: Stub) -> None:
    page = await http.get("/console")
    assert page.status_code == 200
    assert "Agent console" in page.text
    session = await start_session(
        stub,
        (await make_user(stub, "Grace")).id,
        description="Wants a refund",
        history=[
            pb.Message(text="Where is my parcel?", author=pb.AUTHOR_USER),
            pb.Message(text="Let me find a human.", author=pb.AUTHOR_BOT),
        ],
    )
    state = (await http.get("/console/api/state")).json()
    (conv,) = state["conversations"]
    assert conv["id"] == session.external_chat_id
    assert conv["status"] == "waiting"
    assert conv["user"]["name"] == "Grace"
    assert conv["description"] == "Wants a refund"
    assert [(m["author"], m["text"]) for m in conv["history"]] == [
        ("user", "Where is my parcel?"),
        ("bot", "Let me find a human."),
    ]


async def test_agent_actions_reach_the_stream(http: httpx.AsyncClient, stub: Stub) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    async with EventCollector(stub, session_id=session.id) as events:
        assert (await act(http, chat, "take", agent="Alex Agent")).status_code == 200
        await events.wait_for_kind("agent_assigned")
        await stub.SendMessage(
            pb.SendMessageRequest(
                session_id=session.id, message=pb.Message(text="hello?"), request_id=rid()
            ),
            timeout=TIMEOUT,
        )
        assert (
            await act(http, chat, "reply", agent="Alex Agent", text="Hi, I'm Alex")
        ).status_code == 200
        reply = await events.wait_for_kind("agent_message")
        assert (
            await act(
                http, chat, "transfer", agent="Alex Agent", group_id="billing", reason="manual"
            )
        ).status_code == 200
        transferred = await events.wait_for_kind("transferred")
        assert (await act(http, chat, "take", agent="Bea")).status_code == 200
        assert (await act(http, chat, "end", agent="Bea", reason="resolved")).status_code == 200
        ended = await events.wait_for_kind("ended")
    assert reply.agent_message.message.text == "Hi, I'm Alex"
    assert reply.agent_message.agent.name == "Alex Agent"
    # Message.id is "server-assigned on messages the service returns", and
    # created_at says when it was written: the console's replies had neither.
    assert reply.agent_message.message.id.startswith("msg_")
    assert reply.agent_message.message.HasField("created_at")
    assert reply.agent_message.message.created_at == reply.occurred_at
    assert transferred.transferred.to_group_id == "billing"
    assert transferred.transferred.from_agent.name == "Alex Agent"
    assert ended.ended.by == pb.ENDED_BY_AGENT
    assert ended.ended.reason == "resolved"
    assert events.kinds() == [
        "started",
        "queued",
        "agent_assigned",
        "agent_message",
        "transferred",
        "agent_assigned",
        "ended",
    ]
    state = (await http.get("/console/api/state")).json()
    (conv,) = state["conversations"]
    assert [m["text"] for m in conv["messages"]] == ["hello?", "Hi, I'm Alex"]
    got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
    assert got.session.state == pb.SESSION_STATE_ENDED


async def test_bad_console_requests(http: httpx.AsyncClient, stub: Stub) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    as_json = {"Content-Type": "application/json"}
    url = f"/console/api/conversations/{chat}/reply"
    cases = [
        (await http.post(url, content=b"nope", headers=as_json), 400),
        (await http.post(url, content=b"[" * 60_000, headers=as_json), 400),  # RecursionError
        (await act(http, chat, "reply", agent="A", text=""), 400),
        (await act(http, chat, "dance", agent="A"), 404),
        (await act(http, "lc_missing", "take", agent="A"), 404),
    ]
    for response, status in cases:
        assert response.status_code == status
        assert response.json()["error"]
    await act(http, chat, "end", agent="A")
    late = await act(http, chat, "reply", agent="A", text="still there?")
    assert late.status_code == 409


async def test_a_console_action_whose_body_stalls_is_answered_408(
    service_env: dict[str, str],
) -> None:
    """Like a webhook's: a client that stalls mid-body would otherwise hold
    its connection (and a graceful shutdown) for good."""
    from tests.conftest import start_app

    service_env["HITL_HTTP_REQUEST_TIMEOUT"] = "0.2s"
    app = await start_app(service_env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = pb_grpc.HitlServiceStub(channel)
                session = await start_session(stub, (await make_user(stub)).id)
            reader, writer = await asyncio.open_connection("127.0.0.1", app.http_port)
            writer.write(
                f"POST /console/api/conversations/{session.external_chat_id}/take HTTP/1.1\r\n"
                "Host: 127.0.0.1\r\nContent-Type: application/json\r\n"
                'Content-Length: 100\r\n\r\n{"agent": "Al'.encode()
            )
            await writer.drain()
            try:
                answer = await asyncio.wait_for(reader.read(), TIMEOUT)  # until closed
            finally:
                writer.close()
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), answer[:80]
            assert json.loads(body)["error"]
            (conv,) = (await http.get("/console/api/state")).json()["conversations"]
            assert conv["status"] == "waiting"
    finally:
        await app.stop(grace=1)


async def test_caller_stop_closes_the_console_conversation(
    http: httpx.AsyncClient, stub: Stub, app: App
) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    await stub.StopHitl(
        pb.StopHitlRequest(session_id=session.id, reason="bot took over"), timeout=TIMEOUT
    )
    (conv,) = (await http.get("/console/api/state")).json()["conversations"]
    assert conv["status"] == "ended"
    assert conv["end_reason"] == "bot took over"


@asynccontextmanager
async def a_given_up_start(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[httpx.AsyncClient, Stub, pb.StartHitlRequest]]:
    """A service whose upkeep gave a StartHitl up (START_INTERRUPTED, its
    request id forgotten) after the console had opened its conversation:
    (http, stub, the request)."""
    from tests.conftest import start_app

    clock = ShiftedClock(SystemClock())
    app = await start_app(env, clock=clock)
    try:
        original, gate, held = app.provider.start, asyncio.Event(), asyncio.Event()

        async def held_start(*args: Any, **kwargs: Any) -> StartResult:
            held.set()
            await gate.wait()
            return await original(*args, **kwargs)

        monkeypatch.setattr(app.provider, "start", held_start)
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http,
            grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel,
        ):
            stub = pb_grpc.HitlServiceStub(channel)
            user = await make_user(stub)
            request = pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="late")
            call = asyncio.ensure_future(stub.StartHitl(request, timeout=TIMEOUT))
            await asyncio.wait_for(held.wait(), TIMEOUT)
            clock.offset = 3600
            await app.core.maintenance.sweep()
            gate.set()
            error = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert error.reason == "START_INTERRUPTED"
            yield http, stub, request
    finally:
        await app.stop(grace=1)


async def test_a_retried_start_the_service_gave_up_reuses_its_conversation(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The retry, a new session with the same request id, gets the
    conversation, instead of leaving it waiting, for a FAILED session, next
    to a new one."""
    async with a_given_up_start(service_env, monkeypatch) as (http, stub, request):
        retried = (await stub.StartHitl(request, timeout=TIMEOUT)).session
        (conv,) = (await http.get("/console/api/state")).json()["conversations"]
        assert (conv["id"], conv["session_id"]) == (retried.external_chat_id, retried.id)
        assert conv["status"] == "waiting"
        async with EventCollector(stub, session_id=retried.id) as events:
            assert (await act(http, conv["id"], "take", agent="Alex")).is_success
            await events.wait_for_kind("agent_assigned")


async def test_a_new_handoff_closes_the_users_conversation_the_service_gave_up(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a retry, the given-up conversation is closed when its user
    starts another handoff: the service keeps one open session per user, so
    nobody hears the old one any more."""
    async with a_given_up_start(service_env, monkeypatch) as (http, stub, request):
        (given_up,) = (await http.get("/console/api/state")).json()["conversations"]
        assert given_up["status"] == "waiting"  # the caller may still retry
        fresh = await start_session(stub, request.user_id)
        state = (await http.get("/console/api/state")).json()["conversations"]
        status = {c["id"]: c["status"] for c in state}
        assert status == {fresh.external_chat_id: "waiting", given_up["id"]: "ended"}


async def test_conversations_survive_a_restart(service_env: dict[str, str]) -> None:
    from tests.conftest import start_app

    app = await start_app(service_env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            import grpc

            from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc

            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                stub = pb_grpc.HitlServiceStub(channel)
                session = await start_session(stub, (await make_user(stub, "Kept")).id)
    finally:
        await app.stop(grace=1)
    app = await start_app(service_env)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http:
            (conv,) = (await http.get("/console/api/state")).json()["conversations"]
            assert conv["id"] == session.external_chat_id
            assert conv["user"]["name"] == "Kept"
    finally:
        await app.stop(grace=1)


async def test_a_second_agent_cannot_take_a_taken_conversation(
    http: httpx.AsyncClient, stub: Stub
) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    async with EventCollector(stub, session_id=session.id) as events:
        assert (await act(http, chat, "take", agent="Alice")).status_code == 200
        second = await act(http, chat, "take", agent="Bob")
        again = await act(http, chat, "take", agent="Alice")  # a double click
        assert (await act(http, chat, "reply", agent="Alice", text="hi")).status_code == 200
        await events.wait_for_kind("agent_message")
    assert second.status_code == 409
    assert "Alice" in second.json()["error"]
    assert again.status_code == 200
    assert events.kinds() == ["started", "queued", "agent_assigned", "agent_message"]
    (conv,) = (await http.get("/console/api/state")).json()["conversations"]
    assert conv["agent"]["name"] == "Alice"


async def test_only_the_holder_replies_to_transfers_or_ends_a_taken_conversation(
    http: httpx.AsyncClient, stub: Stub
) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    assert (await act(http, chat, "take", agent="Alice")).status_code == 200
    refused = {
        "reply": await act(http, chat, "reply", agent="Bob", text="Bob here"),
        "transfer": await act(http, chat, "transfer", agent="Bob", group_id="billing"),
        "end": await act(http, chat, "end", agent="Bob"),
    }
    assert {action: r.status_code for action, r in refused.items()} == dict.fromkeys(refused, 409)
    assert all("Alice" in r.json()["error"] for r in refused.values())
    (conv,) = (await http.get("/console/api/state")).json()["conversations"]
    assert (conv["status"], conv["agent"]["name"]) == ("active", "Alice")
    assert conv["messages"] == []
    # Given back to the queue, it is anyone's again.
    assert (await act(http, chat, "transfer", agent="Alice", group_id="billing")).is_success
    assert (await act(http, chat, "reply", agent="Bob", text="Bob here")).is_success


async def test_a_transfer_moves_the_session_to_its_group(
    http: httpx.AsyncClient, stub: Stub
) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    async with EventCollector(stub, session_id=session.id) as events:
        assert (await act(http, chat, "take", agent="Alex")).is_success
        assert (await act(http, chat, "transfer", agent="Alex", group_id="billing")).is_success
        moved = await events.wait_for_kind("transferred")
    assert moved.transferred.to_group_id == "billing"
    got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
    assert (got.session.state, got.session.group_id) == (pb.SESSION_STATE_QUEUED, "billing")


async def test_a_waiting_conversation_is_transferred_from_nobody(
    http: httpx.AsyncClient, stub: Stub
) -> None:
    """Transferred.from_agent is "unset if nobody had it" (the proto): an
    agent moving a waiting conversation to another group never held it."""
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    async with EventCollector(stub, session_id=session.id) as events:
        assert (await act(http, chat, "transfer", agent="Alex", group_id="billing")).is_success
        moved = await events.wait_for_kind("transferred")
    assert moved.transferred.to_group_id == "billing"
    assert not moved.transferred.HasField("from_agent")
    got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
    assert (got.session.state, got.session.group_id) == (pb.SESSION_STATE_QUEUED, "billing")
    assert not got.session.HasField("agent")


def _directives(policy: str) -> dict[str, list[str]]:
    return {words[0]: words[1:] for part in policy.split(";") if (words := part.split())}


async def test_every_console_answer_forbids_framing_sniffing_and_referrers(
    http: httpx.AsyncClient, stub: Stub
) -> None:
    """Against clickjacking (a foreign page framing the console over a decoy),
    and image hosts end users choose learning where the console lives."""
    session = await start_session(stub, (await make_user(stub)).id)
    answers = {
        "page": await http.get("/console"),
        "state": await http.get("/console/api/state"),
        "action": await act(http, session.external_chat_id, "take", agent="Alice"),
        "not json": await http.post(
            f"/console/api/conversations/{session.external_chat_id}/take", content=b"x"
        ),
        "foreign host": await http.get("/console/api/state", headers={"Host": "evil.example"}),
    }
    for name, response in answers.items():
        assert response.headers.get("x-frame-options") == "DENY", name
        assert response.headers.get("x-content-type-options") == "nosniff", name
        assert response.headers.get("referrer-policy") == "no-referrer", name
        policy = _directives(response.headers.get("content-security-policy", ""))
        assert policy.get("frame-ancestors") == ["'none'"], name


async def test_no_console_answer_is_kept_in_a_cache(http: httpx.AsyncClient, stub: Stub) -> None:
    """The state (every handoff: names, e-mails, transcripts) and the
    actions' answers had no Cache-Control: a browser's disk cache, or a
    proxy in front, could keep a copy of it."""
    session = await start_session(stub, (await make_user(stub, "Ada Lovelace")).id)
    answers = {
        "page": await http.get("/console"),
        "state": await http.get("/console/api/state"),
        "action": await act(http, session.external_chat_id, "take", agent="Alice"),
        "refused action": await act(http, "lc_missing", "take", agent="Alice"),
        "foreign host": await http.get("/console/api/state", headers={"Host": "evil.example"}),
    }
    assert "Ada Lovelace" in answers["state"].text
    for name, response in answers.items():
        assert response.headers.get("cache-control") == "no-store", name
    async with http.stream("GET", "/console/api/stream") as stream:
        assert stream.headers.get("cache-control") == "no-store"


async def test_the_page_runs_only_its_own_script(http: httpx.AsyncClient) -> None:
    page = await http.get("/console")
    policy = _directives(page.headers["content-security-policy"])
    assert policy["default-src"] == ["'none'"]
    assert policy["connect-src"] == ["'self'"]
    (script,) = re.findall(r"<script>(.*?)</script>", page.text, flags=re.S)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert policy["script-src"] == [f"'sha256-{digest}'"]


async def test_a_store_outage_during_an_action_is_a_503(
    http: httpx.AsyncClient, stub: Stub, app: App, monkeypatch: pytest.MonkeyPatch
) -> None:
    session = await start_session(stub, (await make_user(stub)).id)

    async def down(*args: Any, **kwargs: Any) -> int:
        raise StoreUnavailable("the database is restarting")

    monkeypatch.setattr(app.core.ingestor, "deliver", down)
    response = await act(http, session.external_chat_id, "take", agent="Alice")
    assert response.status_code == 503
    assert response.json()["error"]
    assert response.headers["retry-after"]
    monkeypatch.undo()
    (conv,) = (await http.get("/console/api/state")).json()["conversations"]
    assert conv["status"] == "waiting"  # the failed commit left the console as it was


class TestRequestChecks:
    """DNS rebinding and cross-site requests cannot read or act."""

    @pytest.mark.parametrize(
        "host",
        ["attacker.example", "attacker.example:8080", "127.0.0.1.attacker.example", "bad:port"],
    )
    async def test_a_foreign_host_is_refused(self, http: httpx.AsyncClient, host: str) -> None:
        for path in ("/console", "/console/api/state", "/console/api/stream"):
            response = await http.get(path, headers={"Host": host})
            assert response.status_code == 403, path
            assert response.json()["error"]

    async def test_loopback_names_are_served(self, http: httpx.AsyncClient, app: App) -> None:
        for host in ("localhost", f"localhost:{app.http_port}", f"127.0.0.1:{app.http_port}"):
            response = await http.get("/console/api/state", headers={"Host": host})
            assert response.status_code == 200, host

    @pytest.mark.parametrize(
        "origin", ["http://attacker.example", "null", "http://127.0.0.1:1", "https://127.0.0.1"]
    )
    async def test_a_cross_origin_request_is_refused(
        self, http: httpx.AsyncClient, stub: Stub, origin: str
    ) -> None:
        session = await start_session(stub, (await make_user(stub)).id)
        took = await act(
            http, session.external_chat_id, "take", agent="mallory", headers={"Origin": origin}
        )
        read = await http.get("/console/api/state", headers={"Origin": origin})
        assert (took.status_code, read.status_code) == (403, 403)
        assert took.json()["error"]
        (conv,) = (await http.get("/console/api/state")).json()["conversations"]
        assert conv["status"] == "waiting"

    async def test_a_same_origin_request_is_served(
        self, http: httpx.AsyncClient, stub: Stub, app: App
    ) -> None:
        session = await start_session(stub, (await make_user(stub)).id)
        origin = f"http://127.0.0.1:{app.http_port}"
        took = await act(
            http, session.external_chat_id, "take", agent="Alice", headers={"Origin": origin}
        )
        assert took.status_code == 200

    @pytest.mark.parametrize(
        "content_type", ["text/plain", "", "application/x-www-form-urlencoded"]
    )
    async def test_an_action_must_be_json(
        self, http: httpx.AsyncClient, stub: Stub, content_type: str
    ) -> None:
        session = await start_session(stub, (await make_user(stub)).id)
        took = await http.post(
            f"/console/api/conversations/{session.external_chat_id}/take",
            content=b'{"agent": "mallory"}',
            headers={"Content-Type": content_type} if content_type else {},
        )
        assert took.status_code == 415
        assert took.json()["error"]
        charset = await http.post(
            f"/console/api/conversations/{session.external_chat_id}/take",
            content=b'{"agent": "Alice"}',
            headers={"Content-Type": "application/json; charset=utf-8"},
        )
        assert charset.status_code == 200

    def test_the_bound_host_is_accepted(self) -> None:
        assert host_allowed("console.internal", "console.internal")
        assert host_allowed("10.1.2.3", "10.1.2.3")
        assert host_allowed("::1", "10.1.2.3")
        assert not host_allowed("10.9.9.9", "10.1.2.3")
        assert not host_allowed("attacker.example", "10.1.2.3")
        # Bound to every interface: any address, but still no foreign name.
        everywhere = "0.0.0.0"  # noqa: S104 - the bind address under test, nothing binds
        assert host_allowed("192.168.1.5", everywhere)
        assert host_allowed("fe80::1", "::")
        assert not host_allowed("attacker.example", everywhere)


async def test_live_update_streams_are_capped(
    http: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(console, "MAX_STREAMS", 2)
    async with contextlib.AsyncExitStack() as streams:
        for _ in range(2):
            response = await streams.enter_async_context(http.stream("GET", "/console/api/stream"))
            assert response.status_code == 200
        refused = await http.get("/console/api/stream")
        assert refused.status_code == 503
        assert refused.headers["Retry-After"] == "5"
        assert "console streams are open" in refused.json()["error"]
        assert (await http.get("/console/api/state")).status_code == 200  # not a stream

    async def another_is_served() -> bool:
        async with http.stream("GET", "/console/api/stream") as response:
            return response.status_code == 200

    # The closed streams' slots come back once the server notices them gone.
    await wait_for(another_is_served, what="a stream slot to free up")


async def test_a_shutdown_ends_open_live_update_streams_at_once(
    app: App, http: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    """An open stream would hold the HTTP drain for its whole timeout, then be
    cancelled with error lines on every deploy while an agent watches."""
    async with http.stream("GET", "/console/api/stream") as response:
        assert response.status_code == 200
        lines = response.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        with caplog.at_level("INFO", logger="uvicorn"):
            await app.stop(grace=1)
        rest = [line async for line in lines]  # the server ended it; no hang
    assert all(not line.startswith("data: ") for line in rest)
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert not any("Waiting for connections" in r.getMessage() for r in caplog.records)


async def test_a_reply_reaches_the_user_as_typed(http: httpx.AsyncClient, stub: Stub) -> None:
    # An agent's indentation (a code sample, a list) and line breaks are
    # the message; only a reply of nothing but spaces is refused.
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    assert (await act(http, chat, "take", agent="Alex Agent")).status_code == 200
    typed = "    step 1: reboot\n    step 2: retry\n"
    async with EventCollector(stub, session_id=session.id, after="0") as events:
        assert (await act(http, chat, "reply", agent="Alex Agent", text=typed)).status_code == 200
        await wait_for(lambda: "agent_message" in events.kinds(), what="the reply")
    (reply,) = [e for e in events.events if e.WhichOneof("kind") == "agent_message"]
    assert reply.agent_message.message.text == typed
    assert (await act(http, chat, "reply", agent="Alex Agent", text=" \n\t")).status_code == 400


async def test_a_lone_surrogate_is_refused_with_a_reason(
    http: httpx.AsyncClient, stub: Stub
) -> None:
    session = await start_session(stub, (await make_user(stub)).id)
    chat = session.external_chat_id
    url = f"/console/api/conversations/{chat}/reply"
    body = b'{"agent": "Alex Agent", "text": "hi \\ud800"}'
    response = await http.post(url, content=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == "text is not valid Unicode text (a lone surrogate)"


@pytest.mark.parametrize(
    ("action", "body", "refused"),
    [
        ("take", {"agent": "Al\x00ice"}, "agent"),
        ("reply", {"agent": "Alice", "text": "hi\x00"}, "text"),
        ("end", {"agent": "Alice", "reason": "done\x00"}, "reason"),
        ("transfer", {"agent": "Alice", "group_id": "billing\x00"}, "group_id"),
        ("transfer", {"agent": "Alice", "group_id": "billing team"}, "group_id"),
        ("transfer", {"agent": "Alice", "group_id": "<b>billing</b>"}, "group_id"),
    ],
)
async def test_text_the_service_cannot_keep_is_refused_with_a_reason(
    http: httpx.AsyncClient, stub: Stub, action: str, body: dict[str, str], refused: str
) -> None:
    """A NUL (an end reason, a group) was taken and failed on PostgreSQL,
    whose text columns refuse it: HTTP 500 with a traceback logged. A
    transfer's group was any text: the session then carried a group_id
    StartHitl refuses, which callers may pass back to it."""
    session = await start_session(stub, (await make_user(stub)).id)
    url = f"/console/api/conversations/{session.external_chat_id}/{action}"
    response = await http.post(url, json=body)
    assert response.status_code == 400
    assert response.json()["error"].startswith(f"{refused} must ")
    (conv,) = (await http.get("/console/api/state")).json()["conversations"]
    assert (conv["status"], conv["group_id"], conv["messages"]) == ("waiting", "general", [])
    got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
    assert (got.session.state, got.session.group_id) == (pb.SESSION_STATE_QUEUED, "general")


async def test_open_pages_share_one_encoding_of_each_change(
    http: httpx.AsyncClient, stub: Stub, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every change went to every open page encoded anew: the whole console
    (up to ~16 MB) once per page per change."""
    from providers.local.provider import LocalProvider

    encoded: list[int] = []  # the version of each snapshot taken
    real_snapshot = LocalProvider.snapshot

    def counting(self: LocalProvider) -> tuple[int, list[dict[str, Any]]]:
        taken = real_snapshot(self)
        encoded.append(taken[0])
        return taken

    monkeypatch.setattr(LocalProvider, "snapshot", counting)
    async with contextlib.AsyncExitStack() as pages:
        readers = []
        for _ in range(3):
            response = await pages.enter_async_context(http.stream("GET", "/console/api/stream"))
            readers.append(response.aiter_lines())
        first = [json.loads((await anext(r)).removeprefix("data: ")) for r in readers]
        assert len({page["version"] for page in first}) == 1
        user = await make_user(stub)
        await start_session(stub, user.id)

        async def next_data(lines: AsyncIterator[str]) -> dict[str, Any]:
            async for line in lines:
                if line.startswith("data: "):
                    data: dict[str, Any] = json.loads(line.removeprefix("data: "))
                    if data["conversations"]:
                        return data
            raise AssertionError("the stream ended")

        seen = [await asyncio.wait_for(next_data(r), TIMEOUT) for r in readers]
    versions = {page["version"] for page in first + seen}
    assert (await http.get("/console/api/state")).json()["version"] == max(versions)
    # Each version the pages (and the state call) got was taken and encoded
    # once, whichever asked first.
    assert versions <= set(encoded)
    assert len(encoded) == len(set(encoded)), encoded
