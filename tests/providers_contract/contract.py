"""A provider contract suite any provider's tests can reuse.

It drives the real service (gRPC on 127.0.0.1:0, a real channel, restarts
on the same store) through what every provider must support, whatever its
``Capabilities``: every message kind (native or as readable text), the
agent's side taking, answering and closing a handoff, stops, repeated
requests and restarts. A provider's test module subclasses
``ProviderContract`` and gives it two fixtures:

``contract_env``
    The service's settings, selecting the provider (``HITL_PROVIDER``) and
    whatever the provider needs to run against a fake or local backend.
``agent_side``
    A callable that takes the started ``App`` and returns an ``AgentSide``:
    the provider's backend, driven as its agents would drive it. It is
    called again after each restart.

``test_ticket_desk`` (a provider with few capabilities, pushing events
through the sink) and ``test_local_contract`` (the built-in console) use it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Protocol

import grpc

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers import Agent
from tests.conftest import start_app
from tests.support import TIMEOUT, EventCollector, expect_error, make_user, rid, wait_for

if TYPE_CHECKING:
    from hitl_service.app import App

    Stub = pb_grpc.HitlServiceAsyncStub

JANE = Agent(id="agent-jane", name="Jane")


class AgentSide(Protocol):
    """A provider's backend as its agents use it (chats by external id)."""

    async def take(self, chat_id: str, agent: Agent) -> object:
        """The agent takes the waiting chat."""
        ...

    async def reply(self, chat_id: str, agent: Agent, text: str) -> object:
        """The agent (holding the chat) writes to the user."""
        ...

    async def close(self, chat_id: str, agent: Agent) -> object:
        """The agent (holding the chat) closes it."""
        ...

    def received(self, chat_id: str) -> list[str]:
        """The user's messages the agent sees, oldest first, each as text
        holding what the agent can read of it (say, a JSON dump)."""
        ...


AgentSideFor = Callable[["App"], AgentSide]


@asynccontextmanager
async def served(env: dict[str, str]) -> AsyncIterator[tuple[App, Stub]]:
    """The service, started by the production factory, and a stub on a
    real channel to it; stopped on exit."""
    app = await start_app(env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            yield app, pb_grpc.HitlServiceStub(channel)
    finally:
        await app.stop(grace=1)


async def start(stub: Stub, user_id: str, **fields: object) -> pb.Session:
    """StartHitl; a fresh request id unless given."""
    fields.setdefault("request_id", rid())
    fields.setdefault("title", "Refund")
    response = await stub.StartHitl(
        pb.StartHitlRequest(user_id=user_id, **fields),  # type: ignore[arg-type]
        timeout=TIMEOUT,
    )
    return response.session


async def send(stub: Stub, session_id: str, request_id: str = "", **body: object) -> str:
    """SendMessage with the given body; returns the message id."""
    response = await stub.SendMessage(
        pb.SendMessageRequest(
            session_id=session_id,
            message=pb.Message(**body),  # type: ignore[arg-type]
            request_id=request_id or rid(),
        ),
        timeout=TIMEOUT,
    )
    return response.message_id


async def get(stub: Stub, session_id: str) -> pb.Session:
    """GetSession."""
    response = await stub.GetSession(pb.GetSessionRequest(session_id=session_id), timeout=TIMEOUT)
    return response.session


async def stop(stub: Stub, session_id: str) -> pb.Session:
    """StopHitl."""
    response = await stub.StopHitl(pb.StopHitlRequest(session_id=session_id), timeout=TIMEOUT)
    return response.session


class ProviderContract:
    """What every provider supports, driven through the service (see the
    module docstring for the fixtures a subclass gives)."""

    async def test_every_body_kind_reaches_the_agent_readably(
        self, contract_env: dict[str, str], agent_side: AgentSideFor
    ) -> None:
        """Native where ``Capabilities`` say so, else as readable text:
        never dropped, in the order sent."""
        async with served(contract_env) as (app, stub):
            desk = agent_side(app)
            session = await start(stub, (await make_user(stub)).id)
            chat = session.external_chat_id
            pdf = pb.Media(kind=pb.MEDIA_KIND_FILE, url="https://x.example/terms.pdf")
            place = pb.Location(latitude=52.5, longitude=13.25, name="Office")
            card = pb.Card(title="Plans", buttons=[pb.CardButton(text="Upgrade")])
            await send(stub, session.id, text="plain words")
            await send(stub, session.id, media=pdf)
            await send(stub, session.id, location=place)
            await send(stub, session.id, card=card)
            seen = await wait_for(lambda: len(desk.received(chat)) >= 4 and desk.received(chat))
            assert len(seen) == 4, seen
            assert "plain words" in seen[0]
            assert "https://x.example/terms.pdf" in seen[1]
            assert "52.5" in seen[2]
            assert "Plans" in seen[3]
            assert "Upgrade" in seen[3]

    async def test_the_agents_side_reaches_the_stream_in_order(
        self, contract_env: dict[str, str], agent_side: AgentSideFor
    ) -> None:
        async with served(contract_env) as (app, stub), EventCollector(stub) as events:
            desk = agent_side(app)
            session = await start(stub, (await make_user(stub)).id)
            chat = session.external_chat_id
            await desk.take(chat, JANE)
            await desk.reply(chat, JANE, "Hello, I am Jane")
            await desk.close(chat, JANE)
            ended = await events.wait_for_kind("ended", session.id)
            assert ended.ended.by == pb.ENDED_BY_AGENT
            mine = [e for e in events.events if e.session_id == session.id]
            kinds = [str(e.WhichOneof("kind")) for e in mine]
            assert kinds[0] == "started"
            assert kinds[-3:] == ["agent_assigned", "agent_message", "ended"]
            said = next(e for e in mine if e.WhichOneof("kind") == "agent_message")
            assert said.agent_message.message.text == "Hello, I am Jane"
            assert said.agent_message.agent.id == JANE.id
            assert (await get(stub, session.id)).state == pb.SESSION_STATE_ENDED
            late = await expect_error(
                send(stub, session.id, text="late"), grpc.StatusCode.FAILED_PRECONDITION
            )
            assert late.reason == "SESSION_ENDED"

    async def test_a_stop_ends_the_handoff_once(
        self, contract_env: dict[str, str], agent_side: AgentSideFor
    ) -> None:
        async with served(contract_env) as (app, stub), EventCollector(stub) as events:
            desk = agent_side(app)
            user = await make_user(stub)
            session = await start(stub, user.id)
            await desk.take(session.external_chat_id, JANE)
            stopped = await stop(stub, session.id)
            assert stopped.state == pb.SESSION_STATE_ENDED
            assert (await stop(stub, session.id)).state == pb.SESSION_STATE_ENDED
            again = await start(stub, user.id)  # the user may hand off again
            await events.wait_for_kind("started", again.id)
            ends = [e for e in events.events if e.WhichOneof("kind") == "ended"]
            assert [(e.session_id, e.ended.by) for e in ends] == [(session.id, pb.ENDED_BY_CALLER)]

    async def test_a_repeated_request_is_delivered_once(
        self, contract_env: dict[str, str], agent_side: AgentSideFor
    ) -> None:
        async with served(contract_env) as (app, stub):
            desk = agent_side(app)
            user = await make_user(stub)
            session = await start(stub, user.id, request_id="start-1")
            assert (await start(stub, user.id, request_id="start-1")).id == session.id
            first = await send(stub, session.id, "send-1", text="only once")
            assert await send(stub, session.id, "send-1", text="only once") == first
            assert len(desk.received(session.external_chat_id)) == 1

    async def test_a_restart_keeps_the_handoff_going(
        self, contract_env: dict[str, str], agent_side: AgentSideFor
    ) -> None:
        async with served(contract_env) as (app, stub):
            user = await make_user(stub)
            session = await start(stub, user.id)
            await send(stub, session.id, text="before the restart")
        async with served(contract_env) as (app, stub), EventCollector(stub) as events:
            desk = agent_side(app)
            chat = session.external_chat_id
            await desk.take(chat, JANE)
            await desk.reply(chat, JANE, "still here")
            await send(stub, session.id, text="after the restart")
            seen = desk.received(chat)
            assert ["before the restart" in seen[0], "after the restart" in seen[1]] == [True] * 2
            await events.wait_for_kind("agent_message", session.id)
            assert (await stop(stub, session.id)).state == pb.SESSION_STATE_ENDED
