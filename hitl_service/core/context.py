"""What every part of the core shares: store, provider, clock, settings."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hitl_service.clock import Clock
    from hitl_service.config import Settings
    from hitl_service.core.retry import ProviderCalls
    from hitl_service.metrics import Metrics
    from hitl_service.store.base import Store
    from providers.base import Provider


@dataclass(frozen=True, slots=True)
class CoreContext:
    """Dependencies of the core's services.

    Attributes:
        owner: This replica's identity, written into outbox leases.
    """

    store: Store
    provider: Provider
    clock: Clock
    settings: Settings
    metrics: Metrics
    calls: ProviderCalls
    owner: str

    @property
    def provider_name(self) -> str:
        """The configured provider's name."""
        return self.provider.name

    @property
    def lease(self) -> timedelta:
        """How long an outbox claim protects an attempt.

        An attempt is bounded by the provider timeout; twice that plus a
        second leaves room for its store writes. It also outlasts the time the
        provider may still act on an unanswered request (``settle_seconds``)
        made as late as the attempt's end, so a replica taking over a crashed
        one's claim cannot check for a message too early and send it twice.
        """
        timeout = self.settings.provider_timeout
        settle = self.provider.capabilities.settle_seconds
        return timedelta(seconds=max(timeout * 2 + 1, timeout + settle + 1))
