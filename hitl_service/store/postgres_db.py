"""asyncpg plumbing for the PostgreSQL store: error mapping and a row adapter.

Every statement the store runs goes through ``Db``, which turns connection
trouble into ``StoreUnavailable`` (with a message that never contains the
DSN or password, raised ``from None`` so no asyncpg frame holding the DSN
ends up in a logged traceback) and records into plain dicts.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlsplit

import asyncpg
import asyncpg.exceptions as pgerr

from hitl_service.config import StoreUrl
from hitl_service.errors import StoreUnavailable

if TYPE_CHECKING:
    from hitl_service.secret import Secret

# Errors that mean "the database cannot be used right now", as opposed to a
# bug in a statement or a constraint violation.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, unreachable, DNS
    TimeoutError,  # connect or statement timeout
    pgerr.PostgresConnectionError,  # class 08, incl. ConnectionDoesNotExistError
    pgerr.OperatorInterventionError,  # class 57: shutdown, cannot connect now, canceled
    pgerr.InsufficientResourcesError,  # class 53: too many connections, disk full
    pgerr.InvalidAuthorizationSpecificationError,  # class 28: bad role or password
    pgerr.InvalidCatalogNameError,  # 3D000: the database does not exist
    pgerr.ClientConfigurationError,  # a DSN asyncpg cannot use
    # 25006: a standby (the DSN still names a primary that failed over) or a
    # read-only database; writes come back once the DSN reaches a primary.
    pgerr.ReadOnlySQLTransactionError,
    # Class 40: a deadlock (40P01) or serialization failure (40001) rolled
    # the transaction back. Nothing of it was committed and every write the
    # core makes is safe to repeat (request ids, dedupe keys), so it is
    # reported like an outage: UNAVAILABLE to gRPC callers, 503 to webhooks,
    # and outbox attempts retry. READ COMMITTED and the lock order the core
    # keeps make these rare.
    pgerr.TransactionRollbackError,
)
_MAX_DETAIL = 300


def is_unavailable(exc: BaseException) -> bool:
    """True if ``exc`` says the database is unreachable or unusable right now."""
    if isinstance(exc, _UNAVAILABLE):
        return True
    # A connection the server dropped in the middle of an error (a fast
    # shutdown, a failover) is left "consuming" it; asyncpg says so on the
    # next statement with an InternalClientError ("cannot switch to state
    # ..; another operation (2) is in progress"), and the pool discards it.
    if isinstance(exc, pgerr.InternalClientError) and "another operation" in str(exc):
        return True
    # asyncpg reports a closed pool or connection as a bare InterfaceError;
    # a pooled connection the server ended is taken back by the pool at
    # once, and a transaction still holding it gets "released back to the
    # pool" on its next statement.
    text = str(exc)
    return isinstance(exc, pgerr.InterfaceError) and (
        "closed" in text or "closing" in text or "released back to the pool" in text
    )


class Redactor:
    """Where the store points, for messages; and a scrubber for secrets."""

    def __init__(self, dsn: Secret) -> None:
        self.where = StoreUrl("postgresql", dsn=dsn).redacted()
        raw = dsn.reveal()
        secrets = {raw}
        try:
            parts = urlsplit(raw)
            if parts.password:
                secrets |= {parts.password, unquote(parts.password)}
            secrets |= {v for k, v in parse_qsl(parts.query) if k == "password" and v}
        except ValueError:
            pass
        # Longest first, so the DSN goes before the password inside it.
        self._secrets = sorted((s for s in secrets if s), key=len, reverse=True)

    def scrub(self, text: str) -> str:
        """``text`` with the DSN and password masked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def describe(self, exc: BaseException) -> str:
        """``ExcType: message``, scrubbed and shortened, for logs and errors."""
        detail = self.scrub(" ".join(str(exc).split()))
        if len(detail) > _MAX_DETAIL:
            detail = detail[:_MAX_DETAIL] + "…"
        return f"{type(exc).__name__}: {detail}" if detail else type(exc).__name__

    def unavailable(self, doing: str, exc: BaseException) -> StoreUnavailable:
        """A ``StoreUnavailable`` for ``exc``; raise it ``from None``."""
        if isinstance(exc, pgerr.TransactionRollbackError):
            doing = "rolled back a conflicting transaction (retry it)"
        return StoreUnavailable(f"PostgreSQL at {self.where} {doing}: {self.describe(exc)}")


Row = dict[str, Any]


class Db:
    """Runs statements on a pool or one connection; maps connection errors.

    Args:
        target: An asyncpg pool (each call borrows a connection) or a pooled
            connection (a transaction's).
        redactor: Builds secret-free errors.
    """

    def __init__(
        self,
        target: asyncpg.Pool[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record],
        redactor: Redactor,
        *,
        acquire_timeout: float = 10.0,
    ) -> None:
        self._target = target
        self._redactor = redactor
        # asyncpg's Pool.fetch() and friends wait for a free connection
        # without end; with every connection stuck (a lock a frozen replica
        # holds), each read would hang too. Bounded: StoreUnavailable.
        self._acquire_timeout = acquire_timeout

    async def _run(self, method: str, sql: str, args: tuple[object, ...]) -> Any:
        target = self._target
        if isinstance(target, asyncpg.Pool):
            async with target.acquire(timeout=self._acquire_timeout) as conn:
                return await getattr(conn, method)(sql, *args)
        return await getattr(target, method)(sql, *args)

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            if is_unavailable(exc):
                raise self._redactor.unavailable("is unavailable", exc) from None
            raise

    async def fetch(self, sql: str, *args: object) -> list[Row]:
        """All rows, as dicts."""
        with self._mapped():
            rows = await self._run("fetch", sql, args)
        return [dict(r.items()) for r in rows]

    async def fetchrow(self, sql: str, *args: object) -> Row | None:
        """The first row as a dict, or None."""
        with self._mapped():
            row = await self._run("fetchrow", sql, args)
        return None if row is None else dict(row.items())

    async def fetchval(self, sql: str, *args: object) -> Any:
        """The first column of the first row, or None."""
        with self._mapped():
            return await self._run("fetchval", sql, args)

    async def execute(self, sql: str, *args: object) -> int:
        """Runs a statement; returns the affected row count (0 if none is reported)."""
        with self._mapped():
            status = await self._run("execute", sql, args)
        last = status.rsplit(" ", 1)[-1]
        return int(last) if last.isdigit() else 0
