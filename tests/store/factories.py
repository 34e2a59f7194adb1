"""Records for store tests, with every field settable."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any

from hitl_service.domain import (
    OutboxItem,
    OutboxKind,
    OutboxStatus,
    Session,
    SessionState,
    User,
)

T0 = datetime(2026, 3, 4, 5, 6, 7, 123456, tzinfo=UTC)
"""A fixed instant with microseconds (both backends keep them)."""

_ids = itertools.count(1)


def uid(prefix: str) -> str:
    """A unique id that sorts by creation order (``ses_000001``...)."""
    return f"{prefix}_{next(_ids):06d}"


def at(seconds: float) -> datetime:
    """``T0`` plus ``seconds``."""
    return T0 + timedelta(seconds=seconds)


def make_user(**fields: Any) -> User:
    """A user; ``external_id`` defaults to a unique one."""
    ident = fields.pop("id", None) or uid("usr")
    values: dict[str, Any] = {
        "id": ident,
        "name": "Ada Lovelace",
        "email": "ada@example.com",
        "picture_url": "https://example.com/ada.png",
        "external_id": f"ext-{ident}",
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(fields)
    return User(**values)


def make_session(user_id: str, **fields: Any) -> Session:
    """An open (REQUESTED) session with the defaults of a fresh start."""
    values: dict[str, Any] = {
        "id": uid("ses"),
        "user_id": user_id,
        "provider": "livechat",
        "state": SessionState.REQUESTED,
        "created_at": T0,
        "updated_at": T0,
    }
    values.update(fields)
    return Session(**values)


def make_outbox(session_id: str, **fields: Any) -> OutboxItem:
    """A pending SEND, due at ``T0``."""
    values: dict[str, Any] = {
        "id": uid("out"),
        "session_id": session_id,
        "kind": OutboxKind.SEND,
        "request_id": uid("req"),
        "payload": {"message": {"body": {"type": "text", "text": "hi"}}},
        "status": OutboxStatus.PENDING,
        "created_at": T0,
        "next_attempt_at": T0,
    }
    values.update(fields)
    return OutboxItem(**values)
