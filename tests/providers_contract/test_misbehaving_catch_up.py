"""A provider's catch-up that fails unexpectedly for one chat (a bug: an
exception that is no ``ProviderError``, or a listing the core cannot apply)
costs only that chat's catch-up: the pass goes on to the other open chats
and completes, instead of ending at the first such chat every sweep."""

from __future__ import annotations

import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import (
    AgentMessage,
    Author,
    Capabilities,
    CatchUp,
    InboundEvent,
    Message,
    ProviderChat,
    ProviderUnavailable,
)
from providers.types import Started
from tests.providers_contract.contract import JANE, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import EventCollector, make_user


@pytest.mark.parametrize("fault", ["raise", "bad_event"])
async def test_one_chats_catch_up_bug_leaves_the_others_caught_up(
    env: dict[str, str], desk: Desk, fault: str
) -> None:
    desk.capabilities = Capabilities(catch_up=True)
    env["HITL_RECONCILE_INTERVAL"] = "0"  # only the start-up pass and ours
    async with served(env) as (app, stub):
        sessions = [await start(stub, (await make_user(stub, name)).id) for name in "AB"]
        broken = sessions[0].external_chat_id
        asked: list[str] = []

        async def catch_up(chat: ProviderChat, checkpoint: str) -> CatchUp:
            chat_id = chat.external_chat_id
            asked.append(chat_id)
            if chat_id == broken and fault == "raise":
                raise KeyError("ticket")
            if chat_id == broken:
                return CatchUp((InboundEvent(chat_id, Started("x", chat_id), "bad"),))  # type: ignore[arg-type]
            missed = AgentMessage(Message("missed", Author.AGENT), JANE)
            return CatchUp((InboundEvent(chat_id, missed, f"{chat_id}:missed"),), "cp1")

        desk.hooks["catch_up"] = catch_up
        await app.core.maintenance.sweep_catch_up(force=True)
        async with EventCollector(stub, session_id=sessions[1].id) as events:
            message = await events.wait_for_kind("agent_message")
        assert message.agent_message.message.text == "missed"
        assert sorted(asked) == sorted(s.external_chat_id for s in sessions)
        got = await stub.GetSession(pb.GetSessionRequest(session_id=sessions[0].id))
        assert got.session.state == pb.SESSION_STATE_REQUESTED


@pytest.mark.parametrize("fault", ["unavailable", "raise", "bad_event"])
async def test_state_a_failing_catch_up_changed_is_kept(
    env: dict[str, str], desk: Desk, fault: str
) -> None:
    """What the provider changed in its chat's state before the catch-up
    went wrong (a cursor moved, a token renewed and its refresh token
    spent) is kept, as after a failed send, stop or start: a catch-up
    that ends in a ``ProviderError`` kept it already."""
    desk.capabilities = Capabilities(catch_up=True)
    env["HITL_RECONCILE_INTERVAL"] = "0"
    async with served(env) as (app, stub):
        session = await start(stub, (await make_user(stub)).id)

        async def catch_up(chat: ProviderChat, checkpoint: str) -> CatchUp:
            chat.state["cursor"] = "renewed"
            if fault == "unavailable":
                raise ProviderUnavailable("the desk is down")
            if fault == "raise":
                raise KeyError("ticket")
            chat_id = chat.external_chat_id
            return CatchUp((InboundEvent(chat_id, Started("x", chat_id), "bad"),))  # type: ignore[arg-type]

        desk.hooks["catch_up"] = catch_up
        await app.core.maintenance.sweep_catch_up(force=True)
        stored = await app.store.get_session(session.id)
        assert stored is not None
        assert stored.chat_state.get("cursor") == "renewed"
