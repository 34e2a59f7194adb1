"""The session state machine on its own: every transition and refusal."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from hitl_service.core.state import Ignored, apply_event, passes_over
from hitl_service.domain import Session, SessionState
from providers.types import (
    Agent,
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    Author,
    Ended,
    EndedBy,
    Failed,
    Message,
    Queued,
    Transferred,
)

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)
JANE = Agent("jane@acme.test", "Jane", "https://a.example/j.png")
BOB = Agent("bob@acme.test", "Bob")


def session(state: SessionState = SessionState.REQUESTED, agent: Agent | None = None) -> Session:
    return Session(
        id="ses_1",
        user_id="usr_1",
        provider="p",
        state=state,
        created_at=NOW,
        updated_at=NOW,
        agent=agent,
    )


def test_requested_to_queued_to_assigned_to_ended() -> None:
    s = session()
    assert apply_event(s, Queued(2, 60), NOW) == [Queued(2, 60)]
    assert s.state is SessionState.QUEUED
    assert apply_event(s, AgentAssigned(JANE), NOW) == [AgentAssigned(JANE)]
    assert (s.state, s.agent) == (SessionState.ASSIGNED, JANE)
    [ended] = apply_event(s, Ended(by=EndedBy.AGENT), NOW)
    assert ended == Ended(reason="the agent closed the chat", by=EndedBy.AGENT)
    assert (s.state, s.ended_by, s.ended_at) == (SessionState.ENDED, EndedBy.AGENT, NOW)


def test_an_agent_message_before_any_assignment_assigns_first() -> None:
    s = session(SessionState.QUEUED)
    message = AgentMessage(Message("hi", Author.AGENT), Agent(JANE.id))
    kinds = apply_event(s, message, NOW)
    assert [type(k).__name__ for k in kinds] == ["AgentAssigned", "AgentMessage"]
    assert s.state is SessionState.ASSIGNED


def test_agent_messages_keep_the_name_learned_at_assignment() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    [message] = apply_event(s, AgentMessage(Message("hi"), Agent(JANE.id)), NOW)
    assert isinstance(message, AgentMessage)
    assert message.agent == JANE
    assert message.message.author is Author.AGENT


def test_the_same_agent_assigned_twice_is_ignored() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    with pytest.raises(Ignored):
        apply_event(s, AgentAssigned(JANE), NOW)
    with pytest.raises(Ignored):  # nothing new in a bare id
        apply_event(s, AgentAssigned(Agent(JANE.id)), NOW)


def test_an_agent_known_by_id_only_gets_the_name_of_a_later_assignment() -> None:
    """A transfer names the new agent by id; the agent's join brings the name."""
    s = session(SessionState.ASSIGNED, JANE)
    apply_event(s, Transferred(to_agent=Agent(BOB.id), reason="manual"), NOW)
    assert s.agent == Agent(BOB.id)
    [assigned] = apply_event(s, AgentAssigned(BOB), NOW)
    assert assigned == AgentAssigned(BOB)
    assert (s.state, s.agent) == (SessionState.ASSIGNED, BOB)


def test_transfers_to_a_queue_and_to_an_agent() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    [to_queue] = apply_event(s, Transferred(to_group_id="7", reason="manual"), NOW)
    assert isinstance(to_queue, Transferred)
    assert to_queue.from_agent == JANE
    assert (s.state, s.agent) == (SessionState.QUEUED, None)
    apply_event(s, Transferred(to_group_id="7", to_agent=BOB, reason="assigned"), NOW)
    assert (s.state, s.agent) == (SessionState.ASSIGNED, BOB)


def test_a_queue_report_while_an_agent_holds_the_chat_is_an_old_one() -> None:
    """Back to the queue comes as a transfer or the agent leaving; a queue
    report alone, once an agent holds the chat, was overtaken (webhooks of
    different actions arrive in any order)."""
    s = session(SessionState.ASSIGNED, JANE)
    with pytest.raises(Ignored):
        apply_event(s, Queued(3, 180), NOW)
    assert (s.state, s.agent) == (SessionState.ASSIGNED, JANE)
    apply_event(s, Transferred(to_group_id="7"), NOW)
    assert apply_event(s, Queued(1, 10), NOW) == [Queued(1, 10)]  # queued again: current


def test_an_agent_leaving_requeues_only_the_session_they_held() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    with pytest.raises(Ignored):  # a supervisor, or an agent from before a transfer
        apply_event(s, AgentLeft(Agent(BOB.id), "manual"), NOW)
    assert (s.state, s.agent) == (SessionState.ASSIGNED, JANE)
    [left] = apply_event(s, AgentLeft(Agent(JANE.id), "manual"), NOW)
    assert left == Transferred(from_agent=JANE, reason="manual")
    assert (s.state, s.agent) == (SessionState.QUEUED, None)
    with pytest.raises(Ignored):  # the same news again
        apply_event(s, AgentLeft(Agent(JANE.id), "manual"), NOW)


def test_routing_within_its_group_before_any_agent_is_not_a_transfer() -> None:
    """The start-up routing (the bridge's own transfer to the session's
    group) reaches replicas that never saw the start: not a transfer."""
    s = session(SessionState.QUEUED)
    s.group_id = "19"
    for kind in (Transferred(to_group_id="19", reason="manual"), Transferred(reason="other")):
        with pytest.raises(Ignored):
            apply_event(s, kind, NOW)
    [moved] = apply_event(s, Transferred(to_group_id="7", reason="manual"), NOW)
    assert moved == Transferred(to_group_id="7", reason="manual")


@pytest.mark.parametrize("state", [SessionState.ENDED, SessionState.FAILED, SessionState.STARTING])
@pytest.mark.parametrize(
    "kind",
    [
        Queued(),
        AgentAssigned(JANE),
        AgentMessage(Message("x"), JANE),
        Transferred(),
        AgentLeft(JANE),
        Ended(),
        Failed("X"),
    ],
)
def test_closed_or_unstarted_sessions_take_no_events(state: SessionState, kind: object) -> None:
    s = session(state)
    with pytest.raises(Ignored):
        apply_event(s, kind, NOW)  # type: ignore[arg-type]
    assert s.state is state


def test_the_providers_end_is_ignored_while_our_stop_is_in_flight() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    s.stop_requested_at = NOW
    with pytest.raises(Ignored):
        apply_event(s, Ended(by=EndedBy.AGENT), NOW)
    assert s.state is SessionState.ASSIGNED


def test_agent_messages_written_after_our_stop_pass_over() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    s.stop_requested_at = NOW
    late = AgentMessage(Message("still there?", Author.AGENT), JANE)
    assert passes_over(s, late, NOW)
    assert passes_over(s, late, NOW + timedelta(seconds=1))
    # Written before the stop, reported late: still the handoff's.
    assert not passes_over(s, late, NOW - timedelta(seconds=1))
    s.stop_requested_at = None  # the stop was refused for good: the handoff goes on
    assert not passes_over(s, late, NOW + timedelta(seconds=1))


def test_failed_moves_to_failed() -> None:
    s = session(SessionState.QUEUED)
    apply_event(s, Failed("NO_AGENT", "nobody online"), NOW)
    assert (s.state, s.end_reason) == (SessionState.FAILED, "nobody online")


@pytest.mark.parametrize("code", ["", "no agent", "x" * 64])
def test_a_providers_failure_code_reaches_callers_as_a_stable_code(code: str) -> None:
    """Callers branch on ``failed.code`` (UPPER_SNAKE, like an ErrorInfo
    reason), as on a refusal's reason: a third party's other code becomes
    PROVIDER_FAILED, and the words it had go to the detail."""
    s = session(SessionState.QUEUED)
    assert apply_event(s, Failed(code), NOW) == [Failed("PROVIDER_FAILED", code)]
    assert apply_event(session(), Failed(code, "why"), NOW) == [Failed("PROVIDER_FAILED", "why")]
    assert apply_event(session(), Failed("NO_AGENT"), NOW) == [Failed("NO_AGENT")]


def test_a_message_written_before_the_requeue_does_not_take_the_chat_back() -> None:
    s = session(SessionState.ASSIGNED, JANE)
    apply_event(s, Transferred(to_group_id="7"), NOW)
    assert (s.state, s.waiting_since) == (SessionState.QUEUED, NOW)
    late = AgentMessage(Message("billing will take over", Author.AGENT), JANE)
    kinds = apply_event(s, late, NOW + timedelta(seconds=5), NOW - timedelta(seconds=1))
    assert [type(k).__name__ for k in kinds] == ["AgentMessage"]
    assert (s.state, s.agent) == (SessionState.QUEUED, None)
    # Written after it (by whoever took the chat, their join unreported): assigns.
    later = AgentMessage(Message("Bob here", Author.AGENT), BOB)
    kinds = apply_event(s, later, NOW + timedelta(seconds=6), NOW + timedelta(seconds=6))
    assert [type(k).__name__ for k in kinds] == ["AgentAssigned", "AgentMessage"]
    assert (s.state, s.agent) == (SessionState.ASSIGNED, BOB)
