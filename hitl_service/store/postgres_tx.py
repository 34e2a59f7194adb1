"""Statements of the PostgreSQL store: reads shared with the store, and ``PostgresTx``.

Inserts that may hit a unique key use ``ON CONFLICT DO NOTHING`` and look at
the row count instead of catching the violation: a failed statement would
abort the whole transaction, while a skipped insert leaves it usable (the
same observable behaviour as SQLite, where a failed statement rolls back
only itself).
"""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Any

from hitl_service.codec import kind_to_json
from hitl_service.domain import (
    DeadLetter,
    IdempotencyRecord,
    OutboxItem,
    OutboxStatus,
    Session,
    User,
)
from hitl_service.store.base import DuplicateKey, OpenSessionExists
from hitl_service.store.rows import (
    OUTBOX_COLUMNS,
    OUTBOX_MUTABLE,
    SESSION_COLUMNS,
    USER_COLUMNS,
    dumps,
    inbound_to_json,
    outbox_from_row,
    outbox_update_values,
    outbox_values,
    parked_from_row,
    provider_user_from_row,
    readable,
    session_from_row,
    session_values,
    user_from_row,
    utc,
)

if TYPE_CHECKING:
    from collections.abc import Mapping

    from hitl_service.store.postgres_db import Db
    from providers.types import InboundEvent, LogKind, ProviderUser

CHANNEL = "hitl_events"
"""The NOTIFY channel; the payload is the newest committed cursor."""

HEAD_SQL = "SELECT seq FROM event_log_head"
"""The newest committed cursor (the counter row, as last committed)."""

# pg_advisory_xact_lock(int, int) namespace for per-session outbox inserts;
# the two-key space never collides with single-bigint locks (migrations).
_OUTBOX_LOCK_SPACE = 0x4849_544C  # "HITL"
# ... and for idempotency keys (scope and key), see ``get_idempotency``.
_IDEMPOTENCY_LOCK_SPACE = 0x4944_454D  # "IDEM"
_IDEMPOTENCY_LOCK_SQL = "SELECT pg_advisory_xact_lock($1, hashtext($2 || ':' || $3))"
# ... and for provider chats (provider and chat id), see ``lock_chat``.
_CHAT_LOCK_SPACE = 0x4348_4154  # "CHAT"
# Insert attempts when an open-session conflict vanishes before we can name it.
_INSERT_SESSION_TRIES = 3


def ts(value: datetime | None) -> datetime | None:
    """An aware UTC datetime for a timestamptz parameter (naive means UTC)."""
    return None if value is None else utc(value)


def _columns(columns: str) -> list[str]:
    return [c.strip() for c in columns.split(",")]


def _insert(table: str, columns: str) -> str:
    names = _columns(columns)
    marks = ", ".join(f"${i}" for i in range(1, len(names) + 1))
    return f"INSERT INTO {table} ({', '.join(names)}) VALUES ({marks})"


def _param(value: Any) -> Any:
    return utc(value) if isinstance(value, datetime) else value


def _args(columns: str | list[str], values: Mapping[str, Any]) -> list[Any]:
    """Values in column order, datetimes as aware UTC."""
    names = _columns(columns) if isinstance(columns, str) else columns
    return [_param(values[c]) for c in names]


def _update(table: str, columns: list[str]) -> str:
    """``UPDATE table SET c2 = $2, ... WHERE id = $1`` (``columns`` excludes id)."""
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=2))
    return f"UPDATE {table} SET {sets} WHERE id = $1"


_SESSION_UPDATE_COLUMNS = [
    c for c in _columns(SESSION_COLUMNS) if c not in ("id", "user_id", "provider", "created_at")
]
_OUTBOX_UPDATE_COLUMNS = list(OUTBOX_MUTABLE)
_SQL_UPDATE_OUTBOX = _update("outbox", _OUTBOX_UPDATE_COLUMNS)
_SQL_UPDATE_LEASED_OUTBOX = (
    f"{_SQL_UPDATE_OUTBOX} AND lease_owner = ${len(_OUTBOX_UPDATE_COLUMNS) + 2}"
)
_SQL_INSERT_OUTBOX = (
    # $2 is the session (``OUTBOX_COLUMNS``); see ``insert_outbox``.
    "WITH ahead AS (SELECT 1 FROM outbox WHERE session_id = $2 AND status = 'pending' "
    "ORDER BY pos DESC LIMIT 1 FOR SHARE) "
    f"INSERT INTO outbox ({OUTBOX_COLUMNS}, queued) VALUES "
    f"({', '.join(f'${i}' for i in range(1, len(_columns(OUTBOX_COLUMNS)) + 1))}, "
    "EXISTS (SELECT 1 FROM ahead)) RETURNING NOT EXISTS (SELECT 1 FROM outbox p "
    "WHERE p.session_id = outbox.session_id AND p.status = 'pending' AND p.pos < outbox.pos)"
)
# Asked for every webhook event about a chat that is not ours: matches the
# partial index sessions_starting (migration 0009), the starts in flight.
_SQL_HAS_STARTING = (
    "SELECT EXISTS (SELECT 1 FROM sessions WHERE provider = $1 AND state = 'starting')"
)
# The session's first pending item leaves the queue: see ``insert_outbox``
# and ``_unqueue_head``. True: the item let out was no longer pending.
_SQL_UNQUEUE_HEAD = (
    "UPDATE outbox SET queued = false WHERE pos = (SELECT MIN(pos) FROM outbox "
    "WHERE session_id = $1 AND status = 'pending') AND queued RETURNING status <> 'pending'"
)
_OUTBOX_RETURNING = ", ".join(f"outbox.{c}" for c in _columns(OUTBOX_COLUMNS))
_SQL_CLAIM_OUTBOX = (
    # Queued items are left out (index ``outbox_due``). The order check
    # still guards those an older release stored; it is a scalar subquery
    # (an index probe per due item) on purpose: written as NOT EXISTS, the
    # planner turned it into a hash anti-join over every pending item, or
    # walked the primary key in ``pos`` order through the done items kept
    # (48 h of them) to the first pending one: 24 ms per claim with 200,000
    # done and 20,000 queued, against 0.4 ms this way. A lease is over once
    # it is by the database's clock too: a replica whose clock is ahead
    # (stepped forward, or off) would take over attempts still in flight.
    "WITH due AS (SELECT o.pos FROM outbox o WHERE o.status = 'pending' "
    "AND NOT o.queued AND o.next_attempt_at <= $1 "
    "AND (o.lease_until IS NULL OR o.lease_until <= LEAST($1, statement_timestamp())) "
    "AND o.pos = (SELECT MIN(p.pos) FROM outbox p WHERE p.session_id = o.session_id "
    "AND p.status = 'pending') "
    "ORDER BY o.pos LIMIT $2 FOR UPDATE OF o SKIP LOCKED) "
    "UPDATE outbox SET lease_owner = $3, lease_until = $4 FROM due "
    f"WHERE outbox.pos = due.pos RETURNING outbox.pos, {_OUTBOX_RETURNING}"
)


class Queries:
    """Reads the store and its transactions share."""

    def __init__(self, db: Db) -> None:
        self._db = db

    async def get_user(self, user_id: str) -> User | None:
        """See base class."""
        row = await self._db.fetchrow(f"SELECT {USER_COLUMNS} FROM users WHERE id = $1", user_id)
        return None if row is None else user_from_row(row)

    async def get_session(self, session_id: str) -> Session | None:
        """See base class."""
        row = await self._db.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1", session_id
        )
        return None if row is None else session_from_row(row)

    async def get_provider_user(self, user_id: str, provider: str) -> ProviderUser | None:
        """See base class."""
        row = await self._db.fetchrow(
            "SELECT external_user_id, state FROM provider_users "
            "WHERE user_id = $1 AND provider = $2",
            user_id,
            provider,
        )
        return None if row is None else provider_user_from_row(row)

    async def get_outbox(self, item_id: str) -> OutboxItem | None:
        """See base class."""
        row = await self._db.fetchrow(f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = $1", item_id)
        return None if row is None else outbox_from_row(row)


class PostgresTx(Queries):
    """A write transaction on one pooled connection (READ COMMITTED).

    Attributes:
        last_seq: The newest cursor this transaction appended (0: none); the
            store sends NOTIFY with it before committing.
    """

    def __init__(self, db: Db) -> None:
        super().__init__(db)
        self.last_seq = 0

    # --- users ---------------------------------------------------------------
    async def get_user_by_external_id(self, external_id: str) -> User | None:
        """See base class."""
        row = await self._db.fetchrow(
            f"SELECT {USER_COLUMNS} FROM users WHERE external_id = $1", external_id
        )
        return None if row is None else user_from_row(row)

    async def insert_user(self, user: User) -> None:
        """See base class."""
        values = {
            "id": user.id,
            "name": user.name,
            "email": user.email,
            "picture_url": user.picture_url,
            "external_id": user.external_id or None,
            "created_at": user.created_at,
            "updated_at": user.updated_at,
        }
        added = await self._db.execute(
            _insert("users", USER_COLUMNS) + " ON CONFLICT DO NOTHING",
            *_args(USER_COLUMNS, values),
        )
        if added != 1:
            raise DuplicateKey("users.external_id")

    async def update_user(self, user: User) -> None:
        """See base class."""
        await self._db.execute(
            "UPDATE users SET name = $2, email = $3, picture_url = $4, updated_at = $5 "
            "WHERE id = $1",
            user.id,
            user.name,
            user.email,
            user.picture_url,
            ts(user.updated_at),
        )

    async def put_provider_user(self, user_id: str, provider: str, user: ProviderUser) -> None:
        """See base class."""
        await self._db.execute(
            "INSERT INTO provider_users (user_id, provider, external_user_id, state, updated_at) "
            "VALUES ($1, $2, $3, $4, now()) ON CONFLICT (user_id, provider) DO UPDATE SET "
            "external_user_id = excluded.external_user_id, state = excluded.state, "
            "updated_at = excluded.updated_at",
            user_id,
            provider,
            user.external_user_id,
            dumps(user.state),
        )

    # --- sessions ------------------------------------------------------------
    async def get_session(self, session_id: str) -> Session | None:
        """See base class; locks the row until the transaction ends."""
        row = await self._db.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = $1 FOR UPDATE", session_id
        )
        return None if row is None else session_from_row(row)

    async def find_open_session(self, user_id: str, provider: str) -> Session | None:
        """See base class."""
        row = await self._db.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND provider = $2 "
            "AND state NOT IN ('ended', 'failed')",
            user_id,
            provider,
        )
        return None if row is None else session_from_row(row)

    async def find_session_by_chat(self, provider: str, external_chat_id: str) -> Session | None:
        """See base class; locks the row until the transaction ends."""
        row = await self._db.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE provider = $1 "
            "AND external_chat_id = $2 ORDER BY created_at DESC, id DESC LIMIT 1 FOR UPDATE",
            provider,
            external_chat_id,
        )
        return None if row is None else session_from_row(row)

    async def last_session_with_chat(self, user_id: str, provider: str) -> Session | None:
        """See base class."""
        row = await self._db.fetchrow(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = $1 AND provider = $2 "
            "AND external_chat_id <> '' ORDER BY created_at DESC, id DESC LIMIT 1",
            user_id,
            provider,
        )
        return None if row is None else session_from_row(row)

    async def has_starting_sessions(self, provider: str) -> bool:
        """See base class."""
        found = await self._db.fetchval(_SQL_HAS_STARTING, provider)
        return bool(found)

    async def insert_session(self, session: Session) -> None:
        """See base class.

        A concurrent insert of another open session for the same user waits
        for that transaction; once it commits, this one finds its session
        and raises ``OpenSessionExists`` naming it.
        """
        args = _args(SESSION_COLUMNS, session_values(session))
        sql = _insert("sessions", SESSION_COLUMNS) + " ON CONFLICT DO NOTHING"
        for _ in range(_INSERT_SESSION_TRIES):
            if await self._db.execute(sql, *args) == 1:
                return
            existing = await self.find_open_session(session.user_id, session.provider)
            if existing is not None:
                raise OpenSessionExists(existing.id)
            if await self._db.fetchval("SELECT 1 FROM sessions WHERE id = $1", session.id):
                raise DuplicateKey("sessions.id")
            # The conflicting session closed in between: try again.
        raise OpenSessionExists()

    async def update_session(self, session: Session) -> None:
        """See base class."""
        values = session_values(session)
        await self._db.execute(
            _update("sessions", _SESSION_UPDATE_COLUMNS),
            session.id,
            *_args(_SESSION_UPDATE_COLUMNS, values),
        )

    # --- events --------------------------------------------------------------
    async def append_event(
        self, session_id: str, user_id: str, occurred_at: datetime, kind: LogKind
    ) -> int:
        """See base class.

        The cursor comes from the one-row counter: the row lock it takes is
        held until this transaction ends, so appenders commit one after the
        other, in cursor order.
        """
        tag, data = kind_to_json(kind)
        seq = await self._db.fetchval(
            "WITH head AS (UPDATE event_log_head SET seq = seq + 1 RETURNING seq) "
            "INSERT INTO events (seq, session_id, user_id, occurred_at, kind, data) "
            "SELECT head.seq, $1, $2, $3, $4, $5 FROM head RETURNING seq",
            session_id,
            user_id,
            ts(occurred_at),
            tag,
            dumps(data),
        )
        self.last_seq = int(seq)
        return self.last_seq

    async def claim_dedupe_key(self, provider: str, key: str, now: datetime) -> bool:
        """See base class."""
        added = await self._db.execute(
            "INSERT INTO dedupe_keys (provider, key, created_at) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            provider,
            key,
            ts(now),
        )
        return added == 1

    async def take_turn(
        self, job: str, now: datetime, until: datetime, *, stale_after: datetime | None = None
    ) -> bool:
        """See base class."""
        # A concurrent caller waits on the row's lock, then sees the new end.
        taken = await self._db.execute(
            "INSERT INTO upkeep_turns (job, until) VALUES ($1, $2) ON CONFLICT (job) "
            "DO UPDATE SET until = EXCLUDED.until "
            "WHERE upkeep_turns.until <= $3 OR upkeep_turns.until > $4",  # NULL: never
            job,
            ts(until),
            ts(now),
            ts(stale_after),
        )
        return taken == 1

    async def park_event(self, provider: str, event: InboundEvent, now: datetime) -> None:
        """See base class."""
        await self._db.execute(
            "INSERT INTO parked_events (provider, external_chat_id, event, created_at) "
            "VALUES ($1, $2, $3, $4)",
            provider,
            event.external_chat_id,
            inbound_to_json(event),
            ts(now),
        )

    async def lock_chat(self, provider: str, external_chat_id: str) -> None:
        """See base class (a transaction-scoped advisory lock; a hash
        collision only makes two chats' transactions wait for each other)."""
        await self._db.execute(_IDEMPOTENCY_LOCK_SQL, _CHAT_LOCK_SPACE, provider, external_chat_id)

    async def take_parked_events(self, provider: str, external_chat_id: str) -> list[InboundEvent]:
        """See base class."""
        rows = await self._db.fetch(
            "DELETE FROM parked_events WHERE provider = $1 AND external_chat_id = $2 "
            "RETURNING id, event",
            provider,
            external_chat_id,
        )
        return readable(sorted(rows, key=lambda r: r["id"]), parked_from_row, "parked_events")

    # --- idempotency -----------------------------------------------------------
    async def get_idempotency(self, scope: str, key: str) -> IdempotencyRecord | None:
        """See base class.

        Takes a transaction-scoped advisory lock on the key first, so two
        replicas handling the same request id run one after the other (as
        SQLite's serialized writers do): the second reads the first one's
        record once it commits, instead of missing the uncommitted row and
        going on to do the work again (a second session refused as
        SESSION_ALREADY_OPEN, a second outbox item failing on the key).
        Callers take it first (StartHitl, SendMessage) or right after
        locking the one session the key names (StopHitl), so it closes no
        lock cycle; a hash collision only makes two requests wait for each
        other (a cycle through one would end as a retryable deadlock error,
        see ``postgres_db``).
        """
        await self._db.execute(_IDEMPOTENCY_LOCK_SQL, _IDEMPOTENCY_LOCK_SPACE, scope, key)
        row = await self._db.fetchrow(
            "SELECT scope, key, request_hash, resource_id, created_at FROM idempotency "
            "WHERE scope = $1 AND key = $2",
            scope,
            key,
        )
        return None if row is None else IdempotencyRecord(**row)

    async def put_idempotency(self, record: IdempotencyRecord) -> None:
        """See base class (takes the key's lock too, see ``get_idempotency``)."""
        await self._db.execute(
            _IDEMPOTENCY_LOCK_SQL, _IDEMPOTENCY_LOCK_SPACE, record.scope, record.key
        )
        added = await self._db.execute(
            "INSERT INTO idempotency (scope, key, request_hash, resource_id, created_at) "
            "VALUES ($1, $2, $3, $4, $5) ON CONFLICT DO NOTHING",
            record.scope,
            record.key,
            record.request_hash,
            record.resource_id,
            ts(record.created_at),
        )
        if added != 1:
            raise DuplicateKey("idempotency")

    async def delete_idempotency(self, scope: str, key: str) -> None:
        """See base class."""
        await self._db.execute("DELETE FROM idempotency WHERE scope = $1 AND key = $2", scope, key)

    # --- outbox ------------------------------------------------------------------
    async def insert_outbox(self, item: OutboxItem) -> bool:
        """See base class.

        Inserts for one session are serialized by a transaction-scoped
        advisory lock, so positions within a session follow commit order
        (otherwise a later position could commit, and be claimed, first).

        The last pending item ahead is locked (``FOR SHARE``) until this
        transaction ends: a settle of it, which lets the next item out of
        the queue, waits, and then finds this one. One being settled as we
        look is waited for and then no longer found: the item is stored
        unqueued, which the claim's order check makes safe.
        """
        await self._db.execute(
            "SELECT pg_advisory_xact_lock($1, hashtext($2))", _OUTBOX_LOCK_SPACE, item.session_id
        )
        head = await self._db.fetchval(
            _SQL_INSERT_OUTBOX, *_args(OUTBOX_COLUMNS, outbox_values(item))
        )
        return bool(head)

    async def update_outbox(self, item: OutboxItem, *, leased_by: str = "") -> bool:
        """See base class."""
        args = (item.id, *_args(_OUTBOX_UPDATE_COLUMNS, outbox_update_values(item)))
        if not leased_by:
            updated = await self._db.execute(_SQL_UPDATE_OUTBOX, *args) == 1
        else:
            updated = await self._db.execute(_SQL_UPDATE_LEASED_OUTBOX, *args, leased_by) == 1
        if updated and item.status is not OutboxStatus.PENDING:
            await self._unqueue_head(item.session_id)
        return updated

    async def _unqueue_head(self, session_id: str) -> None:
        """Lets the session's first pending item out of the queue.

        Looks again when the item it let out was no longer pending once its
        lock was free: an end (``fail_pending_outbox``) failed it meanwhile,
        in a transaction that saw the item this one settled still pending,
        so neither would let out what the end left (a stop) otherwise. The
        next statement sees what that transaction committed.
        """
        while await self._db.fetchval(_SQL_UNQUEUE_HEAD, session_id):
            pass

    async def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        """See base class.

        ``FOR UPDATE SKIP LOCKED`` passes over items another replica is
        claiming right now; an item behind a (locked or not) pending item of
        its session never qualifies, since that item is still pending.
        """
        rows = await self._db.fetch(
            _SQL_CLAIM_OUTBOX,
            ts(now),
            limit,
            owner,
            ts(lease_until),
        )
        # Unreadable ones stay leased: looked at again, and logged, once a lease.
        return readable(sorted(rows, key=lambda r: r["pos"]), outbox_from_row, "outbox")

    async def fail_pending_outbox(
        self, session_id: str, now: datetime, code: str, message: str
    ) -> list[str]:
        """See base class."""
        rows = await self._db.fetch(
            "UPDATE outbox SET status = 'failed', error_code = $2, last_error = $3, "
            "done_at = $4, lease_owner = '', lease_until = NULL "
            "WHERE session_id = $1 AND status = 'pending' AND kind = 'send' "
            # Not the sends an attempt may have reached the provider with (in
            # flight, or cut off by a crash): their attempt settles them.
            "AND attempts <= attempts_settled RETURNING pos, id",
            session_id,
            code,
            message,
            ts(now),
        )
        if rows:
            await self._unqueue_head(session_id)
        return [r["id"] for r in sorted(rows, key=lambda r: r["pos"])]

    # --- inspection ----------------------------------------------------------------
    async def add_dead_letter(self, letter: DeadLetter) -> None:
        """See base class."""
        await self._db.execute(
            "INSERT INTO dead_letters (id, provider, received_at, reason, body) "
            "VALUES ($1, $2, $3, $4, $5)",
            letter.id,
            letter.provider,
            ts(letter.received_at),
            letter.reason,
            letter.body,
        )
