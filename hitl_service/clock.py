"""Time as a dependency: logic asks a Clock, so tests can control time."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Wall time, monotonic time and sleeping."""

    def now(self) -> datetime:
        """Current UTC time (timezone-aware)."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds``."""
        ...


class SystemClock:
    """The real clock."""

    def now(self) -> datetime:
        """See base class."""
        return datetime.now(UTC)

    def monotonic(self) -> float:
        """See base class."""
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        """See base class."""
        await asyncio.sleep(seconds)


class WallSteps:
    """Notices steps of the wall clock (NTP stepping a clock that was off, a
    VM resumed from a snapshot, an operator setting the date): between two
    looks, wall time moved unlike monotonic time."""

    THRESHOLD = 1.0
    """Seconds of difference taken for a step: NTP's slewing moves the wall
    clock by at most 0.5 ms a second."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._offset: float | None = None

    def look(self) -> float:
        """Seconds the wall clock stepped since the last look (back when
        negative); 0.0 if it did not, and at the first look."""
        offset = self._clock.now().timestamp() - self._clock.monotonic()
        last, self._offset = self._offset, offset
        if last is None or abs(offset - last) < self.THRESHOLD:
            return 0.0
        return offset - last
