"""The local provider's agent console over HTTP: take, reply, transfer, end,
each reaching the gRPC event stream; bad requests get a JSON reason."""

from __future__ import annotations

from typing import TYPE_CHECKING

import httpx

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.support import TIMEOUT, EventCollector, make_user, rid, start_session

if TYPE_CHECKING:
    from hitl_service.app import App
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub


async def act(http: httpx.AsyncClient, chat_id: str, action: str, **body: str) -> httpx.Response:
    return await http.post(f"/console/api/conversations/{chat_id}/{action}", json=body)


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
    cases = [
        (await http.post(f"/console/api/conversations/{chat}/reply", content=b"nope"), 400),
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
