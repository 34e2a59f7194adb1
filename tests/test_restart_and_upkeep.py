"""Restarts on the same SQLite file, timeouts, catch-up and interrupted starts."""

from __future__ import annotations

import asyncio
import copy
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta
from typing import Any

import grpc
import pytest
import structlog

from hitl_service.app import App
from hitl_service.clock import Clock, SystemClock
from hitl_service.core import provider_state
from hitl_service.core.maintenance import Maintenance
from hitl_service.domain import SessionState
from hitl_service.errors import StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from providers.errors import ProviderUnavailable
from providers.types import (
    Agent,
    AgentAssigned,
    AgentMessage,
    Author,
    CatchUp,
    Ended,
    EndedBy,
    InboundEvent,
    Message,
    ProviderChat,
    ProviderUser,
    Transferred,
)
from tests.conftest import scripted_on_clock, start_app
from tests.scripted import Fault, ScriptedProvider, create
from tests.support import (
    TIMEOUT,
    EventCollector,
    ShiftedClock,
    expect_error,
    make_user,
    rid,
    start_session,
    wait_for,
)

JANE = Agent("jane@acme.test", "Jane")


@asynccontextmanager
async def running(
    env: dict[str, str], *, scripted: bool = True
) -> AsyncIterator[tuple[App, pb_grpc.HitlServiceAsyncStub]]:
    if scripted:
        env["HITL_PROVIDER"] = "scripted"
    app = await start_app(env, provider_factory=create if scripted else None)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            yield app, pb_grpc.HitlServiceStub(channel)
    finally:
        await app.stop(grace=1)


@asynccontextmanager
async def with_session(
    env: dict[str, str],
) -> AsyncIterator[tuple[App, pb_grpc.HitlServiceAsyncStub, ScriptedProvider, pb.Session]]:
    """A scripted service with one started session."""
    async with running(env) as (app, stub):
        provider = app.provider
        assert isinstance(provider, ScriptedProvider)
        yield app, stub, provider, await start_session(stub, (await make_user(stub)).id)


def upkeep_on(app: App, clock: Clock) -> Maintenance:
    """Another replica's upkeep on the app's store, on ``clock``."""
    return Maintenance(replace(app.core.ctx, clock=clock), app.core.outbox)


async def given_up_start(
    app: App,
    stub: pb_grpc.HitlServiceAsyncStub,
    provider: ScriptedProvider,
    clock: ShiftedClock,
    user_id: str,
) -> tuple[pb.StartHitlRequest, asyncio.Future[pb.StartHitlResponse], asyncio.Event]:
    """A StartHitl held at the provider while the upkeep (its clock an hour
    on) gives it up as interrupted: (request, the pending call, the gate)."""
    gate = provider.hold("start")
    request = pb.StartHitlRequest(user_id=user_id, request_id=rid(), title="late")
    call = asyncio.ensure_future(stub.StartHitl(request, timeout=TIMEOUT))
    await wait_for(lambda: provider.waiting.get("start") == 1, what="the held start")
    clock.offset = 3600
    await app.core.maintenance.sweep()  # START_INTERRUPTED, its request id forgotten
    return request, call, gate


async def all_events(stub: pb_grpc.HitlServiceAsyncStub, count: int) -> list[pb.Event]:
    async with EventCollector(stub, after="0") as events:
        await wait_for(lambda: len(events.events) >= count, what=f"{count} events")
    return events.events


async def attempts_after_restart(app: App, request: pb.SendMessageRequest) -> list[bool]:
    """Waits until the restarted process delivers ``request`` (its lease of
    the interrupted attempt expires first); the ``uncertain`` flag of each
    attempt it made."""
    provider = app.provider
    assert isinstance(provider, ScriptedProvider)
    await wait_for(
        lambda: request.request_id in provider.calls.delivered,
        timeout=30,
        what="delivery after restart",
    )
    return [s[3] for s in provider.calls.sends if s[2] == request.request_id]


class TestRestart:
    async def test_users_sessions_and_events_survive_with_the_same_cursors(
        self, service_env: dict[str, str]
    ) -> None:
        async with running(service_env) as (app, stub):
            provider = app.provider
            assert isinstance(provider, ScriptedProvider)
            user = await make_user(stub, "Ada", external_id="crm-1")
            session = await start_session(stub, user.id)
            await provider.push(
                session.external_chat_id, AgentMessage(Message("hi", Author.AGENT), JANE), "k1"
            )
            before = await all_events(stub, 4)
        async with running(service_env) as (app, stub):
            again = await stub.GetSession(
                pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
            )
            assert again.session.state == pb.SESSION_STATE_ASSIGNED
            assert again.session.agent.name == "Jane"
            same_user = await make_user(stub, "Ada", external_id="crm-1")
            assert same_user.id == user.id
            after = await all_events(stub, 4)
            assert [(e.cursor, e.WhichOneof("kind")) for e in after] == [
                (e.cursor, e.WhichOneof("kind")) for e in before
            ]
            # New events continue the numbering; nothing is reused.
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
            grown = await all_events(stub, 5)
            assert grown[-1].cursor == "5"
            assert grown[-1].WhichOneof("kind") == "ended"

    async def test_a_message_accepted_before_a_crash_is_delivered_after_restart(
        self, service_env: dict[str, str]
    ) -> None:
        """The outbox row outlives the process; the next one delivers it once."""
        service_env["HITL_PROVIDER_TIMEOUT"] = "0.5s"  # a short lease to wait out
        async with running(service_env) as (app, stub):
            session = await start_session(stub, (await make_user(stub)).id)
            provider = app.provider
            assert isinstance(provider, ScriptedProvider)
            provider.hold("send")  # the provider never answers before the "crash"
            request = pb.SendMessageRequest(
                session_id=session.id, message=pb.Message(text="survivor"), request_id=rid()
            )
            try:
                await stub.SendMessage(request, timeout=0.5)
            except grpc.aio.AioRpcError as exc:
                assert exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                )
        # The lease of the interrupted attempt expires; the next process retries
        # it as uncertain, so a provider that did get it does not get it twice.
        async with running(service_env) as (app, stub):
            attempts = await attempts_after_restart(app, request)
            assert attempts[0] is True  # uncertain: check before sending
            response = await stub.SendMessage(request, timeout=TIMEOUT)
            assert response.external_message_id == f"ev-{request.request_id}"

    async def test_a_send_answered_before_its_settle_committed_is_checked_after_a_crash(
        self, service_env: dict[str, str]
    ) -> None:
        """SendMessage answers once the provider has the message, without
        waiting for the settle's COMMIT; a process that dies before that
        COMMIT leaves the attempt uncertain, so the next one checks first."""
        service_env["HITL_PROVIDER_TIMEOUT"] = "0.5s"  # a short lease to wait out
        async with running(service_env) as (app, stub):
            session = await start_session(stub, (await make_user(stub)).id)
            provider = app.provider
            assert isinstance(provider, ScriptedProvider)
            request = pb.SendMessageRequest(
                session_id=session.id, message=pb.Message(text="answered"), request_id=rid()
            )
            store, delivered = app.store, provider.calls.delivered
            transaction = store.transaction
            never = asyncio.Event()

            @asynccontextmanager
            async def held() -> AsyncIterator[Any]:
                await never.wait()  # the "crash": this settle never commits
                yield None

            def settles_held(*, lazy: bool = False) -> Any:
                return held() if request.request_id in delivered else transaction(lazy=lazy)

            store.transaction = settles_held  # type: ignore[method-assign]
            response = await stub.SendMessage(request, timeout=TIMEOUT)
            assert response.external_message_id == f"ev-{request.request_id}"
            pending, _ = await store.outbox_stats()
            assert pending == 1  # answered, and the settle not written
        async with running(service_env) as (app, stub):
            attempts = await attempts_after_restart(app, request)
            assert attempts == [True]  # one attempt, uncertain: it checks before sending
            again = await stub.SendMessage(request, timeout=TIMEOUT)
            assert again.external_message_id == response.external_message_id

    async def test_a_start_interrupted_by_a_crash_is_failed_later(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_REQUEST_BUDGET"] = "0.2s"
        service_env["HITL_PROVIDER_TIMEOUT"] = "0.1s"
        async with running(service_env) as (app, stub):
            user = await make_user(stub)
            now = app.core.ctx.clock.now()
            # A session left STARTING by a process that died mid-start.
            from hitl_service.domain import Session

            async with app.store.transaction() as tx:
                await tx.insert_session(
                    Session(
                        id="ses_stuck",
                        user_id=user.id,
                        provider="scripted",
                        state=SessionState.STARTING,
                        created_at=now - timedelta(minutes=5),
                        updated_at=now - timedelta(minutes=5),
                    )
                )
            failed = {"kind": "failed"}
            counted = app.metrics.registry.get_sample_value("hitl_events_appended_total", failed)
            await app.core.maintenance.sweep()
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id="ses_stuck"), timeout=TIMEOUT
            )
            assert got.session.state == pb.SESSION_STATE_FAILED
            after = app.metrics.registry.get_sample_value("hitl_events_appended_total", failed)
            assert (after or 0) - (counted or 0) == 1  # the log's failed event, counted
            # The user is free to start again.
            assert (await start_session(stub, user.id)).id != "ses_stuck"

    async def test_a_start_the_upkeep_gave_up_on_is_not_revived_by_its_late_answer(
        self, service_env: dict[str, str]
    ) -> None:
        """Another replica's upkeep (its clock ahead) fails a start as
        interrupted while the provider is still answering it: the late answer
        must not bring the FAILED session back; the caller is told to retry,
        and the retry starts afresh."""
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, provider):
            user = await make_user(stub)
            request, call, gate = await given_up_start(app, stub, provider, clock, user.id)
            gate.set()
            error = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
            assert error.reason == "START_INTERRUPTED"
            (failed,) = (
                await stub.ListSessions(pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT)
            ).sessions
            assert failed.state == pb.SESSION_STATE_FAILED
            retried = await stub.StartHitl(request, timeout=TIMEOUT)
            assert retried.session.id != failed.id
            assert retried.session.state != pb.SESSION_STATE_FAILED

    async def test_a_late_failure_of_a_given_up_start_keeps_the_retrys_request_id(
        self, service_env: dict[str, str]
    ) -> None:
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, provider):
            user = await make_user(stub)
            request, first, gate = await given_up_start(app, stub, provider, clock, user.id)
            del provider.gates["start"]  # the first call stays held; new ones go through
            retried = (await stub.StartHitl(request, timeout=TIMEOUT)).session
            provider.fail("start", *[Fault("unavailable")] * 5)
            gate.set()  # the first call's provider answer now fails
            error = await expect_error(first, grpc.StatusCode.UNAVAILABLE)
            assert error.reason in ("PROVIDER_UNAVAILABLE", "START_INTERRUPTED")
            provider.faults.clear()
            again = (await stub.StartHitl(request, timeout=TIMEOUT)).session
            assert again.id == retried.id
            listed = await stub.ListSessions(
                pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT
            )
            (given_up,) = [s.id for s in listed.sessions if s.id != retried.id]
            events = await app.store.read_events(after=0, limit=100, session_id=given_up)
            assert [type(e.kind).__name__ for e in events].count("Failed") == 1


class TestTimeouts:
    async def test_no_agent_in_time_ends_the_handoff_with_a_reason(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_QUEUE_TIMEOUT"] = "1s"
        async with with_session(service_env) as (app, stub, provider, session):
            async with EventCollector(stub, session_id=session.id) as events:
                ended = await events.wait_for_kind("ended")
            assert ended.ended.by == pb.ENDED_BY_TIMEOUT
            assert "no agent took the handoff within 1 s" in ended.ended.reason
            assert provider.calls.stops == [session.external_chat_id]  # really closed
            value = app.metrics.registry.get_sample_value(
                "hitl_session_timeouts_total", {"kind": "queue"}
            )
            assert value == 1

    async def test_a_session_row_this_release_cannot_read_holds_no_timeout_back(
        self, service_env: dict[str, str]
    ) -> None:
        """A newer release (or a hand edit) left an open session this one
        cannot decode: the others still time out."""
        service_env["HITL_QUEUE_TIMEOUT"] = "1s"
        async with running(service_env) as (_app, stub):
            # A state a newer release may add.
            _insert_sessions(service_env, ("ses_newer", "paused"))
            session = await start_session(stub, (await make_user(stub)).id)
            async with EventCollector(stub, session_id=session.id) as events:
                ended = await events.wait_for_kind("ended")
            assert ended.ended.by == pb.ENDED_BY_TIMEOUT

    async def test_a_session_row_this_release_cannot_read_cuts_no_sweep_short(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The sweeps read the open sessions a page at a time and stop at a
        short page. An unreadable row left out of a page made it short: every
        open session after that page (beyond the first 500) got no timeout
        and no catch-up, at every sweep."""
        monkeypatch.setattr("hitl_service.core.maintenance._PAGE", 2)
        service_env["HITL_QUEUE_TIMEOUT"] = "1s"
        async with running(service_env) as (_app, stub):
            # First in id order: in a state a newer release may add, then a
            # handoff an agent holds (it does not time out).
            _insert_sessions(
                service_env, (f"ses_{0:024d}", "paused"), (f"ses_{1:024d}", "assigned")
            )
            # The first page held the bad row: the sweeps went no further.
            sessions = [await start_session(stub, (await make_user(stub)).id) for _ in range(3)]
            for session in sessions:
                async with EventCollector(stub, session_id=session.id) as events:
                    ended = await events.wait_for_kind("ended")
                assert ended.ended.by == pb.ENDED_BY_TIMEOUT

    async def test_a_long_prune_holds_no_timeout_back(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """The first prune after HITL_RETENTION is turned on over a large
        history can take minutes: handoffs must still time out meanwhile."""
        service_env["HITL_QUEUE_TIMEOUT"] = "2s"
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, provider):
            pruning, gate = asyncio.Event(), asyncio.Event()
            prune = app.store.prune

            async def long_prune(**cutoffs: Any) -> int:
                pruning.set()
                await gate.wait()
                return await prune(**cutoffs)

            monkeypatch.setattr(app.store, "prune", long_prune)
            session = await start_session(stub, (await make_user(stub)).id)
            clock.offset = 3600 + 3  # the next hourly prune is due; the handoff's timeout too
            try:
                await asyncio.wait_for(pruning.wait(), TIMEOUT)

                async def ended() -> bool:
                    answer = await stub.GetSession(pb.GetSessionRequest(session_id=session.id))
                    return answer.session.state == pb.SESSION_STATE_ENDED

                await wait_for(ended, what="the timeout while the prune runs")
                assert provider.calls.stops == [session.external_chat_id]
            finally:
                gate.set()

    async def test_two_sweeps_timing_out_one_session_count_it_once(
        self, service_env: dict[str, str]
    ) -> None:
        """Replicas sweep at once: both may read the session before either
        stops it. One stop, one metric count, one log line."""
        service_env["HITL_QUEUE_TIMEOUT"] = "60s"
        async with with_session(service_env) as (app, _stub, provider, session):
            gate = provider.hold("stop")  # the stop stays in flight
            stored = await app.store.get_session(session.id)
            assert stored is not None
            clock = ShiftedClock(app.core.ctx.clock)
            clock.offset = 61
            sweeps = [upkeep_on(app, clock) for _ in range(2)]
            with structlog.testing.capture_logs() as logs:
                for upkeep in sweeps:  # both with the read taken before either stop
                    await upkeep._check_timeouts(copy.copy(stored), clock.now())
            gate.set()
            await wait_for(lambda: provider.calls.stops, what="the stop")
            value = app.metrics.registry.get_sample_value(
                "hitl_session_timeouts_total", {"kind": "queue"}
            )
            assert value == 1
            assert [e["event"] for e in logs].count("session.timeout") == 1
            assert provider.calls.stops == [session.external_chat_id]

    async def test_a_timeout_decided_on_an_old_read_is_checked_again(
        self, service_env: dict[str, str]
    ) -> None:
        """The sweep reads a page, then works through it (catch-up calls the
        provider per chat in between): an agent who took the chat since must
        not see it ended as "no agent took the handoff"."""
        service_env["HITL_QUEUE_TIMEOUT"] = "60s"
        async with with_session(service_env) as (app, stub, provider, session):
            stale = await app.store.get_session(session.id)
            assert stale is not None
            await provider.push(session.external_chat_id, AgentAssigned(JANE), "assigned")
            clock = ShiftedClock(app.core.ctx.clock)
            clock.offset = 61
            upkeep = upkeep_on(app, clock)
            await upkeep._check_timeouts(stale, clock.now())
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
            )
            assert got.session.state == pb.SESSION_STATE_ASSIGNED
            assert provider.calls.stops == []

    async def test_a_refused_timeout_stop_is_asked_again_later_and_counted_once(
        self, service_env: dict[str, str]
    ) -> None:
        """The provider refuses the timeout's stop for good: the next sweeps
        (every few seconds) must not ask again at once, nor count a new
        timeout each time."""
        service_env["HITL_QUEUE_TIMEOUT"] = "60s"
        async with with_session(service_env) as (app, _stub, provider, session):
            provider.fail("stop", Fault("rejected"), Fault("rejected"))
            refusals = provider.faults["stop"]  # each stop asked takes one
            clock = ShiftedClock(app.core.ctx.clock)
            upkeep = upkeep_on(app, clock)

            async def sweep_at(offset: float) -> int:
                clock.offset = offset
                current = await app.store.get_session(session.id)
                assert current is not None
                await upkeep._check_timeouts(current, clock.now())

                async def settled() -> bool:
                    again = await app.store.get_session(session.id)
                    return again is not None and again.stop_requested_at is None

                await wait_for(settled, what="the refused stop settled")
                return 2 - len(refusals)

            assert await sweep_at(61) == 1
            assert await sweep_at(65) == 1  # refused moments ago: not asked again
            assert await sweep_at(70) == 1
            assert await sweep_at(61 + 601) == 2  # ten minutes on: asked again
            value = app.metrics.registry.get_sample_value(
                "hitl_session_timeouts_total", {"kind": "queue"}
            )
            assert value == 1

    async def test_a_timeout_after_the_callers_refused_stop_is_counted(
        self, service_env: dict[str, str]
    ) -> None:
        """The caller's StopHitl is refused for good; later the queue timeout
        ends the session: that is a timeout of its own, counted and logged,
        not a retry of the caller's stop."""
        service_env["HITL_QUEUE_TIMEOUT"] = "60s"
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, provider):
            session = await start_session(stub, (await make_user(stub)).id)
            provider.fail("stop", Fault("rejected"))
            await expect_error(
                stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            with structlog.testing.capture_logs() as logs:
                clock.offset = 61 + 601  # the queue timeout, past the refusal's back-off
                await app.core.maintenance.sweep()
                async with EventCollector(stub, session_id=session.id) as events:
                    ended = await events.wait_for_kind("ended")
            assert ended.ended.by == pb.ENDED_BY_TIMEOUT
            value = app.metrics.registry.get_sample_value(
                "hitl_session_timeouts_total", {"kind": "queue"}
            )
            assert value == 1
            assert [e["event"] for e in logs].count("session.timeout") == 1

    async def test_a_handoff_given_back_to_the_queue_waits_anew(
        self, service_env: dict[str, str]
    ) -> None:
        """The queue timeout counts from when the session last began to wait,
        not from its start: an agent who had it for longer than the timeout
        and transfers it to a group must not see it ended at once."""
        service_env["HITL_QUEUE_TIMEOUT"] = "60s"
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, provider):
            session = await start_session(stub, (await make_user(stub)).id)
            chat, upkeep = session.external_chat_id, app.core.maintenance

            async def state_after_sweep(offset: float) -> pb.SessionState.ValueType:
                clock.offset = offset
                await upkeep.sweep()
                got = await stub.GetSession(
                    pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
                )
                return got.session.state

            clock.offset = 30
            await provider.push(chat, AgentAssigned(JANE), "assigned")
            clock.offset = 100  # Jane had it for 70 s, then gives it to billing
            await provider.push(chat, Transferred(to_group_id="billing"), "to-billing")
            assert await state_after_sweep(130) == pb.SESSION_STATE_QUEUED
            assert await state_after_sweep(161) == pb.SESSION_STATE_ENDED
            assert provider.calls.stops == [chat]

    async def test_a_long_catch_up_pass_does_not_hold_timeouts_back(
        self, service_env: dict[str, str]
    ) -> None:
        """Catch-up makes a provider call per open chat, which may take
        minutes over many chats; timeouts run on a loop of their own."""
        service_env["HITL_QUEUE_TIMEOUT"] = "600s"
        service_env["HITL_RECONCILE_INTERVAL"] = "1"
        service_env["HITL_PROVIDER_TIMEOUT"] = "60s"  # the held call outlasts the test
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (_app, stub, provider):
            gate = provider.hold("catch_up")
            session = await start_session(stub, (await make_user(stub)).id)
            await wait_for(lambda: provider.waiting.get("catch_up") == 1, what="a held catch-up")
            clock.offset = 700
            async with EventCollector(stub, session_id=session.id) as events:
                ended = await events.wait_for_kind("ended")
            assert ended.ended.by == pb.ENDED_BY_TIMEOUT
            assert provider.waiting["catch_up"] == 1  # still held: it did not wait for it
            gate.set()

    async def test_a_silent_user_times_out(self, service_env: dict[str, str]) -> None:
        service_env["HITL_IDLE_TIMEOUT"] = "1s"
        async with running(service_env) as (_app, stub):
            session = await start_session(stub, (await make_user(stub)).id)
            async with EventCollector(stub, session_id=session.id) as events:
                ended = await events.wait_for_kind("ended")
            assert ended.ended.by == pb.ENDED_BY_TIMEOUT
            assert "silent" in ended.ended.reason


class _Hangs:
    """A store transaction that never begins."""

    async def __aenter__(self) -> None:
        await asyncio.Event().wait()

    async def __aexit__(self, *_: object) -> None:
        return None


class TestCatchUp:
    @pytest.mark.parametrize("store", ["up", "hanging"])
    async def test_what_a_catch_up_cut_off_changed_at_the_provider_is_kept(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, store: str
    ) -> None:
        """As for a send: a catch-up the shutdown cuts off (the upkeep stops
        first) keeps the token its call renewed, the old one being spent. A
        store that hangs then holds the cut-off (which the shutdown waits
        for) only briefly, and the cancellation goes on."""
        async with with_session(service_env) as (app, _stub, provider, session):
            renewed = asyncio.Event()

            async def catch_up(
                _chat: ProviderChat, user: ProviderUser, _checkpoint: str, *, timeout: float
            ) -> CatchUp:
                user.state["token"] = "renewed"
                renewed.set()
                await asyncio.Event().wait()  # still at it when it is cut off
                raise AssertionError("unreachable")

            monkeypatch.setattr(provider, "catch_up", catch_up)
            stored = await app.store.get_session(session.id)
            assert stored is not None
            task = asyncio.create_task(app.core.maintenance.catch_up(stored))
            await wait_for(renewed.is_set, what="the renewal")
            if store == "hanging":
                monkeypatch.setattr(provider_state, "CUT_OFF_SAVE_SECONDS", 0.1)
                monkeypatch.setattr(app.store, "transaction", lambda **_: _Hangs())
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), TIMEOUT)
            monkeypatch.undo()
            kept = await app.store.get_provider_user(session.user_id, "scripted")
            assert kept is not None
            assert kept.state.get("token") == ("renewed" if store == "up" else None)

    async def test_missed_agent_messages_reach_the_stream_once_and_in_order(
        self, service_env: dict[str, str]
    ) -> None:
        async with with_session(service_env) as (app, stub, provider, session):
            chat = session.external_chat_id
            # One webhook arrived; two more never did.
            await provider.push(chat, AgentMessage(Message("one", Author.AGENT), JANE), "ev:1")
            provider.catch_up_events[chat] = [
                InboundEvent(chat, AgentMessage(Message(t, Author.AGENT), JANE), f"ev:{i}")
                for i, t in enumerate(["one", "two", "three"], start=1)
            ] + [InboundEvent(chat, Ended(by=EndedBy.AGENT), "deactivated:1")]
            await app.core.maintenance.sweep(force_catch_up=True)
            await app.core.maintenance.sweep(force_catch_up=True)  # idempotent
            async with EventCollector(stub, session_id=session.id) as events:
                await events.wait_for_kind("ended")
            texts = [
                e.agent_message.message.text for e in events.events if e.HasField("agent_message")
            ]
            assert texts == ["one", "two", "three"]
            recovered = app.metrics.registry.get_sample_value(
                "hitl_catch_up_events_total", {"provider": "scripted"}
            )
            assert recovered == 3  # two messages and the end
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
            )
            assert got.session.state == pb.SESSION_STATE_ENDED
            assert got.session.ended_by == pb.ENDED_BY_AGENT

    async def test_a_message_written_while_a_refused_stop_was_pending_is_caught_up_later(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """What the agent writes while our stop is pending passes over (the
        user is back with the bot), its webhook answered. If the provider
        then refuses the stop for good, the handoff goes on and the message
        is the handoff's: a catch-up pass that ran meanwhile must not have
        moved its checkpoint past it, or nothing ever brings it."""
        async with with_session(service_env) as (app, stub, provider, session):
            chat = session.external_chat_id
            await provider.push(chat, AgentAssigned(JANE), "join")
            history: list[InboundEvent] = []

            async def catch_up(
                _chat: ProviderChat, _user: ProviderUser, checkpoint: str, *, timeout: float
            ) -> CatchUp:
                # Like LiveChat's: only what follows the checkpoint.
                seen = int(checkpoint.removeprefix("cp") or 0)
                return CatchUp(tuple(history[seen:]), checkpoint=f"cp{len(history)}")

            monkeypatch.setattr(provider, "catch_up", catch_up)
            gate = provider.hold("stop")
            stop = asyncio.ensure_future(
                stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
            )
            await wait_for(lambda: provider.waiting.get("stop") == 1, what="the stop in flight")
            late = AgentMessage(Message("still there?", Author.AGENT), JANE)
            history.append(InboundEvent(chat, late, "ev:late"))
            await app.core.maintenance.sweep(force_catch_up=True)  # passes it over
            provider.fail("stop", Fault("rejected"))
            gate.set()
            await expect_error(stop, grpc.StatusCode.FAILED_PRECONDITION)
            stored = await app.store.get_session(session.id)
            assert stored is not None
            assert (stored.state, stored.stop_requested_at) == (SessionState.ASSIGNED, None)

            await app.core.maintenance.sweep(force_catch_up=True)
            await app.core.maintenance.sweep(force_catch_up=True)  # idempotent
            async with EventCollector(stub, session_id=session.id) as events:
                message = await events.wait_for_kind("agent_message")
            assert message.agent_message.message.text == "still there?"
            logged = await app.store.read_events(after=0, limit=100, session_id=session.id)
            assert [type(e.kind).__name__ for e in logged] == [
                "Started",
                "Queued",
                "AgentAssigned",
                "AgentMessage",
            ]

    @pytest.mark.parametrize("fails", [False, True])
    async def test_state_the_provider_changed_in_catch_up_is_kept(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch, fails: bool
    ) -> None:
        async with with_session(service_env) as (app, _stub, provider, session):

            async def renew(
                chat: ProviderChat, user: ProviderUser, checkpoint: str, *, timeout: float
            ) -> CatchUp:
                user.state["token"] = "renewed"  # the old one may be spent now
                chat.state["cursor"] = "c2"
                if fails:
                    raise ProviderUnavailable("503 after the renewal")
                return CatchUp((), checkpoint="cp1")

            monkeypatch.setattr(provider, "catch_up", renew)
            await app.core.maintenance.sweep(force_catch_up=True)
            user = await app.store.get_provider_user(session.user_id, "scripted")
            stored = await app.store.get_session(session.id)
            assert user is not None
            assert stored is not None
            assert (user.state["token"], stored.chat_state.get("cursor")) == ("renewed", "c2")
            assert stored.catch_up_checkpoint == ("" if fails else "cp1")

    async def test_replicas_catch_up_and_prune_in_turns(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        service_env["HITL_RECONCILE_INTERVAL"] = "60"
        async with with_session(service_env) as (app, _stub, provider, session):
            clock = ShiftedClock(app.core.ctx.clock)
            # Two more replicas' upkeep on the same store (and the app's own,
            # which pruned when it started: the hour's prune turn is taken).
            a, b = (upkeep_on(app, clock) for _ in "ab")
            prunes: list[datetime] = []
            real_prune = app.store.prune

            async def prune(**cutoffs: datetime) -> int:
                prunes.append(cutoffs["dedupe_before"])
                return await real_prune(**cutoffs)

            monkeypatch.setattr(app.store, "prune", prune)
            catch_ups = provider.calls.catch_ups

            async def sweeps(offset: float) -> tuple[int, int]:
                clock.offset = offset
                before = len(catch_ups), len(prunes)
                await a.sweep()
                await b.sweep()
                return len(catch_ups) - before[0], len(prunes) - before[1]

            # Each process catches up once when it starts, turn or not.
            assert await sweeps(0) == (2, 0)
            assert catch_ups == [session.external_chat_id] * 2
            assert await sweeps(30) == (0, 0)  # not due on either
            assert await sweeps(61) == (1, 0)  # due on both: one takes the turn
            assert await sweeps(122) == (1, 0)
            assert await sweeps(3700) == (1, 1)  # an hour on: one prune between them
            assert await sweeps(3730) == (0, 0)

    async def test_interval_zero_catches_up_only_when_the_process_starts(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_RECONCILE_INTERVAL"] = "0"
        async with with_session(service_env) as (app, _stub, provider, session):
            clock = ShiftedClock(app.core.ctx.clock)
            upkeep = upkeep_on(app, clock)
            await upkeep.sweep()
            assert provider.calls.catch_ups == [session.external_chat_id]
            for offset in (60.0, 86400.0):
                clock.offset = offset
                await upkeep.sweep()
            assert provider.calls.catch_ups == [session.external_chat_id]

    async def test_a_start_up_pass_the_store_interrupted_is_run_again(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        service_env["HITL_RECONCILE_INTERVAL"] = "0"
        async with with_session(service_env) as (app, _stub, provider, session):
            upkeep = Maintenance(app.core.ctx, app.core.outbox)
            real_list = app.store.list_open_sessions

            async def down(**page: Any) -> list[Any]:
                raise StoreUnavailable("the database is restarting")

            monkeypatch.setattr(app.store, "list_open_sessions", down)
            with pytest.raises(StoreUnavailable):
                await upkeep.sweep()
            assert provider.calls.catch_ups == []
            monkeypatch.setattr(app.store, "list_open_sessions", real_list)
            await upkeep.sweep()
            await upkeep.sweep()
            assert provider.calls.catch_ups == [session.external_chat_id]


class TestSweepResilience:
    async def test_a_session_the_store_fails_on_does_not_stop_the_sweep(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """One session's row locked by a frozen replica (its statement timed
        out) must not keep the others from their timeouts."""
        async with with_session(service_env) as (app, stub, _provider, first):
            second = await start_session(stub, (await make_user(stub)).id)
            upkeep = Maintenance(app.core.ctx, app.core.outbox)
            check, seen = upkeep._check_timeouts, []

            async def failing_first(session: Any, now: datetime) -> None:
                seen.append(session.id)
                if len(seen) == 1:
                    raise StoreUnavailable("canceling statement due to statement timeout")
                await check(session, now)

            monkeypatch.setattr(upkeep, "_check_timeouts", failing_first)
            await upkeep.sweep()
            assert sorted(seen) == sorted([first.id, second.id])


class TestEndedElsewhere:
    async def test_agent_end_fails_queued_messages_and_refuses_new_ones(
        self, service_env: dict[str, str]
    ) -> None:
        async with with_session(service_env) as (_app, stub, provider, session):
            await provider.push(session.external_chat_id, Ended(by=EndedBy.AGENT), "end")
            got = await stub.GetSession(
                pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
            )
            assert got.session.state == pb.SESSION_STATE_ENDED
            assert got.session.end_reason == "the agent closed the chat"
            # A stop after the agent's end is a no-op: the provider is not called.
            stopped = await stub.StopHitl(
                pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
            )
            assert stopped.session.ended_by == pb.ENDED_BY_AGENT
            assert provider.calls.stops == []

    async def test_our_own_stop_is_not_reported_twice_by_the_provider(
        self, service_env: dict[str, str]
    ) -> None:
        async with with_session(service_env) as (_app, stub, provider, session):
            await stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT)
            # The provider's own end notification for that chat arrives afterwards.
            await provider.push(session.external_chat_id, Ended(by=EndedBy.AGENT), "late-end")
            async with EventCollector(stub, session_id=session.id) as events:
                await events.wait_for_kind("ended")
            assert events.kinds().count("ended") == 1
            assert events.events[-1].ended.by == pb.ENDED_BY_CALLER


class TestRetention:
    async def test_ended_sessions_older_than_the_retention_go_and_open_ones_stay(
        self, service_env: dict[str, str]
    ) -> None:
        service_env["HITL_RETENTION"] = "2d"
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, _provider):
            ended_user = await make_user(stub)
            ended = await start_session(stub, ended_user.id)
            await stub.StopHitl(pb.StopHitlRequest(session_id=ended.id), timeout=TIMEOUT)
            still_open = await start_session(stub, (await make_user(stub)).id)
            async with EventCollector(stub) as before:
                await before.wait_for_kind("ended", session_id=ended.id)
                await before.wait_for_kind("started", session_id=still_open.id)
            head = max(int(e.cursor) for e in before.events)

            clock.offset = 2 * 86400 + 3600  # past the retention, and the hourly prune
            with structlog.testing.capture_logs() as logs:
                await app.core.maintenance.sweep()
                # The app's own upkeep loop, on the same clock, may take the turn.
                await wait_for(
                    lambda: any(e["event"] == "maintenance.pruned" for e in logs),
                    what="the prune",
                )
            pruned = next(e for e in logs if e["event"] == "maintenance.pruned")
            # The session and its events, besides expired request records.
            assert pruned["rows"] >= 1 + len(before.kinds(ended.id))

            await expect_error(
                stub.GetSession(pb.GetSessionRequest(session_id=ended.id), timeout=TIMEOUT),
                grpc.StatusCode.NOT_FOUND,
            )
            listed = await stub.ListSessions(
                pb.ListSessionsRequest(user_id=ended_user.id), timeout=TIMEOUT
            )
            assert list(listed.sessions) == []
            kept = await stub.GetSession(
                pb.GetSessionRequest(session_id=still_open.id), timeout=TIMEOUT
            )
            assert kept.session.state not in (pb.SESSION_STATE_ENDED, pb.SESSION_STATE_FAILED)

            async with EventCollector(stub) as everything:
                # Every event the open session has, read up to the old head.
                await wait_for(
                    lambda: everything.events and int(everything.events[-1].cursor) == head,
                    what="the stream up to the head",
                )
                assert everything.kinds(ended.id) == []
                assert everything.kinds(still_open.id) == before.kinds(still_open.id)

            # Following the pruned session alone: as for an id never seen.
            # (Read to its end: the initial metadata of a refused stream can
            # arrive before its status does.)
            async def follow_pruned() -> None:
                request = pb.StreamEventsRequest(session_id=ended.id, after_cursor="0")
                async for event in stub.StreamEvents(request, timeout=TIMEOUT):
                    raise AssertionError(f"an event of a pruned session: {event}")

            await expect_error(follow_pruned(), grpc.StatusCode.NOT_FOUND)

    async def test_a_start_retried_while_the_prune_removes_its_session_starts_afresh(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With the retention at its 2-day floor, a prune deletes a session
        and then, in a later transaction, its request record, both just past
        48 h (a replica whose clock is behind can also date an end before its
        start). A StartHitl retried in between finds the record without its
        session: it is answered as a new request, not INTERNAL."""
        service_env["HITL_RETENTION"] = "2d"
        clock = ShiftedClock(SystemClock())
        async with scripted_on_clock(service_env, clock) as (app, stub, _provider):
            user = await make_user(stub)
            request = pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="old")
            old = (await stub.StartHitl(request, timeout=TIMEOUT)).session
            await stub.StopHitl(pb.StopHitlRequest(session_id=old.id), timeout=TIMEOUT)

            store, prune_sessions = app.store, app.store._prune_sessions  # type: ignore[attr-defined]
            sessions_gone, gate = asyncio.Event(), asyncio.Event()

            async def held(before: datetime) -> int:
                removed: int = await prune_sessions(before)
                sessions_gone.set()
                await gate.wait()  # before the records' turn
                return removed

            monkeypatch.setattr(store, "_prune_sessions", held)
            clock.offset = 2 * 86400 + 3600  # past the retention, and the hourly prune
            prune = asyncio.ensure_future(app.core.maintenance.sweep())
            try:
                await asyncio.wait_for(sessions_gone.wait(), TIMEOUT)
                retried = (await stub.StartHitl(request, timeout=TIMEOUT)).session
            finally:
                gate.set()
                await prune
            assert retried.id != old.id
            assert retried.state != pb.SESSION_STATE_FAILED
            again = (await stub.StartHitl(request, timeout=TIMEOUT)).session
            assert again.id == retried.id  # the new record answers from now on


def _insert_sessions(service_env: dict[str, str], *sessions: tuple[str, str]) -> None:
    """Writes open sessions (id, state) straight into the service's SQLite
    file, each with a user of its own, as another release or a hand edit
    would."""
    db = sqlite3.connect(service_env["HITL_STORE_URL"].removeprefix("sqlite:///"))
    at = "2026-01-01T00:00:00.000000Z"
    try:
        with db:
            for session_id, state in sessions:
                user_id = f"usr_{session_id}"
                db.execute(
                    "INSERT INTO users (id, name, created_at, updated_at) VALUES (?, 'N', ?, ?)",
                    (user_id, at, at),
                )
                db.execute(
                    "INSERT INTO sessions (id, user_id, provider, state, created_at, updated_at) "
                    "VALUES (?, ?, 'scripted', ?, ?, ?)",
                    (session_id, user_id, state, at, at),
                )
    finally:
        db.close()
