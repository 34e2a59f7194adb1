"""A third provider with few capabilities ("ticketdesk": text only, no
transfers, queue info, catch-up, webhooks or abandon; events pushed through
the sink), installed as an entry point and driven through the real service:
gRPC on 127.0.0.1:0, a real channel, restarts on the same store and desk."""

from __future__ import annotations

import grpc
import httpx

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.providers_contract.service import JANE, get, send, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import TIMEOUT, EventCollector, expect_error, make_user


class TestLifecycle:
    async def test_start_every_body_kind_agent_events_and_stop(
        self, env: dict[str, str], desk: Desk
    ) -> None:
        async with served(env) as (_app, stub):
            user = await make_user(stub)
            async with EventCollector(stub) as events:
                history = [pb.Message(text="hi bot"), pb.Message(card=pb.Card(title="Plans"))]
                session = await start(stub, user.id, history=history)
                assert session.state == pb.SESSION_STATE_REQUESTED
                ticket = desk.tickets[session.external_chat_id]
                assert ticket.transcript[0].body == "hi bot"
                assert "Plans" in str(ticket.transcript[1].body)  # as text: no cards here
                await send(stub, session.id, text="plain")
                pdf = pb.Media(kind=pb.MEDIA_KIND_FILE, url="https://x.example/a.pdf")
                await send(stub, session.id, media=pdf)
                await send(stub, session.id, location=pb.Location(latitude=1.5, longitude=2.5))
                card = pb.Card(title="Pick", buttons=[pb.CardButton(text="A")])
                await send(stub, session.id, card=card)
                bodies = [m.body for m in desk.received(ticket.id)]
                assert all(isinstance(b, str) for b in bodies), bodies
                assert bodies[0] == "plain"
                assert "https://x.example/a.pdf" in str(bodies[1])
                assert "1.5" in str(bodies[2])
                assert "Pick" in str(bodies[3])
                assert await desk.take(ticket.id, JANE) == 1
                assert await desk.reply(ticket.id, JANE, "hello") == 1
                stopped = await stub.StopHitl(
                    pb.StopHitlRequest(session_id=session.id, reason="done"), timeout=TIMEOUT
                )
                assert stopped.session.state == pb.SESSION_STATE_ENDED
                assert not ticket.open
                # The desk's own close notification afterwards adds nothing.
                assert await desk.solve(ticket.id) == 0
                await events.wait_for_kind("ended")
                assert events.kinds() == ["started", "agent_assigned", "agent_message", "ended"]
            late = send(stub, session.id, text="late")
            error = await expect_error(late, grpc.StatusCode.FAILED_PRECONDITION)
            assert error.reason == "SESSION_ENDED"

    async def test_the_agent_solves_the_ticket(self, env: dict[str, str], desk: Desk) -> None:
        async with served(env) as (_app, stub):
            session = await start(stub, (await make_user(stub)).id)
            assert await desk.solve(session.external_chat_id) == 1
            ended = await get(stub, session.id)
            assert ended.state == pb.SESSION_STATE_ENDED
            assert ended.end_reason == "the agent closed the chat"

    async def test_a_restart_keeps_the_sessions(self, env: dict[str, str], desk: Desk) -> None:
        async with served(env) as (_app, stub):
            user = await make_user(stub)
            session = await start(stub, user.id)
            await send(stub, session.id, text="before")
        async with served(env) as (_app, stub):
            await desk.take(session.external_chat_id, JANE)
            await send(stub, session.id, text="after")
            assert [m.body for m in desk.received(session.external_chat_id)] == ["before", "after"]
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
            again = await start(stub, user.id)
            assert again.external_chat_id != session.external_chat_id

    async def test_a_retried_start_reuses_its_ticket(self, env: dict[str, str], desk: Desk) -> None:
        async with served(env) as (_app, stub):
            user = await make_user(stub)
            first = await start(stub, user.id, request_id="r-1")
            again = await start(stub, user.id, request_id="r-1")
            assert (again.id, len(desk.tickets)) == (first.id, 1)

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
