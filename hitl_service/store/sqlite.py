"""The embedded store: one SQLite file in WAL mode, one process.

One writer connection serialized by an asyncio lock (``BEGIN IMMEDIATE``,
so a transaction never has to upgrade a read lock and fail with
SQLITE_BUSY), one read-only connection for queries, and an in-process
wake-up for event readers. Several processes on one file are not supported:
use PostgreSQL for replicas.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
import structlog

from hitl_service.codec import kind_to_json
from hitl_service.domain import (
    OPEN_STATES,
    DeadLetter,
    IdempotencyRecord,
    LogEvent,
    OutboxItem,
    Session,
    SessionState,
    User,
)
from hitl_service.errors import StoreUnavailable
from hitl_service.store.base import DuplicateKey, OpenSessionExists
from hitl_service.store.migrations import migrations, statements
from hitl_service.store.rows import (
    OUTBOX_COLUMNS,
    SESSION_COLUMNS,
    USER_COLUMNS,
    dumps,
    event_from_row,
    inbound_from_json,
    inbound_to_json,
    outbox_from_row,
    outbox_values,
    provider_user_from_row,
    session_from_row,
    session_values,
    user_from_row,
    utc,
)
from providers.types import InboundEvent, LogKind, ProviderUser

log = structlog.get_logger(__name__)

_MIN_SQLITE = (3, 24, 0)  # ON CONFLICT ... DO NOTHING
_TS_COLUMNS = frozenset(
    {
        "created_at",
        "updated_at",
        "ended_at",
        "stop_requested_at",
        "last_activity_at",
        "occurred_at",
        "next_attempt_at",
        "lease_until",
        "done_at",
        "received_at",
    }
)
_OPEN = tuple(s.value for s in OPEN_STATES)


def _ts(value: datetime | None) -> str | None:
    """datetime → fixed-width UTC text, so text order is time order."""
    if value is None:
        return None
    return utc(value).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _row(row: sqlite3.Row) -> dict[str, Any]:
    """A row as a dict with timestamp columns parsed."""
    out = dict(zip(row.keys(), tuple(row), strict=True))
    for key in _TS_COLUMNS.intersection(out):
        if out[key] is not None:
            out[key] = datetime.fromisoformat(out[key])
    return out


def _params(values: Mapping[str, Any]) -> dict[str, Any]:
    """Column values with datetimes as text."""
    return {k: _ts(v) if isinstance(v, datetime) else v for k, v in values.items()}


def _placeholders(columns: str) -> str:
    return ", ".join(f":{c.strip()}" for c in columns.split(","))


def _assignments(columns: Iterable[str]) -> str:
    return ", ".join(f"{c} = :{c}" for c in columns)


class _Queries:
    """Read queries shared by the reader connection and transactions."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    async def _one(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> dict[str, Any] | None:
        async with self._conn.execute(sql, params) as cur:
            row = await cur.fetchone()
        return None if row is None else _row(row)

    async def _all(
        self, sql: str, params: Sequence[Any] | Mapping[str, Any]
    ) -> list[dict[str, Any]]:
        rows = await self._conn.execute_fetchall(sql, params)
        return [_row(r) for r in rows]

    async def get_user(self, user_id: str) -> User | None:
        row = await self._one(f"SELECT {USER_COLUMNS} FROM users WHERE id = ?", (user_id,))
        return None if row is None else user_from_row(row)

    async def get_session(self, session_id: str) -> Session | None:
        row = await self._one(f"SELECT {SESSION_COLUMNS} FROM sessions WHERE id = ?", (session_id,))
        return None if row is None else session_from_row(row)

    async def get_provider_user(self, user_id: str, provider: str) -> ProviderUser | None:
        row = await self._one(
            "SELECT external_user_id, state FROM provider_users WHERE user_id = ? AND provider = ?",
            (user_id, provider),
        )
        return None if row is None else provider_user_from_row(row)

    async def get_outbox(self, item_id: str) -> OutboxItem | None:
        row = await self._one(f"SELECT {OUTBOX_COLUMNS} FROM outbox WHERE id = ?", (item_id,))
        return None if row is None else outbox_from_row(row)


class SqliteTx(_Queries):
    """A write transaction on the writer connection."""

    def __init__(self, conn: aiosqlite.Connection) -> None:
        super().__init__(conn)
        self.last_seq = 0

    async def _exec(self, sql: str, params: Sequence[Any] | Mapping[str, Any] = ()) -> int:
        async with self._conn.execute(sql, params) as cur:
            return cur.rowcount

    # --- users ---------------------------------------------------------------
    async def get_user_by_external_id(self, external_id: str) -> User | None:
        row = await self._one(
            f"SELECT {USER_COLUMNS} FROM users WHERE external_id = ?", (external_id,)
        )
        return None if row is None else user_from_row(row)

    async def insert_user(self, user: User) -> None:
        try:
            await self._exec(
                f"INSERT INTO users ({USER_COLUMNS}) VALUES ({_placeholders(USER_COLUMNS)})",
                _params(_user_values(user)),
            )
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
    async def find_open_session(self, user_id: str, provider: str) -> Session | None:
        row = await self._one(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND provider = ? "
            f"AND state IN ({', '.join('?' * len(_OPEN))})",
            (user_id, provider, *_OPEN),
        )
        return None if row is None else session_from_row(row)

    async def find_session_by_chat(self, provider: str, external_chat_id: str) -> Session | None:
        row = await self._one(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE provider = ? AND external_chat_id = ? "
            "ORDER BY created_at DESC, id DESC LIMIT 1",
            (provider, external_chat_id),
        )
        return None if row is None else session_from_row(row)

    async def last_session_with_chat(self, user_id: str, provider: str) -> Session | None:
        row = await self._one(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE user_id = ? AND provider = ? "
            "AND external_chat_id != '' ORDER BY created_at DESC, id DESC LIMIT 1",
            (user_id, provider),
        )
        return None if row is None else session_from_row(row)

    async def has_starting_sessions(self, provider: str) -> bool:
        row = await self._one(
            "SELECT 1 AS one FROM sessions WHERE provider = ? AND state = 'starting' LIMIT 1",
            (provider,),
        )
        return row is not None

    async def insert_session(self, session: Session) -> None:
        values = session_values(session)
        try:
            await self._exec(
                f"INSERT INTO sessions ({SESSION_COLUMNS}) "
                f"VALUES ({_placeholders(SESSION_COLUMNS)})",
                _params(values),
            )
        except sqlite3.IntegrityError as exc:
            existing = await self.find_open_session(session.user_id, session.provider)
            if existing is None:
                raise  # not the one-open rule (a duplicate id, an unknown user)
            raise OpenSessionExists(existing.id) from exc

    async def update_session(self, session: Session) -> None:
        values = session_values(session)
        columns = [c for c in values if c not in ("id", "user_id", "provider", "created_at")]
        await self._exec(
            f"UPDATE sessions SET {_assignments(columns)} WHERE id = :id", _params(values)
        )

    # --- events --------------------------------------------------------------
    async def append_event(
        self, session_id: str, user_id: str, occurred_at: datetime, kind: LogKind
    ) -> int:
        tag, data = kind_to_json(kind)
        async with self._conn.execute(
            "INSERT INTO events (session_id, user_id, occurred_at, kind, data) "
            "VALUES (?, ?, ?, ?, ?)",
            (session_id, user_id, _ts(occurred_at), tag, dumps(data)),
        ) as cur:
            seq = cur.lastrowid
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

    async def park_event(self, provider: str, event: InboundEvent, now: datetime) -> None:
        await self._exec(
            "INSERT INTO parked_events (provider, external_chat_id, event, created_at) "
            "VALUES (?, ?, ?, ?)",
            (provider, event.external_chat_id, inbound_to_json(event), _ts(now)),
        )

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
        return [inbound_from_json(r["event"]) for r in rows]

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
        await self._exec(
            f"INSERT INTO outbox ({OUTBOX_COLUMNS}) VALUES ({_placeholders(OUTBOX_COLUMNS)})",
            _params(outbox_values(item)),
        )
        return ahead is None

    async def update_outbox(self, item: OutboxItem) -> None:
        values = outbox_values(item)
        columns = [c for c in values if c not in ("id", "session_id", "kind", "created_at")]
        await self._exec(
            f"UPDATE outbox SET {_assignments(columns)} WHERE id = :id", _params(values)
        )

    async def claim_outbox(
        self, owner: str, now: datetime, lease_until: datetime, limit: int
    ) -> list[OutboxItem]:
        rows = await self._all(
            f"SELECT {OUTBOX_COLUMNS} FROM outbox o WHERE o.status = 'pending' "
            "AND o.next_attempt_at <= :now AND (o.lease_until IS NULL OR o.lease_until <= :now) "
            "AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.session_id = o.session_id "
            "AND p.status = 'pending' AND p.pos < o.pos) ORDER BY o.pos LIMIT :limit",
            {"now": _ts(now), "limit": limit},
        )
        items = [outbox_from_row(r) for r in rows]
        for item in items:
            item.lease_owner = owner
            item.lease_until = lease_until
            await self._exec(
                "UPDATE outbox SET lease_owner = ?, lease_until = ? WHERE id = ?",
                (owner, _ts(lease_until), item.id),
            )
        return items

    async def fail_pending_outbox(
        self, session_id: str, now: datetime, code: str, message: str
    ) -> list[str]:
        rows = await self._all(
            "SELECT id FROM outbox WHERE session_id = ? AND status = 'pending' AND kind = 'send'",
            (session_id,),
        )
        ids = [r["id"] for r in rows]
        if ids:
            await self._exec(
                "UPDATE outbox SET status = 'failed', error_code = ?, last_error = ?, "
                "done_at = ?, lease_owner = '', lease_until = NULL "
                "WHERE session_id = ? AND status = 'pending' AND kind = 'send'",
                (code, message, _ts(now), session_id),
            )
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


class SqliteStore:
    """``Store`` on one SQLite file."""

    backend = "sqlite"

    def __init__(self, path: Path, *, busy_timeout_ms: int = 5000) -> None:
        self._path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._writer: aiosqlite.Connection | None = None
        self._reader: aiosqlite.Connection | None = None
        self._reads: _Queries | None = None
        self._write_lock = asyncio.Lock()
        self._head = 0
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        return f"SqliteStore({str(self._path)!r})"

    async def open(self) -> None:
        """See base class."""
        if sqlite3.sqlite_version_info < _MIN_SQLITE:
            raise StoreUnavailable(
                f"SQLite {sqlite3.sqlite_version} is too old; 3.24 or newer is needed"
            )
        try:
            if str(self._path) != ":memory:":
                self._path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = await self._connect()
            await self._migrate(self._writer)
            self._reader = await self._connect()
            await self._reader.execute("PRAGMA query_only = ON")
        except (sqlite3.Error, OSError) as exc:
            await self.close()
            raise StoreUnavailable(f"cannot open SQLite database at {self._path}: {exc}") from exc
        self._reads = _Queries(self._reader)
        self._head = await self._read_head()

    async def _connect(self) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self._path, isolation_level=None)
        conn.row_factory = sqlite3.Row
        for pragma in (
            "journal_mode = WAL",
            "synchronous = NORMAL",
            "foreign_keys = ON",
            f"busy_timeout = {self._busy_timeout_ms}",
        ):
            await conn.execute(f"PRAGMA {pragma}")
        return conn

    async def _migrate(self, conn: aiosqlite.Connection) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version INTEGER PRIMARY KEY, applied_at TEXT NOT NULL)"
        )
        rows = await conn.execute_fetchall("SELECT MAX(version) FROM schema_version")
        current = next(iter(rows))[0] or 0
        for version, sql in migrations("sqlite"):
            if version <= current:
                continue
            log.info("store.migrate", backend="sqlite", version=version)
            await conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in statements(sql):
                    await conn.execute(statement)
                await conn.execute(
                    "INSERT INTO schema_version (version, applied_at) VALUES (?, ?)",
                    (version, _ts(datetime.now(UTC))),
                )
            except BaseException:
                await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    async def close(self) -> None:
        """See base class."""
        for conn in (self._reader, self._writer):
            if conn is not None:
                await conn.close()
        self._reader = self._writer = None
        self._reads = None
        self._changed.set()

    def _queries(self) -> _Queries:
        if self._reads is None:
            raise StoreUnavailable("the store is closed")
        return self._reads

    async def ping(self) -> None:
        """See base class."""
        try:
            await self._queries()._one("SELECT 1 AS one", ())
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"SQLite does not answer: {exc}") from exc

    async def schema_version(self) -> int:
        """See base class."""
        row = await self._queries()._one("SELECT MAX(version) AS v FROM schema_version", ())
        return int(row["v"] or 0) if row else 0

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[SqliteTx]:
        """See base class."""
        async with self._write_lock:
            if self._writer is None:
                raise StoreUnavailable("the store is closed")
            conn = self._writer
            try:
                await conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"SQLite refused a write: {exc}") from exc
            tx = SqliteTx(conn)
            try:
                yield tx
            except BaseException:
                # Shielded: a cancelled caller must still leave no open transaction.
                await asyncio.shield(conn.execute("ROLLBACK"))
                raise
            try:
                await asyncio.shield(conn.execute("COMMIT"))
            except sqlite3.Error as exc:
                await asyncio.shield(conn.execute("ROLLBACK"))
                raise StoreUnavailable(f"SQLite could not commit: {exc}") from exc
        if tx.last_seq > self._head:
            self._head = tx.last_seq
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()

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
            where.append("(created_at < ? OR (created_at = ? AND id < ?))")
            params.extend([_ts(before[0]), _ts(before[0]), before[1]])
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._queries()._all(
            f"SELECT {SESSION_COLUMNS} FROM sessions {clause} "
            "ORDER BY created_at DESC, id DESC LIMIT ?",
            (*params, limit),
        )
        return [session_from_row(r) for r in rows]

    async def list_open_sessions(self, *, after_id: str, limit: int) -> list[Session]:
        """See base class."""
        rows = await self._queries()._all(
            f"SELECT {SESSION_COLUMNS} FROM sessions WHERE state NOT IN ('ended', 'failed') "
            "AND id > ? ORDER BY id LIMIT ?",
            (after_id, limit),
        )
        return [session_from_row(r) for r in rows]

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
        row = await self._queries()._one("SELECT COALESCE(MAX(seq), 0) AS head FROM events", ())
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
            "SELECT COUNT(*) AS n, MIN(next_attempt_at) AS next_attempt_at FROM outbox "
            "WHERE status = 'pending'",
            (),
        )
        if row is None:
            return 0, None
        return int(row["n"]), row["next_attempt_at"]

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        """See base class."""
        rows = await self._queries()._all(
            "SELECT id, provider, received_at, reason, body FROM dead_letters "
            "ORDER BY received_at DESC LIMIT ?",
            (limit,),
        )
        return [DeadLetter(**r) for r in rows]

    async def prune(
        self, *, idempotency_before: datetime, dedupe_before: datetime, parked_before: datetime
    ) -> int:
        """See base class."""
        removed = 0
        async with self.transaction() as tx:
            for sql, cutoff in (
                ("DELETE FROM idempotency WHERE created_at < ?", idempotency_before),
                (
                    "DELETE FROM outbox WHERE status != 'pending' AND done_at < ?",
                    idempotency_before,
                ),
                ("DELETE FROM dedupe_keys WHERE created_at < ?", dedupe_before),
                ("DELETE FROM parked_events WHERE created_at < ?", parked_before),
            ):
                removed += await tx._exec(sql, (_ts(cutoff),))
        return removed
