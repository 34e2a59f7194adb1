"""Sends and stops through the outbox: retries, uncertain attempts, permanent
refusals, pending deliveries, per-session order — exactly one delivery."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import hitl_service.core as core_module
from hitl_service.clock import SystemClock
from hitl_service.codec import message_to_json
from hitl_service.core import outbox as outbox_module
from hitl_service.core.commands import SendUserMessage, StopHandoff
from hitl_service.domain import OutboxItem, OutboxKind, OutboxStatus
from hitl_service.errors import FailedPrecondition, StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.store.postgres_tx import PostgresTx
from providers.types import (
    Agent,
    AgentAssigned,
    AgentMessage,
    Author,
    Ended,
    EventKind,
    Failed,
    InboundEvent,
    Message,
    ProviderUser,
    SendResult,
    Transferred,
)
from tests.conftest import scripted_on_clock
from tests.scripted import Fault, ScriptedProvider
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

_PROTO = Path(__file__).resolve().parents[1] / "proto" / "hitl" / "v1" / "hitl_service.proto"

if TYPE_CHECKING:
    from hitl_service.app import App
    from hitl_service.gen.hitl.v1.hitl_service_pb2_grpc import HitlServiceAsyncStub as Stub
    from hitl_service.store.base import Tx


JANE = Agent("jane", "Jane")


async def open_session(stub: Stub) -> pb.Session:
    return await start_session(stub, (await make_user(stub)).id)


def send_request(session: pb.Session, text: str, request_id: str = "") -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        session_id=session.id, message=pb.Message(text=text), request_id=request_id or rid()
    )


async def stop_pending(stub: Stub, scripted: ScriptedProvider) -> tuple[pb.Session, asyncio.Event]:
    """An open session whose StopHitl answered STOP_PENDING; set the gate to
    let the provider close the chat."""
    session = await open_session(stub)
    gate = scripted.hold("stop")
    error = await expect_error(
        stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=1.0),
        grpc.StatusCode.UNAVAILABLE,
    )
    assert error.reason == "STOP_PENDING"
    return session, gate


async def held_send(
    stub: Stub, scripted: ScriptedProvider, session: pb.Session, text: str, *faults: Fault
) -> tuple[asyncio.Future[pb.SendMessageResponse], asyncio.Event]:
    """A SendMessage whose attempt is at the provider and held there (set the
    gate to let it go; ``faults`` then decide its outcome)."""
    gate = scripted.hold("send")
    scripted.fail("send", *faults)
    call = asyncio.ensure_future(stub.SendMessage(send_request(session, text), timeout=TIMEOUT))
    await wait_for(lambda: scripted.calls.sends, what="the held attempt")
    return call, gate


class TestRetries:
    async def test_transient_failures_are_retried_within_the_call(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("unavailable"), Fault("unavailable", retry_after=0.05))
        request = send_request(session, "hello")
        response = await scripted_stub.SendMessage(request, timeout=TIMEOUT)
        assert response.external_message_id == f"ev-{request.request_id}"
        attempts = [s for s in scripted.calls.sends if s[2] == request.request_id]
        assert len(attempts) == 3
        # Failures that surely did not reach the provider: no need to check first.
        assert [a[3] for a in attempts] == [False, False, False]
        assert list(scripted.calls.delivered) == [request.request_id]

    async def test_after_a_lost_response_the_retry_checks_and_sends_once(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("uncertain", after_effect=True))
        request = send_request(session, "exactly once")
        await scripted_stub.SendMessage(request, timeout=TIMEOUT)
        attempts = [s for s in scripted.calls.sends if s[2] == request.request_id]
        assert [a[3] for a in attempts] == [False, True]  # the retry was told to check
        assert list(scripted.calls.delivered) == [request.request_id]

    async def test_a_hung_provider_call_times_out_and_is_retried_as_uncertain(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("hang"))
        request = send_request(session, "slow")
        await scripted_stub.SendMessage(request, timeout=TIMEOUT)
        attempts = [s for s in scripted.calls.sends if s[2] == request.request_id]
        assert [a[3] for a in attempts] == [False, True]

    async def test_a_permanent_refusal_fails_without_retrying(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("rejected"))
        request = send_request(session, "no")
        error = await expect_error(
            scripted_stub.SendMessage(request, timeout=TIMEOUT),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error.reason == "SCRIPTED_REFUSAL"
        assert error.metadata["message_id"].startswith("msg_")
        assert len(scripted.calls.sends) == 1
        # The same request again gives the same answer, without another call.
        again = await expect_error(
            scripted_stub.SendMessage(request, timeout=TIMEOUT),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert again.metadata["message_id"] == error.metadata["message_id"]
        assert len(scripted.calls.sends) == 1

    async def test_refused_credentials_name_the_setting(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("auth"))
        error = await expect_error(
            scripted_stub.SendMessage(send_request(session, "x"), timeout=TIMEOUT),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error.reason == "PROVIDER_CREDENTIALS"
        assert error.metadata["setting"] == "HITL_SCRIPTED_TOKEN"
        assert "HITL_SCRIPTED_TOKEN" in error.message


class TestExpiry:
    @pytest.mark.parametrize(
        ("fault", "words"),
        [
            ("unavailable", "not delivered within 0 min"),
            ("uncertain", "outcome is unknown, so the agent may have it"),
        ],
    )
    async def test_a_send_past_its_time_is_given_up_saying_what_is_known(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
        fault: str,
        words: str,
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault(fault))
        gate = scripted.hold("send")
        call = scripted_stub.SendMessage(send_request(session, "late"), timeout=TIMEOUT)
        await wait_for(lambda: scripted.waiting.get("send"), what="the attempt at the provider")
        monkeypatch.setattr(outbox_module, "SEND_TTL", timedelta(0))  # any retry is too late
        gate.set()
        error = await expect_error(call, grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == "DELIVERY_EXPIRED"
        assert error.message.startswith("gave up on the message: ")
        assert words in error.message


class TestPending:
    async def test_unreachable_provider_gives_unavailable_and_delivers_later_once(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        gate = scripted.hold("send")
        request = send_request(session, "queued")
        error = await expect_error(
            scripted_stub.SendMessage(request, timeout=1.0), grpc.StatusCode.UNAVAILABLE
        )
        assert error.reason == "DELIVERY_PENDING"
        message_id = error.metadata["message_id"]
        gate.set()  # the provider comes back
        await wait_for(lambda: request.request_id in scripted.calls.delivered, what="delivery")
        # The caller retries with the same request id and learns the outcome.
        response = await scripted_stub.SendMessage(request, timeout=TIMEOUT)
        assert response.message_id == message_id
        assert list(scripted.calls.delivered) == [request.request_id]

    async def test_a_send_the_provider_may_still_carry_out_is_not_retried_sooner(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        # An uncertain failure's retry_after is how long the provider may
        # still act (LiveChat: HITL_LIVECHAT_SERVER_TIMEOUT), not a wish the
        # backoff may cap at 120 s: a retry before it could send twice.
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("uncertain", retry_after=300))
        request = send_request(session, "still at the provider")
        started = datetime.now(UTC)
        error = await expect_error(
            scripted_stub.SendMessage(request, timeout=1.0), grpc.StatusCode.UNAVAILABLE
        )
        assert error.reason == "DELIVERY_PENDING"

        async def retry_stored() -> OutboxItem | None:
            found = await scripted_app.store.get_outbox(error.metadata["message_id"])
            return found if found is not None and found.last_error else None

        stored = await wait_for(retry_stored, what="the retry stored")
        assert stored.status is OutboxStatus.PENDING
        assert stored.next_attempt_at >= started + timedelta(seconds=300)

    async def test_messages_of_one_session_are_delivered_in_order(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("send", Fault("unavailable"), Fault("unavailable"))
        requests = [send_request(session, f"m{i}") for i in range(5)]
        await asyncio.gather(*(scripted_stub.SendMessage(r, timeout=TIMEOUT) for r in requests))
        delivered = [m.body for m in scripted.calls.delivered.values()]
        # Arrival order of concurrent calls is not defined, but each message is
        # delivered once and no message overtakes one that is still queued.
        assert sorted(delivered) == [f"m{i}" for i in range(5)]  # type: ignore[type-var]
        assert len(scripted.calls.delivered) == 5

    async def test_sends_queued_behind_a_slow_one_keep_their_order(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        gate = scripted.hold("send")

        async def send(text: str) -> pb.SendMessageResponse:
            return await scripted_stub.SendMessage(send_request(session, text), timeout=TIMEOUT)

        first = asyncio.create_task(send("first"))
        await wait_for(lambda: scripted.calls.sends, what="the first attempt")
        later = [asyncio.create_task(send(f"later{i}")) for i in range(3)]

        async def all_queued() -> bool:
            pending, _ = await scripted_app.store.outbox_stats()
            return pending == 4

        await wait_for(all_queued, what="the later messages to queue behind the first")
        gate.set()
        await asyncio.gather(first, *later)
        bodies = [m.body for m in scripted.calls.delivered.values()]
        assert bodies[0] == "first"
        assert sorted(bodies[1:]) == ["later0", "later1", "later2"]  # type: ignore[type-var]

    async def test_a_settled_head_wakes_the_loop_for_the_sends_behind_it(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """Queued sends go out when their head settles, not at the next poll
        (an hour here: a missing wake-up would time the calls out)."""
        outbox = scripted_app.core.outbox
        outbox.poll_interval = 3600.0
        outbox.kick()
        session = await open_session(scripted_stub)
        gate = scripted.hold("send")
        requests = [send_request(session, f"m{i}") for i in range(4)]

        async def send(request: pb.SendMessageRequest) -> pb.SendMessageResponse:
            return await scripted_stub.SendMessage(request, timeout=TIMEOUT)

        first = asyncio.create_task(send(requests[0]))
        await wait_for(lambda: scripted.calls.sends, what="the first attempt")
        later = [asyncio.create_task(send(r)) for r in requests[1:]]

        async def all_queued() -> bool:
            pending, _ = await scripted_app.store.outbox_stats()
            return pending == 4

        await wait_for(all_queued, what="the later messages to queue behind the first")
        gate.set()
        answers = await asyncio.gather(first, *later)
        assert [a.external_message_id for a in answers] == [f"ev-{r.request_id}" for r in requests]
        assert len(scripted.calls.delivered) == 4

    async def test_requests_in_progress_are_counted_while_handled_only(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """``App.activity`` (which groups SQLite commits) counts unary RPCs
        and webhooks while they run, streams never, and forgets every one,
        whatever its outcome."""
        activity = scripted_app.activity
        session = await open_session(scripted_stub)
        async with EventCollector(scripted_stub, session_id=session.id):
            assert activity.current == 0  # an open stream is not a request in progress
            call, gate = await held_send(scripted_stub, scripted, session, "held")
            assert activity.current == 1
            gate.set()
            await call
        await expect_error(
            scripted_stub.GetSession(pb.GetSessionRequest(session_id="nope"), timeout=TIMEOUT),
            grpc.StatusCode.NOT_FOUND,
        )
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{scripted_app.http_port}") as http:
            assert (await http.post("/webhooks/scripted", content=b"{")).status_code == 400
        assert activity.current == 0


class TestLeases:
    async def test_an_attempt_that_lost_its_lease_leaves_the_new_holder_alone(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """A retry or failure outcome is written only while this replica still
        holds the item; one that another replica took over (the attempt
        outlived its lease) keeps that replica's lease."""
        store, outbox = scripted_app.store, scripted_app.core.outbox
        session = await open_session(scripted_stub)
        call, gate = await held_send(scripted_stub, scripted, session, "slow", Fault("unavailable"))
        async with store.transaction() as tx:  # another replica takes the item over
            [taken] = await tx.claim_outbox("other-replica", _far_future(), _far_future(), 10)
        gate.set()
        await wait_for(lambda: not outbox._inflight, what="the attempt to end")
        stored = await store.get_outbox(taken.id)
        assert stored is not None
        assert stored.lease_owner == "other-replica"
        assert stored.last_error == ""  # the lost attempt's outage is not recorded
        call.cancel()


class TestCancelledCallers:
    """A caller that goes away while its transaction commits (client cancel,
    deadline) must not leave the item it claimed unattempted: until its lease
    ran out, nothing would deliver it, nor what is queued behind it."""

    @pytest.fixture
    def service_env(self, service_env: dict[str, str]) -> dict[str, str]:
        service_env["HITL_PROVIDER_TIMEOUT"] = "30s"  # a lease (61 s) no wait below outlasts
        return service_env

    @staticmethod
    async def cancel_while_committing(
        app: App, monkeypatch: pytest.MonkeyPatch, call: Coroutine[Any, Any, Any]
    ) -> None:
        """Runs ``call`` until its transaction has committed, then cancels it
        there (as if the COMMIT were still under way)."""
        store, transaction = app.store, app.store.transaction
        parked = asyncio.Event()

        @asynccontextmanager
        async def committing(**options: bool) -> AsyncIterator[Tx]:
            async with transaction(**options) as tx:
                yield tx
            monkeypatch.setattr(store, "transaction", transaction)  # only this one
            parked.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(store, "transaction", committing)
        task = asyncio.create_task(call)
        await wait_for(parked.is_set, what="the commit")
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    async def test_a_send_cancelled_while_committing_is_delivered_at_once(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        session = await open_session(scripted_stub)
        command = SendUserMessage(session.id, Message(body="hello"), rid())
        call = scripted_app.core.send_message(command, TIMEOUT)
        await self.cancel_while_committing(scripted_app, monkeypatch, call)
        await wait_for(lambda: command.request_id in scripted.calls.delivered, what="delivery")
        attempts = [s[3] for s in scripted.calls.sends if s[2] == command.request_id]
        assert attempts == [False]  # one attempt, not uncertain: nothing was tried before
        answer = await scripted_stub.SendMessage(
            send_request(session, "hello", command.request_id), timeout=TIMEOUT
        )
        assert answer.external_message_id == f"ev-{command.request_id}"

    async def test_a_stop_cancelled_while_committing_still_closes_the_chat(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        session = await open_session(scripted_stub)
        call = scripted_app.core.stop_handoff(StopHandoff(session.id), TIMEOUT)
        await self.cancel_while_committing(scripted_app, monkeypatch, call)
        await wait_for(lambda: scripted.calls.stops, what="the stop")
        assert scripted.calls.stops == [session.external_chat_id]
        stopped = await scripted_stub.StopHitl(
            pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
        )
        assert stopped.session.state == pb.SESSION_STATE_ENDED


class TestBackgroundLoops:
    """An error nobody expected (a disk error the store did not translate)
    is logged; the loops go on."""

    async def test_the_outbox_loop_outlives_an_unexpected_error(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        store, outbox = scripted_app.store, scripted_app.core.outbox
        outbox.poll_interval = 0.05
        session = await open_session(scripted_stub)
        stats, calls = store.outbox_stats, []

        async def failing_once() -> tuple[int, datetime | None]:
            calls.append(1)
            if len(calls) == 1:
                raise sqlite3.OperationalError("database or disk is full")
            return await stats()

        monkeypatch.setattr(store, "outbox_stats", failing_once)
        outbox.kick()
        await wait_for(lambda: len(calls) >= 2, what="the loop to look again")
        # A transient failure: the retry is the background loop's.
        scripted.fail("send", Fault("unavailable"))
        request = send_request(session, "retried")
        answer = await scripted_stub.SendMessage(request, timeout=TIMEOUT)
        assert answer.external_message_id == f"ev-{request.request_id}"

    async def test_streams_follow_after_an_unexpected_error_in_the_hub(
        self, scripted_app: App, scripted_stub: Stub, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        store = scripted_app.store
        read, calls = store.read_events, []

        async def failing_once(**query: Any) -> Any:
            calls.append(1)
            if len(calls) == 1:
                raise sqlite3.OperationalError("disk I/O error")
            return await read(**query)

        async with EventCollector(scripted_stub, after="0") as events:
            monkeypatch.setattr(store, "read_events", failing_once)
            session = await open_session(scripted_stub)  # its events reach the hub
            await events.wait_for_kind("started", session.id)
        assert calls  # the failure did happen on the way


class TestUncommittedOutcomes:
    async def test_a_refusal_whose_record_failed_to_commit_is_not_reported(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The store still holds the item as pending (it is retried when its
        lease ends), so the caller must not be told it failed for good."""
        store, transaction = scripted_app.store, scripted_app.store.transaction
        session = await open_session(scripted_stub)
        call, gate = await held_send(
            scripted_stub, scripted, session, "refused, unrecorded", Fault("rejected")
        )

        @asynccontextmanager
        async def failing(**options: bool) -> AsyncIterator[Tx]:
            monkeypatch.setattr(store, "transaction", transaction)  # only this one
            async with transaction(**options) as tx:
                yield tx
                raise StoreUnavailable("SQLite could not commit: disk I/O error")

        monkeypatch.setattr(store, "transaction", failing)  # the settle's
        gate.set()
        error = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
        assert error.reason == "DELIVERY_PENDING"
        stored = await store.get_outbox(error.metadata["message_id"])
        assert stored is not None
        assert stored.status is OutboxStatus.PENDING


class TestWaiters:
    async def test_waiting_on_items_settled_elsewhere_leaves_nothing_behind(
        self, scripted_app: App, scripted_stub: Stub
    ) -> None:
        """An RPC waiting on an item another replica settles (read from the
        store) must not leave its wake-up event behind."""
        store, outbox = scripted_app.store, scripted_app.core.outbox
        outbox.poll_interval = 0.05
        session = await open_session(scripted_stub)
        async with store.transaction() as tx:
            item = await _item_held_elsewhere(tx, session.id)
        waiter = asyncio.create_task(outbox.wait(item, TIMEOUT))
        await wait_for(lambda: item.id in outbox._finished, what="the waiter")
        async with store.transaction() as tx:  # "another replica" settles it
            item.status, item.lease_owner, item.lease_until = OutboxStatus.DONE, "", None
            await tx.update_outbox(item)
        assert (await waiter).status is OutboxStatus.DONE
        assert item.id not in outbox._finished

    async def test_a_waiter_whose_caller_goes_away_leaves_nothing_behind(
        self, scripted_app: App, scripted_stub: Stub
    ) -> None:
        """An RPC cancelled (its caller gave up) while it waits on an item
        another replica holds must not leave its wake-up event behind: that
        replica settles the item, so nothing here would ever drop it (one
        entry per message whose caller went away, for the process's life)."""
        store, outbox = scripted_app.store, scripted_app.core.outbox
        session = await open_session(scripted_stub)
        async with store.transaction() as tx:
            item = await _item_held_elsewhere(tx, session.id)
        waiter = asyncio.create_task(outbox.wait(item, TIMEOUT))
        await wait_for(lambda: item.id in outbox._finished, what="the waiter")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert item.id not in outbox._finished


async def _item_held_elsewhere(tx: Tx, session_id: str) -> OutboxItem:
    """An item another replica holds (its lease lasts), in ``session_id``."""
    now = datetime.now(UTC)
    item = OutboxItem(
        id=f"msg_{rid()}",
        session_id=session_id,
        kind=OutboxKind.SEND,
        request_id=rid(),
        payload={"message": {"text": "x"}},
        status=OutboxStatus.PENDING,
        created_at=now,
        next_attempt_at=now,
        attempts=1,
        lease_owner="other-replica",
        lease_until=_far_future(),
    )
    await tx.insert_outbox(item)
    return item


class TestOneAttemptAtATime:
    async def test_an_attempt_outliving_its_lease_is_not_started_twice_here(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """The lease ran out while this replica's attempt still runs: the
        loop may claim the item again, but must not start a second attempt
        beside the first (both would pass the lease guard: same owner)."""
        store, outbox = scripted_app.store, scripted_app.core.outbox
        session = await open_session(scripted_stub)
        call, gate = await held_send(scripted_stub, scripted, session, "slow")
        [(item_id, running)] = outbox._inflight.items()
        async with store.transaction() as tx:  # its lease runs out
            item = await tx.get_outbox(item_id)
            assert item is not None
            item.lease_until = datetime.now(UTC) - timedelta(seconds=1)
            await tx.update_outbox(item)
        await outbox._claim_and_start()
        assert outbox._inflight.get(item_id) is running
        gate.set()
        answer = await call
        assert answer.message_id == item_id
        assert len(scripted.calls.sends) == 1


def _far_future() -> datetime:
    return datetime.now(UTC) + timedelta(days=1)


class TestStop:
    async def test_stop_retries_until_the_provider_confirms(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("stop", Fault("unavailable"), Fault("uncertain"))
        stopped = await scripted_stub.StopHitl(
            pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
        )
        assert stopped.session.state == pb.SESSION_STATE_ENDED
        assert scripted.calls.stops == [session.external_chat_id]

    async def test_stop_pending_then_done_in_the_background(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session, gate = await stop_pending(scripted_stub, scripted)
        # A message after the stop was asked for is refused.
        await expect_error(
            scripted_stub.SendMessage(send_request(session, "late"), timeout=TIMEOUT),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        gate.set()

        async def ended() -> bool:
            got = await scripted_stub.GetSession(
                pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
            )
            return got.session.state == pb.SESSION_STATE_ENDED

        await wait_for(ended, what="the background stop")
        assert scripted.calls.stops == [session.external_chat_id]

    async def test_the_agent_is_not_heard_once_the_stop_is_recorded(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """STOP_PENDING: the chat is still open at the provider and its agent
        types on; nothing they write after the stop reaches the streams."""
        session, gate = await stop_pending(scripted_stub, scripted)
        head = await scripted_app.store.head()
        late = AgentMessage(Message("are you there?", Author.AGENT), JANE)
        await scripted.push(session.external_chat_id, late, "late")
        assert await scripted_app.store.read_events(after=head, limit=10) == []
        gate.set()
        async with EventCollector(scripted_stub, session_id=session.id, after="0") as events:
            await events.wait_for_kind("ended")
        assert "agent_message" not in [e.WhichOneof("kind") for e in events.events]

    async def test_what_the_agent_wrote_while_a_refused_stop_was_pending_comes_back(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """The stop is refused for good, so the handoff goes on: a message
        passed over while it was pending is the handoff's after all, and
        catch-up brings it (its dedupe key was left free)."""
        session, gate = await stop_pending(scripted_stub, scripted)
        chat = session.external_chat_id
        written = datetime.now(UTC)
        pending = InboundEvent(chat, AgentMessage(Message("one moment", Author.AGENT), JANE), "m1")
        await scripted.push(chat, pending.kind, pending.dedupe_key)  # passed over
        scripted.fail("stop", Fault("rejected"))
        gate.set()

        async def refused() -> bool:
            current = await scripted_app.store.get_session(session.id)
            return current is not None and current.stop_requested_at is None

        await wait_for(refused, what="the stop refused for good")
        scripted.catch_up_events[chat] = [replace(pending, occurred_at=written)]
        await scripted_app.core.maintenance.sweep(force_catch_up=True)
        events = await scripted_app.store.read_events(after=0, limit=50, session_id=session.id)
        texts = [e.kind.message.body for e in events if isinstance(e.kind, AgentMessage)]
        assert texts == ["one moment"]

    async def test_stop_of_a_chat_already_closed_at_the_provider_is_a_success(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("stop", Fault("inactive"))
        stopped = await scripted_stub.StopHitl(
            pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
        )
        assert stopped.session.state == pb.SESSION_STATE_ENDED

    async def test_a_refused_stop_reports_the_refusal_and_leaves_the_session_open(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        session = await open_session(scripted_stub)
        scripted.fail("stop", Fault("rejected"))
        error = await expect_error(
            scripted_stub.StopHitl(pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error.reason == "SCRIPTED_REFUSAL"
        got = await scripted_stub.GetSession(
            pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
        )
        assert got.session.state != pb.SESSION_STATE_ENDED
        # A second stop tries again (and now succeeds).
        stopped = await scripted_stub.StopHitl(
            pb.StopHitlRequest(session_id=session.id), timeout=TIMEOUT
        )
        assert stopped.session.state == pb.SESSION_STATE_ENDED

    async def test_a_stop_refused_once_its_wait_is_over_reports_the_refusal(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The provider refuses the stop for good after StopHitl's wait last
        read it pending, before the session is read (an attempt of another
        replica, in production): the caller is told the refusal. It was told
        STOP_PENDING, retried in the background, while nothing retried it and
        the session stayed open."""
        session = await open_session(scripted_stub)
        gate = scripted.hold("stop")
        outbox = scripted_app.core.outbox
        real = outbox.wait

        async def refused_after_the_wait(item: OutboxItem, timeout: float) -> OutboxItem:
            seen = await real(item, timeout)
            assert seen.status is OutboxStatus.PENDING
            scripted.fail("stop", Fault("rejected"))
            gate.set()

            async def refused() -> bool:
                stored = await scripted_app.store.get_outbox(item.id)
                return stored is not None and stored.status is OutboxStatus.FAILED

            await wait_for(refused, what="the refusal")
            return seen

        monkeypatch.setattr(outbox, "wait", refused_after_the_wait)
        with pytest.raises(FailedPrecondition) as raised:  # not STOP_PENDING
            await scripted_app.core.stop_handoff(StopHandoff(session.id), budget=0.2)
        assert raised.value.reason == "SCRIPTED_REFUSAL"


async def _start_held_at_the_provider(
    stub: Stub, scripted: ScriptedProvider
) -> tuple[asyncio.Event, pb.StartHitlRequest, Any]:
    """A new user's StartHitl (its request and call) that has reached the
    provider, which holds it until the returned gate is set."""
    user = await make_user(stub)
    gate = scripted.hold("start")
    request = pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="t")
    call = stub.StartHitl(request, timeout=TIMEOUT)
    await wait_for(lambda: scripted.waiting.get("start") == 1, what="the held start")
    return gate, request, call


class TestCancelledStart:
    async def test_a_start_whose_caller_went_away_finishes_for_the_retry(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """The provider may have opened the chat: the start runs to its end,
        and the caller's retry with the same request id gets the session."""
        gate, request, call = await _start_held_at_the_provider(scripted_stub, scripted)
        call.cancel()  # the caller goes away mid-start
        with pytest.raises(asyncio.CancelledError):
            await call
        gate.set()
        await wait_for(lambda: scripted.waiting.get("start") == 0, what="the start to go on")
        retried = await scripted_stub.StartHitl(request, timeout=TIMEOUT)
        assert retried.session.external_chat_id  # started, not stuck STARTING
        assert len(scripted.calls.starts) == 1

    async def test_a_start_still_running_when_the_drain_ends_is_cut_before_the_provider_closes(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Shutdown gives starts up to the grace period, then closes the
        provider and the store. A start still at the provider then ran on
        under them: its HTTP calls failed on the closed clients
        (``livechat.connection_lost`` warnings at every such shutdown, a
        retry on a closed client failing as our bug) until the event loop
        ended. It is cut off at the end of the grace period, as the
        operations guide says."""
        _, _, call = await _start_held_at_the_provider(scripted_stub, scripted)  # never let go
        starts_at_close: list[int] = []

        async def close() -> None:
            starts_at_close.append(scripted.waiting.get("start", 0))

        monkeypatch.setattr(scripted, "close", close)
        await scripted_app.stop(grace=0.2)
        assert starts_at_close == [0]
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE

    async def test_a_start_cut_off_by_the_shutdown_is_failed_so_its_retry_starts_at_once(
        self,
        service_env: dict[str, str],
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
    ) -> None:
        """A start the shutdown cut off stayed STARTING until some replica's
        upkeep failed it, twice HITL_REQUEST_BUDGET + HITL_PROVIDER_TIMEOUT
        after it began (a minute by default): through a rolling restart, the
        caller's retry with the same request_id was answered
        START_IN_PROGRESS all that time (the Python client gives up long
        before). The stopping process fails it itself (START_INTERRUPTED,
        as the upkeep would), so the retry on the next replica starts afresh."""
        _, request, call = await _start_held_at_the_provider(scripted_stub, scripted)
        await scripted_app.stop(grace=0.2)
        with pytest.raises(grpc.aio.AioRpcError):
            await call
        async with scripted_on_clock(service_env, SystemClock()) as (_, stub, _scripted):
            retried = await stub.StartHitl(request, timeout=TIMEOUT)
            assert retried.session.external_chat_id
            failed = [
                s
                for s in (
                    await stub.ListSessions(
                        pb.ListSessionsRequest(user_id=request.user_id), timeout=TIMEOUT
                    )
                ).sessions
                if s.state == pb.SESSION_STATE_FAILED
            ]
            assert len(failed) == 1
            assert failed[0].id != retried.session.id
            async with EventCollector(stub, session_id=failed[0].id) as events:
                event = await events.wait_for_kind("failed")
            assert event.failed.code == "START_INTERRUPTED"

    async def test_a_store_that_hangs_while_cut_off_starts_are_failed_holds_the_shutdown_briefly(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """Failing the starts a shutdown cut off is bounded (5 s; shortened
        here): a store that does not answer leaves them to the next
        replica's upkeep, and the shutdown goes on to close it."""
        await _start_held_at_the_provider(scripted_stub, scripted)
        hung = asyncio.Event()

        async def hang(session_id: str) -> None:
            hung.set()
            await asyncio.Event().wait()

        monkeypatch.setattr(scripted_app.core.maintenance, "fail_interrupted_start", hang)
        monkeypatch.setattr(core_module, "FAIL_CUT_STARTS_SECONDS", 0.2)
        await asyncio.wait_for(scripted_app.stop(grace=0.2), TIMEOUT)
        assert hung.is_set()

    async def test_a_start_under_way_reads_as_requested_without_a_chat(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        """A caller that lists or gets a session while its StartHitl waits for
        the provider sees REQUESTED with no chat, and its sends and stops are
        SESSION_STARTING. The proto said REQUESTED meant the provider had
        accepted the handoff; it says this now."""
        gate, request, call = await _start_held_at_the_provider(scripted_stub, scripted)
        listed = await scripted_stub.ListSessions(
            pb.ListSessionsRequest(user_id=request.user_id), timeout=TIMEOUT
        )
        (starting,) = listed.sessions
        assert starting.state == pb.SESSION_STATE_REQUESTED
        assert starting.external_chat_id == ""
        send = pb.SendMessageRequest(
            session_id=starting.id, message=pb.Message(text="hi"), request_id=rid()
        )
        error = await expect_error(
            scripted_stub.SendMessage(send, timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error.reason == "SESSION_STARTING"
        stop = pb.StopHitlRequest(session_id=starting.id)
        error = await expect_error(
            scripted_stub.StopHitl(stop, timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error.reason == "SESSION_STARTING"
        gate.set()
        assert (await call).session.external_chat_id
        before = _PROTO.read_text().split("SESSION_STATE_REQUESTED = ")[0].splitlines()
        documented = " ".join(line.strip().removeprefix("//").strip() for line in before[-5:])
        assert "empty external_chat_id" in documented
        assert "SESSION_STARTING" in documented


async def test_a_timeout_the_upkeep_stops_while_the_outbox_drains_is_not_left_running(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The shutdown drains the outbox (attempts in flight get the grace
    period, then are cut off) before the provider and the store close. The
    upkeep ran on through that drain: a session timing out meanwhile got a
    stop attempt the drain had not listed, neither waited for nor cut off,
    which ran on with the provider and the store closed under it (its item
    leased to a process gone, the chat left open until the lease ran out)."""
    service_env["HITL_IDLE_TIMEOUT"] = "600s"
    service_env["HITL_RECONCILE_INTERVAL"] = "1"  # an upkeep sweep every second
    clock = ShiftedClock(SystemClock())
    async with scripted_on_clock(service_env, clock) as (app, stub, scripted):
        busy = await open_session(stub)
        await open_session(stub)  # another, silent from here on
        send, send_gate = await held_send(stub, scripted, busy, "in flight")
        send.cancel()  # the attempt runs on, held: the drain waits for it
        scripted.hold("stop")  # never let go
        calls_at_close: list[dict[str, int]] = []

        async def close() -> None:
            calls_at_close.append(dict(scripted.waiting))

        monkeypatch.setattr(scripted, "close", close)
        upkeep = next(t for t in app.core._tasks if t.get_name() == "core-maintenance")
        stopping = asyncio.create_task(app.stop(grace=TIMEOUT))
        await wait_for(lambda: app.core.outbox._stopping, what="the outbox drain")
        clock.offset = 700  # both sessions are past HITL_IDLE_TIMEOUT now
        await wait_for(
            lambda: scripted.waiting.get("stop") == 1 or upkeep.done(),
            what="a timeout's stop at the provider, or the upkeep stopped",
        )
        send_gate.set()  # the drain's attempt ends: the drain is over
        await stopping
        assert [sum(held.values()) for held in calls_at_close] == [0]  # none still at it


async def test_what_an_attempt_cut_off_by_the_shutdown_changed_at_the_provider_is_kept(
    service_env: dict[str, str],
    scripted_app: App,
    scripted_stub: Stub,
    scripted: ScriptedProvider,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A provider updates its user's state during a call (a token renewed,
    the old refresh token spent); the outbox keeps it whatever the call's
    outcome. An attempt still at the provider when the grace period ends is
    cut off (cancelled): what the call changed was dropped then, and the
    delivery after the restart used the spent credentials."""
    session = await open_session(scripted_stub)
    renewed = asyncio.Event()

    async def send(chat: Any, user: ProviderUser, *args: Any, **kwargs: Any) -> SendResult:
        user.state["token"] = "renewed"
        renewed.set()
        await asyncio.Event().wait()  # slow: still at it when the grace period ends
        raise AssertionError("unreachable")

    monkeypatch.setattr(scripted, "send", send)
    call = scripted_stub.SendMessage(send_request(session, "hi"), timeout=TIMEOUT)
    await wait_for(renewed.is_set, what="the renewal")
    call.cancel()
    await scripted_app.stop(grace=0.2)
    async with scripted_on_clock(service_env, SystemClock()) as (app, _stub, _scripted):
        kept = await app.store.get_provider_user(session.user_id, "scripted")
    assert kept is not None
    assert kept.state.get("token") == "renewed"


@pytest.mark.postgres
async def test_a_retried_start_whose_start_was_given_up_meanwhile_starts_afresh(
    service_env: dict[str, str], postgres_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upkeep (another replica's, in production) fails a start cut off
    and forgets its request id while the caller's retry is between reading
    the request id and reading the session: the retry starts afresh. It
    answered START_FAILED, read committed letting the second read see what
    the first did not (seen in the chaos test on two replicas)."""
    service_env.update(HITL_STORE_URL=postgres_dsn, HITL_STORE_POOL_MIN="1")
    async with scripted_on_clock(service_env, SystemClock()) as (app, stub, scripted):
        gate, request, call = await _start_held_at_the_provider(stub, scripted)
        listed = pb.ListSessionsRequest(user_id=request.user_id)
        (cut,) = (await stub.ListSessions(listed, timeout=TIMEOUT)).sessions
        real = PostgresTx.get_idempotency
        given_up = asyncio.Event()

        async def read_then_give_up(tx: PostgresTx, scope: str, key: str) -> Any:
            record = await real(tx, scope, key)
            if key == request.request_id and not given_up.is_set():
                given_up.set()
                await app.core.maintenance.fail_interrupted_start(cut.id)
            return record

        monkeypatch.setattr(PostgresTx, "get_idempotency", read_then_give_up)
        retry = asyncio.ensure_future(stub.StartHitl(request, timeout=TIMEOUT))
        await wait_for(
            lambda: retry.done() or scripted.waiting.get("start") == 2, what="the retry's answer"
        )
        assert given_up.is_set()
        gate.set()
        started = (await retry).session  # not START_FAILED
        assert started.id != cut.id
        assert started.state == pb.SESSION_STATE_QUEUED
        error = await expect_error(call, grpc.StatusCode.UNAVAILABLE)
        assert error.reason == "START_INTERRUPTED"


class TestStartFailures:
    async def test_refused_start_fails_the_session_with_an_event(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        scripted.fail("start", Fault("rejected"))
        request_id = rid()
        error = await expect_error(
            start_session(scripted_stub, user.id, request_id=request_id),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert error.reason == "SCRIPTED_REFUSAL"
        listed = await scripted_stub.ListSessions(
            pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT
        )
        (failed,) = listed.sessions
        assert failed.state == pb.SESSION_STATE_FAILED
        # The same request again gets the same refusal, and the user may start anew.
        again = await expect_error(
            start_session(scripted_stub, user.id, request_id=request_id),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        assert again.reason == "START_FAILED"
        assert (await start_session(scripted_stub, user.id)).state == pb.SESSION_STATE_QUEUED

    async def test_unreachable_provider_gives_unavailable_and_the_retry_starts(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        scripted.fail("start", *[Fault("unavailable", retry_after=0.3)] * 10)
        request_id = rid()
        error = await expect_error(
            scripted_stub.StartHitl(
                pb.StartHitlRequest(user_id=user.id, request_id=request_id), timeout=1.0
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error.reason == "PROVIDER_UNAVAILABLE"
        scripted.faults["start"].clear()
        session = await start_session(scripted_stub, user.id, request_id=request_id)
        assert session.state == pb.SESSION_STATE_QUEUED

    async def test_credentials_refused_at_start_name_the_setting(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        scripted.fail("upsert_user", Fault("auth"))
        error = await expect_error(
            start_session(scripted_stub, user.id), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert error.metadata["setting"] == "HITL_SCRIPTED_TOKEN"

    async def test_returning_user_reuses_their_identity_and_chat(
        self, scripted_stub: Stub, scripted: ScriptedProvider
    ) -> None:
        user = await make_user(scripted_stub)
        first = await start_session(scripted_stub, user.id)
        await scripted_stub.StopHitl(pb.StopHitlRequest(session_id=first.id), timeout=TIMEOUT)
        second = await start_session(scripted_stub, user.id)
        assert second.external_chat_id == first.external_chat_id
        assert scripted.calls.starts[1].previous_chat is not None
        assert scripted.calls.starts[1].previous_chat.external_chat_id == first.external_chat_id


class TestLease:
    def test_a_claim_outlasts_the_time_the_provider_may_still_act(
        self, scripted_app: App, scripted: ScriptedProvider
    ) -> None:
        from dataclasses import replace

        ctx = scripted_app.core.ctx
        timeout = ctx.settings.provider_timeout
        assert ctx.lease.total_seconds() == timeout * 2 + 1
        scripted.capabilities = replace(scripted.capabilities, settle_seconds=30.0)
        # The provider's last request may go out as late as the attempt's end.
        assert ctx.lease.total_seconds() == timeout + 31.0


class TestOverload:
    async def test_a_hung_provider_holds_no_more_attempts_than_the_concurrency(
        self, service_env: dict[str, str]
    ) -> None:
        """Sends to many sessions at once, the provider hung: each caller gets
        DELIVERY_PENDING by its deadline, but only ``concurrency`` attempts
        (tasks, provider connections) wait at the provider; the rest wait in
        the store. Once it recovers, every message goes out, once."""
        service_env["HITL_PROVIDER_TIMEOUT"] = "60s"  # held until the gate opens
        async with scripted_on_clock(service_env, SystemClock()) as (app, stub, scripted):
            outbox = app.core.outbox
            outbox.concurrency = 2
            sessions = [await open_session(stub) for _ in range(5)]
            gate = scripted.hold("send")
            requests = [send_request(session, f"m{i}") for i, session in enumerate(sessions)]
            errors = await asyncio.gather(  # all at once, each with a 1 s deadline
                *(
                    expect_error(stub.SendMessage(r, timeout=1.0), grpc.StatusCode.UNAVAILABLE)
                    for r in requests
                )
            )
            assert {e.reason for e in errors} == {"DELIVERY_PENDING"}
            assert scripted.waiting["send"] == 2
            assert len(outbox._inflight) == 2
            pending, _ = await app.store.outbox_stats()
            assert pending == 5  # accepted: the other three are in the store

            gate.set()
            answers = await asyncio.gather(
                *(stub.SendMessage(r, timeout=TIMEOUT) for r in requests)  # retries: the outcome
            )
            assert [a.external_message_id for a in answers] == [
                f"ev-{r.request_id}" for r in requests
            ]
            assert sorted(scripted.calls.delivered) == sorted(r.request_id for r in requests)

    async def test_calls_beyond_the_in_flight_limit_are_refused_before_anything_is_stored(
        self, service_env: dict[str, str]
    ) -> None:
        """Callers of a hung provider each hold a call until their deadline:
        beyond HITL_RPC_MAX_IN_FLIGHT, a call is refused at once (nothing
        stored, so nothing acknowledged is lost) instead of adding to memory.
        Health stays answerable."""
        service_env["HITL_RPC_MAX_IN_FLIGHT"] = "2"
        service_env["HITL_PROVIDER_TIMEOUT"] = "60s"  # held until the gate opens
        async with scripted_on_clock(service_env, SystemClock()) as (app, stub, scripted):
            first, second, third = [await open_session(stub) for _ in range(3)]
            gate = scripted.hold("send")
            held = [
                stub.SendMessage(send_request(s, "held"), timeout=TIMEOUT) for s in (first, second)
            ]
            await wait_for(lambda: scripted.waiting.get("send") == 2, what="two held sends")
            refused = send_request(third, "refused")
            error = await expect_error(
                stub.SendMessage(refused, timeout=TIMEOUT), grpc.StatusCode.UNAVAILABLE
            )
            assert error.reason == "TOO_MANY_REQUESTS"
            assert "HITL_RPC_MAX_IN_FLIGHT" in error.message
            assert (await app.store.outbox_stats())[0] == 2  # the refused one was not stored
            async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
                health: Any = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
                assert answer.status == health_pb2.HealthCheckResponse.SERVING
            gate.set()
            await asyncio.gather(*held)
            again = await stub.SendMessage(refused, timeout=TIMEOUT)  # room again
            assert again.external_message_id == f"ev-{refused.request_id}"

    async def test_a_backlog_claimed_past_its_time_is_given_up_not_sent(
        self, service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Messages that waited in the store beyond the attempts' concurrency
        until after their 15 minutes are failed like a late retry, not
        delivered to an agent long after the user gave up."""
        service_env["HITL_PROVIDER_TIMEOUT"] = "60s"  # held until the gate opens
        async with scripted_on_clock(service_env, SystemClock()) as (app, stub, scripted):
            app.core.outbox.concurrency = 1
            sessions = [await open_session(stub) for _ in range(3)]
            gate = scripted.hold("send")
            requests = [send_request(session, f"m{i}") for i, session in enumerate(sessions)]
            for r in requests:
                await expect_error(stub.SendMessage(r, timeout=0.5), grpc.StatusCode.UNAVAILABLE)
            assert scripted.waiting["send"] == 1  # the other two wait in the store
            monkeypatch.setattr(outbox_module, "SEND_TTL", timedelta(0))  # now all are late
            monkeypatch.setattr(outbox_module, "LATE_CLAIM", timedelta(0))  # and long due
            gate.set()
            first = await stub.SendMessage(requests[0], timeout=TIMEOUT)
            assert first.external_message_id == f"ev-{requests[0].request_id}"
            for r in requests[1:]:
                error = await expect_error(
                    stub.SendMessage(r, timeout=TIMEOUT), grpc.StatusCode.FAILED_PRECONDITION
                )
                assert error.reason == "DELIVERY_EXPIRED"
                assert "not delivered within 0 min; last error: not attempted in time" in (
                    error.message
                )
            assert list(scripted.calls.delivered) == [requests[0].request_id]

    @pytest.mark.parametrize("case", ["uncertain", "due just now"])
    async def test_a_late_item_still_goes_out_when_it_may_be_delivered_or_just_came_due(
        self, scripted_app: App, scripted_stub: Stub, scripted: ScriptedProvider, case: str
    ) -> None:
        """Past its time, but not given up unasked: an item whose last attempt's
        outcome is unknown (the process died mid-send and stayed down) asks
        the provider, which confirms the delivery, rather than end as "the
        agent may have it"; a retry that came due just before the item's
        time goes out, though its claim comes a moment after it."""
        session = await open_session(scripted_stub)
        now = datetime.now(UTC)
        long_ago = now - outbox_module.SEND_TTL - timedelta(minutes=5)
        uncertain = case == "uncertain"
        item = OutboxItem(
            id=f"msg_{rid()}",
            session_id=session.id,
            kind=OutboxKind.SEND,
            request_id=rid(),
            payload={"message": message_to_json(Message(body="late"))},
            status=OutboxStatus.PENDING,
            created_at=long_ago,
            next_attempt_at=long_ago if uncertain else now,
            attempts=1,
            attempts_settled=0 if uncertain else 1,  # claimed, never settled: uncertain
        )
        if uncertain:
            scripted.calls.delivered[item.request_id] = Message(body="late")
        async with scripted_app.store.transaction() as tx:
            await tx.insert_outbox(item)
        scripted_app.core.outbox.kick()

        async def settled() -> OutboxItem | None:
            found = await scripted_app.store.get_outbox(item.id)
            return found if found and found.status is not OutboxStatus.PENDING else None

        done = await wait_for(settled, what="the item settled")
        assert (done.status, done.error_code) == (OutboxStatus.DONE, ""), done.last_error
        assert [s[3] for s in scripted.calls.sends if s[2] == item.request_id] == [uncertain]
        assert list(scripted.calls.delivered) == [item.request_id]

    async def test_a_send_or_stop_whose_commit_fails_gives_its_slot_back(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """A writer reserves an attempt slot before its COMMIT; one that
        fails must give it back, or each store hiccup would cost a slot for
        good and, at the last, every send would wait for the background loop."""
        outbox = scripted_app.core.outbox
        outbox.concurrency = 1
        store, transaction = scripted_app.store, scripted_app.store.transaction
        session = await open_session(scripted_stub)

        @asynccontextmanager
        async def failing(**options: bool) -> AsyncIterator[Tx]:
            monkeypatch.setattr(store, "transaction", transaction)  # only this one
            async with transaction(**options) as tx:
                yield tx
                raise StoreUnavailable("SQLite could not commit: disk I/O error")

        monkeypatch.setattr(store, "transaction", failing)
        error = await expect_error(
            scripted_stub.SendMessage(send_request(session, "lost"), timeout=TIMEOUT),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error.reason == "STORE_UNAVAILABLE"
        monkeypatch.setattr(store, "transaction", failing)
        stop = pb.StopHitlRequest(session_id=session.id)
        error = await expect_error(
            scripted_stub.StopHitl(stop, timeout=TIMEOUT), grpc.StatusCode.UNAVAILABLE
        )
        assert error.reason == "STORE_UNAVAILABLE"
        scripted.hold("send")  # the slot is free: a send is attempted at once, inline
        outbox.poll_interval = 3600.0  # (not by the loop)
        outbox.kick()
        call = asyncio.ensure_future(
            scripted_stub.SendMessage(send_request(session, "kept"), timeout=TIMEOUT)
        )
        await wait_for(lambda: scripted.waiting.get("send"), what="the inline attempt")
        assert len(outbox._inflight) == 1
        scripted.gates["send"].set()
        await call

    async def test_a_send_during_the_loops_claim_does_not_exceed_the_concurrency(
        self,
        scripted_app: App,
        scripted_stub: Stub,
        scripted: ScriptedProvider,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """The loop counts its free slots, then claims that many items in a
        transaction: a writer that reserves a slot while that COMMIT is under
        way must not get one of them, or both attempts go to the provider."""
        outbox = scripted_app.core.outbox
        outbox.concurrency = 1
        store, transaction = scripted_app.store, scripted_app.store.transaction
        first, queued, late = [await open_session(scripted_stub) for _ in range(3)]
        held = scripted.hold("send")
        calls = [
            asyncio.ensure_future(
                scripted_stub.SendMessage(send_request(first, "inline"), timeout=TIMEOUT)
            )
        ]
        await wait_for(lambda: scripted.waiting.get("send"), what="the inline attempt")
        calls.append(
            asyncio.ensure_future(
                scripted_stub.SendMessage(send_request(queued, "queued"), timeout=TIMEOUT)
            )
        )

        async def stored() -> bool:
            return (await store.outbox_stats())[0] == 2

        await wait_for(stored, what="the second message in the store")
        paused, resume, resumed = asyncio.Event(), asyncio.Event(), asyncio.Event()

        @asynccontextmanager
        async def pausing(**options: bool) -> AsyncIterator[Tx]:
            async with transaction(**options) as tx:
                claim, claimed = tx.claim_outbox, False

                async def noted(*args: Any, **kwargs: Any) -> list[OutboxItem]:
                    nonlocal claimed
                    claimed = True
                    return await claim(*args, **kwargs)

                tx.claim_outbox = noted  # type: ignore[method-assign]
                yield tx
            if claimed:  # the loop's claim has committed; its attempts start next
                monkeypatch.setattr(store, "transaction", transaction)
                paused.set()
                await resume.wait()
                resumed.set()  # seen once the loop has started the attempts it claimed

        monkeypatch.setattr(store, "transaction", pausing)
        later = scripted.hold("send")  # the attempts after the first wait here
        held.set()  # the first attempt ends: the loop claims the queued message
        await asyncio.wait_for(paused.wait(), TIMEOUT)
        calls.append(
            asyncio.ensure_future(
                scripted_stub.SendMessage(send_request(late, "late"), timeout=TIMEOUT)
            )
        )
        await wait_for(stored, what="the late message in the store")
        resume.set()
        await asyncio.wait_for(resumed.wait(), TIMEOUT)
        assert len(outbox._inflight) == 1  # the queued message's; the late one waits its turn
        later.set()
        await asyncio.gather(*calls)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("kind", "field", "kept"),
    [
        (Transferred(to_group_id="tier\x002"), "group_id", "tier\ufffd2"),
        (Ended(reason="bye\x00"), "end_reason", "bye\ufffd"),
        (Failed(code="ROUTING_FAILED", detail="no\x00route"), "end_reason", "no\ufffdroute"),
    ],
)
async def test_a_nul_in_what_the_session_keeps_of_an_event_is_stored_not_refused(
    service_env: dict[str, str], postgres_dsn: str, kind: EventKind, field: str, kept: str
) -> None:
    """A provider's group or reason with a NUL went into the session's text
    columns, which PostgreSQL refuses: the batch failed on every retry of
    its webhook, and every event beside it with it. The NUL is replaced, as
    in ids."""
    service_env.update(HITL_STORE_URL=postgres_dsn)
    async with scripted_on_clock(service_env, SystemClock()) as (_app, stub, scripted):
        session = await start_session(stub, (await make_user(stub)).id)
        chat = session.external_chat_id
        await scripted.push(chat, AgentAssigned(Agent("ag1", "Al")), "k0")
        assert await scripted.push(chat, kind, "k1") == 1
        got = await stub.GetSession(pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT)
    assert getattr(got.session, field) == kept
