"""The embedded store: one SQLite file in WAL mode, one process.

One writer connection serialized by an asyncio lock (``BEGIN IMMEDIATE``,
so a transaction never has to upgrade a read lock and fail with
SQLITE_BUSY), one read-only connection for queries, and an in-process
wake-up for event readers. Several processes on one file are not supported:
use PostgreSQL for replicas.

Statements run on the event loop's thread, not in a worker thread: a
statement on a local WAL database takes microseconds, while handing each
one to a thread and back (what aiosqlite does) costs two thread switches
and, under load, most of a request's time; a SendMessage runs about fifteen
statements. What could block for long stays off the loop:

- lock waits: connections have no busy handler (``busy_timeout = 0``); a
  statement that finds the database locked (only another process can hold
  it) is retried with ``asyncio.sleep`` back-offs until the busy timeout;
- WAL checkpoints (which write the database file and fsync it): automatic
  checkpoints are off on the loop's connections and run in a worker thread
  on a connection of their own, every ``CHECKPOINT_COMMITS`` commits; once
  the WAL reaches ``WAL_FORCE_FRAMES`` frames, one restarts it with writes
  held off (asynchronously), so that it cannot grow without end;
- opening, migrating and closing, which happen outside request handling;
- pruning deletes in bounded batches, one transaction each.

Because a statement no longer suspends the caller, every read outside a
transaction and every ``transaction()`` first yields to the event loop once
(``asyncio.sleep(0)``, far cheaper than a thread hop): a caller that polls
the store in a loop (``Outbox.wait`` re-reads its item until a task settles
it) must still let that task, and everything else, run. Statements inside a
transaction do not yield, so a transaction body runs in one go.

Transactions commit with ``synchronous = NORMAL`` by default: a commit
survives a crash of the process (it is in the WAL before the webhook's 200);
an operating system crash or power loss may lose the last commits, as with
any ``synchronous = NORMAL`` WAL database. ``HITL_SQLITE_SYNCHRONOUS=full``
fsyncs the WAL at every COMMIT (one per group) so that they survive those too.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TypeVar

import structlog

from hitl_service.activity import Activity
from hitl_service.codec import kind_to_json
from hitl_service.domain import (
    OPEN_STATES,
    DeadLetter,
    IdempotencyRecord,
    LogEvent,
    OutboxItem,
    OutboxStatus,
    Session,
    SessionState,
    User,
)
from hitl_service.errors import StoreUnavailable
from hitl_service.store.base import DuplicateKey, OpenSessionExists
from hitl_service.store.migrations import migrations, statements, warn_if_newer
from hitl_service.store.rows import (
    OUTBOX_COLUMNS,
    OUTBOX_MUTABLE,
    PENDING_NOW,
    SESSION_COLUMNS,
    USER_COLUMNS,
    Row,
    dumps,
    event_from_row,
    inbound_to_json,
    open_sessions_page,
    outbox_from_row,
    outbox_update_values,
    outbox_values,
    parked_from_row,
    provider_user_from_row,
    readable,
    session_from_row,
    session_values,
    user_from_row,
)
from providers.types import InboundEvent, LogKind, ProviderUser

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_MIN_SQLITE = (3, 24, 0)  # ON CONFLICT ... DO NOTHING
_TS_COLUMNS = frozenset(
    {
        "created_at",
        "updated_at",
        "ended_at",
        "stop_requested_at",
        "last_activity_at",
        "waiting_since",
        "occurred_at",
        "next_attempt_at",
        "lease_until",
        "done_at",
        "received_at",
    }
)
_OPEN = tuple(s.value for s in OPEN_STATES)
_BUSY_CODES = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})
CHECKPOINT_COMMITS = 500  # a few pages each: some 10 MB of WAL per checkpoint
WAL_SIZE_LIMIT = 256 * 1024 * 1024  # the WAL file is trimmed to this when it restarts
# Frames (256 MB at 4 KiB pages) at which a checkpoint holds writes off to
# restart the WAL: larger costs disk, smaller costs throughput (every
# restart rewrites the WAL from its start; at 8192 frames webhook ingest
# lost a quarter of its throughput).
WAL_FORCE_FRAMES = 65536
# The longest that restart waits for readers, writes held off meanwhile. Our
# own reads last milliseconds; a reader that keeps a snapshot open (an online
# backup, a report) pins the WAL for as long as it reads, and waiting for it
# would stall every write (the busy timeout, at each checkpoint).
RESTART_WAIT_MS = 200
PRUNE_BATCH = 2000  # rows deleted per transaction when pruning
_WAITING_PAYS = 1.5  # members a COMMIT that waits a turn must gather on average
_PROBE_EVERY = 16  # otherwise every 16th COMMIT waits anyway, to notice load
LAZY_COMMIT_DELAY = 0.005  # how long a lazy COMMIT waits for company


_last_ts: tuple[datetime | None, str | None] = (None, None)


def _ts(value: datetime | None) -> str | None:
    """datetime → fixed-width UTC text, so text order is time order."""
    global _last_ts
    if value is None:
        return None
    # A write usually stores one "now" in several columns: reuse its text.
    last, text = _last_ts
    if value is last:
        return text
    utc = value if value.tzinfo is UTC else value.astimezone(UTC)
    # isoformat is C code; same text as strftime("%Y-%m-%dT%H:%M:%S.%fZ").
    text = utc.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"
    _last_ts = (value, text)
    return text


_COLUMNS_OF: dict[str, tuple[tuple[str, ...], list[str]]] = {}


def _columns(cursor: sqlite3.Cursor, sql: str) -> tuple[tuple[str, ...], list[str]]:
    """A result's column names, and those holding timestamps (once per SQL
    text: the statements are constants, with parameters for every value)."""
    found = _COLUMNS_OF.get(sql)
    if found is None:
        names = tuple(d[0] for d in cursor.description)
        found = names, [n for n in names if n in _TS_COLUMNS]
        if len(_COLUMNS_OF) < 256:
            _COLUMNS_OF[sql] = found
    return found


def _parsed(names: tuple[str, ...], stamps: list[str], values: tuple[Any, ...]) -> dict[str, Any]:
    return _stamped(dict(zip(names, values, strict=True)), stamps)


def _stamped(row: dict[str, Any], stamps: list[str]) -> dict[str, Any]:
    """``row`` with its timestamp columns parsed (in place)."""
    for key in stamps:
        value = row[key]
        if value is not None:
            row[key] = datetime.fromisoformat(value)
    return row


def _rows(cursor: sqlite3.Cursor, sql: str, raw: Iterable[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Result tuples as dicts, with timestamp columns parsed."""
    names, stamps = _columns(cursor, sql)
    return [_parsed(names, stamps, values) for values in raw]


def _is_busy(exc: sqlite3.Error) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and exc.sqlite_errorcode in _BUSY_CODES


async def _retry_busy(call: Callable[[], _T], timeout: float) -> _T:
    """Runs ``call``; while the database is locked, retries with back-offs.

    The connections have no busy handler, so a lock held by another process
    never blocks the event loop; this waits asynchronously instead. A lock
    that outlasts ``timeout``, a full disk, an I/O error: ``StoreUnavailable``,
    as the PostgreSQL store reports its own (503 and UNAVAILABLE, not 500).
    """
    try:
        return call()
    except sqlite3.OperationalError as exc:
        if not _is_busy(exc):
            raise StoreUnavailable(f"SQLite failed: {exc}") from exc
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        await asyncio.sleep(delay)
        try:
            return call()
        except sqlite3.OperationalError as exc:
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise StoreUnavailable(f"SQLite failed: {exc}") from exc
        delay = min(delay * 2, 0.05)


def _params(values: dict[str, Any]) -> dict[str, Any]:
    """Column values with datetimes as text (in place: callers pass a new dict)."""
    for key, value in values.items():
        if type(value) is datetime:
            values[key] = _ts(value)
    return values


def _placeholders(columns: str) -> str:
    return ", ".join(f":{c.strip()}" for c in columns.split(","))


def _assignments(columns: Iterable[str]) -> str:
    return ", ".join(f"{c} = :{c}" for c in columns)


_SESSION_UPDATE = [
    c.strip()
    for c in SESSION_COLUMNS.split(",")
    if c.strip() not in ("id", "user_id", "provider", "created_at")
]
_SQL_INSERT_USER = f"INSERT INTO users ({USER_COLUMNS}) VALUES ({_placeholders(USER_COLUMNS)})"
_SQL_INSERT_SESSION = (
    f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES ({_placeholders(SESSION_COLUMNS)})"
)
_SQL_UPDATE_SESSION = f"UPDATE sessions SET {_assignments(_SESSION_UPDATE)} WHERE id = :id"
_SQL_INSERT_OUTBOX = (
    f"INSERT INTO outbox ({OUTBOX_COLUMNS}, queued) "
    f"VALUES ({_placeholders(OUTBOX_COLUMNS)}, :queued)"
)
# The session's first pending item leaves the queue (``Tx.insert_outbox``):
# the one ahead of it is no longer pending.
_SQL_UNQUEUE_HEAD = (
    "UPDATE outbox SET queued = 0 WHERE pos = (SELECT MIN(pos) FROM outbox "
    "WHERE session_id = ? AND status = 'pending') AND queued = 1"
)
# Three reads in index order (``Store.outbox_next_due``): the first unleased
# head; the end of the first lease among items already due (those in
# flight); the first queued item.
_SQL_NEXT_DUE = (
    "SELECT MIN(next_attempt_at) AS next_attempt_at FROM ("
    "SELECT * FROM (SELECT next_attempt_at FROM outbox INDEXED BY outbox_due "
    "WHERE status = 'pending' AND queued = 0 "
    "AND (lease_until IS NULL OR lease_until <= next_attempt_at) "
    "ORDER BY next_attempt_at LIMIT 1) UNION ALL "
    "SELECT MIN(lease_until) FROM outbox INDEXED BY outbox_due "
    "WHERE status = 'pending' AND queued = 0 AND next_attempt_at <= :now "
    "AND lease_until > next_attempt_at UNION ALL "
    "SELECT MIN(next_attempt_at) FROM outbox INDEXED BY outbox_queued "
    "WHERE status = 'pending' AND queued = 1)"
)
_SQL_UNQUEUE_STRANDED = (
    "UPDATE outbox SET queued = 0 WHERE status = 'pending' AND queued = 1 "
    "AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.session_id = outbox.session_id "
    "AND p.status = 'pending' AND p.pos < outbox.pos)"
)
# ``Store.pull_in_outbox``, once per partial index (queued or not): each
# reads the pending items in range of it only. An abandon is scheduled at
# creation and never attempted yet; it keeps that shape when pulled in.
_SQL_PULL_IN_SCHEDULED = (
    "UPDATE outbox INDEXED BY {index} SET next_attempt_at = :scheduled_to, created_at = :now "
    "WHERE status = 'pending' AND queued = {queued} AND next_attempt_at > :scheduled_by "
    "AND attempts = 0 AND next_attempt_at > created_at"
)
_SQL_PULL_IN_DUE = (
    "UPDATE outbox INDEXED BY {index} SET next_attempt_at = :now "
    "WHERE status = 'pending' AND queued = {queued} AND next_attempt_at > :due_by "
    "AND (attempts <= attempts_settled OR next_attempt_at > :uncertain_by) "
    "AND NOT (attempts = 0 AND next_attempt_at > created_at)"
)
_SQL_PULL_IN_LEASES = (
    "UPDATE outbox INDEXED BY outbox_due SET lease_until = :now "
    "WHERE status = 'pending' AND queued = 0 AND lease_until > :lease_by"
)
_SQL_UPDATE_OUTBOX = f"UPDATE outbox SET {_assignments(OUTBOX_MUTABLE)} WHERE id = :id"
_SQL_UPDATE_LEASED_OUTBOX = f"{_SQL_UPDATE_OUTBOX} AND lease_owner = :leased_by"
_SQL_GET_SESSION = f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?"
# A write that changes nothing: the newest migration's row rewritten as it is.
_WRITE_PROBE = (
    "UPDATE schema_version SET version = version"
    " WHERE version = (SELECT MAX(version) FROM schema_version)"
)


@functools.lru_cache(maxsize=64)
def _session_update_sql(columns: tuple[str, ...]) -> str:
    return f"UPDATE sessions SET {_assignments(columns)} WHERE id = :id"


_SQL_GET_OUTBOX = f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?"
_SQL_GET_USER = f"SELECT {USER_COLUMNS} FROM users WHERE id = ?"
# Sessions HITL_RETENTION deletes, oldest first (index sessions_ended; the
# state condition is the index's own). One with a pending outbox item waits:
# its attempt may still log an event for it.
_SQL_ENDED_SESSIONS = (
    "SELECT id FROM sessions WHERE state IN ('ended', 'failed') AND ended_at < ? "
    "AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.session_id = sessions.id "
    "AND outbox.status = 'pending') ORDER BY ended_at, id LIMIT ?"
)


class _Queries:
    """Read queries shared by the store's reads and transactions.

    ``conn`` is asked for the connection at every attempt: the store reads
    on the writer connection while no write transaction is open on it (its
    page cache is warm) and on the read-only connection otherwise (it sees
    committed rows only).
    """

    def __init__(
        self, conn: Callable[[], sqlite3.Connection], busy_timeout: float, *, yields: bool
    ) -> None:
        self._conn = conn
        self._busy_timeout = busy_timeout
        self._yields = yields

    async def _one(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> dict[str, Any] | None:
        if self._yields:
            await asyncio.sleep(0)  # let other tasks run (module docstring)

        def query() -> dict[str, Any] | None:
            cursor = self._conn().execute(sql, params)
            row = cursor.fetchone()
            return None if row is None else _rows(cursor, sql, (row,))[0]

        return await _retry_busy(query, self._busy_timeout)

    async def _all(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        if self._yields:
            await asyncio.sleep(0)  # let other tasks run (module docstring)

        def query() -> list[dict[str, Any]]:
            cursor = self._conn().execute(sql, params)
            return _rows(cursor, sql, cursor.fetchall())

        return await _retry_busy(query, self._busy_timeout)

    async def get_user(self, user_id: str) -> User | None:
        row = await self._one(_SQL_GET_USER, (user_id,))
        return None if row is None else user_from_row(row)

    async def get_session(self, session_id: str) -> Session | None:
        row = await self._one(_SQL_GET_SESSION, (session_id,))
        return None if row is None else session_from_row(row)

    async def get_provider_user(self, user_id: str, provider: str) -> ProviderUser | None:
        row = await self._one(
            "SELECT external_user_id, state FROM provider_users WHERE user_id = ? AND provider = ?",
            (user_id, provider),
        )
        return None if row is None else provider_user_from_row(row)

    async def get_outbox(self, item_id: str) -> OutboxItem | None:
        row = await self._one(_SQL_GET_OUTBOX, (item_id,))
        return None if row is None else outbox_from_row(row)


class SqliteTx(_Queries):
    """A write transaction on the writer connection (a savepoint in a batch)."""

    def __init__(self, conn: sqlite3.Connection, busy_timeout: float) -> None:
        super().__init__(lambda: conn, busy_timeout, yields=False)
        self._writer = self.connection = conn
        self.last_seq = 0
        # Session rows as stored (column text), as this transaction read or
        # wrote them: update_session writes only the columns that changed.
        self._stored: dict[str, dict[str, Any]] = {}

    async def _session(self, sql: str, params: Sequence[Any]) -> Session | None:
        def query() -> tuple[tuple[str, ...], list[str], tuple[Any, ...]] | None:
            cursor = self._writer.execute(sql, params)
            row = cursor.fetchone()
            return None if row is None else (*_columns(cursor, sql), row)

        found = await _retry_busy(query, self._busy_timeout)
        if found is None:
            return None
        names, stamps, values = found
        stored = dict(zip(names, values, strict=True))
        session = session_from_row(_stamped(stored.copy(), stamps))
        self._stored[session.id] = stored
        return session

    async def _exec(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        def execute() -> int:
            return self._writer.execute(sql, params).rowcount

        return await _retry_busy(execute, self._busy_timeout)

    # --- users ---------------------------------------------------------------
    async def get_user_by_external_id(self, external_id: str) -> User | None:
        row = await self._one(
            f"SELECT {USER_COLUMNS} FROM users WHERE external_id = ?", (external_id,)
        )
        return None if row is None else user_from_row(row)

    async def insert_user(self, user: User) -> None:
        try:
            await self._exec(_SQL_INSERT_USER, _params(_user_values(user)))
        except sqlite3.IntegrityError as exc:
            raise DuplicateKey("users.external_id") from exc

    async def update_user(self, user: User) -> None:
        values = _user_values(user)
        await self._exec(
            "UPDATE users SET name = :name, email = :email, picture_url = :picture_url, "
            "updated_at = :updated_at WHERE id = :id",
            _params(values),
        )

    async def put_provider_user(self, user_id: str, provider: str, user: ProviderUser) -> None:
        await self._exec(
            "INSERT INTO provider_users (user_id, provider, external_user_id, state, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (user_id, provider) DO UPDATE SET "
            "external_user_id = excluded.external_user_id, state = excluded.state, "
            "updated_at = excluded.updated_at",
            (user_id, provider, user.external_user_id, dumps(user.state), _ts(datetime.now(UTC))),
        )

    # --- sessions ------------------------------------------------------------
    async def get_session(self, session_id: str) -> Session | None:
        return await self._session(_SQL_GET_SESSION, (session_id,))

    async def find_open_session(self, user_id: str, provider: str) -> Session | None:
        return await self._session(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND provider = ? "
            f"AND state IN ({', '.join('?' * len(_OPEN))})",
            (user_id, provider, *_OPEN),
        )

    async def find_session_by_chat(self, provider: str, external_chat_id: str) -> Session | None:
        return await self._session(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE provider = ? AND external_chat_id = ? "
            "ORDER BY created_at DESC, id DESC LIMIT 1",
            (provider, external_chat_id),
        )

    async def last_session_with_chat(self, user_id: str, provider: str) -> Session | None:
        return await self._session(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND provider = ? "
            "AND external_chat_id != '' ORDER BY created_at DESC, id DESC LIMIT 1",
            (user_id, provider),
        )

    async def has_starting_sessions(self, provider: str) -> bool:
        # Asked for every webhook event about a chat that is not ours: through
        # sessions_starting (migration 0009), which holds the starts in flight
        # only; the provider's index would walk every session ever kept, and
        # sessions_open every open one.
        row = await self._one(
            "SELECT 1 AS one FROM sessions INDEXED BY sessions_starting "
            "WHERE provider = ? AND state = 'starting' LIMIT 1",
            (provider,),
        )
        return row is not None

    async def insert_session(self, session: Session) -> None:
        values = _params(session_values(session))
        try:
            await self._exec(_SQL_INSERT_SESSION, values)
            self._stored[session.id] = values
        except sqlite3.IntegrityError as exc:
            existing = await self.find_open_session(session.user_id, session.provider)
            if existing is None:
                raise  # not the one-open rule (a duplicate id, an unknown user)
            raise OpenSessionExists(existing.id) from exc

    async def update_session(self, session: Session) -> None:
        values = _params(session_values(session))
        stored = self._stored.get(session.id)
        if stored is None:
            await self._exec(_SQL_UPDATE_SESSION, values)
        else:
            # Only what changed: fewer index updates (state and the chat id
            # are indexed), and nothing at all when nothing changed.
            changed = tuple(c for c in _SESSION_UPDATE if values[c] != stored.get(c))
            if changed:
                await self._exec(_session_update_sql(changed), values)
        self._stored[session.id] = values

    # --- events --------------------------------------------------------------
    async def append_event(
        self, session_id: str, user_id: str, occurred_at: datetime, kind: LogKind
    ) -> int:
        tag, data = kind_to_json(kind)
        params = (session_id, user_id, _ts(occurred_at), tag, dumps(data))

        def insert() -> int | None:
            return self._writer.execute(
                "INSERT INTO events (session_id, user_id, occurred_at, kind, data) "
                "VALUES (?, ?, ?, ?, ?)",
                params,
            ).lastrowid

        seq = await _retry_busy(insert, self._busy_timeout)
        assert seq is not None  # an INSERT into a rowid table always sets it
        self.last_seq = seq
        return seq

    async def claim_dedupe_key(self, provider: str, key: str, now: datetime) -> bool:
        added = await self._exec(
            "INSERT INTO dedupe_keys (provider, key, created_at) VALUES (?, ?, ?) "
            "ON CONFLICT DO NOTHING",
            (provider, key, _ts(now)),
        )
        return added == 1

    async def take_turn(
        self, job: str, now: datetime, until: datetime, *, stale_after: datetime | None = None
    ) -> bool:
        taken = await self._exec(
            "INSERT INTO upkeep_turns (job, until) VALUES (?, ?) ON CONFLICT (job) "
            "DO UPDATE SET until = excluded.until "
            "WHERE upkeep_turns.until <= ? OR upkeep_turns.until > ?",  # NULL: never
            (job, _ts(until), _ts(now), _ts(stale_after)),
        )
        return taken == 1

    async def park_event(self, provider: str, event: InboundEvent, now: datetime) -> None:
        await self._exec(
            "INSERT INTO parked_events (provider, external_chat_id, event, created_at) "
            "VALUES (?, ?, ?, ?)",
            (provider, event.external_chat_id, inbound_to_json(event), _ts(now)),
        )

    async def lock_chat(self, provider: str, external_chat_id: str) -> None:
        """See base class: transactions run one at a time here already."""

    async def take_parked_events(self, provider: str, external_chat_id: str) -> list[InboundEvent]:
        rows = await self._all(
            "SELECT id, event FROM parked_events WHERE provider = ? AND external_chat_id = ? "
            "ORDER BY id",
            (provider, external_chat_id),
        )
        if rows:
            await self._exec(
                "DELETE FROM parked_events WHERE provider = ? AND external_chat_id = ?",
                (provider, external_chat_id),
            )
        return readable(rows, parked_from_row, "parked_events")

    # --- idempotency -----------------------------------------------------------
    async def get_idempotency(self, scope: str, key: str) -> IdempotencyRecord | None:
        row = await self._one(
            "SELECT scope, key, request_hash, resource_id, created_at FROM idempotency "
            "WHERE scope = ? AND key = ?",
            (scope, key),
        )
        return None if row is None else IdempotencyRecord(**row)

    async def put_idempotency(self, record: IdempotencyRecord) -> None:
        try:
            await self._exec(
                "INSERT INTO idempotency (scope, key, request_hash, resource_id, created_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    record.scope,
                    record.key,
                    record.request_hash,
                    record.resource_id,
                    _ts(record.created_at),
                ),
            )
        except sqlite3.IntegrityError as exc:
            raise DuplicateKey("idempotency") from exc

    async def delete_idempotency(self, scope: str, key: str) -> None:
        await self._exec("DELETE FROM idempotency WHERE scope = ? AND key = ?", (scope, key))

    # --- outbox ------------------------------------------------------------------
    async def insert_outbox(self, item: OutboxItem) -> bool:
        ahead = await self._one(
            "SELECT 1 AS one FROM outbox WHERE session_id = ? AND status = 'pending' LIMIT 1",
            (item.session_id,),
        )
        values = _params(outbox_values(item))
        values["queued"] = ahead is not None
        await self._exec(_SQL_INSERT_OUTBOX, values)
        return ahead is None

    async def update_outbox(self, item: OutboxItem, *, leased_by: str = "") -> bool:
        values = _params(outbox_update_values(item))
        if not leased_by:
            updated = await self._exec(_SQL_UPDATE_OUTBOX, values) == 1
        else:
            values["leased_by"] = leased_by
            updated = await self._exec(_SQL_UPDATE_LEASED_OUTBOX, values) == 1
        if updated and item.status is not OutboxStatus.PENDING:
            await self._exec(_SQL_UNQUEUE_HEAD, (item.session_id,))
        return updated

    async def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        rows = await self._all(
            # INDEXED BY: without it SQLite walks the whole table in pos
            # order (done items included) to avoid a sort of a few rows. The
            # index leaves queued items out; the order check still guards
            # those an older release stored (never marked queued).
            f"SELECT {OUTBOX_COLUMNS} FROM outbox o INDEXED BY outbox_due "
            "WHERE o.status = 'pending' AND o.queued = 0 "
            "AND o.next_attempt_at <= :now AND (o.lease_until IS NULL OR o.lease_until <= :now) "
            "AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.session_id = o.session_id "
            "AND p.status = 'pending' AND p.pos < o.pos) ORDER BY o.pos LIMIT :limit",
            {"now": _ts(now), "limit": limit},
        )
        # Unreadable ones are leased too (as on PostgreSQL): looked at again,
        # and logged, once a lease, not at every claim.
        for row in rows:
            await self._exec(
                "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE id = ?",
                (owner, _ts(lease_until), row["id"]),
            )
        items = readable(rows, outbox_from_row, "outbox")
        for item in items:
            item.lease_owner = owner
            item.lease_until = lease_until
        return items

    async def fail_pending_outbox(
        self, session_id: str, now: datetime, code: str, message: str
    ) -> list[str]:
        # Not the sends an attempt may have reached the provider with (in
        # flight, or cut off by a crash): their attempt settles them.
        rows = await self._all(
            "SELECT id FROM outbox WHERE session_id = ? AND status = 'pending' AND kind = 'send' "
            "AND attempts <= attempts_settled",
            (session_id,),
        )
        ids = [r["id"] for r in rows]
        if ids:
            await self._exec(
                "UPDATE outbox SET status = 'failed', error_code = ?, last_error = ?, "
                "done_at = ?, lease_owner = '', lease_until = NULL "
                "WHERE session_id = ? AND status = 'pending' AND kind = 'send' "
                "AND attempts <= attempts_settled",
                (code, message, _ts(now), session_id),
            )
            await self._exec(_SQL_UNQUEUE_HEAD, (session_id,))
        return ids

    async def add_dead_letter(self, letter: DeadLetter) -> None:
        await self._exec(
            "INSERT INTO dead_letters (id, provider, received_at, reason, body) "
            "VALUES (?, ?, ?, ?, ?)",
            (letter.id, letter.provider, _ts(letter.received_at), letter.reason, letter.body),
        )


def _user_values(user: User) -> dict[str, Any]:
    return {
        "id": user.id,
        "name": user.name,
        "email": user.email,
        "picture_url": user.picture_url,
        "external_id": user.external_id or None,
        "created_at": user.created_at,
        "updated_at": user.updated_at,
    }


def _checkpoint(conn: sqlite3.Connection, mode: str) -> tuple[int, int, int]:
    """A checkpoint: (busy, frames in the WAL, frames copied)."""
    busy, frames, copied = conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
    return int(busy), int(frames), int(copied)


def _check_writable(conn: sqlite3.Connection) -> None:
    """Fails unless a write goes through. SQLite opens a file it may not
    write (its owner or mode, a read-only mount) read-only without a word:
    reads work, every write fails. A write rolled back finds out at start.

    Raises:
        sqlite3.OperationalError: "attempt to write a readonly database".
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_WRITE_PROBE)
    finally:
        conn.execute("ROLLBACK")


# Below this, a failing open names the free space: SQLite says only "disk
# I/O error" when it cannot grow its shared-memory file on a full disk, and
# the write-ahead log alone takes 10-25 MB under load.
_LOW_FREE_BYTES = 32 * 1024 * 1024


def _free_space_note(path: Path) -> str:
    """ " (its file system has N MB free)" when that is next to nothing."""
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return ""
    if free >= _LOW_FREE_BYTES:
        return ""
    return f" (its file system has {free / 1e6:.1f} MB free)"


def _close_all(conns: Sequence[sqlite3.Connection]) -> None:
    for conn in conns:
        conn.close()


# SQLite means one process: a serving store holds an exclusive lock on
# "<database>.lock" (flock) while it is open, so a second `serve` on the same
# file stops at start instead of serving a replica whose stream heads,
# buffers and upkeep assume they are alone. Counted per process: stores of
# one process (tests, a restart in place) share the lock.
_held_lock = threading.Lock()
_held: dict[str, tuple[int, int]] = {}  # lock file -> (descriptor, stores holding it)


def _take_process_lock(path: Path) -> str:
    """Takes the lock of ``path``'s database for this process; returns its key.

    Raises:
        StoreUnavailable: Another process holds it.
        OSError: The lock file cannot be created.
    """
    key = os.path.abspath(f"{path}.lock")
    with _held_lock:
        if key in _held:
            fd, count = _held[key]
            _held[key] = (fd, count + 1)
            return key
        fd = os.open(key, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreUnavailable(
                f"SQLite database at {path} is in use by another process (its lock {key} is "
                "held): SQLite means one hitl-service process; use PostgreSQL for replicas"
            ) from None
        except OSError:
            os.close(fd)
            raise
        _held[key] = (fd, 1)
        return key


def _create_private(path: Path) -> None:
    """Creates the database file readable by its owner only, unless it exists.

    It holds the provider's credentials for each user (LiveChat customer
    tokens and identity cookies) and every transcript; sqlite3 would create
    it with the umask's mode (0644 as a rule: readable by every local user),
    and SQLite gives its ``-wal`` and ``-shm`` files the database's mode. An
    existing file keeps the mode it has.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _release_process_lock(key: str) -> None:
    with _held_lock:
        fd, count = _held[key]
        if count > 1:
            _held[key] = (fd, count - 1)
            return
        del _held[key]
        os.close(fd)  # releases the flock


class _Batch:
    """Logical transactions sharing one SQLite transaction (group commit)."""

    __slots__ = ("committed", "last_seq", "members")

    def __init__(self, committed: asyncio.Future[None]) -> None:
        self.committed = committed
        self.last_seq = 0
        self.members = 0


class _Transaction:
    """``async with store.transaction() as tx`` (a class, not a generator:
    every write runs through it)."""

    __slots__ = ("_batch", "_joined", "_lazy", "_store", "_tx")

    def __init__(self, store: SqliteStore, lazy: bool) -> None:
        self._store = store
        self._lazy = lazy

    async def __aenter__(self) -> SqliteTx:
        self._tx, self._batch, self._joined = await self._store._join()
        return self._tx

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if exc_type is not None and issubclass(exc_type, StoreUnavailable):
            self._store._write_failed = True
        await self._store._leave(
            self._tx, self._batch, self._joined, failed=exc_type is not None, lazy=self._lazy
        )


class SqliteStore:
    """``Store`` on one SQLite file."""

    backend = "sqlite"

    def __init__(
        self,
        path: Path,
        *,
        busy_timeout_ms: int = 5000,
        activity: Activity | None = None,
        synchronous: Literal["normal", "full"] = "normal",
        exclusive: bool = False,
    ) -> None:
        self._path = path
        # True for a serving process: no other process may open the file.
        self._exclusive = exclusive
        self._lock_key: str | None = None
        self._synchronous = synchronous
        self._activity = activity or Activity()
        self._busy_timeout = busy_timeout_ms / 1000
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._checkpointer: sqlite3.Connection | None = None
        self._reads: _Queries | None = None
        self._write_lock = asyncio.Lock()
        self._batch: _Batch | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._lazy: asyncio.TimerHandle | None = None  # when a lazy COMMIT stops waiting
        self._entering = 0  # callers of transaction() not yet holding the write lock
        self._gathered = 1.0  # moving average of members per COMMIT that waited a turn
        self._ends = 0
        self._head = 0
        self._changed = asyncio.Event()
        self._commits = 0
        self._checkpoint: asyncio.Task[None] | None = None
        self._write_failed = False  # the last write failed: ping() tries one
        self._file: tuple[int, int] | None = None  # (device, inode) of the file opened

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    async def open(self) -> None:
        """See base class."""
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StoreUnavailable(
                f"SQLite {sqlite3.sqlite_version} is too old; 3.24 or newer is needed"
            )
        # The thread runs on when the open is cancelled (a SIGTERM during the
        # start): closing waits for it, or it would close a connection the
        # thread is using and miss the ones it opens after.
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_blocking))
        try:
            await asyncio.shield(opening)
            self._reads = _Queries(self._read_connection, self._busy_timeout, yields=True)
            self._head = await self._read_head()
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreUnavailable(
                f"cannot open SQLite database at {self._path}: {exc}{_free_space_note(self._path)}"
            ) from exc
        except BaseException:
            await asyncio.gather(opening, return_exceptions=True)
            await self.close()  # connections and the process lock
            raise

    def _open_blocking(self) -> None:
        if str(self._path) != ":memory:":
            self._path.parent.mkdir(parents=True, exist_ok=True)
            if self._exclusive and self._lock_key is None:
                self._lock_key = _take_process_lock(self._path)
            _create_private(self._path)
        self._writer = self._connect(self._busy_timeout)
        if str(self._path) != ":memory:":
            opened = os.stat(self._path)
            self._file = (opened.st_dev, opened.st_ino)
        self._migrate(self._writer)
        _check_writable(self._writer)
        self._writer.execute("PRAGMA busy_timeout = 0")  # waits are async (_retry_busy)
        self._writer.execute("PRAGMA wal_autocheckpoint = 0")  # done off the loop
        self._writer.execute(f"PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}")
        self._reader = self._connect(0)
        self._reader.execute("PRAGMA query_only = ON")
        if str(self._path) != ":memory:":
            # Its waits are for readers only (PASSIVE never waits): see RESTART_WAIT_MS.
            self._checkpointer = self._connect(RESTART_WAIT_MS / 1000)

    def _connect(self, busy_timeout: float) -> sqlite3.Connection:
        # check_same_thread=False: opened in a worker thread, used on the loop.
        conn = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        for pragma in (
            "journal_mode = WAL",
            f"synchronous = {self._synchronous.upper()}",
            "foreign_keys = ON",
            f"busy_timeout = {int(busy_timeout * 1000)}",
        ):
            conn.execute(f"PRAGMA {pragma}")
        return conn

    def _check_file(self) -> None:
        """Fails once the file opened is no longer at its path.

        Deleted, or replaced by another file (a restore by ``mv``), it still
        takes writes, through the descriptors open on it; the next start
        opens what the path holds then, without them.

        Raises:
            StoreUnavailable: The path holds no file, or another one.
        """
        if self._file is None:
            return
        try:
            now = os.stat(self._path)
        except OSError as exc:
            now_at: tuple[int, int] | None = None
            error = str(exc)
        else:
            now_at, error = (now.st_dev, now.st_ino), "another file is there"
        if now_at != self._file:
            raise StoreUnavailable(
                f"the SQLite database file {self._path} was deleted or replaced while the "
                f"service had it open ({error}): what it writes now would be lost at the next "
                "start; restart the service"
            )

    def _read_connection(self) -> sqlite3.Connection:
        """The writer while it has no transaction open (warm cache), else the reader.

        A read on the writer outside a transaction sees committed rows only;
        while a batch is open on it, reads go to the read-only connection so
        nobody ever sees a row before its commit.
        """
        writer, reader = self._writer, self._reader
        if writer is None or reader is None:
            raise StoreUnavailable("the store is closed")
        return reader if writer.in_transaction else writer

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        current = conn.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
        known = migrations("sqlite")
        warn_if_newer("sqlite", current, known)
        for version, sql in known:
            if version <= current:
                continue
            log.info("store.migrate", backend="sqlite", version=version)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements(sql):
                    conn.execute(statement)
                conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, _ts(datetime.now(UTC))),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    async def close(self) -> None:
        """See base class."""
        if self._batch is not None:  # a batch waits (lazy, or for its flush): commit it
            async with self._write_lock:
                if self._batch is not None:
                    self._commit(self._batch)
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        if self._checkpoint is not None:
            await asyncio.gather(self._checkpoint, return_exceptions=True)
            self._checkpoint = None
        # Under the write lock: a transaction (or a BEGIN waiting out a busy
        # database between its retries) still holds the writer otherwise,
        # and would run on it while a worker thread closes it (a crash in
        # SQLite's C code, not an error). Reads ask for their connection at
        # every attempt, so they see the store closed.
        async with self._write_lock:
            if self._batch is not None:
                # One that ended while this waited for the lock, its COMMIT
                # left to a flush queued behind this: it would find the
                # writer closed, and its members a StoreUnavailable. No
                # checkpoint task for it: the one below takes the WAL.
                self._commits = 0
                self._commit(self._batch)
            if self._checkpointer is not None:
                try:  # leave a short WAL behind
                    await asyncio.to_thread(
                        self._checkpointer.execute, "PRAGMA wal_checkpoint(TRUNCATE)"
                    )
                except sqlite3.Error as exc:
                    log.warning("store.checkpoint_failed", backend="sqlite", error=str(exc))
            conns = [c for c in (self._reader, self._writer, self._checkpointer) if c is not None]
            self._reader = self._writer = self._checkpointer = None
            self._reads = None
        self._changed.set()
        if conns:
            await asyncio.to_thread(_close_all, conns)
        if self._lock_key is not None:
            _release_process_lock(self._lock_key)
            self._lock_key = None

    def _queries(self) -> _Queries:
        if self._reads is None:
            raise StoreUnavailable("the store is closed")
        return self._reads

    async def ping(self) -> None:
        """See base class.

        A read answers even when the file takes no writes (full disk, I/O
        error, read-only mount), so once a write has failed, and until one
        succeeds, the ping is a write: one row rewritten with its own value.
        A file deleted or replaced while open fails it too (``_check_file``).
        """
        self._check_file()
        try:
            await self._queries()._one("SELECT 1 AS one", ())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite does not answer: {exc}") from exc
        if self._write_failed:
            async with self.transaction() as tx:
                await tx._exec(_WRITE_PROBE)

    async def schema_version(self) -> int:
        """See base class."""
        row = await self._queries()._one("SELECT MAX(version) AS v FROM schema_version", ())
        return int(row["v"] or 0) if row else 0

    async def database_time(self) -> datetime | None:
        """See base class: one process, one clock."""
        return None

    def transaction(self, *, lazy: bool = False) -> _Transaction:
        """See base class.

        Group commit: a transaction is a savepoint inside the writer's open
        SQLite transaction (the first member is that transaction itself), and
        one COMMIT makes every member of the batch durable at once. A body
        that ends while other callers are on their way to the write lock
        leaves the COMMIT to a task that runs after them, so they join its
        batch, and so does one that ends while other requests are in
        progress (``Activity``): their transactions may come within that
        turn. While such waits gather members (a moving average of at least
        ``_WAITING_PAYS``), every COMMIT waits; otherwise a body that ends
        with nobody coming and no other request at work commits at once (no
        added latency without concurrency), except every ``_PROBE_EVERY``-th,
        which waits to notice load. Each caller's ``async with`` exits only
        after that COMMIT, so nothing is acknowledged or announced before it
        is committed; if the COMMIT fails, every member raises
        ``StoreUnavailable``. Bodies still run one at a time (the write
        lock), so each sees the effects of the ones before it, exactly as
        serial transactions would. A ``lazy`` body that would commit at once
        leaves its batch open instead, for up to ``LAZY_COMMIT_DELAY``: the
        next transaction joins it and its COMMIT takes both.
        """
        return _Transaction(self, lazy)

    async def _join(self) -> tuple[SqliteTx, _Batch, bool]:
        """Takes the write lock and joins (or begins) the open batch.

        Returns the member's ``SqliteTx``, its batch, and whether it joined a
        batch that already had members (and so runs in a savepoint).
        """
        self._entering += 1
        try:
            await asyncio.sleep(0)  # let other tasks run (module docstring)
            await self._write_lock.acquire()
        finally:
            self._entering -= 1
        try:
            conn = self._writer
            if conn is None:
                raise StoreUnavailable("the store is closed")
            batch = self._batch
            if batch is None:
                try:
                    await _retry_busy(lambda: conn.execute("BEGIN IMMEDIATE"), self._busy_timeout)
                except StoreUnavailable:
                    self._write_failed = True
                    raise
                except sqlite3.Error as exc:
                    self._write_failed = True
                    raise StoreUnavailable(f"SQLite refused a write: {exc}") from exc
                batch = self._batch = _Batch(asyncio.get_running_loop().create_future())
            # The first member needs no savepoint: undoing it is a ROLLBACK.
            joined = batch.members > 0
            if joined:
                conn.execute("SAVEPOINT tx")
        except BaseException:
            self._write_lock.release()
            raise
        return SqliteTx(conn, self._busy_timeout), batch, joined

    async def _leave(
        self, tx: SqliteTx, batch: _Batch, joined: bool, *, failed: bool, lazy: bool
    ) -> None:
        """Ends a member: undone if its body failed, else committed with its batch."""
        try:
            conn = tx.connection
            if failed:
                self._undo(conn, batch)
                return
            if joined:
                conn.execute("RELEASE tx")
            batch.members += 1
            batch.last_seq = max(batch.last_seq, tx.last_seq)
            self._ends += 1
            if not (
                self._entering
                or self._activity.others()
                or self._gathered >= _WAITING_PAYS
                or self._ends % _PROBE_EVERY == 0
            ):
                if not lazy:
                    self._commit(batch)  # nobody would join: commit every member now
                elif self._lazy is None:
                    self._lazy = asyncio.get_running_loop().call_later(
                        LAZY_COMMIT_DELAY, self._lazy_due
                    )
            else:
                self._flush_soon()
        finally:
            self._write_lock.release()
        # Shielded: a cancelled caller must not cancel the batch's commit.
        await asyncio.shield(batch.committed)

    def _end_batch(self) -> None:
        self._batch = None
        if self._lazy is not None:
            self._lazy.cancel()
            self._lazy = None

    def _lazy_due(self) -> None:
        """A lazy COMMIT waited long enough: nobody came to share it."""
        self._lazy = None
        if self._batch is not None:
            self._flush_soon()

    def _flush_soon(self) -> None:
        """Has the open batch committed by a task of its own (if none is due)."""
        # A done one was cancelled before it could run (torn down with the loop).
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush(), name="sqlite-commit")

    def _undo(self, conn: sqlite3.Connection, batch: _Batch) -> None:
        """Rolls back one failed member; the batch goes on without it."""
        try:
            if conn.in_transaction:
                if batch.members == 0:
                    conn.execute("ROLLBACK")
                else:
                    conn.execute("ROLLBACK TO tx")
                    conn.execute("RELEASE tx")
        except sqlite3.Error as exc:
            log.warning("store.rollback_failed", backend="sqlite", error=str(exc))
        if conn.in_transaction:
            return
        # Nothing is open any more: the members before this one are gone too.
        self._end_batch()
        if batch.members:
            batch.committed.set_exception(
                StoreUnavailable("SQLite rolled the transaction back after an error")
            )
        else:
            batch.committed.set_result(None)

    async def _flush(self) -> None:
        """Commits the open batch (runs once the bodies ready now have joined it)."""
        async with self._write_lock:
            self._flusher = None
            if self._batch is not None:
                self._gathered += (self._batch.members - self._gathered) / 8
                self._commit(self._batch)

    def _commit(self, batch: _Batch) -> None:
        """COMMITs the open batch (write lock held) and tells its members."""
        self._end_batch()
        conn = self._writer
        if conn is None:
            batch.committed.set_exception(StoreUnavailable("the store is closed"))
            return
        try:
            self._check_file()
        except StoreUnavailable as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._write_failed = True
            batch.committed.set_exception(exc)
            return
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self._write_failed = True
            batch.committed.set_exception(StoreUnavailable(f"SQLite could not commit: {exc}"))
            return
        self._write_failed = False
        self._after_commit()
        if batch.last_seq > self._head:
            self._head = batch.last_seq
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
        batch.committed.set_result(None)

    def _after_commit(self) -> None:
        """Starts a checkpoint in a worker thread once the WAL has grown."""
        self._commits += 1
        if self._commits < CHECKPOINT_COMMITS or self._checkpointer is None:
            return
        if self._checkpoint is None or self._checkpoint.done():
            self._commits = 0
            self._checkpoint = asyncio.create_task(self._run_checkpoint(), name="sqlite-checkpoint")

    async def _run_checkpoint(self) -> None:
        """Copies the WAL into the database in a worker thread.

        SQLite restarts the WAL from its beginning only when a write begins
        right after a complete checkpoint; under a steady stream of commits a
        checkpoint in another thread never gets that moment, and the WAL grows
        without end (seen: 1.2 GB in 95 s at 250 commits/s). So once the WAL
        holds ``WAL_FORCE_FRAMES`` frames, a RESTART checkpoint runs with
        writes held off (they wait asynchronously; reads go on). The PASSIVE
        pass before it has copied the bulk, so writes wait only for the tail,
        and for readers at most ``RESTART_WAIT_MS``: one holding an older
        snapshot leaves the WAL as it is until a later checkpoint.
        """
        conn = self._checkpointer
        if conn is None:
            return
        try:
            _, frames, _ = await asyncio.to_thread(_checkpoint, conn, "PASSIVE")
            if frames >= WAL_FORCE_FRAMES:
                async with self._write_lock:
                    if self._batch is not None:
                        self._commit(self._batch)  # what is in the WAL is committed
                    await asyncio.to_thread(_checkpoint, conn, "RESTART")
        except sqlite3.Error as exc:
            log.warning("store.checkpoint_failed", backend="sqlite", error=str(exc))

    async def get_user(self, user_id: str) -> User | None:
        """See base class."""
        return await self._queries().get_user(user_id)

    async def get_session(self, session_id: str) -> Session | None:
        """See base class."""
        return await self._queries().get_session(session_id)

    async def get_provider_user(self, user_id: str, provider: str) -> ProviderUser | None:
        """See base class."""
        return await self._queries().get_provider_user(user_id, provider)

    async def get_outbox(self, item_id: str) -> OutboxItem | None:
        """See base class."""
        return await self._queries().get_outbox(item_id)

    async def list_sessions(
        self,
        *,
        user_id: str,
        state: SessionState | None,
        before: tuple[datetime, str] | None,
        limit: int,
    ) -> list[Session]:
        """See base class."""
        where: list[str] = []
        params: list[Any] = []
        if user_id:
            where.append("user_id = ?")
            params.append(user_id)
        if state is not None:
            states = [state.value]
            if state is SessionState.REQUESTED:
                states.append(SessionState.STARTING.value)
            where.append(f"state IN ({', '.join('?' * len(states))})")
            params.extend(states)
        if before is not None:
            # A row value, not "created_at < ? OR (...)": SQLite seeks the
            # index to it; the OR form walked every row newer than the page
            # (a page deep in 100,000 sessions read all of them above it).
            where.append("(created_at, id) < (?, ?)")
            params.extend([_ts(before[0]), before[1]])
        index = ""
        if not user_id and state is not None and state.is_open:
            # Open sessions are few, the ended ones pile up: through
            # sessions_open (whose condition is repeated, so that it may),
            # sorted after; by creation it would walk the whole history.
            index = "INDEXED BY sessions_open"
            where.append("state NOT IN ('ended', 'failed')")
        elif not user_id and state is SessionState.FAILED:
            # Few among the ended ones: through their own index (its
            # condition repeated, so that it may).
            index = "INDEXED BY sessions_failed"
            where.append("state = 'failed'")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._queries()._all(
            f"SELECT {SESSION_COLUMNS} FROM sessions {index} {clause} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit),
        )
        return [session_from_row(r) for r in rows]

    async def list_open_sessions(self, *, after_id: str, limit: int) -> list[Session]:
        """See base class."""

        async def fetch(after: str, count: int) -> Sequence[Row]:
            return await self._queries()._all(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE state NOT IN ('ended', 'failed') "
                "AND id > ? ORDER BY id LIMIT ?",
                (after, count),
            )

        return await open_sessions_page(fetch, after_id, limit)

    async def read_events(
        self, *, after: int, limit: int, session_id: str = ""
    ) -> Sequence[LogEvent]:
        """See base class."""
        if session_id:
            sql = (
                "SELECT seq, session_id, user_id, occurred_at, kind, data FROM events "
                "WHERE session_id = ? AND seq > ? ORDER BY seq LIMIT ?"
            )
            params: tuple[Any, ...] = (session_id, after, limit)
        else:
            sql = (
                "SELECT seq, session_id, user_id, occurred_at, kind, data FROM events "
                "WHERE seq > ? ORDER BY seq LIMIT ?"
            )
            params = (after, limit)
        rows = await self._queries()._all(sql, params)
        return [event_from_row(r) for r in rows]

    async def _read_head(self) -> int:
        # sqlite_sequence keeps the newest cursor ever committed, even once
        # HITL_RETENTION pruned its event: a client resuming from it after a
        # restart must not be told its cursor is ahead of the log.
        row = await self._queries()._one(
            "SELECT MAX(COALESCE((SELECT MAX(seq) FROM events), 0), COALESCE((SELECT seq "
            "FROM sqlite_sequence WHERE name = 'events'), 0)) AS head",
            (),
        )
        return int(row["head"]) if row else 0

    async def head(self) -> int:
        """See base class."""
        return self._head

    async def wait_for_events(self, after: int, timeout: float) -> None:
        """See base class."""
        if self._head > after:
            return
        changed = self._changed
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return

    async def outbox_stats(self) -> tuple[int, datetime | None]:
        """See base class."""
        row = await self._queries()._one(
            f"SELECT {PENDING_NOW} AS n, "
            "MIN(MAX(next_attempt_at, COALESCE(lease_until, next_attempt_at))) AS next_attempt_at "
            "FROM outbox WHERE status = 'pending'",
            (),
        )
        if row is None:
            return 0, None
        return int(row["n"] or 0), row["next_attempt_at"]

    async def outbox_next_due(self, now: datetime) -> datetime | None:
        """See base class."""
        row = await self._queries()._one(_SQL_NEXT_DUE, {"now": _ts(now)})
        return None if row is None else row["next_attempt_at"]

    async def unqueue_stranded_outbox(self) -> int:
        """See base class."""
        async with self.transaction() as tx:
            return await tx._exec(_SQL_UNQUEUE_STRANDED, ())

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
        """See base class."""
        values = _params(
            {
                "now": now,
                "lease_by": lease_by,
                "due_by": due_by,
                "uncertain_by": uncertain_by,
                "scheduled_by": scheduled_by,
                "scheduled_to": scheduled_to,
            }
        )
        due = 0
        async with self.transaction() as tx:
            leases = await tx._exec(_SQL_PULL_IN_LEASES, values)
            for index, queued in (("outbox_due", 0), ("outbox_queued", 1)):
                for sql in (_SQL_PULL_IN_SCHEDULED, _SQL_PULL_IN_DUE):
                    due += await tx._exec(sql.format(index=index, queued=queued), values)
        return leases, due

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        """See base class."""
        rows = await self._queries()._all(
            "SELECT id, provider, received_at, reason, body FROM dead_letters "
            "ORDER BY received_at DESC LIMIT ?",
            (limit,),
        )
        return [DeadLetter(**r) for r in rows]

    async def prune(
        self,
        *,
        idempotency_before: datetime,
        dedupe_before: datetime,
        parked_before: datetime,
        sessions_before: datetime | None = None,
    ) -> int:
        """See base class. Deletes in batches of ``PRUNE_BATCH`` rows, one
        transaction each, so the event loop never stalls on a big delete."""
        removed = await self._prune_outbox(idempotency_before)
        if sessions_before is not None:
            removed += await self._prune_sessions(sessions_before)
        for table, key, condition, cutoff in (
            # idempotency has no rowid (migration 0002): its key is the row's.
            ("idempotency", "scope, key", "created_at < ?", idempotency_before),
            ("dedupe_keys", "rowid", "created_at < ?", dedupe_before),
            ("parked_events", "rowid", "created_at < ?", parked_before),
            # Dead letters hold message text too: kept as long as sessions.
            *(
                [("dead_letters", "rowid", "received_at < ?", sessions_before)]
                if sessions_before
                else []
            ),
        ):
            sql = (
                f"DELETE FROM {table} WHERE ({key}) IN "
                f"(SELECT {key} FROM {table} WHERE {condition} LIMIT {PRUNE_BATCH})"
            )
            while True:
                async with self.transaction() as tx:
                    count = await tx._exec(sql, (_ts(cutoff),))
                removed += count
                if count < PRUNE_BATCH:
                    break
                await asyncio.sleep(0)  # let requests in between batches
        return removed

    async def _prune_sessions(self, before: datetime) -> int:
        """Deletes sessions that ended before ``before``, and their events.

        A transaction takes the oldest ``PRUNE_BATCH`` such sessions (index
        ``sessions_ended``), deletes up to ``PRUNE_BATCH`` of their events,
        then those of them left without events: a batch of long sessions
        takes several transactions, none more than two batches of rows.
        """
        removed, cutoff = 0, _ts(before)
        while True:
            # The batch is the same query in each statement: nothing else
            # runs inside a transaction's statements (no JSON1 or 2000 bound
            # parameters needed, which older SQLite builds lack).
            async with self.transaction() as tx:
                if not await tx._one(_SQL_ENDED_SESSIONS, (cutoff, 1)):
                    return removed
                removed += await tx._exec(
                    "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE session_id "
                    f"IN ({_SQL_ENDED_SESSIONS}) LIMIT ?)",
                    (cutoff, PRUNE_BATCH, PRUNE_BATCH),
                )
                removed += await tx._exec(
                    f"DELETE FROM sessions WHERE id IN ({_SQL_ENDED_SESSIONS}) "
                    "AND NOT EXISTS (SELECT 1 FROM events WHERE events.session_id = sessions.id)",
                    (cutoff, PRUNE_BATCH),
                )
            await asyncio.sleep(0)  # let requests in between batches

    async def _prune_outbox(self, before: datetime) -> int:
        """Deletes outbox items finished before ``before``, walking the table
        in ``pos`` order, ``PRUNE_BATCH`` rows a transaction.

        Finished items have no index of their own (it would cost every
        settle a page): a query for them would scan every row kept, 48 hours
        of messages, in one statement on the loop. Rows are in creation
        order, and an item finishes after it is created, so the walk stops at
        the first batch that reaches items created after ``before``.
        """
        cutoff, after, removed = _ts(before), -1, 0
        while True:
            async with self.transaction() as tx:
                batch = await tx._one(
                    "SELECT count(*) AS n, max(pos) AS last, max(created_at) AS newest FROM "
                    "(SELECT pos, created_at FROM outbox WHERE pos > ? ORDER BY pos LIMIT ?)",
                    (after, PRUNE_BATCH),
                )
                if batch is None or not batch["n"]:
                    return removed
                removed += await tx._exec(
                    "DELETE FROM outbox WHERE pos > ? AND pos <= ? "
                    "AND status != 'pending' AND done_at < ?",
                    (after, batch["last"], cutoff),
                )
            if batch["n"] < PRUNE_BATCH or batch["newest"] >= cutoff:
                return removed
            after = batch["last"]
            await asyncio.sleep(0)  # let requests in between batches
