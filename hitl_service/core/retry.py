"""The retry policy for provider calls: jittered exponential backoff within
a budget, honouring the provider's ``Retry-After``.

The core owns this policy for every provider; providers make one attempt
per call and report transient failures as ``ProviderUnavailable``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import structlog

from providers.errors import ProviderError, ProviderRejected, ProviderUnavailable

if TYPE_CHECKING:
    from hitl_service.clock import Clock
    from hitl_service.metrics import Metrics

T = TypeVar("T")
log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Backoff:
    """Delays between attempts: ``initial * factor**n``, capped, with jitter."""

    initial: float = 0.2
    factor: float = 2.0
    cap: float = 30.0

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before attempt ``attempt + 1`` (``attempt`` ≥ 1).

        "Equal jitter": half fixed, half random, so retries spread out but
        never collapse to zero; a provider's ``Retry-After`` is a floor.
        """
        base = min(self.cap, self.initial * self.factor ** max(0, attempt - 1))
        wait = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.cap * 4))
        return wait


class CallTimedOut(ProviderUnavailable):
    """Our own timeout ended a provider call: the request may have reached
    the provider, which may still be carrying it out (for up to its
    ``settle_seconds``)."""


class ProviderCalls:
    """Runs provider calls with timeouts, metrics and the retry policy."""

    def __init__(
        self,
        *,
        provider: str,
        clock: Clock,
        metrics: Metrics,
        call_timeout: float,
        backoff: Backoff | None = None,
    ) -> None:
        self._provider = provider
        self._clock = clock
        self._metrics = metrics
        self._call_timeout = call_timeout
        self.backoff = backoff or Backoff()

    async def once(
        self, operation: str, call: Callable[[float], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        """One attempt, bounded by the call timeout (and ``budget`` if smaller).

        ``call`` receives the timeout it must respect. Our own timeout firing
        is reported as an uncertain ``ProviderUnavailable``: the request may
        have reached the provider.
        """
        timeout = (
            self._call_timeout if budget is None else max(0.05, min(budget, self._call_timeout))
        )
        started = self._clock.monotonic()
        outcome = "error"
        try:
            async with asyncio.timeout(timeout):
                result = await call(timeout)
            outcome = "ok"
            return result
        except TimeoutError:
            outcome = "unavailable"
            raise CallTimedOut(
                f"{self._provider} did not answer {operation} within {timeout:.1f}s",
                uncertain=True,
            ) from None
        except ProviderUnavailable:
            outcome = "unavailable"
            raise
        except ProviderRejected:
            outcome = "rejected"
            raise
        finally:
            metrics = self._metrics
            metrics.child(metrics.provider_seconds, self._provider, operation, outcome).observe(
                self._clock.monotonic() - started
            )

    async def with_retries(
        self, operation: str, call: Callable[[float], Awaitable[T]], *, budget: float
    ) -> T:
        """Retries transient failures until success or the budget runs out.

        Raises:
            ProviderUnavailable: The last transient failure, once another
                attempt would not fit in the budget.
            ProviderRejected: A permanent refusal (never retried).
        """
        deadline = self._clock.monotonic() + budget
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._clock.monotonic()
            try:
                return await self.once(operation, call, budget=remaining)
            except ProviderUnavailable as exc:
                wait = self.backoff.delay(attempt, exc.retry_after)
                left = deadline - self._clock.monotonic()
                if wait + 0.05 >= left:
                    raise
                log.info(
                    "provider.retry",
                    provider=self._provider,
                    operation=operation,
                    attempt=attempt,
                    wait=round(wait, 3),
                    error=str(exc),
                )
                await self._clock.sleep(wait)


def is_permanent(exc: BaseException) -> bool:
    """True for provider errors that retrying cannot fix."""
    return isinstance(exc, ProviderError) and not isinstance(exc, ProviderUnavailable)
