"""The core's records: users, sessions, log entries, outbox items.

Plain dataclasses; the store persists them and the API layer converts them
to protobuf at the edge.
"""

from __future__ import annotations

import enum
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from providers.types import Agent, EndedBy, LogKind

if TYPE_CHECKING:
    from datetime import datetime


class SessionState(enum.Enum):
    """Where a handoff is. STARTING is internal: shown as REQUESTED."""

    STARTING = "starting"
    REQUESTED = "requested"
    QUEUED = "queued"
    ASSIGNED = "assigned"
    ENDED = "ended"
    FAILED = "failed"

    @property
    def is_open(self) -> bool:
        """True until the session ended or failed."""
        return self not in (SessionState.ENDED, SessionState.FAILED)

    @property
    def is_waiting(self) -> bool:
        """True while the handoff waits for an agent (the queue timeout runs)."""
        return self in (SessionState.REQUESTED, SessionState.QUEUED)


OPEN_STATES = tuple(s for s in SessionState if s.is_open)


def new_id(prefix: str) -> str:
    """A random, URL-safe id with a type prefix (``usr_…``, ``ses_…``)."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass(slots=True)
class User:
    """An end user."""

    id: str
    name: str
    email: str
    picture_url: str
    external_id: str
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True)
class Session:
    """One handoff and its provider-side chat."""

    id: str
    user_id: str
    provider: str
    state: SessionState
    created_at: datetime
    updated_at: datetime
    request_id: str = ""
    title: str = ""
    description: str = ""
    group_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    external_chat_id: str = ""
    chat_state: dict[str, Any] = field(default_factory=dict)
    agent: Agent | None = None
    ended_at: datetime | None = None
    end_reason: str = ""
    ended_by: EndedBy = EndedBy.UNSPECIFIED
    # Set while a stop is pending: the provider's own end notification for
    # the chat is then ignored, so the log holds one `ended` (by CALLER).
    stop_requested_at: datetime | None = None
    last_activity_at: datetime | None = None
    catch_up_checkpoint: str = ""
    # When it last went back to waiting for an agent (None: since it was
    # created): the queue timeout counts from here.
    waiting_since: datetime | None = None


@dataclass(frozen=True, slots=True)
class LogEvent:
    """One committed entry of the event log; ``seq`` is its cursor.

    ``kind`` is None for an entry this release cannot read (a kind a newer
    release added, before a rollback; a hand edit): it is streamed with no
    kind set, so the log's order and every cursor stay whole."""

    seq: int
    session_id: str
    user_id: str
    occurred_at: datetime
    kind: LogKind | None


class OutboxKind(enum.Enum):
    """What an outbox item asks the provider to do."""

    SEND = "send"
    STOP = "stop"


ABANDONED_START = "abandoned_start"
"""Payload key of a STOP that abandons a given-up start: its request id."""


class OutboxStatus(enum.Enum):
    """Where an outbox item is."""

    PENDING = "pending"
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True)
class OutboxItem:
    """A provider call the core owes: stored before it is made.

    Attributes:
        attempts: Attempts started so far (recorded before each call).
        attempts_settled: Attempts known not to have reached the provider
            (refused connection, rejected before sending). When it is below
            ``attempts``, an earlier call may have gone through: the next
            attempt is uncertain and the provider checks before resending.
        payload: JSON: the message (SEND) or the reason and who (STOP).
        result: JSON: the provider's answer once DONE.
    """

    id: str
    session_id: str
    kind: OutboxKind
    request_id: str
    payload: dict[str, Any]
    status: OutboxStatus
    created_at: datetime
    next_attempt_at: datetime
    attempts: int = 0
    attempts_settled: int = 0
    lease_owner: str = ""
    lease_until: datetime | None = None
    last_error: str = ""
    error_code: str = ""
    result: dict[str, Any] = field(default_factory=dict)
    done_at: datetime | None = None

    @property
    def abandons_start(self) -> bool:
        """A stop of the chat a given-up start may have opened (its session
        FAILED without one): ``providers.base.SupportsAbandon``. A STOP, so
        that a replica of a version before it fails it (no chat) instead of
        refusing the row."""
        return self.kind is OutboxKind.STOP and ABANDONED_START in self.payload

    @property
    def earlier_attempt_uncertain(self) -> bool:
        """While an attempt runs (counted in ``attempts``): an earlier one may
        have reached the provider, so this one must check before resending."""
        return self.attempts - 1 > self.attempts_settled


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """A remembered answer to a request with a request_id."""

    scope: str
    key: str
    request_hash: str
    resource_id: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An inbound payload we authenticated but could not process."""

    id: str
    provider: str
    received_at: datetime
    reason: str
    body: bytes
