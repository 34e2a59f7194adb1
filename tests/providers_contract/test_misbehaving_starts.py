"""A provider's start answering what it must not: the handoff fails at once
(INTERNAL, the session FAILED), never left STARTING (blocking the user's
next start with SESSION_ALREADY_OPEN until the upkeep gives it up) and never
taking over another session's chat."""

from __future__ import annotations

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers import InboundEvent, ProviderChat, StartResult
from providers.types import Started
from tests.providers_contract.contract import JANE, get, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import TIMEOUT, expect_error, make_user


@pytest.mark.parametrize("answer", [None, StartResult(ProviderChat(""))])
async def test_a_start_answering_no_ticket_fails_the_session(
    env: dict[str, str], desk: Desk, answer: StartResult | None
) -> None:
    async def bad_start(*_args: object) -> StartResult | None:
        return answer

    async with served(env) as (_app, stub):
        user = await make_user(stub)
        desk.hooks["start"] = bad_start
        error = await expect_error(start(stub, user.id), grpc.StatusCode.INTERNAL)
        assert error.reason == "INTERNAL_ERROR"
        del desk.hooks["start"]
        session = await start(stub, user.id)
        assert session.state == pb.SESSION_STATE_REQUESTED


async def test_a_start_reporting_an_event_the_core_cannot_apply(
    env: dict[str, str], desk: Desk
) -> None:
    """``Started`` is the core's own kind: reported with a start, it fails
    that start."""

    async def start_reporting_started(*_args: object) -> StartResult:
        event = InboundEvent("TD-9", Started("ticketdesk", "TD-9"), "td-9-started")  # type: ignore[arg-type]
        return StartResult(ProviderChat("TD-9"), events=(event,))

    async with served(env) as (_app, stub):
        user = await make_user(stub)
        desk.hooks["start"] = start_reporting_started
        await expect_error(start(stub, user.id), grpc.StatusCode.INTERNAL)
        del desk.hooks["start"]
        await start(stub, user.id)


async def test_a_start_returning_another_open_sessions_ticket_fails(
    env: dict[str, str], desk: Desk
) -> None:
    """A ticket id handed out twice must not move the first session's
    chat, and its agent's replies, to the second one."""
    async with served(env) as (_app, stub):
        first = await start(stub, (await make_user(stub)).id)

        async def same_ticket(*_args: object) -> StartResult:
            return StartResult(ProviderChat(first.external_chat_id))

        desk.hooks["start"] = same_ticket
        bob = await make_user(stub, "Bob")
        error = await expect_error(start(stub, bob.id), grpc.StatusCode.INTERNAL)
        assert error.reason == "INTERNAL_ERROR"
        del desk.hooks["start"]
        assert await desk.reply(first.external_chat_id, JANE, "for the first user") == 2
        assert (await get(stub, first.id)).state == pb.SESSION_STATE_ASSIGNED
        listed = await stub.ListSessions(pb.ListSessionsRequest(user_id=bob.id), timeout=TIMEOUT)
        assert [s.state for s in listed.sessions] == [pb.SESSION_STATE_FAILED]
        await start(stub, bob.id)  # Bob is not blocked
