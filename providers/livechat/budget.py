"""Time budget of one provider method, and its error boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from providers.errors import ProviderUnavailable
from providers.livechat.client import ApiError
from providers.livechat.failures import map_api_error


class Budget:
    """The time one provider method has left, and whether it sent a change.

    Attributes:
        sent: True once a call that changes something at LiveChat started;
            a timeout after that is reported as uncertain.
    """

    def __init__(self, operation: str, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._deadline = self._loop.time() + timeout
        self.operation = operation
        self.sent = False

    def left(self) -> float:
        """Seconds left for the next HTTP call.

        Raises:
            ProviderUnavailable: None is left.
        """
        remaining = self._deadline - self._loop.time()
        if remaining <= 0:
            raise ProviderUnavailable(
                f"LiveChat {self.operation} ran out of time", uncertain=self.sent
            )
        return remaining

    def sending(self) -> float:
        """Like :meth:`left`, for a call that changes something."""
        remaining = self.left()
        self.sent = True
        return remaining


@asynccontextmanager
async def bounded(operation: str, timeout: float) -> AsyncIterator[Budget]:
    """Runs a provider method within ``timeout`` and maps leftover refusals.

    Raises:
        ProviderUnavailable: The method did not finish in time.
        ProviderError: An ``ApiError`` nobody handled, mapped.
    """
    budget = Budget(operation, timeout)
    try:
        async with asyncio.timeout(timeout):
            yield budget
    except TimeoutError:
        raise ProviderUnavailable(
            f"LiveChat {operation} did not finish within {timeout:g} s", uncertain=budget.sent
        ) from None
    except ApiError as err:
        raise map_api_error(err) from None
