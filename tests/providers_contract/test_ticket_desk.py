"""A third provider with few capabilities ("ticketdesk": text only, no
transfers, queue info, catch-up, webhooks or abandon; events pushed through
the sink), installed as an entry point and driven through the real service:
the reusable contract suite, and what is particular to such a provider."""

from __future__ import annotations

import asyncio

import grpc
import httpx
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import Message, ProviderChat, SendResult
from tests.providers_contract.contract import (
    JANE,
    AgentSide,
    AgentSideFor,
    ProviderContract,
    get,
    send,
    served,
    start,
)
from tests.providers_contract.ticket_desk import Desk, TicketDeskProvider
from tests.support import make_user, wait_for


class TestContract(ProviderContract):
    @pytest.fixture
    def contract_env(self, env: dict[str, str]) -> dict[str, str]:
        return env

    @pytest.fixture
    def agent_side(self, desk: Desk) -> AgentSideFor:
        def side(app: object) -> AgentSide:
            assert isinstance(getattr(app, "provider", None), TicketDeskProvider)
            return desk

        return side


class TestTicketDesk:
    async def test_the_transcript_arrives_as_text(self, env: dict[str, str], desk: Desk) -> None:
        async with served(env) as (_app, stub):
            history = [pb.Message(text="hi bot"), pb.Message(card=pb.Card(title="Plans"))]
            session = await start(stub, (await make_user(stub)).id, history=history)
            transcript = desk.tickets[session.external_chat_id].transcript
            assert transcript[0].body == "hi bot"
            assert isinstance(transcript[1].body, str)
            assert "Plans" in transcript[1].body

    async def test_the_desk_closing_the_ticket_ends_the_session(
        self, env: dict[str, str], desk: Desk
    ) -> None:
        async with served(env) as (_app, stub):
            session = await start(stub, (await make_user(stub)).id)
            assert session.state == pb.SESSION_STATE_REQUESTED  # no queue reports
            assert await desk.solve(session.external_chat_id) == 1
            ended = await get(stub, session.id)
            assert ended.state == pb.SESSION_STATE_ENDED
            assert ended.end_reason == "the agent closed the chat"

    async def test_its_close_after_our_stop_adds_no_second_end(
        self, env: dict[str, str], desk: Desk
    ) -> None:
        async with served(env) as (_app, stub):
            session = await start(stub, (await make_user(stub)).id)
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=5)
            assert not desk.tickets[session.external_chat_id].open
            assert await desk.solve(session.external_chat_id) == 0

    async def test_a_new_handoff_gets_a_new_ticket(self, env: dict[str, str], desk: Desk) -> None:
        async with served(env) as (_app, stub):
            user = await make_user(stub)
            first = await start(stub, user.id)
            await stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=5)
            second = await start(stub, user.id)
            assert second.external_chat_id != first.external_chat_id
            assert len(desk.tickets) == 2

    async def test_a_send_cut_off_by_a_restart_is_delivered_once(
        self, env: dict[str, str], desk: Desk
    ) -> None:
        """The desk took the message, then the service stopped before the
        answer: after the restart the send is asked again as uncertain, and
        the retry of the request learns it was delivered."""
        attempts: list[bool] = []
        never = asyncio.Event()

        async def take_then_hang(
            chat: ProviderChat, message: Message, request_id: str, uncertain: bool
        ) -> SendResult:
            attempts.append(uncertain)
            ticket = desk.tickets[chat.external_chat_id]
            if all(rid != request_id for rid, _m in ticket.messages):
                ticket.messages.append((request_id, message))
            if not uncertain:
                await never.wait()
            return SendResult(f"{ticket.id}/{request_id}")

        async with served(env) as (_app, stub):
            session = await start(stub, (await make_user(stub)).id)
            desk.hooks["send"] = take_then_hang
            cut = asyncio.ensure_future(send(stub, session.id, "r-1", text="once"))
            await wait_for(lambda: attempts, what="the first attempt")
        (outcome,) = await asyncio.gather(cut, return_exceptions=True)
        assert isinstance(outcome, BaseException)  # cut off: no answer
        async with served(env) as (_app, stub):

            async def delivered() -> bool:
                try:
                    return bool(await send(stub, session.id, "r-1", text="once"))
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE  # DELIVERY_PENDING
                    return False

            await wait_for(delivered, what="the delivery after the restart")
            assert attempts[:2] == [False, True]
            assert desk.received(session.external_chat_id) == ["once"]

    async def test_events_about_unknown_tickets_are_dropped(
        self, env: dict[str, str], desk: Desk
    ) -> None:
        async with served(env) as (_app, _stub):
            assert await desk.reply("TD-404", JANE, "who?") == 0

    async def test_the_webhook_route_answers_json(self, env: dict[str, str]) -> None:
        async with (
            served(env) as (app, _stub),
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http,
        ):
            response = await http.post("/webhooks/ticketdesk", content=b"{}")
            assert response.status_code == 404
            assert "webhooks" in response.json()["error"]
