"""The host's wall clock steps (NTP stepping a clock that was minutes off, a
VM resumed from a snapshot, an operator setting the date) while the service
runs: times it stored before the step must not hold work up, or end
handoffs, for as long as the step. Monotonic time goes on as before."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from structlog.testing import capture_logs

from hitl_service.clock import SystemClock, WallSteps
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from providers.types import Agent, AgentAssigned
from tests.conftest import scripted_on_clock
from tests.scripted import Fault
from tests.support import (
    TIMEOUT,
    SteppedClock,
    expect_error,
    make_user,
    rid,
    start_session,
    wait_for,
)

HOUR = 3600.0


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store_env(request: pytest.FixtureRequest, service_env: dict[str, str]) -> dict[str, str]:
    """``service_env`` on a fresh SQLite file or PostgreSQL database."""
    if request.param == "postgres":
        dsn: str = request.getfixturevalue("postgres_dsn")
        service_env.update(HITL_STORE_URL=dsn, HITL_STORE_POOL_MIN="1")
    return service_env


def _send(session: pb.Session, text: str) -> pb.SendMessageRequest:
    return pb.SendMessageRequest(
        session_id=session.id, message=pb.Message(text=text), request_id=rid()
    )


def test_a_step_is_told_from_slewing() -> None:
    clock = SteppedClock()
    steps = WallSteps(clock)
    assert steps.look() == 0.0  # nothing to compare with yet
    clock.step(-0.5)  # NTP slews this much in over 15 minutes
    assert steps.look() == 0.0
    clock.step(-HOUR)
    assert round(steps.look()) == -HOUR
    assert steps.look() == 0.0  # told once


class TestOutbox:
    @pytest.mark.parametrize("ahead", [HOUR, 10 * 60.0])
    async def test_a_retry_due_before_the_clock_went_back_is_not_held_up(
        self, store_env: dict[str, str], ahead: float
    ) -> None:
        """A send the provider asked to retry in 3 s, while the clock was
        ``ahead``: the clock set right must not make it wait that long.
        (On PostgreSQL, the database's clock was right all along.)"""
        clock = SteppedClock()
        clock.step(ahead)
        async with scripted_on_clock(store_env, clock) as (_app, stub, scripted):
            session = await start_session(stub, (await make_user(stub)).id)
            scripted.fail("send", Fault("unavailable", retry_after=3.0))
            request = _send(session, "due in 3 s")
            error = await expect_error(
                stub.SendMessage(request, timeout=1.0), grpc.StatusCode.UNAVAILABLE
            )
            assert error.reason == "DELIVERY_PENDING"
            with capture_logs() as logs:
                clock.step(-ahead)
                await wait_for(
                    lambda: request.request_id in scripted.calls.delivered, what="the retry"
                )
            warnings = [e for e in logs if e["event"] == "outbox.clock_stepped_back"]
            assert [(e["log_level"], e["leases"], e["due"]) for e in warnings] == [
                ("warning", 0, 1)
            ]
            answer = await stub.SendMessage(request, timeout=5.0)  # the retry's outcome
            assert answer.external_message_id == f"ev-{request.request_id}"

    async def test_an_attempt_cut_off_before_the_clock_went_back_is_retried_after_a_restart(
        self, store_env: dict[str, str]
    ) -> None:
        """The process stopped mid-attempt (its lease stays), the clock went
        back an hour, the service started again: the attempt's lease, an
        hour and a lease ahead now, must not hold the message for an hour."""
        clock = SteppedClock()
        clock.step(HOUR)
        async with scripted_on_clock(store_env, clock) as (_app, stub, scripted):
            session = await start_session(stub, (await make_user(stub)).id)
            scripted.hold("send")  # no answer before the stop
            request = _send(session, "in flight")
            await expect_error(stub.SendMessage(request, timeout=0.5), grpc.StatusCode.UNAVAILABLE)
        clock.step(-HOUR)
        with capture_logs() as logs:
            async with scripted_on_clock(store_env, clock) as (_app, _stub, scripted):
                await wait_for(
                    lambda: request.request_id in scripted.calls.delivered, what="the retry"
                )
                # Uncertain: the cut-off attempt may have reached the provider.
                assert [s[3] for s in scripted.calls.sends] == [True]
        warnings = [e for e in logs if e["event"] == "outbox.clock_stepped_back"]
        assert [(e["leases"], e["due"]) for e in warnings] == [(1, 1)]

    async def test_a_clock_stepped_forward_mid_attempt_sends_nothing_twice(
        self, service_env: dict[str, str]
    ) -> None:
        """One process: the step ends its own attempt's lease early and its
        loop claims the item again, but starts no second attempt while the
        first one runs."""
        service_env["HITL_PROVIDER_TIMEOUT"] = "30s"  # the attempt stays held meanwhile
        clock = SteppedClock()
        async with scripted_on_clock(service_env, clock) as (app, stub, scripted):
            session = await start_session(stub, (await make_user(stub)).id)
            gate = scripted.hold("send")
            request = _send(session, "in flight")
            call = asyncio.ensure_future(stub.SendMessage(request, timeout=TIMEOUT))
            await wait_for(lambda: scripted.waiting.get("send") == 1, what="the attempt")
            (item,) = app.core.outbox._inflight
            clock.step(HOUR)

            async def claimed_again() -> bool:
                stored = await app.store.get_outbox(item)
                return stored is not None and stored.attempts == 2

            await wait_for(claimed_again, what="the item claimed again")
            gate.set()
            answer = await call
            assert answer.external_message_id == f"ev-{request.request_id}"
            assert [s[2] for s in scripted.calls.sends] == [request.request_id]

    @pytest.mark.postgres
    @pytest.mark.parametrize("step", [HOUR, -HOUR], ids=["ahead", "back"])
    async def test_a_replica_whose_clock_steps_takes_over_no_send_in_flight(
        self, service_env: dict[str, str], postgres_dsn: str, step: float
    ) -> None:
        """Replica A's clock is stepped an hour away from the database's
        while replica B has a send in flight. Ahead, by A's clock B's lease
        is over; behind, it looks an hour too long, as one a clock stepped
        back left. It is neither: taken over (at A's next claim, or when A
        brings in what the step left ahead), A would send the message too
        and the agent get it twice."""
        env = {
            **service_env,
            "HITL_STORE_URL": postgres_dsn,
            "HITL_STORE_POOL_MIN": "1",
            "HITL_PROVIDER_TIMEOUT": "30s",  # B's attempt stays held meanwhile
        }
        clock = SteppedClock()
        a_env = {**env, "HITL_DATA_DIR": env["HITL_DATA_DIR"] + "-a"}
        async with (
            scripted_on_clock(dict(env), SystemClock()) as (b, b_stub, b_scripted),
            scripted_on_clock(a_env, clock) as (a, _a_stub, a_scripted),
        ):
            session = await start_session(b_stub, (await make_user(b_stub)).id)
            gate = b_scripted.hold("send")
            request = _send(session, "in flight at B")
            call = asyncio.ensure_future(b_stub.SendMessage(request, timeout=TIMEOUT))
            await wait_for(lambda: b_scripted.waiting.get("send") == 1, what="B's attempt")
            (item,) = b.core.outbox._inflight
            before = await b.store.get_outbox(item)
            clock.step(step)
            if step > 0:
                await a.core.outbox._claim_and_start()  # as A's loop does at its next look
            else:
                await a.core.outbox._pull_in()  # as A's loop does once it notices the step
            after = await b.store.get_outbox(item)
            assert before is not None
            assert after is not None
            assert (after.lease_owner, after.lease_until) == (b.core.ctx.owner, before.lease_until)
            gate.set()
            answer = await call
            assert answer.external_message_id == f"ev-{request.request_id}"
            assert a_scripted.calls.sends == []


class TestUpkeepTurns:
    async def test_catch_up_goes_on_when_the_clock_is_set_back(
        self, store_env: dict[str, str]
    ) -> None:
        """Catch-up every second, in turns taken through the store: the turn
        taken while the clock was an hour ahead must not stop catch-up for
        an hour once the clock is set right (on SQLite, the same as a clock
        stepped back an hour)."""
        store_env["HITL_RECONCILE_INTERVAL"] = "1s"
        clock = SteppedClock()
        clock.step(HOUR)
        async with scripted_on_clock(store_env, clock) as (_app, stub, scripted):
            await start_session(stub, (await make_user(stub)).id)
            catch_ups = scripted.calls.catch_ups
            await wait_for(lambda: len(catch_ups) >= 2, what="catch-up passes")  # turns taken
            clock.step(-HOUR)
            seen = len(catch_ups)
            await wait_for(lambda: len(catch_ups) >= seen + 2, what="passes after the step")

    @pytest.mark.postgres
    async def test_a_replica_whose_clock_goes_back_takes_no_turn_another_holds(
        self, service_env: dict[str, str], postgres_dsn: str
    ) -> None:
        """By a clock stepped back an hour, behind the database's, replica
        B's current catch-up turn looks an hour too long, but it is no stale
        one: A taking it would double the provider calls of every pass."""
        env = {**service_env, "HITL_STORE_URL": postgres_dsn, "HITL_STORE_POOL_MIN": "1"}
        a_env = {**env, "HITL_DATA_DIR": env["HITL_DATA_DIR"] + "-a"}
        clock = SteppedClock()
        async with scripted_on_clock(dict(env), SystemClock()) as (b, _b_stub, _b_scripted):
            await wait_for(lambda: b.core.maintenance._start_pass_done, what="B's first pass")
            async with scripted_on_clock(a_env, clock) as (a, _a_stub, _a_scripted):
                clock.step(-HOUR)
                interval = a.settings.reconcile_interval
                assert not await a.core.maintenance._take_turn("catch_up", clock.now(), interval)


class TestTimeouts:
    """HITL_QUEUE_TIMEOUT and HITL_IDLE_TIMEOUT, 10 minutes each, and the
    limit on a start (StartHitl's budget twice and the provider timeout)."""

    @pytest.fixture
    def timed_env(self, service_env: dict[str, str]) -> dict[str, str]:
        service_env.update(HITL_QUEUE_TIMEOUT="10m", HITL_IDLE_TIMEOUT="10m")
        return service_env

    async def test_a_clock_stepped_forward_ends_no_handoff(self, timed_env: dict[str, str]) -> None:
        """An hour's step forward: handoffs that waited a moment are not
        ended as if they had waited an hour; they time out once they have
        waited ten minutes. The step is logged once."""
        clock = SteppedClock()
        async with scripted_on_clock(timed_env, clock) as (app, stub, scripted):
            queued = await start_session(stub, (await make_user(stub)).id)
            assigned = await start_session(stub, (await make_user(stub)).id)
            agent = Agent("jane", "Jane")
            await scripted.push(assigned.external_chat_id, AgentAssigned(agent), "assigned")
            upkeep = app.core.maintenance
            await upkeep.sweep_timeouts()  # as every few seconds

            async def states() -> list[str]:
                found = []
                for session in (queued, assigned):
                    answer = await stub.GetSession(pb.GetSessionRequest(session_id=session.id))
                    found.append(pb.SessionState.Name(answer.session.state))
                return found

            assert await states() == ["SESSION_STATE_QUEUED", "SESSION_STATE_ASSIGNED"]
            with capture_logs() as logs:
                clock.step(HOUR)
                await upkeep.sweep_timeouts()
                for session in (queued, assigned):
                    stored = await app.store.get_session(session.id)
                    assert stored is not None
                    assert stored.stop_requested_at is None  # no timeout's stop
                clock.advance(601)
                await upkeep.sweep_timeouts()
                await wait_for(lambda: len(scripted.calls.stops) == 2, what="the timeouts")
            steps = [e for e in logs if e["event"] == "maintenance.clock_stepped"]
            assert [(e["log_level"], round(e["seconds"])) for e in steps] == [("warning", HOUR)]
            timeouts = [e["kind"] for e in logs if e["event"] == "session.timeout"]
            assert sorted(timeouts) == ["idle", "queue"]

    async def test_a_clock_stepped_back_holds_no_timeout_back(
        self, timed_env: dict[str, str]
    ) -> None:
        clock = SteppedClock()
        async with scripted_on_clock(timed_env, clock) as (app, stub, scripted):
            session = await start_session(stub, (await make_user(stub)).id)
            await app.core.maintenance.sweep_timeouts()
            clock.step(-HOUR)
            clock.advance(601)
            await app.core.maintenance.sweep_timeouts()
            await wait_for(lambda: scripted.calls.stops, what="the timeout")
            assert scripted.calls.stops == [session.external_chat_id]

    async def test_a_clock_stepped_forward_gives_up_no_start_under_way(
        self, timed_env: dict[str, str]
    ) -> None:
        """A start the provider is still answering is not failed as
        interrupted because the clock jumped past its limit."""
        clock = SteppedClock()
        async with scripted_on_clock(timed_env, clock) as (app, stub, scripted):
            user = await make_user(stub)
            gate = scripted.hold("start")
            call = asyncio.ensure_future(start_session(stub, user.id))
            await wait_for(lambda: scripted.waiting.get("start") == 1, what="the held start")
            await app.core.maintenance.sweep_timeouts()
            clock.step(HOUR)
            await app.core.maintenance.sweep_timeouts()
            gate.set()
            started = await call
            assert started.state == pb.SESSION_STATE_QUEUED

    async def test_a_refused_timeout_stop_is_asked_again_after_a_step_back(
        self, timed_env: dict[str, str]
    ) -> None:
        """The provider refused a timeout's stop for good: it is asked again
        ten minutes later, not ten minutes after the clock has made up an
        hour's step back."""
        clock = SteppedClock()
        async with scripted_on_clock(timed_env, clock) as (app, stub, scripted):
            session = await start_session(stub, (await make_user(stub)).id)
            scripted.fail("stop", Fault("rejected"), Fault("rejected"))
            refusals = scripted.faults["stop"]  # each stop asked takes one
            upkeep = app.core.maintenance
            await upkeep.sweep_timeouts()
            clock.advance(601)
            await upkeep.sweep_timeouts()

            async def refused(count: int) -> bool:
                stored = await app.store.get_session(session.id)
                assert stored is not None
                return len(refusals) == 2 - count and stored.stop_requested_at is None

            await wait_for(lambda: refused(1), what="the first refusal")
            clock.step(-HOUR)
            await upkeep.sweep_timeouts()
            await wait_for(lambda: refused(2), what="the stop asked again")
