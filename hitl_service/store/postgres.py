"""The shared store: PostgreSQL through asyncpg, for one or many replicas.

A connection pool serves reads and transactions (READ COMMITTED; row locks
and unique constraints carry the cross-replica guarantees, see
``postgres_tx``). Cursors come from a one-row counter so that commit order
equals cursor order; a transaction that appended events sends
``NOTIFY hitl_events, '<cursor>'`` (delivered at commit), which every
replica's listener turns into a wake-up (``postgres_wakeup``). Migrations
run at ``open()`` under a transaction-scoped advisory lock, so replicas that
start together apply them once.

The DSN is a ``Secret``: ``repr``, errors and logs show only
``StoreUrl.redacted()`` (user, host, port, database).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import asyncpg
import structlog

from hitl_service.domain import DeadLetter, LogEvent, OutboxItem, Session, SessionState, User
from hitl_service.errors import StoreUnavailable
from hitl_service.store.migrations import migrations, warn_if_newer
from hitl_service.store.postgres_db import Db, Redactor, is_unavailable
from hitl_service.store.postgres_tx import CHANNEL, HEAD_SQL, PostgresTx, Queries, ts
from hitl_service.store.postgres_wakeup import EventWakeup
from hitl_service.store.rows import (
    PENDING_NOW,
    SESSION_COLUMNS,
    Row,
    event_from_row,
    open_sessions_page,
    session_from_row,
)

if TYPE_CHECKING:
    from collections.abc import Iterator, Sequence
    from datetime import datetime

    from hitl_service.secret import Secret
    from providers.types import ProviderUser

log = structlog.get_logger(__name__)

# pg_advisory_xact_lock(bigint) key serializing migrations across replicas.
_MIGRATION_LOCK = 0x6869_746C_6D69_6772  # "hitlmigr"
_APP_NAME = "hitl-service"
_NO_LIMIT = 24 * 3600.0  # seconds: "no statement timeout" for asyncpg calls
# How long a migration waits for a table lock before it lets the queries
# queued behind it through and asks again (store.migrate_waiting).
_MIGRATION_LOCK_TIMEOUT_MS = 2000
PRUNE_BATCH = 5000  # rows deleted per transaction when pruning
_EVENT_COLUMNS = "seq, session_id, user_id, occurred_at, kind, data"
# Sessions HITL_RETENTION deletes, oldest first (index sessions_ended; the
# state condition is the index's own). One with a pending outbox item waits:
# its attempt may still log an event for it.
_SQL_ENDED_SESSIONS = (
    "SELECT id FROM sessions WHERE state IN ('ended', 'failed') AND ended_at < $1 "
    "AND NOT EXISTS (SELECT 1 FROM outbox WHERE outbox.session_id = sessions.id "
    "AND outbox.status = 'pending') ORDER BY ended_at, id LIMIT $2 FOR UPDATE SKIP LOCKED"
)


class PostgresStore:
    """``Store`` on a PostgreSQL database.

    Args:
        dsn: ``postgresql://user:password@host:port/database``.
        pool_min: Connections the pool keeps open.
        pool_max: Most connections the pool opens.
        poll_only: Never LISTEN (PgBouncer in transaction mode drops
            notifications silently); waiters rely on polling.
        statement_cache_size: asyncpg's prepared-statement cache per
            connection; 0 turns it off, for PgBouncer in transaction mode
            older than 1.21 (or without ``max_prepared_statements``), where
            a named statement prepared in one transaction is missing in the
            next one's server connection.
        connect_timeout: Seconds to open a connection (and to wait for a
            free one in the pool).
        statement_timeout: Seconds a statement may take, lock waits
            included, before it is cancelled (``StoreUnavailable``): a
            replica frozen while it holds a row lock must not hang the
            others. Migrations are exempt.
        ping_timeout: Seconds ``ping()`` waits for its query.
        poll_min: First poll interval while nobody listens.
        poll_max: Longest poll interval (reached while nothing changes).
        check_interval: How often the listener connection is verified (and
            the head re-read, in case a notification was lost).
        reconnect_min: First pause before reconnecting a dropped listener.
        reconnect_max: Longest pause between listener reconnect attempts.
    """

    backend = "postgresql"

    def __init__(
        self,
        dsn: Secret,
        *,
        pool_min: int = 2,
        pool_max: int = 10,
        poll_only: bool = False,
        statement_cache_size: int = 100,
        connect_timeout: float = 10.0,
        statement_timeout: float = 10.0,
        ping_timeout: float = 5.0,
        poll_min: float = 0.25,
        poll_max: float = 2.0,
        check_interval: float = 15.0,
        reconnect_min: float = 0.25,
        reconnect_max: float = 15.0,
    ) -> None:
        self._dsn = dsn
        self._pool_min = min(pool_min, pool_max)
        self._pool_max = pool_max
        self._poll_only = poll_only
        self._statement_cache_size = statement_cache_size
        self._connect_timeout = connect_timeout
        self._statement_timeout = statement_timeout
        self._ping_timeout = ping_timeout
        self._redactor = Redactor(dsn)
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None
        self._db: Db | None = None
        self._reads: Queries | None = None
        self._wakeup = EventWakeup(
            connect=self._connect_listener,
            read_head=self._read_head,
            redactor=self._redactor,
            poll_only=poll_only,
            poll_min=poll_min,
            poll_max=poll_max,
            check_interval=check_interval,
            reconnect_min=reconnect_min,
            reconnect_max=reconnect_max,
        )

    def __repr__(self) -> str:
        return f"PostgresStore({self._redactor.where!r})"

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (never with ``poll_only``)."""
        return self._wakeup.listening

    @property
    def listener_pid(self) -> int | None:
        """The LISTEN connection's server process id, while it is up."""
        return self._wakeup.listener_pid

    # --- lifecycle -------------------------------------------------------------
    @contextlib.contextmanager
    def _mapped(self, doing: str, *, opening: bool = False) -> Iterator[None]:
        """Turns connection trouble into ``StoreUnavailable`` without secrets.

        ``opening``: also any error PostgreSQL or asyncpg reports while the
        store opens (a role without rights on the database, a DSN parameter
        the server does not know, such as libpq's ``connect_timeout``), so
        that the start fails with one ``cannot start:`` line naming it.
        """
        try:
            yield
        except StoreUnavailable:
            raise
        except Exception as exc:
            if is_unavailable(exc) or (
                opening and isinstance(exc, asyncpg.PostgresError | asyncpg.InterfaceError)
            ):
                raise self._redactor.unavailable(doing, exc) from None
            raise

    async def open(self) -> None:
        """See base class."""
        if self._pool is not None:
            return
        try:
            with self._mapped("cannot be opened", opening=True):
                self._pool = await asyncpg.create_pool(
                    self._dsn.reveal(),
                    min_size=self._pool_min,
                    max_size=self._pool_max,
                    timeout=self._connect_timeout,
                    # Client-side (asyncpg cancels the query): no server
                    # setting in the startup packet, which PgBouncer refuses.
                    command_timeout=self._statement_timeout,
                    statement_cache_size=self._statement_cache_size,
                    server_settings={"application_name": _APP_NAME},
                )
            self._db = Db(self._pool, self._redactor, acquire_timeout=self._connect_timeout)
            self._reads = Queries(self._db)
            with self._mapped("cannot be migrated", opening=True):
                await self._migrate(self._pool)
            head = await self._read_head()
        except BaseException:
            await self._close_pool()
            raise
        self._wakeup.start(head)
        log.debug("store.open", backend=self.backend, store=self._redactor.where, head=head)

    async def _migrate(self, pool: asyncpg.Pool[asyncpg.Record]) -> None:
        # No statement timeout here: another replica may be migrating (the
        # lock), and a migration may rewrite a large table. But a migration's
        # table lock is asked with a short lock_timeout, and asked again: while
        # it waits (behind a backup, a report, a frozen replica), PostgreSQL
        # queues every other query of that table behind it, and the replicas
        # still running (a rolling upgrade) would stall for as long. The pause
        # between attempts keeps the migration lock: released, the next new
        # replica waiting for it would ask for the table at once, and with two
        # or more starting together the running ones never got through.
        async with pool.acquire(timeout=self._connect_timeout) as conn, conn.transaction():
            await conn.execute("SET LOCAL statement_timeout = 0")
            await conn.execute(
                "SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK, timeout=_NO_LIMIT
            )
            # After the advisory lock: waiting for another replica's migration is fine.
            await conn.execute(f"SET LOCAL lock_timeout = '{_MIGRATION_LOCK_TIMEOUT_MS}ms'")
            delay = 0.1
            while True:
                try:
                    async with conn.transaction():  # a savepoint: undone alone
                        await self._migrate_once(conn)
                    return
                except asyncpg.LockNotAvailableError as exc:
                    log.warning(
                        "store.migrate_waiting",
                        backend=self.backend,
                        error=str(exc),
                        hint="a table to migrate is in use (a long transaction); retrying",
                    )
                    # Paused in the server, not idle in the transaction:
                    # idle_in_transaction_session_timeout does not end it.
                    await conn.execute("SELECT pg_sleep($1)", delay, timeout=_NO_LIMIT)
                    delay = min(delay * 2, 5.0)

    async def _migrate_once(self, conn: asyncpg.pool.PoolConnectionProxy[asyncpg.Record]) -> None:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version "
            "(version integer PRIMARY KEY, applied_at timestamptz NOT NULL)"
        )
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_version")
        known = migrations("postgres")
        warn_if_newer(self.backend, current, known)
        for version, sql in known:
            if version <= current:
                continue
            log.info("store.migrate", backend=self.backend, version=version)
            await conn.execute(sql, timeout=_NO_LIMIT)  # no parameters: one batch
            await conn.execute(
                "INSERT INTO schema_version (version, applied_at) VALUES ($1, now())", version
            )

    async def _connect_listener(self) -> asyncpg.Connection[Any]:
        return await asyncpg.connect(
            self._dsn.reveal(),
            timeout=self._connect_timeout,
            statement_cache_size=self._statement_cache_size,
            server_settings={"application_name": f"{_APP_NAME}-listen"},
        )

    async def _read_head(self) -> int:
        return int(await self._database().fetchval(HEAD_SQL))

    async def close(self) -> None:
        """See base class."""
        await self._wakeup.close()
        await self._close_pool()

    async def _close_pool(self) -> None:
        pool, self._pool = self._pool, None
        self._db = self._reads = None
        if pool is None:
            return
        try:
            async with asyncio.timeout(10):
                await pool.close()
        except Exception:  # stuck or broken connections: drop them
            pool.terminate()

    def _database(self) -> Db:
        if self._db is None:
            raise StoreUnavailable("the store is closed")
        return self._db

    def _queries(self) -> Queries:
        if self._reads is None:
            raise StoreUnavailable("the store is closed")
        return self._reads

    async def ping(self) -> None:
        """See base class.

        A standby (after a failover the DSN still points at) or a database
        set ``default_transaction_read_only`` answers reads and refuses
        every write: that is not ready either.
        """
        db = self._database()
        with self._mapped("does not answer"):
            async with asyncio.timeout(self._ping_timeout):
                read_only = await db.fetchval(
                    "SELECT pg_is_in_recovery()"
                    " OR current_setting('transaction_read_only')::boolean"
                )
        if read_only:
            raise StoreUnavailable("PostgreSQL takes no writes here (a standby, or read-only)")

    async def database_time(self) -> datetime | None:
        """See base class."""
        with self._mapped("does not answer"):
            async with asyncio.timeout(self._ping_timeout):
                now: datetime = await self._database().fetchval("SELECT clock_timestamp()")
        return now

    async def schema_version(self) -> int:
        """See base class."""
        return int(await self._database().fetchval("SELECT MAX(version) FROM schema_version") or 0)

    @asynccontextmanager
    async def transaction(self, *, lazy: bool = False) -> AsyncIterator[PostgresTx]:
        """See base class.

        Errors the body raises pass through unchanged (statements of the
        ``Tx`` already map connection trouble to ``StoreUnavailable``).
        ``lazy`` changes nothing here: each transaction has a connection of
        its own and commits on its own.
        """
        if self._pool is None:
            raise StoreUnavailable("the store is closed")
        pool = self._pool
        with self._mapped("refused a transaction"):
            conn = await pool.acquire(timeout=self._connect_timeout)
        ended = False  # committed or rolled back: the connection goes back clean
        try:
            xact = conn.transaction()
            with self._mapped("refused a transaction"):
                await xact.start()
            tx = PostgresTx(Db(conn, self._redactor))
            try:
                yield tx
            except BaseException:
                # A dead connection has rolled back already (closed below).
                with contextlib.suppress(Exception):
                    await xact.rollback()
                    ended = True
                raise
            with self._mapped("could not commit"):
                if tx.last_seq:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, str(tx.last_seq))
                await xact.commit()
            ended = True
        finally:
            if not ended:
                # Cut off (cancelled) in its BEGIN, COMMIT or ROLLBACK, or
                # its connection lost: closed, and the server rolls back what
                # did not commit. Handed back open, asyncpg would reset it
                # and report "Resetting connection with an active
                # transaction" to the loop, which logs it as an error. A
                # connection the server ended is back in the pool already
                # (its proxy raises InterfaceError): nothing to close.
                with contextlib.suppress(asyncpg.InterfaceError):
                    conn.terminate()
            with contextlib.suppress(Exception):
                await pool.release(conn)
        if tx.last_seq:
            self._wakeup.advance(tx.last_seq)

    # --- reads -------------------------------------------------------------------
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
        args: list[Any] = []

        def arg(value: Any) -> str:
            args.append(value)
            return f"${len(args)}"

        if user_id:
            where.append(f"user_id = {arg(user_id)}")
        if state is not None:
            states = [state.value]
            if state is SessionState.REQUESTED:
                states.append(SessionState.STARTING.value)
            where.append(f"state = ANY({arg(states)}::text[])")
            if state.is_open:
                # Lets the planner take the partial index sessions_open: open
                # sessions are few, the ended ones pile up.
                where.append("state NOT IN ('ended', 'failed')")
            elif state is SessionState.FAILED:
                where.append("state = 'failed'")  # ... and sessions_failed
        if before is not None:
            where.append(f"(created_at, id) < ({arg(ts(before[0]))}, {arg(before[1])})")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        rows = await self._database().fetch(
            f"SELECT {SESSION_COLUMNS} FROM sessions {clause} "
            f"ORDER BY created_at DESC, id DESC LIMIT {arg(limit)}",
            *args,
        )
        return [session_from_row(r) for r in rows]

    async def list_open_sessions(self, *, after_id: str, limit: int) -> list[Session]:
        """See base class."""

        async def fetch(after: str, count: int) -> Sequence[Row]:
            return await self._database().fetch(
                f"SELECT {SESSION_COLUMNS} FROM sessions WHERE state NOT IN ('ended', 'failed') "
                "AND id > $1 ORDER BY id LIMIT $2",
                after,
                count,
            )

        return await open_sessions_page(fetch, after_id, limit)

    async def read_events(
        self, *, after: int, limit: int, session_id: str = ""
    ) -> Sequence[LogEvent]:
        """See base class."""
        if session_id:
            rows = await self._database().fetch(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE session_id = $1 AND seq > $2 "
                "ORDER BY seq LIMIT $3",
                session_id,
                after,
                limit,
            )
        else:
            rows = await self._database().fetch(
                f"SELECT {_EVENT_COLUMNS} FROM events WHERE seq > $1 ORDER BY seq LIMIT $2",
                after,
                limit,
            )
        return [event_from_row(r) for r in rows]

    async def head(self) -> int:
        """See base class."""
        head = await self._read_head()
        self._wakeup.advance(head)
        return head

    async def wait_for_events(self, after: int, timeout: float) -> None:
        """See base class."""
        await self._wakeup.wait(after, timeout)

    async def outbox_stats(self) -> tuple[int, datetime | None]:
        """See base class."""
        row = await self._database().fetchrow(
            f"SELECT {PENDING_NOW} AS n, "
            "MIN(GREATEST(next_attempt_at, COALESCE(lease_until, next_attempt_at))) "
            "AS next_attempt_at FROM outbox WHERE status = 'pending'"
        )
        if row is None:
            return 0, None
        return int(row["n"]), row["next_attempt_at"]

    async def outbox_next_due(self, now: datetime) -> datetime | None:
        """See base class: three reads in index order, as on SQLite."""
        due: datetime | None = await self._database().fetchval(
            "SELECT LEAST((SELECT next_attempt_at FROM outbox "
            "WHERE status = 'pending' AND NOT queued "
            "AND (lease_until IS NULL OR lease_until <= next_attempt_at) "
            "ORDER BY next_attempt_at LIMIT 1), (SELECT MIN(lease_until) FROM outbox "
            "WHERE status = 'pending' AND NOT queued AND next_attempt_at <= $1 "
            "AND lease_until > next_attempt_at), (SELECT MIN(next_attempt_at) "
            "FROM outbox WHERE status = 'pending' AND queued))",
            ts(now),
        )
        return due

    async def unqueue_stranded_outbox(self) -> int:
        """See base class. Rows another transaction holds are skipped (it
        lets them out, or the next sweep does): two replicas sweeping at
        once would otherwise lock many rows in different orders."""
        async with self.transaction() as tx:
            return await tx._db.execute(
                "UPDATE outbox SET queued = false WHERE pos IN (SELECT o.pos FROM outbox o "
                "WHERE o.status = 'pending' AND o.queued AND NOT EXISTS (SELECT 1 FROM outbox p "
                "WHERE p.session_id = o.session_id AND p.status = 'pending' AND p.pos < o.pos) "
                "FOR UPDATE SKIP LOCKED)"
            )

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
        """See base class. Each statement reads the pending items in range
        of it through the outbox_due or the outbox_queued index."""
        scheduled = "attempts = 0 AND next_attempt_at > created_at"
        due = 0
        async with self.transaction() as tx:
            leases = await tx._db.execute(
                "UPDATE outbox SET lease_until = $1 WHERE pos IN (SELECT pos FROM outbox "
                "WHERE status = 'pending' AND NOT queued AND lease_until > $2 "
                "FOR UPDATE SKIP LOCKED)",
                ts(now),
                ts(lease_by),
            )
            for queued in ("NOT queued", "queued"):
                due += await tx._db.execute(
                    "UPDATE outbox SET next_attempt_at = $1, created_at = $2 WHERE pos IN "
                    f"(SELECT pos FROM outbox WHERE status = 'pending' AND {queued} "
                    f"AND next_attempt_at > $3 AND {scheduled} FOR UPDATE SKIP LOCKED)",
                    ts(scheduled_to),
                    ts(now),
                    ts(scheduled_by),
                )
                due += await tx._db.execute(
                    "UPDATE outbox SET next_attempt_at = $1 WHERE pos IN (SELECT pos FROM outbox "
                    f"WHERE status = 'pending' AND {queued} AND next_attempt_at > $2 "
                    "AND (attempts <= attempts_settled OR next_attempt_at > $3) "
                    f"AND NOT ({scheduled}) FOR UPDATE SKIP LOCKED)",
                    ts(now),
                    ts(due_by),
                    ts(uncertain_by),
                )
        return leases, due

    async def list_dead_letters(self, limit: int) -> list[DeadLetter]:
        """See base class."""
        rows = await self._database().fetch(
            "SELECT id, provider, received_at, reason, body FROM dead_letters "
            "ORDER BY received_at DESC, id DESC LIMIT $1",
            limit,
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
        """See base class."""
        removed = 0 if sessions_before is None else await self._prune_sessions(sessions_before)
        # In batches, a transaction each: one statement over a large backlog
        # would outlast the statement timeout (and hold its locks as long).
        for table, condition, cutoff in (
            ("idempotency", "created_at < $1", idempotency_before),
            ("outbox", "status <> 'pending' AND done_at < $1", idempotency_before),
            ("dedupe_keys", "created_at < $1", dedupe_before),
            ("parked_events", "created_at < $1", parked_before),
            # Dead letters hold message text too: kept as long as sessions.
            *([("dead_letters", "received_at < $1", sessions_before)] if sessions_before else []),
        ):
            sql = (
                f"DELETE FROM {table} WHERE ctid = ANY(ARRAY("
                f"SELECT ctid FROM {table} WHERE {condition} LIMIT {PRUNE_BATCH}))"
            )
            while True:
                async with self.transaction() as tx:
                    count = await tx._db.execute(sql, ts(cutoff))
                removed += count
                if count < PRUNE_BATCH:
                    break
        return removed

    async def _prune_sessions(self, before: datetime) -> int:
        """Deletes sessions that ended before ``before``, and their events.

        As on SQLite: a transaction takes the oldest ``PRUNE_BATCH`` such
        sessions (index ``sessions_ended``), locked so that no writer logs
        an event for one in between, deletes up to ``PRUNE_BATCH`` of their
        events, then those of them left without events.
        """
        removed = 0
        while True:
            async with self.transaction() as tx:
                rows = await tx._db.fetch(_SQL_ENDED_SESSIONS, ts(before), PRUNE_BATCH)
                if not rows:
                    return removed
                ids = [row["id"] for row in rows]
                removed += await tx._db.execute(
                    "DELETE FROM events WHERE seq = ANY(ARRAY(SELECT seq FROM events "
                    "WHERE session_id = ANY($1::text[]) LIMIT $2))",
                    ids,
                    PRUNE_BATCH,
                )
                removed += await tx._db.execute(
                    "DELETE FROM sessions AS s WHERE s.id = ANY($1::text[]) "
                    "AND NOT EXISTS (SELECT 1 FROM events AS e WHERE e.session_id = s.id)",
                    ids,
                )
