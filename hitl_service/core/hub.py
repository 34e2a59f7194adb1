"""Fan-out of the event log to StreamEvents subscribers.

One reader per process follows the log by cursor and keeps the newest
events in a bounded buffer; every subscriber reads the shared buffer from
its own cursor and falls back to the store when it is further behind than
the buffer reaches. Memory is bounded by the buffer, whatever the number or
speed of subscribers, and a slow subscriber never blocks the others: one
behind the buffer holds only the page of the store it is writing out, cut to
about ``PAGE_BYTES`` (a subscriber that stops reading keeps its page).
"""

from __future__ import annotations

import asyncio
from bisect import bisect_right
from typing import TYPE_CHECKING

import structlog

from hitl_service.errors import StoreUnavailable
from providers.types import AgentMessage

if TYPE_CHECKING:
    from collections.abc import AsyncGenerator, Sequence
    from datetime import datetime

    from hitl_service.clock import Clock
    from hitl_service.domain import LogEvent
    from hitl_service.store.base import Store

log = structlog.get_logger(__name__)

# A subscriber behind the buffer reads the store a page at a time and holds
# that page until its client has read it: a client that stops reading keeps
# it for as long as the stream stays open. So a page is cut to about this
# many bytes of events (at least one event), and each read asks for as many
# events as the last one kept (twice as many, up to read_batch, while they
# take less than half of it): a read_batch page of long messages would be
# megabytes per stream.
PAGE_BYTES = 64 * 1024


class HubClosed(Exception):
    """The hub shut down; subscribers should end their streams."""


def _seq(event: LogEvent) -> int:
    return event.seq


def _weight(event: LogEvent) -> int:
    """About the bytes ``event`` holds: an agent's message is what can be
    long (its text, else its media or card by their repr); other kinds hold
    a few short fields."""
    kind = event.kind
    if not isinstance(kind, AgentMessage):
        return 512
    body = kind.message.body
    return 256 + len(body if isinstance(body, str) else repr(body))


class EventHub:
    """Follows the log and serves subscribers from a shared buffer."""

    def __init__(
        self,
        store: Store,
        clock: Clock,
        *,
        buffer_size: int = 1024,
        read_batch: int = 512,
        poll_interval: float = 1.0,
    ) -> None:
        self._store = store
        self._clock = clock
        self._size = buffer_size
        self._batch = read_batch
        self._poll = poll_interval
        self._buf: list[LogEvent] = []
        self._floor = 0  # the buffer holds every event with floor < seq <= head
        self._trims = 0  # times the buffer's front was cut (its indexes moved)
        self._head = 0
        self._signal = asyncio.Event()
        self._woken_at = 0.0
        self._closed = False
        self.subscribers = 0

    @property
    def head(self) -> int:
        """The newest cursor this replica has read."""
        return self._head

    async def start(self) -> None:
        """Starts at the store's head: the buffer begins empty."""
        self._head = self._floor = await self._store.head()

    async def run(self) -> None:
        """Reads new events into the buffer until ``close()``."""
        while not self._closed:
            try:
                await self._store.wait_for_events(self._head, self._poll)
                await self._read_new()
            except StoreUnavailable as exc:
                log.warning("hub.store_unavailable", error=str(exc))
                await self._clock.sleep(self._poll)
            except Exception:
                # Anything else: streams must not stop following for good.
                log.exception("hub.error")
                await self._clock.sleep(self._poll)
            if self._clock.monotonic() - self._woken_at >= self._poll:
                # A heartbeat: subscribers far from their deadline wait with
                # no timer of their own (see _follow), so wake them now and
                # then to look at the time.
                self._wake()

    async def _read_new(self) -> None:
        while not self._closed:
            events = await self._store.read_events(after=self._head, limit=self._batch)
            if not events:
                return
            self._append(events)
            if len(events) < self._batch:
                return

    def _append(self, events: Sequence[LogEvent]) -> None:
        self._buf.extend(events)
        self._head = self._buf[-1].seq
        # Trim in chunks, so the copy is amortized over many appends.
        if len(self._buf) > 2 * self._size:
            cut = len(self._buf) - self._size
            self._floor = self._buf[cut - 1].seq
            del self._buf[:cut]
            self._trims += 1
        self._wake()

    def forget_before(self, cutoff: datetime) -> None:
        """Drops buffered events that occurred before ``cutoff``, and all
        before them: HITL_RETENTION deletes such events from the store (on
        whichever replica prunes), and a stream must not get them from here.

        Subscribers behind the new floor read the store, as any slow one.
        """
        last = -1
        for index, event in enumerate(self._buf):
            if event.occurred_at < cutoff:
                last = index
        if last >= 0:
            self._floor = self._buf[last].seq
            del self._buf[: last + 1]
            self._trims += 1

    def _wake(self) -> None:
        """Wakes every waiting subscriber (they re-read from their cursor)."""
        self._woken_at = self._clock.monotonic()
        signal, self._signal = self._signal, asyncio.Event()
        signal.set()

    def close(self) -> None:
        """Ends every subscription (they raise ``HubClosed``)."""
        self._closed = True
        self._signal.set()

    def subscribe(
        self, after: int | None, session_id: str = "", *, until: float | None = None
    ) -> AsyncGenerator[LogEvent]:
        """Events with cursor > ``after`` (None: from now), then live ones.

        Args:
            after: Start after this cursor; None means events committed from
                now on.
            session_id: Only this session's events; empty means all.
            until: Monotonic time at which to stop (the iterator just ends).

        Raises:
            HubClosed: The hub shut down.

        The starting cursor is fixed when this returns, before iteration
        begins: nothing committed after the call can be missed.
        """
        return self._follow(self._head if after is None else after, session_id, until)

    def _expired(self, until: float | None) -> bool:
        return until is not None and self._clock.monotonic() >= until

    async def _follow(
        self, cursor: int, session_id: str, until: float | None
    ) -> AsyncGenerator[LogEvent]:
        self.subscribers += 1
        limit = 1  # events per read of the store: grows while pages stay short
        try:
            while True:
                if self._closed:
                    raise HubClosed
                # A stream that is behind ends at its lifetime too (after an
                # event: the reader resumes from its cursor, missing nothing),
                # or a reader slower than the log would keep it forever.
                if cursor < self._floor:
                    cursor, events, limit = await self._from_store(cursor, session_id, limit)
                    for event in events:
                        yield event
                        if self._expired(until):
                            return
                    continue
                buf = self._buf
                index = bisect_right(buf, cursor, key=_seq)
                if index < len(buf):
                    # Walk the shared buffer itself, one event at a time: a
                    # copy of its tail (up to 2 x buffer_size events) would be
                    # kept alive, trimmed or not, for as long as the client
                    # takes to read it (forever, for one that stops reading).
                    trims = self._trims
                    while index < len(buf):
                        event = buf[index]
                        index += 1
                        cursor = event.seq
                        if not session_id or event.session_id == session_id:
                            yield event
                            if self._expired(until):
                                return
                            if self._trims != trims:
                                break  # the front was cut: find the cursor again
                    continue
                signal = self._signal
                if self._head > cursor:
                    continue
                if until is None:
                    await signal.wait()
                    continue
                remaining = until - self._clock.monotonic()
                if remaining <= 0:
                    return
                if remaining > 2 * self._poll:
                    # No timer: the hub wakes everyone at least every poll
                    # interval, and a timer per wait costs every stream a
                    # timer on every event it is woken for.
                    await signal.wait()
                    continue
                try:
                    async with asyncio.timeout(remaining):
                        await signal.wait()
                except TimeoutError:
                    return
        finally:
            self.subscribers -= 1

    async def _from_store(
        self, cursor: int, session_id: str, limit: int
    ) -> tuple[int, list[LogEvent], int]:
        """Reads a page behind the buffer, of at most ``limit`` events and
        about ``PAGE_BYTES``; returns the new cursor, the events and the
        limit for the next read."""
        head = self._head
        events = list(
            await self._store.read_events(after=cursor, limit=limit, session_id=session_id)
        )
        if not events:
            # Nothing (for this session) up to the store's head, which is at
            # least the head we noted before reading.
            return max(cursor, head), [], limit
        kept, size = 0, 0
        for event in events:
            size += _weight(event)
            if kept and size > PAGE_BYTES:
                break
            kept += 1
        if kept < len(events):
            del events[kept:]  # read again, with the next page
            limit = kept
        elif 2 * size <= PAGE_BYTES:
            limit = min(self._batch, 2 * limit)
        return events[-1].seq, events, limit
