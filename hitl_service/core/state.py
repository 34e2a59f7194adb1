"""The session state machine: which provider events change what, and what
goes into the log.

REQUESTED → QUEUED → ASSIGNED → ENDED, with transfers back to QUEUED or to
another agent, and FAILED when the provider refused. Ended and failed
sessions take no further events; anything impossible is ignored (and the
caller logs why), never half-applied.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from hitl_service.domain import Session, SessionState, new_id
from hitl_service.errors import provider_reason
from providers.types import (
    Agent,
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    Author,
    Ended,
    EndedBy,
    EventKind,
    Failed,
    Queued,
    Transferred,
)

if TYPE_CHECKING:
    from datetime import datetime

_END_WORDS = {
    EndedBy.AGENT: "the agent closed the chat",
    EndedBy.USER: "the user closed the chat",
    EndedBy.CALLER: "stopped by the caller",
    EndedBy.TIMEOUT: "timed out",
    EndedBy.PROVIDER: "the provider closed the chat",
    EndedBy.UNSPECIFIED: "the chat was closed",
}


class Ignored(Exception):
    """The event does not apply to the session; ``str()`` says why."""


def apply_event(
    session: Session, kind: EventKind, now: datetime, occurred_at: datetime | None = None
) -> list[EventKind]:
    """Applies one provider event to ``session`` in place (``passes_over``
    is asked first, before the event's dedupe key is claimed).

    ``occurred_at`` is when the provider says it happened (None: ``now``).

    Returns:
        The events to append to the log, in order (an agent message from an
        agent nobody assigned yet is preceded by an ``AgentAssigned``).

    Raises:
        Ignored: The event changes nothing (duplicate information, a closed
            session, our own stop in flight); ``session`` is untouched.
    """
    if not session.state.is_open:
        raise Ignored(f"session is {session.state.value}")
    if session.state is SessionState.STARTING:
        raise Ignored("session is not started yet")
    if isinstance(kind, Queued):
        if session.state is SessionState.ASSIGNED:
            # A chat going back to the queue comes as a transfer (or the
            # agent leaving), which moves the session first. A queue report
            # alone is an old one: LiveChat does not order webhooks across
            # actions, and retries come up to a minute late.
            raise Ignored("an agent holds the chat: an earlier queue report")
        _set(session, SessionState.QUEUED, None, now)
        return [kind]
    if isinstance(kind, AgentLeft):
        if not holds(session, kind.agent):
            raise Ignored("an agent who did not hold the chat left")
        left = Transferred(from_agent=session.agent, reason=kind.reason or "agent_left")
        _set(session, SessionState.QUEUED, None, now)
        return [left]
    if isinstance(kind, AgentAssigned):
        if session.state is SessionState.ASSIGNED and _same(session.agent, kind.agent):
            # A transfer may name only the new agent's id (LiveChat's
            # chat_transferred); the agent's own join that follows brings the
            # name and avatar. Keep those and tell the streams, else ignore.
            assert session.agent is not None  # _same() checked it
            richer = _merge(session.agent, kind.agent)
            if richer == session.agent:
                raise Ignored("agent already assigned")
            _set(session, SessionState.ASSIGNED, richer, now)
            return [AgentAssigned(agent=richer)]
        _set(session, SessionState.ASSIGNED, kind.agent, now)
        return [kind]
    if isinstance(kind, AgentMessage):
        return _agent_message(session, kind, now, occurred_at or now)
    if isinstance(kind, Transferred):
        transferred = replace(kind, from_agent=kind.from_agent or session.agent)
        if (
            transferred.from_agent is None
            and transferred.to_agent is None
            and transferred.to_group_id in ("", session.group_id)
        ):
            # Routed within its own group before any agent held it: the
            # start-up routing (ours), not a transfer for the caller. Its
            # queue position, if any, comes as a Queued event of its own.
            raise Ignored("routed within its group before any agent: not a transfer")
        if kind.to_group_id:
            session.group_id = kind.to_group_id
        if kind.to_agent is not None:
            _set(session, SessionState.ASSIGNED, kind.to_agent, now)
        else:
            _set(session, SessionState.QUEUED, None, now)
        return [transferred]
    if isinstance(kind, Ended):
        if session.stop_requested_at is not None:
            raise Ignored("our own stop is in flight; it records the end")
        ended = kind if kind.reason else replace(kind, reason=_END_WORDS[kind.by])
        finish(session, SessionState.ENDED, ended.reason, ended.by, now)
        return [ended]
    assert isinstance(kind, Failed)
    code = provider_reason(kind.code, "PROVIDER_FAILED")
    if code != kind.code:
        # Callers branch on it, as on a refusal's reason (a third party may
        # report "" or words): its words, if any, go to the detail.
        kind = Failed(code=code, detail=kind.detail or kind.code)
    finish(session, SessionState.FAILED, kind.detail or kind.code, EndedBy.PROVIDER, now)
    return [kind]


def holds(session: Session, agent: Agent) -> bool:
    """Whether ``agent`` holds the session (is its assigned agent)."""
    return session.agent is not None and session.agent.id == agent.id


def passes_over(session: Session, kind: EventKind, occurred_at: datetime) -> str:
    """Why an event changes nothing *for now*, or "" if it applies.

    Such an event is ignored without being recorded as seen (its dedupe key
    stays free), so that it applies if it comes again once it would: the
    same agent may take the chat and leave later in the same thread, and a
    message written while our stop was pending belongs to the handoff if
    the provider refuses the stop for good (catch-up brings it then).
    """
    if isinstance(kind, AgentLeft) and not holds(session, kind.agent):
        return "an agent who did not hold the chat left"
    stopped = session.stop_requested_at
    if isinstance(kind, AgentMessage) and stopped is not None and occurred_at >= stopped:
        # The caller (or a timeout) ended the handoff: SendMessage already
        # refuses it, and the user is back with the bot. What the agent
        # wrote before the stop still arrives.
        return "written after our stop was requested"
    return ""


def finish(session: Session, state: SessionState, reason: str, by: EndedBy, now: datetime) -> None:
    """Moves ``session`` to ENDED or FAILED."""
    session.state = state
    session.ended_at = now
    session.end_reason = reason
    session.ended_by = by
    session.updated_at = now
    session.stop_requested_at = None


def _agent_message(
    session: Session, kind: AgentMessage, now: datetime, written: datetime
) -> list[EventKind]:
    agent = kind.agent
    current = session.agent
    if current is not None and current.id == agent.id:
        # Webhooks for messages may carry only the agent id; keep the name
        # and avatar learned when the agent joined.
        agent = Agent(
            id=agent.id,
            name=agent.name or current.name,
            avatar_url=agent.avatar_url or current.avatar_url,
        )
    # The API promises a message id on what it returns (Message.id) and says
    # when it was written; a provider may give neither (the local console
    # gave none): the service gives them then.
    message = replace(
        kind.message,
        author=Author.AGENT,
        id=kind.message.id or new_id("msg"),
        created_at=kind.message.created_at or written,
    )
    out: list[EventKind] = []
    if (session.state is SessionState.ASSIGNED and current is not None) or _before_requeue(
        session, written
    ):
        session.updated_at = now
    else:
        out.append(AgentAssigned(agent=agent))
        _set(session, SessionState.ASSIGNED, agent, now)
    out.append(AgentMessage(message=message, agent=agent))
    return out


def _before_requeue(session: Session, written: datetime) -> bool:
    """Whether a message was written before the session went back to the
    queue: by the agent who held it then, reported late (LiveChat does not
    order webhooks across actions and retries them up to a minute late; the
    catch-up finds lost ones later still). Such a message is that agent's,
    not a sign that someone took the waiting session.
    """
    since = session.waiting_since
    return session.state.is_waiting and since is not None and written < since


def _set(session: Session, state: SessionState, agent: Agent | None, now: datetime) -> None:
    if state.is_waiting and session.state is SessionState.ASSIGNED:
        session.waiting_since = now  # back in the queue: the queue timeout starts over
    session.state = state
    session.agent = agent
    session.updated_at = now


def _same(a: Agent | None, b: Agent) -> bool:
    return a is not None and a.id == b.id


def _merge(known: Agent, new: Agent) -> Agent:
    """``known`` with the name and avatar it lacks taken from ``new``."""
    return Agent(
        id=known.id,
        name=known.name or new.name,
        avatar_url=known.avatar_url or new.avatar_url,
    )
