"""A clock tests can move forward; shared by the fake and the provider."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta


class FakeClock:
    """Wall time that starts at a fixed instant and moves only when told.

    It satisfies ``hitl_service.clock.Clock``. ``monotonic`` follows the same
    offset, and ``sleep`` advances the clock instead of waiting.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._start = start or datetime(2026, 3, 2, 10, 0, 0, tzinfo=UTC)
        self._offset = 0.0
        self._base_monotonic = time.monotonic()

    def now(self) -> datetime:
        """Current fake UTC time."""
        return self._start + timedelta(seconds=self._offset)

    def monotonic(self) -> float:
        """Monotonic seconds including the advanced offset."""
        return self._base_monotonic + self._offset

    async def sleep(self, seconds: float) -> None:
        """Advances the clock; yields once to the loop."""
        self.advance(seconds)
        await asyncio.sleep(0)

    def advance(self, seconds: float) -> None:
        """Moves time forward."""
        self._offset += max(0.0, seconds)


class LiveClock(FakeClock):
    """The fake's clock moving with real time, and jumping when advanced.

    The provider tests freeze the fake's time; end to end, two queue entries
    of one thread must not share a ``queued_at``, as they never do at LiveChat.
    """

    def __init__(self) -> None:
        # From the real time, as LiveChat's own clock: the service compares
        # the times LiveChat reports with its own (what an agent wrote
        # before the session went back to the queue, or before our stop).
        super().__init__(datetime.now(UTC))
        self._real_start = time.monotonic()

    def _elapsed(self) -> float:
        return time.monotonic() - self._real_start

    def now(self) -> datetime:
        return super().now() + timedelta(seconds=self._elapsed())

    def monotonic(self) -> float:
        return super().monotonic() + self._elapsed()


def rfc3339(moment: datetime) -> str:
    """LiveChat's timestamp format: microseconds and ``Z``."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
