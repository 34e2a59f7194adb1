"""Crash points between durable steps: the process dies at one step, a new
one starts on the same database, and the invariants hold."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

import grpc

from hitl_service.core.retry import Backoff
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.types import Ended, EndedBy, Message
from tests.scripted import Fault, ScriptedProvider
from tests.support import TIMEOUT, make_user, rid, start_session, wait_for
from tests.test_restart_and_upkeep import running, with_session

if TYPE_CHECKING:
    from hitl_service.app import App
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub


async def test_a_delivered_send_whose_settle_died_is_not_failed_by_the_agents_end(
    service_env: dict[str, str],
) -> None:
    """The provider took the message and the caller was answered, but the
    process died before the settle committed; the agent then ends the chat.
    The retry with the same request id must still get the first outcome (the
    provider has the message), not SESSION_ENDED ("ended before delivery")."""
    service_env["HITL_PROVIDER_TIMEOUT"] = "0.5s"  # a short lease to wait out
    async with with_session(service_env) as (app, stub, provider, session):
        outbox = app.core.outbox
        never = asyncio.Event()

        async def settle_dies(*args: Any, **kwargs: Any) -> Any:
            await never.wait()  # the "crash": this settle never commits

        outbox._settle_done = settle_dies  # type: ignore[method-assign]
        request = pb.SendMessageRequest(
            session_id=session.id, message=pb.Message(text="answered"), request_id=rid()
        )
        first = await stub.SendMessage(request, timeout=TIMEOUT)
        assert first.external_message_id == f"ev-{request.request_id}"
        # The agent read it and closed the chat (its webhook commits).
        await provider.push(session.external_chat_id, Ended(by=EndedBy.AGENT), "end-1")
    async with running(service_env) as (app, stub):
        restarted = app.provider
        assert isinstance(restarted, ScriptedProvider)
        # The provider still has the message (a fresh scripted instance
        # forgets it: tell it what the chat holds).
        restarted.calls.delivered[request.request_id] = Message("answered")
        try:
            again = await stub.SendMessage(request, timeout=TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            raise AssertionError(
                f"the retry of an answered send got {exc.code().name}: {exc.details()}"
            ) from None
        assert again.external_message_id == first.external_message_id


async def _stopped_once(app: App, stub: Stub, session: pb.Session) -> None:
    async def ended() -> bool:
        got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
        return got.session.state == pb.SESSION_STATE_ENDED

    await wait_for(ended, timeout=30, what="the stop after restart")
    stopped = await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
    assert stopped.session.state == pb.SESSION_STATE_ENDED
    assert stopped.session.ended_by == pb.ENDED_BY_CALLER
    events = await app.store.read_events(after=0, limit=100, session_id=session.id)
    kinds = [type(e.kind).__name__ for e in events]
    assert kinds.count("Ended") == 1, kinds
    assert [e.seq for e in await app.store.read_events(after=0, limit=100)] == list(
        range(1, await app.store.head() + 1)
    )
    pending, _ = await app.store.outbox_stats()
    assert pending == 0


async def test_a_stop_recorded_before_the_provider_was_called_is_made_after_restart(
    service_env: dict[str, str],
) -> None:
    service_env["HITL_PROVIDER_TIMEOUT"] = "0.5s"
    async with with_session(service_env) as (app, stub, provider, session):
        provider.hold("stop")  # dies before the provider hears of the stop
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=0.5)
        assert provider.calls.stops == []
    async with running(service_env) as (app, stub):
        restarted = app.provider
        assert isinstance(restarted, ScriptedProvider)
        await _stopped_once(app, stub, session)
        assert restarted.calls.stops == [session.external_chat_id]


async def test_a_stop_the_provider_made_but_whose_settle_died_ends_once(
    service_env: dict[str, str],
) -> None:
    service_env["HITL_PROVIDER_TIMEOUT"] = "0.5s"
    async with with_session(service_env) as (app, stub, provider, session):
        never = asyncio.Event()

        async def settle_dies(*args: Any, **kwargs: Any) -> Any:
            await never.wait()

        app.core.outbox._settle_done = settle_dies  # type: ignore[method-assign]
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=0.5)
        assert provider.calls.stops == [session.external_chat_id]
        # The provider's own end notification arrives before the "crash".
        await provider.push(session.external_chat_id, Ended(by=EndedBy.AGENT), "prov-end")
    async with running(service_env) as (app, stub):
        await _stopped_once(app, stub, session)


async def test_an_undelivered_send_of_an_ended_session_does_not_land_in_the_next_handoff(
    service_env: dict[str, str],
) -> None:
    """A send whose attempt may have reached the provider is asked about
    after its session ended; once the user's next handoff reopened the same
    chat, the provider would send what it does not find into that handoff."""
    async with running(service_env) as (app, stub):
        provider = app.provider
        assert isinstance(provider, ScriptedProvider)
        app.core.ctx.calls.backoff = Backoff(initial=3.0, cap=3.0)  # retry after 1.5-3 s
        user = await make_user(stub)
        first = await start_session(stub, user.id)
        chat = first.external_chat_id
        provider.fail("send", Fault("uncertain"))  # lost on the way: never delivered
        request = pb.SendMessageRequest(
            session_id=first.id, message=pb.Message(text="for the first handoff"), request_id=rid()
        )
        with contextlib.suppress(grpc.aio.AioRpcError):
            await stub.SendMessage(request, timeout=0.5)
        await provider.push(chat, Ended(by=EndedBy.AGENT), "end-1")
        provider.closed_chats.add(chat)
        second = await start_session(stub, user.id)
        assert second.external_chat_id == chat

        async def settled() -> bool:
            pending, _ = await app.store.outbox_stats()
            return pending == 0

        await wait_for(settled, timeout=TIMEOUT, what="the old send settled")
        assert request.request_id not in provider.calls.delivered
