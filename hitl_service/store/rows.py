"""Row ↔ record conversions shared by the SQL stores.

Rows arrive as mappings whose timestamp columns are already ``datetime``
(each backend converts its own representation) and whose JSON columns are
text or already-decoded values.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar

import orjson
import structlog

from hitl_service.codec import (
    agent_from_json,
    agent_to_json,
    kind_from_json,
    kind_to_json,
)
from hitl_service.domain import (
    LogEvent,
    OutboxItem,
    OutboxKind,
    OutboxStatus,
    Session,
    SessionState,
    User,
)
from providers.types import EndedBy, InboundEvent, LogKind, ProviderUser, Started

Row = Mapping[str, Any]
_T = TypeVar("_T")

log = structlog.get_logger(__name__)

SESSION_COLUMNS = (
    "id, user_id, provider, state, request_id, title, description, group_id, metadata, "
    "external_chat_id, chat_state, agent, created_at, updated_at, ended_at, end_reason, "
    "ended_by, stop_requested_at, last_activity_at, catch_up_checkpoint, waiting_since"
)
OUTBOX_COLUMNS = (
    "id, session_id, kind, request_id, payload, status, attempts, attempts_settled, "
    "next_attempt_at, lease_owner, lease_until, last_error, error_code, result, created_at, "
    "done_at"
)
USER_COLUMNS = "id, name, email, picture_url, external_id, created_at, updated_at"


stable_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""Compact JSON text from the standard library: the same text in every
version (request hashes depend on it), and what orjson refuses."""


def dumps(value: Any) -> str:
    """Compact JSON text.

    orjson (a tenth of the standard library's cost, and every message is
    encoded a few times on its way); what it refuses (integers beyond 64
    bits, keys that are not strings, lone surrogates) the standard library
    encodes as before.
    """
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:
        return stable_dumps(value)


def loads(value: Any) -> Any:
    """Decodes JSON text; passes already-decoded values through."""
    if value is None:
        return None
    if isinstance(value, str | bytes | bytearray):
        try:
            return orjson.loads(value)
        except orjson.JSONDecodeError:  # what only the standard library reads (NaN, ...)
            return json.loads(value)
    return value


def utc(value: datetime) -> datetime:
    """The same instant, as an aware UTC datetime."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def readable(rows: Iterable[Row], decode: Callable[[Row], _T], table: str) -> list[_T]:
    """``decode`` of each row, less the rows it cannot decode (a value a newer
    release wrote, such as a session state or an outbox kind this one does
    not know; a hand edit): each is logged as ``store.row_unreadable`` and
    left out. For the reads of the background loops (timeouts, catch-up,
    delivery), where one such row would otherwise stop the loop for every
    session, at every pass."""
    found: list[_T] = []
    for row in rows:
        try:
            found.append(decode(row))
        except Exception as exc:
            log.error("store.row_unreadable", table=table, id=row["id"], error=str(exc))
    return found


async def open_sessions_page(
    fetch: Callable[[str, int], Awaitable[Sequence[Row]]], after_id: str, limit: int
) -> list[Session]:
    """Up to ``limit`` readable open sessions after ``after_id``, by id, from
    ``fetch(after_id, count)`` (a backend's query for up to ``count`` open
    session rows after an id, in id order). A row left out as unreadable is
    made up for by the rows after it: the sweeps page until a short page."""
    sessions: list[Session] = []
    while True:
        wanted = limit - len(sessions)
        rows = await fetch(after_id, wanted)
        sessions.extend(readable(rows, session_from_row, "sessions"))
        if len(rows) < wanted or len(sessions) >= limit:
            return sessions
        after_id = rows[-1]["id"]


def user_from_row(row: Row) -> User:
    """A users row → User."""
    return User(
        id=row["id"],
        name=row["name"],
        email=row["email"],
        picture_url=row["picture_url"],
        external_id=row["external_id"] or "",
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def provider_user_from_row(row: Row) -> ProviderUser:
    """A provider_users row → ProviderUser."""
    return ProviderUser(external_user_id=row["external_user_id"], state=loads(row["state"]) or {})


def session_from_row(row: Row) -> Session:
    """A sessions row → Session."""
    return Session(
        id=row["id"],
        user_id=row["user_id"],
        provider=row["provider"],
        state=SessionState(row["state"]),
        request_id=row["request_id"],
        title=row["title"],
        description=row["description"],
        group_id=row["group_id"],
        metadata=loads(row["metadata"]) or {},
        external_chat_id=row["external_chat_id"],
        chat_state=loads(row["chat_state"]) or {},
        agent=agent_from_json(loads(row["agent"])),
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        ended_at=row["ended_at"],
        end_reason=row["end_reason"],
        ended_by=EndedBy(row["ended_by"]),
        stop_requested_at=row["stop_requested_at"],
        last_activity_at=row["last_activity_at"],
        catch_up_checkpoint=row["catch_up_checkpoint"],
        waiting_since=row["waiting_since"],
    )


def session_values(session: Session) -> dict[str, Any]:
    """Session → column values (timestamps as datetime, JSON as text)."""
    return {
        "id": session.id,
        "user_id": session.user_id,
        "provider": session.provider,
        "state": session.state.value,
        "request_id": session.request_id,
        "title": session.title,
        "description": session.description,
        "group_id": session.group_id,
        "metadata": dumps(session.metadata),
        "external_chat_id": session.external_chat_id,
        "chat_state": dumps(session.chat_state),
        "agent": dumps(agent_to_json(session.agent)) if session.agent else None,
        "created_at": session.created_at,
        "updated_at": session.updated_at,
        "ended_at": session.ended_at,
        "end_reason": session.end_reason,
        "ended_by": session.ended_by.value,
        "stop_requested_at": session.stop_requested_at,
        "last_activity_at": session.last_activity_at,
        "catch_up_checkpoint": session.catch_up_checkpoint,
        "waiting_since": session.waiting_since,
    }


def event_from_row(row: Row) -> LogEvent:
    """An events row → LogEvent; one whose kind this release cannot decode
    keeps its place with no kind (``store.row_unreadable``). Raised, it
    stopped the hub at that row: no stream got another live event."""
    seq = int(row["seq"])
    kind: LogKind | None
    try:
        kind = kind_from_json(row["kind"], loads(row["data"]))
    except Exception as exc:
        log.error("store.row_unreadable", table="events", id=seq, error=str(exc))
        kind = None
    return LogEvent(
        seq=seq,
        session_id=row["session_id"],
        user_id=row["user_id"],
        occurred_at=row["occurred_at"],
        kind=kind,
    )


# ``outbox_stats``'s count: pending items, less those scheduled for later and
# never attempted (a given-up start's close, due HITL_ABANDON_AFTER after
# it), which are no backlog.
PENDING_NOW = (
    "COALESCE(SUM(CASE WHEN attempts = 0 AND next_attempt_at > created_at THEN 0 ELSE 1 END), 0)"
)


def outbox_from_row(row: Row) -> OutboxItem:
    """An outbox row → OutboxItem."""
    return OutboxItem(
        id=row["id"],
        session_id=row["session_id"],
        kind=OutboxKind(row["kind"]),
        request_id=row["request_id"],
        payload=loads(row["payload"]) or {},
        status=OutboxStatus(row["status"]),
        attempts=int(row["attempts"]),
        attempts_settled=int(row["attempts_settled"]),
        next_attempt_at=row["next_attempt_at"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        last_error=row["last_error"],
        error_code=row["error_code"],
        result=loads(row["result"]) or {},
        created_at=row["created_at"],
        done_at=row["done_at"],
    )


def outbox_values(item: OutboxItem) -> dict[str, Any]:
    """OutboxItem → column values."""
    return {
        "id": item.id,
        "session_id": item.session_id,
        "kind": item.kind.value,
        "request_id": item.request_id,
        "payload": dumps(item.payload),
        "created_at": item.created_at,
        **outbox_update_values(item),
    }


OUTBOX_MUTABLE = (
    "status",
    "attempts",
    "attempts_settled",
    "next_attempt_at",
    "lease_owner",
    "lease_until",
    "last_error",
    "error_code",
    "result",
    "done_at",
)
"""The columns an update writes: the rest (the payload above all) never change."""


def outbox_update_values(item: OutboxItem) -> dict[str, Any]:
    """An item's ``OUTBOX_MUTABLE`` column values, and its id."""
    return {
        "id": item.id,
        "status": item.status.value,
        "attempts": item.attempts,
        "attempts_settled": item.attempts_settled,
        "next_attempt_at": item.next_attempt_at,
        "lease_owner": item.lease_owner,
        "lease_until": item.lease_until,
        "last_error": item.last_error,
        "error_code": item.error_code,
        "result": dumps(item.result),
        "done_at": item.done_at,
    }


def inbound_to_json(event: InboundEvent) -> str:
    """A parked InboundEvent → JSON text."""
    tag, data = kind_to_json(event.kind)
    return dumps(
        {
            "external_chat_id": event.external_chat_id,
            "kind": tag,
            "data": data,
            "dedupe_key": event.dedupe_key,
            "occurred_at": event.occurred_at.isoformat() if event.occurred_at else None,
            "author_id": event.author_id,
            "thread_id": event.thread_id,
            "repeatable": event.repeatable,
        }
    )


def parked_from_row(row: Row) -> InboundEvent:
    """A parked_events row → InboundEvent."""
    data = loads(row["event"])
    kind = kind_from_json(data["kind"], data["data"])
    if isinstance(kind, Started):
        raise ValueError("a started event is never parked")
    occurred = data.get("occurred_at")
    return InboundEvent(
        external_chat_id=data["external_chat_id"],
        kind=kind,
        dedupe_key=data["dedupe_key"],
        occurred_at=datetime.fromisoformat(occurred) if occurred else None,
        author_id=data.get("author_id", ""),
        thread_id=data.get("thread_id", ""),  # absent in rows parked by older versions
        repeatable=bool(data.get("repeatable", False)),
    )
