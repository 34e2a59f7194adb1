"""LiveChat happenings to normalized InboundEvents.

Webhooks and catch-up share these functions, so both produce the same events
with the same dedupe keys:

- events: ``ev:<event id>`` (event ids are ``<thread_id>_<n>``);
- an agent joining: ``user_added_to_chat:<chat>:<thread>:<agent>``;
- a transfer: ``chat_transferred:<chat>:<thread>:<reason>:<groups>:<agents>:<queued_at>``;
- a queue position: ``queued:<chat>:<thread>:<queued_at or position>``;
- an agent leaving: ``user_removed_from_chat:<chat>:<thread>:<agent>``, marked
  ``repeatable``: an agent may leave a thread, rejoin and leave again, and
  the webhook carries no id or time to tell that from a redelivery (the core
  applies a leave only while that agent holds the session);
- the end of a thread: ``chat_deactivated:<chat>:<thread>``.

LiveChat's ``webhook_id`` names a registration, not a delivery, so it is
never part of a key.
"""

from __future__ import annotations

from collections.abc import Sequence

from providers.livechat.mapping import event_to_message
from providers.livechat.memory import OWN_CUSTOM_ID_PREFIX, ChatMemory
from providers.livechat.models import LcEvent, LcQueue, LcThread, LcUser, as_str, parse_time
from providers.types import (
    AgentAssigned,
    AgentLeft,
    AgentMessage,
    Ended,
    EndedBy,
    InboundEvent,
    Queued,
    Transferred,
)

MESSAGE_TYPES = frozenset({"message", "file", "rich_message"})


def event_key(event_id: str) -> str:
    """Dedupe key of a chat event."""
    return "ev:" + event_id


def ended_key(chat_id: str, thread_id: str) -> str:
    """Dedupe key of a thread's end (webhook ``chat_deactivated`` or catch-up)."""
    return f"chat_deactivated:{chat_id}:{thread_id}"


def assigned_key(chat_id: str, thread_id: str, agent_id: str) -> str:
    """Dedupe key of an agent joining a thread."""
    return f"user_added_to_chat:{chat_id}:{thread_id}:{agent_id}"


def queued_event(chat_id: str, thread_id: str, queue: LcQueue) -> InboundEvent:
    """A Queued event with the key every source of this queue entry agrees on."""
    mark = queue.queued_at or f"p{queue.position}"
    return InboundEvent(
        external_chat_id=chat_id,
        kind=Queued(position=queue.position, wait_seconds=queue.wait_time),
        dedupe_key=f"queued:{chat_id}:{thread_id}:{mark}",
        occurred_at=parse_time(queue.queued_at),
        thread_id=thread_id,
    )


def message_event(
    memory: ChatMemory, chat_id: str, event: LcEvent, thread_id: str = ""
) -> tuple[InboundEvent | None, str]:
    """An ``incoming_event``'s event as an AgentMessage, or why it is dropped.

    ``thread_id`` is the thread the event was posted in, if known.

    Returns:
        ``(event, "")`` or ``(None, reason)``.
    """
    author = event.author_id
    if event.custom_id.startswith(OWN_CUSTOM_ID_PREFIX) or memory.is_own_event(event.id):
        memory.learn_own(author)
        return None, "echo of the bridge's own event"
    if event.type not in MESSAGE_TYPES:
        return None, f"{event.type or 'untyped'} event"
    if event.visibility == "agents":
        return None, "internal note (visibility agents)"
    if not author:
        return None, "event without author"
    if memory.is_own(author):
        return None, "echo of the bridge's own event"
    if memory.is_sent_custom_id(event.custom_id) or memory.is_customer(chat_id, author):
        return None, "the end user's own message"
    message = event_to_message(event)
    if message is None:
        return None, f"empty {event.type} event"
    return (
        InboundEvent(
            external_chat_id=chat_id,
            kind=AgentMessage(message=message, agent=memory.agent(chat_id, author)),
            dedupe_key=event_key(event.id),
            occurred_at=event.created_at,
            author_id=author,
            thread_id=thread_id,
        ),
        "",
    )


def agent_added(
    memory: ChatMemory, chat_id: str, thread_id: str, user: LcUser, requester: str = ""
) -> tuple[InboundEvent | None, str]:
    """An agent added to a chat as AgentAssigned, or why it is not one."""
    if user.type == "customer":
        memory.facts(chat_id).customers.add(user.id)
        return None, "the customer joined"
    if memory.is_own(user.id):
        return None, "the bridge itself joined"
    memory.remember_users(chat_id, (user,))
    if user.visibility == "agents":
        return None, "an agent joined as a supervisor (visibility agents)"
    memory.facts(chat_id).assignee = user.id
    return (
        InboundEvent(
            external_chat_id=chat_id,
            kind=AgentAssigned(agent=memory.agent(chat_id, user.id)),
            dedupe_key=assigned_key(chat_id, thread_id, user.id),
            author_id=requester,
            thread_id=thread_id,
        ),
        "",
    )


def transferred(
    memory: ChatMemory,
    chat_id: str,
    thread_id: str,
    *,
    requester: str,
    reason: str,
    group_ids: Sequence[str],
    agent_ids: Sequence[str],
    queue: LcQueue | None,
) -> tuple[list[InboundEvent], str]:
    """A ``chat_transferred`` as events, or why it produced none.

    Our own start-up transfer (requested by the bridge, to a group) is not a
    transfer for the caller: it yields at most its queue position.
    """
    facts = memory.facts(chat_id)
    group = group_ids[0] if group_ids else ""
    ours = memory.is_own(requester) or (
        not agent_ids
        and not requester
        and facts.start_group is not None
        and facts.start_group == group
    )
    if ours:
        facts.start_group = None
        if agent_ids:
            # LiveChat routed our start-up transfer straight to a free agent:
            # an assignment (keyed like that agent's join), not a transfer.
            facts.assignee = agent_ids[0]
            assigned = InboundEvent(
                external_chat_id=chat_id,
                kind=AgentAssigned(agent=memory.agent(chat_id, agent_ids[0])),
                dedupe_key=assigned_key(chat_id, thread_id, agent_ids[0]),
                author_id=requester,
                thread_id=thread_id,
            )
            return [assigned], ""
        if queue is not None:
            return [queued_event(chat_id, thread_id, queue)], ""
        return [], "the bridge's own start-up transfer"
    previous = facts.assignee
    to_agent = memory.agent(chat_id, agent_ids[0]) if agent_ids else None
    facts.assignee = agent_ids[0] if agent_ids else ""
    mark = queue.queued_at if queue is not None else ""
    key = (
        f"chat_transferred:{chat_id}:{thread_id}:{reason}:"
        f"{','.join(group_ids)}:{','.join(agent_ids)}:{mark}"
    )
    events = [
        InboundEvent(
            external_chat_id=chat_id,
            kind=Transferred(
                from_agent=memory.agent(chat_id, previous) if previous else None,
                to_group_id=group,
                reason=reason,
                to_agent=to_agent,
            ),
            dedupe_key=key,
            author_id=requester,
            thread_id=thread_id,
        )
    ]
    if queue is not None and to_agent is None:
        events.append(queued_event(chat_id, thread_id, queue))
    return events, ""


def agent_removed(
    memory: ChatMemory, chat_id: str, thread_id: str, user_id: str, reason: str, requester: str
) -> tuple[InboundEvent | None, str]:
    """An agent leaving the chat as AgentLeft: the core knows whether that
    agent held the session (then it goes back to the queue)."""
    if not user_id:
        return None, "no agent left"
    if memory.is_own(user_id):
        return None, "the bridge itself left"
    facts = memory.known(chat_id)
    if facts is not None and facts.assignee == user_id:
        facts.assignee = ""
    return (
        InboundEvent(
            external_chat_id=chat_id,
            kind=AgentLeft(agent=memory.agent(chat_id, user_id), reason=reason or "agent_removed"),
            dedupe_key=f"user_removed_from_chat:{chat_id}:{thread_id}:{user_id}",
            author_id=requester,
            thread_id=thread_id,
            repeatable=True,
        ),
        "",
    )


def ended(memory: ChatMemory, chat_id: str, thread_id: str, user_id: str) -> InboundEvent:
    """A ``chat_deactivated`` as Ended, with who closed the chat."""
    facts = memory.known(chat_id)
    if not user_id:
        by, reason = EndedBy.PROVIDER, "LiveChat closed the chat (for example after inactivity)"
    elif memory.is_own(user_id) or (facts is not None and facts.stopped_by_us):
        by, reason = EndedBy.CALLER, "the handoff was stopped"
    elif memory.is_customer(chat_id, user_id):
        by, reason = EndedBy.USER, "the end user closed the chat"
    else:
        by, reason = EndedBy.AGENT, "the agent closed the chat"
    return InboundEvent(
        external_chat_id=chat_id,
        kind=Ended(reason=reason, by=by),
        dedupe_key=ended_key(chat_id, thread_id),
        author_id=user_id,
        thread_id=thread_id,
    )


_CLOSED_BY: dict[str, EndedBy] = {
    "manual_archived_agent": EndedBy.AGENT,
    "manual_archived_customer": EndedBy.USER,
}


def thread_events(
    memory: ChatMemory,
    chat_id: str,
    thread: LcThread,
    users: Sequence[LcUser],
    after_event_id: str,
) -> list[InboundEvent]:
    """What a listed thread shows, as the webhooks would have reported it.

    Args:
        memory: Caches and own identities.
        chat_id: The chat.
        thread: The thread, with its events in order.
        users: The chat's users (for agents present in the thread).
        after_event_id: Skip events up to and including this one ("" = none).
    """
    for seen in thread.events:
        # The bridge's own summary tells which agent id is the bridge itself.
        if seen.custom_id.startswith(OWN_CUSTOM_ID_PREFIX) or memory.is_own_event(seen.id):
            memory.learn_own(seen.author_id)
    memory.remember_users(chat_id, tuple(users))
    out: list[InboundEvent] = []
    for user in users:
        if (
            user.type == "agent"
            and user.present
            and (not thread.user_ids or user.id in thread.user_ids)
        ):
            joined, _ = agent_added(memory, chat_id, thread.id, user)
            if joined is not None:
                out.append(joined)
    events = list(thread.events)
    ids = [e.id for e in events]
    if after_event_id in ids:
        events = events[ids.index(after_event_id) + 1 :]
    closed_by = EndedBy.PROVIDER
    for seen in thread.events:
        if seen.type == "system_message":
            closed_by = _CLOSED_BY.get(as_str(seen.raw.get("system_message_type")), closed_by)
    for event in events:
        if event.deleted:
            continue  # retracted by its author: not for the user
        message, _ = message_event(memory, chat_id, event, thread.id)
        if message is not None:
            out.append(message)
    if thread.active:
        # The chat as it is now, after its history: agents of this thread who
        # are gone (the one holding the session, if any, gave it up) ...
        authors = {e.author_id for e in thread.events}
        for user in users:
            if (
                user.type == "agent"
                and not user.present
                and (user.id in thread.user_ids or user.id in authors)
            ):
                left, _ = agent_removed(memory, chat_id, thread.id, user.id, "agent_left", "")
                if left is not None:
                    out.append(left)
        # ... and its place in the queue.
        if thread.queue is not None:
            out.append(queued_event(chat_id, thread.id, thread.queue))
    if not thread.active:
        facts = memory.known(chat_id)
        if facts is not None and facts.stopped_by_us:
            closed_by = EndedBy.CALLER
        out.append(
            InboundEvent(
                external_chat_id=chat_id,
                kind=Ended(reason=_END_REASONS[closed_by], by=closed_by),
                dedupe_key=ended_key(chat_id, thread.id),
                thread_id=thread.id,
            )
        )
    return out


_END_REASONS = {
    EndedBy.AGENT: "the agent closed the chat",
    EndedBy.USER: "the end user closed the chat",
    EndedBy.CALLER: "the handoff was stopped",
    EndedBy.PROVIDER: "LiveChat closed the chat (for example after inactivity)",
}
