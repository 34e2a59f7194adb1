"""A break-it review of StopHitl against the fake LiveChat: a stop must end
the session once, close the chat at LiveChat, whatever happens, and close
nothing that is not ours.

The service runs in-process (real gRPC, real sidecar, the fake LiveChat
over HTTP with scripted faults); every wait is on a condition.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import pytest

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.integration.conftest import JANE, LiveChatService, kinds
from tests.support import TIMEOUT, expect_error, rid, wait_for

# A stop retried through an outage waits its backoff (0.2 s doubling) once
# LiveChat is back: well within this.
BACK = 30.0


async def stop(lc: LiveChatService, session_id: str, reason: str = "", **kwargs: Any) -> pb.Session:
    kwargs.setdefault("timeout", TIMEOUT)
    response = await lc.stub.StopHitl(
        pb.StopHitlRequest(session_id=session_id, reason=reason), **kwargs
    )
    return response.session


def ok_deactivations(lc: LiveChatService, chat_id: str) -> list[Any]:
    return [
        c
        for c in lc.fake.calls("deactivate_chat")
        if c.body.get("id") == chat_id and c.status == 200
    ]


async def ended_events(lc: LiveChatService, session_id: str) -> list[pb.Ended]:
    return [e.ended for e in await lc.log(session_id) if e.WhichOneof("kind") == "ended"]


async def ended(lc: LiveChatService, session_id: str) -> pb.Session:
    async def done() -> pb.Session | None:
        current = await lc.session(session_id)
        return current if current.state == pb.SESSION_STATE_ENDED else None

    result: pb.Session = await wait_for(done, timeout=BACK, what="the session ended")
    return result


class TestOutage:
    @pytest.mark.parametrize("kind", ["drop", "status"])
    async def test_a_stop_through_an_outage_longer_than_the_deadline_closes_once_back(
        self, lc: LiveChatService, kind: str
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.agent_join(chat_id, JANE[0])
        await lc.delivered()
        lc.fake.add_fault("*", kind=kind, api="agent", status=503, times=None)
        error = await expect_error(
            stop(lc, session.id, "resolved", timeout=3), grpc.StatusCode.UNAVAILABLE
        )
        assert error.reason == "STOP_PENDING"
        assert error.metadata == {"session_id": session.id}
        # Meanwhile: still open, the agent still has it, but nothing more is
        # sent to it; a second StopHitl says the same.
        current = await lc.session(session.id)
        assert current.state == pb.SESSION_STATE_ASSIGNED
        refused = await expect_error(
            lc.send(session.id, "one more thing"), grpc.StatusCode.FAILED_PRECONDITION
        )
        assert refused.reason == "SESSION_ENDED"
        again = await expect_error(
            stop(lc, session.id, "other words", timeout=2), grpc.StatusCode.UNAVAILABLE
        )
        assert again.reason == "STOP_PENDING"
        assert lc.fake.chat(chat_id).active

        lc.fake.clear_faults()
        final = await ended(lc, session.id)
        assert (final.ended_by, final.end_reason) == (pb.ENDED_BY_CALLER, "resolved")
        assert not lc.fake.chat(chat_id).active
        assert len(ok_deactivations(lc, chat_id)) == 1
        await lc.delivered()
        assert [(e.by, e.reason) for e in await ended_events(lc, session.id)] == [
            (pb.ENDED_BY_CALLER, "resolved")
        ]
        # And now StopHitl answers the ENDED session.
        assert (await stop(lc, session.id)).state == pb.SESSION_STATE_ENDED
        assert len(ok_deactivations(lc, chat_id)) == 1


class TestPendingMessages:
    async def test_messages_queued_before_the_stop_go_out_before_the_close_never_after(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.agent_join(chat_id, JANE[0])
        await lc.delivered()
        lc.fake.add_fault("send_event", kind="drop", api="customer", times=None)
        pending = await expect_error(
            lc.send(session.id, "my order number is 123", timeout=2), grpc.StatusCode.UNAVAILABLE
        )
        assert pending.reason == "DELIVERY_PENDING"
        stopping = await expect_error(stop(lc, session.id, timeout=2), grpc.StatusCode.UNAVAILABLE)
        assert stopping.reason == "STOP_PENDING"
        assert not ok_deactivations(lc, chat_id)  # the stop waits behind the message

        lc.fake.clear_faults()
        await ended(lc, session.id)
        texts = [e.get("text") for e in lc.fake.events(chat_id) if e.get("type") == "message"]
        assert texts.count("my order number is 123") == 1
        order = [
            c.method
            for c in lc.fake.calls()
            if c.status == 200 and c.method in ("send_event", "deactivate_chat")
        ]
        assert order[-1] == "deactivate_chat"


class TestRaces:
    @pytest.mark.parametrize("when", ["before", "held", "during"])
    async def test_the_agent_closing_around_our_stop_gives_one_end(
        self, lc: LiveChatService, when: str
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.agent_join(chat_id, JANE[0])
        await lc.delivered()
        if when == "before":
            lc.fake.agent_close(chat_id, JANE[0])
            await lc.delivered()
        elif when == "held":
            lc.fake.delivery.hold()
            lc.fake.agent_close(chat_id, JANE[0])
        else:
            # The agent closes while our deactivate_chat is on its way.
            gate = lc.fake.add_fault("deactivate_chat", kind="delay", delay=0.5)
            task = asyncio.ensure_future(stop(lc, session.id, "resolved"))
            await wait_for(lambda: gate.hits, what="deactivate_chat under way")
            lc.fake.agent_close(chat_id, JANE[0])
            result = await task
            assert result.state == pb.SESSION_STATE_ENDED
        result = await stop(lc, session.id, "resolved")
        assert result.state == pb.SESSION_STATE_ENDED
        lc.fake.delivery.release()
        await lc.delivered()
        ends = await ended_events(lc, session.id)
        assert len(ends) == 1
        if when == "before":
            assert ends[0].by == pb.ENDED_BY_AGENT
        assert not lc.fake.chat(chat_id).active
        assert len(lc.fake.chat(chat_id).threads) == 1


class TestRepeats:
    async def test_stops_in_parallel_make_one_deactivation_and_one_end(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.add_fault("deactivate_chat", kind="delay", delay=0.3)
        results = await asyncio.gather(
            *(stop(lc, session.id, f"reason {n}") for n in range(5)), return_exceptions=True
        )
        for result in results:
            assert isinstance(result, pb.Session), result
            assert result.state == pb.SESSION_STATE_ENDED
        assert len({r.end_reason for r in results if isinstance(r, pb.Session)}) == 1
        assert len(lc.fake.calls("deactivate_chat")) == 1
        assert not lc.fake.chat(chat_id).active
        assert len(await ended_events(lc, session.id)) == 1

    async def test_unknown_and_failed_sessions(self, lc: LiveChatService) -> None:
        error = await expect_error(stop(lc, "ses_nope"), grpc.StatusCode.NOT_FOUND)
        assert error.reason == "SESSION_NOT_FOUND"
        user = await lc.user()
        lc.fake.add_fault("start_chat", error_type="validation", message="nope")
        await expect_error(
            lc.stub.StartHitl(
                pb.StartHitlRequest(user_id=user.id, request_id=rid(), title="x"), timeout=TIMEOUT
            ),
            grpc.StatusCode.FAILED_PRECONDITION,
        )
        failed = (
            await lc.stub.ListSessions(pb.ListSessionsRequest(user_id=user.id), timeout=TIMEOUT)
        ).sessions[0]
        assert failed.state == pb.SESSION_STATE_FAILED
        again = await stop(lc, failed.id)
        assert again.state == pb.SESSION_STATE_FAILED
        assert again.end_reason == failed.end_reason
        assert not lc.fake.calls("deactivate_chat")
        assert "ended" not in kinds(await lc.log(failed.id))


class TestRefusals:
    @pytest.mark.parametrize(
        ("error_type", "reason"),
        [
            ("validation", "VALIDATION"),
            ("not_found", "NOT_FOUND"),
            ("authentication", "PROVIDER_CREDENTIALS"),
            ("license_expired", "PROVIDER_CREDENTIALS"),
            ("limit_reached", "LIMIT_REACHED"),
        ],
    )
    async def test_a_refused_deactivate_is_reported_and_the_session_stays_open(
        self, lc: LiveChatService, error_type: str, reason: str
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.add_fault("deactivate_chat", error_type=error_type, times=None)
        error = await expect_error(stop(lc, session.id), grpc.StatusCode.FAILED_PRECONDITION)
        assert error.reason == reason
        assert error.metadata["session_id"] == session.id
        current = await lc.session(session.id)
        assert current.state in (pb.SESSION_STATE_QUEUED, pb.SESSION_STATE_REQUESTED)
        assert lc.fake.chat(chat_id).active
        # The provider's own end applies again; a later stop can still work.
        lc.fake.clear_faults()
        assert (await stop(lc, session.id)).state == pb.SESSION_STATE_ENDED
        assert not lc.fake.chat(chat_id).active
        assert len(await ended_events(lc, session.id)) == 1

    @pytest.mark.parametrize(
        "error_type", ["too_many_requests", "internal", "service_unavailable", "request_timeout"]
    )
    async def test_a_transient_refusal_is_retried_to_the_end(
        self, lc: LiveChatService, error_type: str
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.add_fault("deactivate_chat", error_type=error_type, times=2)
        final = await stop(lc, session.id)
        if final.state != pb.SESSION_STATE_ENDED:
            final = await ended(lc, session.id)
        assert final.ended_by == pb.ENDED_BY_CALLER
        assert not lc.fake.chat(chat_id).active
        assert len(await ended_events(lc, session.id)) == 1

    async def test_a_chat_moved_to_a_group_the_bridge_cannot_access_is_closed_as_the_user(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.add_fault("deactivate_chat", api="agent", error_type="authorization", times=None)
        lc.fake.add_fault("get_chat", api="agent", error_type="missing_access", times=None)
        final = await stop(lc, session.id, "done")
        assert final.state == pb.SESSION_STATE_ENDED
        assert final.ended_by == pb.ENDED_BY_CALLER
        assert not lc.fake.chat(chat_id).active
        assert lc.fake.calls("deactivate_chat", api="customer")
        assert len(await ended_events(lc, session.id)) == 1


class TestBrokenAnswers:
    @pytest.mark.parametrize(
        "fault",
        [
            {"kind": "bad_json"},
            {"kind": "lost_response"},
            {"kind": "status", "status": 502, "body": "<html>Bad gateway</html>"},
            {"kind": "status", "status": 504, "body": "<html>Gateway timeout</html>"},
        ],
        ids=["bad json", "lost response", "proxy 502", "proxy 504"],
    )
    async def test_a_deactivate_whose_answer_is_lost_or_broken_ends_once(
        self, lc: LiveChatService, fault: dict[str, Any]
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.add_fault("deactivate_chat", **fault)
        try:
            final = await stop(lc, session.id, "bye")
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            final = await ended(lc, session.id)
        if final.state != pb.SESSION_STATE_ENDED:
            final = await ended(lc, session.id)
        assert (final.ended_by, final.end_reason) == (pb.ENDED_BY_CALLER, "bye")
        assert not lc.fake.chat(chat_id).active
        assert len(lc.fake.chat(chat_id).threads) == 1
        await lc.delivered()
        assert len(await ended_events(lc, session.id)) == 1

    async def test_a_refused_pre_read_does_not_leave_the_chat_open_unsaid(
        self, lc: LiveChatService
    ) -> None:
        session = await lc.start()
        chat_id = session.external_chat_id
        lc.fake.add_fault("get_chat", api="agent", error_type="validation", times=None)
        try:
            final = await stop(lc, session.id, "bye")
        except grpc.aio.AioRpcError as exc:
            # Refused: the session must still be open, and the chat too.
            assert exc.code() == grpc.StatusCode.FAILED_PRECONDITION, exc
            assert lc.fake.chat(chat_id).active
            assert (await lc.session(session.id)).state != pb.SESSION_STATE_ENDED
            return
        assert final.state == pb.SESSION_STATE_ENDED
        assert not lc.fake.chat(chat_id).active


class TestTimeoutRace:
    @pytest.mark.parametrize("first", ["caller", "timeout"])
    async def test_a_queue_timeout_racing_stophitl_gives_one_end(
        self, make_service: Any, first: str
    ) -> None:
        lc: LiveChatService = await make_service(HITL_QUEUE_TIMEOUT="1s")
        session = await lc.start()
        chat_id = session.external_chat_id
        core = lc.app.core
        current = await core.get_session(session.id)
        await wait_for(
            lambda: core.maintenance._due(current, core.ctx.clock.now()),
            what="the queue timeout due",
        )
        lc.fake.add_fault("deactivate_chat", kind="delay", delay=0.3)
        sweep = core.maintenance.sweep_timeouts()
        call = stop(lc, session.id, "caller's words")
        if first == "caller":
            answer, _ = await asyncio.gather(call, sweep)
        else:
            _, answer = await asyncio.gather(sweep, call)
        final = await ended(lc, session.id)
        assert answer.state == pb.SESSION_STATE_ENDED
        assert (answer.ended_by, answer.end_reason) == (final.ended_by, final.end_reason)
        assert final.ended_by in (pb.ENDED_BY_CALLER, pb.ENDED_BY_TIMEOUT)
        assert len(lc.fake.calls("deactivate_chat")) == 1
        await lc.delivered()
        ends = await ended_events(lc, session.id)
        assert [(e.by, e.reason) for e in ends] == [(final.ended_by, final.end_reason)]
        assert not lc.fake.chat(chat_id).active
