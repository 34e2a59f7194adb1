"""The storage interface the core uses; SQLite and PostgreSQL implement it.

Writes happen in transactions (``Store.transaction()`` yields a ``Tx``);
everything a business step changes (session state, log events, dedupe keys,
idempotency records, outbox items) commits together or not at all. Reads
that need no transaction are methods of ``Store`` itself.

Cross-replica guarantees come from the database, not from in-process locks:
unique constraints (one open session per user and provider, idempotency
keys, dedupe keys) and row locks (``Tx.get_session`` locks the row on
PostgreSQL; SQLite serializes writers).
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Sequence
    from datetime import datetime

    from hitl_service.domain import (
        DeadLetter,
        IdempotencyRecord,
        LogEvent,
        OutboxItem,
        Session,
        SessionState,
        User,
    )
    from providers.types import InboundEvent, LogKind, ProviderUser


class OpenSessionExists(Exception):
    """The user already has an open session with this provider.

    Attributes:
        session_id: The open session, if the store could tell.
    """

    def __init__(self, session_id: str = "") -> None:
        super().__init__(session_id)
        self.session_id = session_id


class DuplicateKey(Exception):
    """A unique key (external id, request id) is already taken."""


class Tx(Protocol):
    """One write transaction. Methods are valid only inside ``transaction()``."""

    # --- users -------------------------------------------------------------
    async def get_user(self, user_id: str) -> User | None:
        """The user, or None."""
        ...

    async def get_user_by_external_id(self, external_id: str) -> User | None:
        """The user with this caller-side id, or None."""
        ...

    async def insert_user(self, user: User) -> None:
        """Adds a user. Raises ``DuplicateKey`` if ``external_id`` is taken."""
        ...

    async def update_user(self, user: User) -> None:
        """Saves name, email, picture and ``updated_at``."""
        ...

    async def get_provider_user(self, user_id: str, provider: str) -> ProviderUser | None:
        """The provider's identity for the user, or None."""
        ...

    async def put_provider_user(self, user_id: str, provider: str, user: ProviderUser) -> None:
        """Inserts or replaces the provider's identity for the user."""
        ...

    # --- sessions ----------------------------------------------------------
    async def get_session(self, session_id: str) -> Session | None:
        """The session, locked for update until the transaction ends."""
        ...

    async def find_open_session(self, user_id: str, provider: str) -> Session | None:
        """The user's open session with this provider, or None."""
        ...

    async def find_session_by_chat(self, provider: str, external_chat_id: str) -> Session | None:
        """The newest session on this provider chat (locked), or None."""
        ...

    async def last_session_with_chat(self, user_id: str, provider: str) -> Session | None:
        """The user's newest session that got a provider chat, or None."""
        ...

    async def has_starting_sessions(self, provider: str) -> bool:
        """True if a start is in flight for this provider (state STARTING)."""
        ...

    async def insert_session(self, session: Session) -> None:
        """Adds a session. Raises ``OpenSessionExists`` on the one-open rule."""
        ...

    async def update_session(self, session: Session) -> None:
        """Saves every mutable field of the session."""
        ...

    # --- events ------------------------------------------------------------
    async def append_event(
        self, session_id: str, user_id: str, occurred_at: datetime, kind: LogKind
    ) -> int:
        """Appends to the log; returns the event's cursor.

        Cursors are allocated so that commit order equals cursor order.
        """
        ...

    async def claim_dedupe_key(self, provider: str, key: str, now: datetime) -> bool:
        """Records a provider event key; False if it was recorded before."""
        ...

    async def park_event(self, provider: str, event: InboundEvent, now: datetime) -> None:
        """Keeps an event for a chat we may be about to learn (start in flight)."""
        ...

    async def lock_chat(self, provider: str, external_chat_id: str) -> None:
        """Holds the provider chat until this transaction ends: a concurrent
        caller waits here until it has committed or rolled back.

        A start recording its chat takes it before it takes the chat's
        parked events; a batch about to park events for a chat nobody holds
        takes it and then reads the chat's session again. So an event is
        either parked before the start takes the parked events, or finds
        the started session: never parked after the start has committed.
        """
        ...

    async def take_turn(
        self, job: str, now: datetime, until: datetime, *, stale_after: datetime | None = None
    ) -> bool:
        """Takes the turn of a periodic job the replicas share, until ``until``.

        False, changing nothing, while another turn of ``job`` lasts (it ends
        after ``now``), unless it ends after ``stale_after``: later than any
        turn is taken to, its taker's clock has been stepped back since. The
        first caller of a job always gets it. Concurrent callers on one
        database: one gets the turn.
        """
        ...

    async def take_parked_events(self, provider: str, external_chat_id: str) -> list[InboundEvent]:
        """Removes and returns parked events of the chat, oldest first."""
        ...

    # --- idempotency -------------------------------------------------------
    async def get_idempotency(self, scope: str, key: str) -> IdempotencyRecord | None:
        """The remembered request, or None.

        A transaction writing the same key concurrently (another replica
        handling the same request) is waited for, so None means the caller
        may do the work and put the key (SQLite serializes writers;
        PostgreSQL locks the key).
        """
        ...

    async def put_idempotency(self, record: IdempotencyRecord) -> None:
        """Remembers a request. Raises ``DuplicateKey`` if the key is taken."""
        ...

    async def delete_idempotency(self, scope: str, key: str) -> None:
        """Forgets a request (its attempt failed before doing anything)."""
        ...

    # --- outbox ------------------------------------------------------------
    async def insert_outbox(self, item: OutboxItem) -> bool:
        """Adds an item. Returns True if it is the head of its session's queue
        (no earlier pending item), i.e. it may be delivered right away.

        An item behind a pending one is stored *queued*: claims pass over
        it without reading it, until the item ahead of it leaves the
        pending state (``update_outbox``, ``fail_pending_outbox``), so a
        long queue in one session costs a claim nothing."""
        ...

    async def get_outbox(self, item_id: str) -> OutboxItem | None:
        """The item, or None."""
        ...

    async def update_outbox(self, item: OutboxItem, *, leased_by: str = "") -> bool:
        """Saves status, attempts, lease, errors and result; True if it did.

        With ``leased_by``, only while that owner still holds the item's
        lease: an attempt that outlived its lease must not overwrite the
        replica that has taken the item over since. An item that leaves the
        pending state lets its session's next one out of the queue.
        """
        ...

    async def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        """Claims due items that head their session's queue and are not leased.

        Sets ``lease_owner``/``lease_until`` on them. On PostgreSQL uses row
        locks that skip rows other replicas hold.
        """
        ...

    async def fail_pending_outbox(
        self, session_id: str, now: datetime, code: str, message: str
    ) -> list[str]:
        """Marks the session's pending sends FAILED, except those an attempt may
        have taken to the provider (``attempts > attempts_settled``: in flight,
        or cut off by a crash), which their attempt settles; returns their ids."""
        ...

    # --- inspection ---------------------------------------------------------
    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """Keeps a payload we could not process, for inspection."""
        ...


class Store(Protocol):
    """A durable store: users, sessions, the event log and the outbox."""

    backend: str
    """``"sqlite"`` or ``"postgresql"``."""

    async def open(self) -> None:
        """Connects and applies pending migrations."""
        ...

    async def close(self) -> None:
        """Closes connections; pending waits return."""
        ...

    async def ping(self) -> None:
        """Round-trips to the database and checks it takes writes.

        Raises ``StoreUnavailable`` (readiness reports it).
        """
        ...

    async def schema_version(self) -> int:
        """The newest applied migration."""
        ...

    async def database_time(self) -> datetime | None:
        """The database server's clock, to compare replicas' clocks with;
        None where the store runs on this process's clock (SQLite)."""
        ...

    def transaction(self, *, lazy: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A write transaction; commits on success, rolls back on error.

        Wakes ``wait_for_events`` after a commit that appended events. A
        ``lazy`` transaction is one no caller waits on: the store may hold its
        COMMIT a few milliseconds to share it with the next transaction. Its
        ``async with`` still exits only once it is committed.
        """
        ...

    async def get_user(self, user_id: str) -> User | None:
        """The user, or None."""
        ...

    async def get_session(self, session_id: str) -> Session | None:
        """The session, or None."""
        ...

    async def get_provider_user(self, user_id: str, provider: str) -> ProviderUser | None:
        """The provider's identity for the user, or None."""
        ...

    async def list_sessions(
        self,
        *,
        user_id: str,
        state: SessionState | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Session]:
        """Sessions newest first (by ``created_at``, then id), after a keyset.

        ``state`` REQUESTED also matches STARTING (they look the same).
        """
        ...

    async def list_open_sessions(self, *, after_id: str, limit: int) -> list[Session]:
        """Open sessions ordered by id, after ``after_id`` (for sweeps).

        Up to ``limit``; fewer only at the end of the listing (callers page
        until a short page): a row left out as unreadable (``rows.readable``)
        is made up for by the rows after it.
        """
        ...

    async def read_events(
        self, *, after: int, limit: int, session_id: str = ""
    ) -> Sequence[LogEvent]:
        """Committed events with cursor > ``after``, in cursor order."""
        ...

    async def head(self) -> int:
        """The newest committed cursor (0 when the log is empty)."""
        ...

    async def wait_for_events(self, after: int, timeout: float) -> None:
        """Returns once the head may be past ``after``, or after ``timeout``.

        A wake-up only: callers re-read by cursor. Spurious wake-ups are fine.
        """
        ...

    async def outbox_next_due(self, now: datetime) -> datetime | None:
        """The earliest time an item may be claimed, as ``outbox_stats``
        says, read from indexes: its cost grows with the items in flight,
        not with the sessions waiting for a retry nor the items queued
        behind their heads.

        A lease is seen only on an item due by ``now``: one a replica whose
        clock runs ahead claimed before it was due here is seen once it is
        (the loop looks at least every poll interval anyway)."""
        ...

    async def unqueue_stranded_outbox(self) -> int:
        """Lets out of the queue the items that have no pending item ahead
        of them any more; returns how many. Only an older release (a
        rollback, or a rolling upgrade) leaves such items: it settles a head
        without letting the next one out. Reads every queued item."""
        ...

    async def pull_in_outbox(
        self,
        now: datetime,
        *,
        lease_by: datetime,
        due_by: datetime,
        uncertain_by: datetime,
        scheduled_by: datetime,
        scheduled_to: datetime,
    ) -> tuple[int, int]:
        """Brings pending items' times back from further ahead than any a
        writer sets: written before their clock was stepped back, they would
        hold an item up for as long as the step.

        A lease ending after ``lease_by`` ends ``now``. A first attempt
        scheduled at creation (an abandon: never attempted, due after its
        creation) due after ``scheduled_by`` is due at ``scheduled_to``,
        created ``now``; an item whose last attempt is uncertain due after
        ``uncertain_by``, or any other due after ``due_by``, is due ``now``.
        Returns (leases ended, due times brought in). On PostgreSQL, rows
        another transaction holds are skipped (the next call sees them).
        """
        ...

    async def outbox_stats(self) -> tuple[int, datetime | None]:
        """(pending items, the earliest time one of them may be claimed).

        The count leaves out items scheduled for later and never attempted
        (``SupportsAbandon`` closes): they are no backlog.

        That time is an item's ``next_attempt_at``, or the end of its lease
        when it is leased beyond it; items queued behind their session's
        head are not told apart (the head's settle wakes the loop).
        """
        ...

    async def get_outbox(self, item_id: str) -> OutboxItem | None:
        """The item, or None."""
        ...

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        """Newest kept payloads first."""
        ...

    async def prune(
        self,
        *,
        idempotency_before: datetime,
        dedupe_before: datetime,
        parked_before: datetime,
        sessions_before: datetime | None = None,
    ) -> int:
        """Deletes expired rows; returns how many went.

        Idempotency records and finished outbox items (a retried SendMessage
        reads its answer there) older than ``idempotency_before``, dedupe keys
        older than ``dedupe_before``, parked events older than
        ``parked_before``. With ``sessions_before`` (``HITL_RETENTION``), also
        sessions that ended (ENDED or FAILED) before it, with their log
        events (not one with a pending outbox item: an attempt may still log
        its outcome; it goes at a later prune), and dead letters received
        before it. Users, their provider identities and open sessions stay;
        cursors are never reused.
        """
        ...
