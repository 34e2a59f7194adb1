"""A provider's send that misbehaves: the caller learns the outcome, and
the desk gets each accepted message once."""

from __future__ import annotations

import grpc

from providers import Message, ProviderChat
from tests.providers_contract.contract import send, served, start
from tests.providers_contract.ticket_desk import Desk
from tests.support import expect_error, make_user, wait_for


async def test_a_send_that_returns_nothing_delivered_the_message(
    env: dict[str, str], desk: Desk
) -> None:
    """A forgotten ``return`` (None for a SendResult): the call returned, so
    the message was delivered; it was retried as an error instead, sent
    again by a provider that does not look for it first, and the caller got
    DELIVERY_PENDING, then DELIVERY_EXPIRED."""
    attempts: list[bool] = []

    async def send_returning_none(
        chat: ProviderChat, message: Message, request_id: str, uncertain: bool
    ) -> None:
        attempts.append(uncertain)
        desk.tickets[chat.external_chat_id].messages.append((request_id, message))

    async with served(env) as (_app, stub):
        session = await start(stub, (await make_user(stub)).id)
        desk.hooks["send"] = send_returning_none
        assert await send(stub, session.id, text="hello")
        assert attempts == [False]
        assert desk.received(session.external_chat_id) == ["hello"]


async def test_a_send_that_raises_a_bug_is_retried_then_delivered_once(
    env: dict[str, str], desk: Desk
) -> None:
    """A bug (not a ProviderError) is retried as uncertain: the caller is
    told it is pending, without a traceback, and a retry of the request
    learns the outcome."""

    async def broken(*_args: object) -> None:
        raise RuntimeError("desk client bug")

    async with served(env) as (_app, stub):
        session = await start(stub, (await make_user(stub)).id)
        desk.hooks["send"] = broken
        pending = await expect_error(
            send(stub, session.id, "r-1", text="x"), grpc.StatusCode.UNAVAILABLE
        )
        assert pending.reason == "DELIVERY_PENDING"
        assert "desk client bug" not in pending.message
        del desk.hooks["send"]
        await wait_for(lambda: desk.received(session.external_chat_id), what="the retry")
        assert await send(stub, session.id, "r-1", text="x") == pending.metadata["message_id"]
        assert len(desk.received(session.external_chat_id)) == 1
