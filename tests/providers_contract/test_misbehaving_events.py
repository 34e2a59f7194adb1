"""Events a provider reports in a form the contract leaves open."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import AgentMessage, Author, InboundEvent, Message, WebhookBatch
from tests.providers_contract.contract import JANE, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import TIMEOUT, EventCollector, make_user, wait_for


async def test_a_naive_occurred_at_is_taken_as_utc(env: dict[str, str], desk: Desk) -> None:
    """A time without a zone (``datetime.utcnow()``, an ISO string without
    offset) failed the whole batch while a stop was pending (compared with
    the stop's time): the agent's last message before the stop was lost."""
    closing = asyncio.Event()

    async def slow_stop(*_args: object) -> None:
        await closing.wait()

    async with served(env) as (_app, stub), EventCollector(stub) as events:
        session = await start(stub, (await make_user(stub)).id)
        desk.hooks["stop"] = slow_stop
        stopping = asyncio.ensure_future(
            stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
        )
        await wait_for(lambda: "stop" in desk.calls, what="the stop at the desk")
        # Naive UTC, as ``datetime.utcnow()`` gives: before the stop.
        written = datetime.now(UTC).replace(tzinfo=None) - timedelta(seconds=30)
        message = AgentMessage(Message("one last thing", Author.AGENT), JANE)
        event = InboundEvent(session.external_chat_id, message, "td-late", occurred_at=written)
        assert desk.sink is not None
        assert await desk.sink.deliver(WebhookBatch("desk", (event,))) == 2  # assigned, message
        closing.set()
        await stopping
        await events.wait_for_kind("ended")
        assert events.kinds() == ["started", "agent_assigned", "agent_message", "ended"]


async def test_an_event_without_a_dedupe_key_is_refused_not_dropped(
    env: dict[str, str], desk: Desk
) -> None:
    """The first keyless event claimed the key "": every later one was a
    duplicate, dropped without a word. Refused, the provider learns of it
    (a webhook's batch is kept as a dead letter and answered 500)."""
    async with served(env) as (_app, stub):
        session = await start(stub, (await make_user(stub)).id)
        assert desk.sink is not None
        for text in ("first", "second"):
            said = AgentMessage(Message(text, Author.AGENT), JANE)
            event = InboundEvent(session.external_chat_id, said, dedupe_key="")
            with pytest.raises(ValueError, match="no dedupe key"):
                await desk.sink.deliver(WebhookBatch("desk", (event,)))
