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
