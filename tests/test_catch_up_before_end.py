"""The read of a chat's history before an end: a provider whose catch-up
fails unexpectedly (a bug, not a ProviderError) does not keep ends from applying."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from hitl_service.app import App
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.errors import ProviderAuthError
from providers.types import (
    Agent,
    AgentMessage,
    Author,
    Ended,
    EndedBy,
    InboundEvent,
    Message,
    ProviderChat,
    ProviderUser,
)
from tests.scripted import Fault, ScriptedProvider
from tests.support import TIMEOUT, make_user, start_session

JANE = Agent(id="jane@acme.test", name="Jane")


async def _open(stub: Any) -> pb.Session:
    return await start_session(stub, (await make_user(stub)).id)


def _broken_catch_up(scripted: ScriptedProvider) -> None:
    async def catch_up(*args: Any, **kwargs: Any) -> Any:
        raise KeyError("a provider bug while reading the history")

    scripted.catch_up = catch_up  # type: ignore[method-assign]


async def test_a_provider_end_applies_when_the_history_read_breaks(
    scripted_app: App, scripted_stub: Any, scripted: ScriptedProvider
) -> None:
    session = await _open(scripted_stub)
    _broken_catch_up(scripted)
    await scripted.push(session.external_chat_id, Ended(by=EndedBy.AGENT), "end-1")
    got = await scripted_stub.GetSession(
        pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
    )
    assert got.session.state == pb.SESSION_STATE_ENDED


async def test_a_stop_ends_when_the_history_read_breaks(
    scripted_app: App, scripted_stub: Any, scripted: ScriptedProvider
) -> None:
    session = await _open(scripted_stub)
    _broken_catch_up(scripted)
    stopped = await scripted_stub.StopHitl(
        pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
    )
    assert stopped.session.state == pb.SESSION_STATE_ENDED


async def test_the_stop_s_read_uses_and_keeps_the_provider_user_state(
    scripted_app: App, scripted_stub: Any, scripted: ScriptedProvider
) -> None:
    """A provider whose credentials rotate (a refresh token spent once): the
    stop renews them, the read after it must use the renewed ones, and what
    the read renews in turn is what stays stored."""
    session = await _open(scripted_stub)
    written = datetime.now(UTC)
    late = AgentMessage(Message("your reference is R-42", Author.AGENT), JANE)
    chat = session.external_chat_id
    scripted.catch_up_events[chat] = [InboundEvent(chat, late, "m-late", occurred_at=written)]
    stop, catch_up = scripted.stop, scripted.catch_up

    def rotate(user: ProviderUser) -> None:
        user.state["refresh"] = int(user.state.get("refresh", 0)) + 1

    async def stop_rotating(chat: ProviderChat, user: ProviderUser, *a: Any, **k: Any) -> None:
        rotate(user)
        await stop(chat, user, *a, **k)

    async def catch_up_rotating(
        chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
    ) -> Any:
        if user.state.get("refresh") != 1:  # the one the stop spent
            raise ProviderAuthError("HITL_SCRIPTED_TOKEN", "refresh token already used")
        rotate(user)
        return await catch_up(chat, user, checkpoint, timeout=timeout)

    scripted.stop = stop_rotating  # type: ignore[method-assign]
    scripted.catch_up = catch_up_rotating  # type: ignore[method-assign]
    stopped = await scripted_stub.StopHitl(
        pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
    )
    assert stopped.session.state == pb.SESSION_STATE_ENDED

    events = await scripted_app.store.read_events(after=0, limit=50, session_id=session.id)
    names = [type(e.kind).__name__ for e in events]
    assert names[-2:] == ["AgentMessage", "Ended"]
    user = await scripted_app.store.get_provider_user(stopped.session.user_id, "scripted")
    assert user is not None
    assert user.state["refresh"] == 2  # the read's renewal, not the stop's


@pytest.mark.parametrize("end", ["stop", "provider"])
async def test_a_history_read_failing_once_before_an_end_is_tried_again(
    scripted_app: App, scripted_stub: Any, scripted: ScriptedProvider, end: str
) -> None:
    """The read before an end is the last chance for an agent message whose
    webhook was lost: after the end no catch-up reads the chat again. One
    transient failure of that read lost the message for good (seen in the
    chaos test, whose LiveChat fails a read now and then)."""
    session = await _open(scripted_stub)
    chat = session.external_chat_id
    late = AgentMessage(Message("your reference is R-42", Author.AGENT), JANE)
    written = datetime.now(UTC)  # before the stop was asked
    scripted.catch_up_events[chat] = [InboundEvent(chat, late, "m-late", occurred_at=written)]
    scripted.fail("catch_up", Fault("unavailable"))
    if end == "stop":
        await scripted_stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
    else:
        await scripted.push(chat, Ended(by=EndedBy.AGENT), "end-1")
    events = await scripted_app.store.read_events(after=0, limit=50, session_id=session.id)
    assert [type(e.kind).__name__ for e in events][-2:] == ["AgentMessage", "Ended"]
    assert len(scripted.calls.catch_ups) == 2
