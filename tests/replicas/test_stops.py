"""StopHitl on two replicas of one PostgreSQL database: a stop while the
start is still in flight on the other replica, stops racing on both, and a
stop pending through an outage finished by the other replica after the
first one died."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests.replicas.helpers import deployment, until
from tests.support import TIMEOUT, EventCollector, expect_error, rid


async def ended_count(stub: pb_grpc.HitlServiceAsyncStub, session_id: str) -> int:
    """How many ended events the session has in the log (read up to its
    head as the stream started, which is past the session's last event)."""
    async with EventCollector(stub, session_id=session_id, after="0") as events:
        await until(
            lambda: any(e.WhichOneof("kind") == "ended" for e in events.events),
            what="the ended event",
        )
        head = await log_head(stub)
        await until(
            lambda: int(events.events[-1].cursor) >= head or None,
            what="the session's events up to the head",
        )
    return sum(e.WhichOneof("kind") == "ended" for e in events.events)


async def log_head(stub: pb_grpc.HitlServiceAsyncStub) -> int:
    """The cursor the live part of a new stream starts after."""
    async with EventCollector(stub, after="0") as stream:
        metadata = await stream._call.initial_metadata()
    return int(dict(metadata)["x-stream-head"])


class TestStopsAcrossReplicas:
    async def test_a_stop_during_the_start_then_stops_racing_on_both(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            await d.fake.register_webhooks(a.webhook_url)
            user = (
                await a.stub.CreateUser(pb.CreateUserRequest(name="Grace"), timeout=TIMEOUT)
            ).user
            await d.fake.control("add_fault", method="start_chat", kind="delay", delay=2.0)
            starting = asyncio.ensure_future(
                a.stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="Help"),
                    timeout=TIMEOUT,
                )
            )

            async def listed() -> list[pb.Session]:
                found = await b.stub.ListSessions(
                    pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT
                )
                return list(found.sessions)

            session_id = (await until(listed, what="the STARTING session"))[0].id
            error = await expect_error(
                b.stub.StopHitl(pb.StopHitlRequest(session_id=session_id), timeout=TIMEOUT),
                grpc.StatusCode.FAILED_PRECONDITION,
            )
            assert error.reason == "SESSION_STARTING"
            session = (await starting).session
            assert session.state in (pb.SESSION_STATE_QUEUED, pb.SESSION_STATE_REQUESTED)
            chat = session.external_chat_id
            assert (await d.fake.chat(chat))["thread"]["active"]

            await d.fake.control("add_fault", method="deactivate_chat", kind="delay", delay=0.5)
            answers = await asyncio.gather(
                *(
                    replica.stub.StopHitl(
                        pb.StopHitlRequest(session_id=session_id, reason=f"by {replica.name}"),
                        timeout=TIMEOUT,
                    )
                    for replica in (a, b, a, b)
                )
            )
            assert {x.session.state for x in answers} == {pb.SESSION_STATE_ENDED}
            assert len({x.session.end_reason for x in answers}) == 1
            assert not (await d.fake.chat(chat))["thread"]["active"]
            assert len(await d.fake.calls("deactivate_chat")) == 1
            await until(d.fake.deliveries_settled, what="webhook deliveries")
            assert await ended_count(b.stub, session_id) == 1

    async def test_a_stop_pending_on_a_dead_replica_is_finished_by_the_other(
        self, postgres_dsn: str, tmp_path: Path
    ) -> None:
        async with deployment(postgres_dsn, tmp_path) as d:
            a, b = d["a"], d["b"]
            await d.fake.register_webhooks(b.webhook_url)
            user = (await a.stub.CreateUser(pb.CreateUserRequest(name="Ada"), timeout=TIMEOUT)).user
            session = (
                await a.stub.StartHitl(
                    pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="Help"),
                    timeout=TIMEOUT,
                )
            ).session
            chat = session.external_chat_id
            await d.fake.control("add_fault", method="deactivate_chat", kind="drop", times=None)
            error = await expect_error(
                a.stub.StopHitl(pb.StopHitlRequest(session_id=session.id, reason="bye"), timeout=3),
                grpc.StatusCode.UNAVAILABLE,
            )
            assert error.reason == "STOP_PENDING"
            await a.kill()
            await d.fake.control("clear_faults")

            async def ended() -> pb.Session | None:
                got = await b.stub.GetSession(
                    pb.GetSessionRequest(session_id=session.id), timeout=TIMEOUT
                )
                return got.session if got.session.state == pb.SESSION_STATE_ENDED else None

            final = await until(ended, timeout=60, what="the stop finished on b")
            assert (final.ended_by, final.end_reason) == (pb.ENDED_BY_CALLER, "bye")
            assert not (await d.fake.chat(chat))["thread"]["active"]
            ok = [c for c in await d.fake.calls("deactivate_chat") if c["status"] == 200]
            assert len(ok) == 1
            await until(d.fake.deliveries_settled, what="webhook deliveries")
            assert await ended_count(b.stub, session.id) == 1
