"""Wake-ups for ``wait_for_events`` on PostgreSQL: LISTEN/NOTIFY plus polling.

NOTIFY is only a hint (waiters re-read the log by cursor), and a dropped
connection loses notifications, so:

- a dedicated (not pooled) connection LISTENs; it is checked every
  ``check_interval`` seconds with a read of the head (which also catches
  anything a lost notification would have announced), and re-connected with
  backoff after it drops, re-reading the head once it listens again;
- while nobody listens (``poll_only``, for PgBouncer in transaction mode,
  or the listener is down) and someone waits, a poller reads the head every
  ``poll_min`` seconds, backing off to ``poll_max`` while nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from hitl_service.store.postgres_tx import CHANNEL, HEAD_SQL

if TYPE_CHECKING:
    from collections.abc import Awaitable

    import asyncpg

    from hitl_service.store.postgres_db import Redactor

log = structlog.get_logger(__name__)


class EventWakeup:
    """The newest cursor this process knows of, and waiters for it to move.

    Args:
        connect: Opens the dedicated listener connection.
        read_head: Reads the committed head through the pool.
        redactor: For secret-free log messages.
        poll_only: Never LISTEN; poll while someone waits.
        poll_min: First poll interval (seconds) without a listener.
        poll_max: Longest poll interval while nothing changes.
        check_interval: How often the listener connection is checked.
        reconnect_min: First wait before reconnecting the listener.
        reconnect_max: Longest wait between listener reconnect attempts.
    """

    def __init__(
        self,
        *,
        connect: Callable[[], Awaitable[asyncpg.Connection[Any]]],
        read_head: Callable[[], Awaitable[int]],
        redactor: Redactor,
        poll_only: bool,
        poll_min: float,
        poll_max: float,
        check_interval: float,
        reconnect_min: float,
        reconnect_max: float,
    ) -> None:
        self._connect = connect
        self._read_head = read_head
        self._redactor = redactor
        self._poll_only = poll_only
        self._poll_min = poll_min
        self._poll_max = poll_max
        self._check_interval = check_interval
        self._reconnect_min = reconnect_min
        self._reconnect_max = reconnect_max
        self.head = 0
        self._changed = asyncio.Event()
        self._listening = False
        self._waiters = 0
        self._poll_wanted = asyncio.Event()
        self._closed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: asyncpg.Connection[Any] | None = None

    @property
    def listening(self) -> bool:
        """True while the listener connection is up and LISTENing."""
        return self._listening

    @property
    def listener_pid(self) -> int | None:
        """The listener's server process id (for operators and tests)."""
        conn = self._listener
        return None if conn is None or not self._listening else conn.get_server_pid()

    def start(self, head: int) -> None:
        """Starts the listener (unless poll-only) and the poller."""
        self.head = head
        self._closed.clear()
        self._tasks.append(asyncio.create_task(self._poll_loop(), name="hitl-store-poll"))
        if not self._poll_only:
            self._tasks.append(asyncio.create_task(self._listen_loop(), name="hitl-store-listen"))

    async def close(self) -> None:
        """Stops both loops, closes the listener and releases every waiter."""
        self._closed.set()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        self._wake()

    def advance(self, seq: int) -> None:
        """Records that ``seq`` is committed; wakes waiters if it is new."""
        if seq > self.head:
            self.head = seq
            self._wake()

    def _wake(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait(self, after: int, timeout: float) -> None:
        """Returns once the head may be past ``after``, or after ``timeout``."""
        if self.head > after or self._closed.is_set():
            return
        changed = self._changed
        self._waiters += 1
        if not self._listening:
            self._poll_wanted.set()
        try:
            async with asyncio.timeout(timeout):
                await changed.wait()
        except TimeoutError:
            return
        finally:
            self._waiters -= 1

    # --- the listener --------------------------------------------------------
    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            seq = int(str(payload))
        except ValueError:
            return
        self.advance(seq)

    async def _pause(self, seconds: float) -> None:
        """Sleeps ``seconds``, or less if the store closes."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closed.wait()

    async def _listen_loop(self) -> None:
        delay = self._reconnect_min
        attempt = 0
        while not self._closed.is_set():
            conn: asyncpg.Connection[Any] | None = None
            lost = asyncio.Event()
            try:
                conn = await self._connect()
                conn.add_termination_listener(_setter(lost))
                await conn.add_listener(CHANNEL, self._on_notify)
                self._listener = conn
                self._listening = True
                # Anything committed while nobody listened was announced to nobody.
                self.advance(int(await conn.fetchval(HEAD_SQL, timeout=self._check_interval)))
                if attempt:
                    log.info("store.listen_restored", store=self._redactor.where)
                attempt, delay = 0, self._reconnect_min
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._check_interval):
                            await lost.wait()
                    if lost.is_set():
                        raise ConnectionError("the listener connection was closed")
                    # A silently dead connection never fires `lost`; this read
                    # fails on it. It also catches a lost notification.
                    self.advance(int(await conn.fetchval(HEAD_SQL, timeout=self._check_interval)))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: fall back to polling, reconnect
                attempt += 1
                log.warning(
                    "store.listen_lost",
                    store=self._redactor.where,
                    error=self._redactor.describe(exc),
                    attempt=attempt,
                    retry_in=round(delay, 3),
                )
            finally:
                self._listening = False
                self._listener = None
                if conn is not None:
                    await _close_quietly(conn)
            if self._waiters:
                self._poll_wanted.set()
            await self._pause(delay)
            delay = min(delay * 2, self._reconnect_max)

    # --- the poller ----------------------------------------------------------
    async def _poll_loop(self) -> None:
        interval = self._poll_min
        while not self._closed.is_set():
            await self._poll_wanted.wait()
            if self._listening or not self._waiters:
                self._poll_wanted.clear()
                interval = self._poll_min
                continue
            try:
                head = await self._read_head()
            except Exception as exc:  # the store may be down; keep polling
                log.debug("store.poll_failed", error=self._redactor.describe(exc))
                head = self.head
            if head > self.head:
                self.advance(head)
                interval = self._poll_min
            else:
                interval = min(interval * 2, self._poll_max)
            await self._pause(interval)


def _setter(event: asyncio.Event) -> Callable[[object], None]:
    """A termination callback that sets ``event``."""
    return lambda _conn: event.set()


async def _close_quietly(conn: asyncpg.Connection[Any]) -> None:
    try:
        await conn.close(timeout=2)
    except Exception:  # already broken: drop it
        conn.terminate()
