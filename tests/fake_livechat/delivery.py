"""Webhook delivery: envelopes, filters, retries, and scripted misbehaviour."""

from __future__ import annotations

import asyncio
import contextlib
import random
from dataclasses import dataclass
from typing import Any

import httpx

from tests.fake_livechat.model import Chat, Delivery, Webhook
from tests.fake_livechat.state import FakeState


@dataclass(frozen=True)
class Chaos:
    """Random misbehaviour of every delivery (``WebhookDelivery.chaos``).

    Attributes:
        drop: Probability that a delivery is never sent (LiveChat gave up).
        duplicate: Probability that a delivery is sent twice.
        max_delay: Each copy waits a random 0 to ``max_delay`` seconds
            before its first attempt, concurrently with the others, so
            later deliveries overtake earlier ones.
    """

    drop: float = 0.0
    duplicate: float = 0.0
    max_delay: float = 0.0


class WebhookDelivery:
    """Delivers fired webhooks to registered URLs, one at a time, in order.

    Knobs (attributes a test may set): ``drop_next`` deliveries are dropped
    (never sent, as after LiveChat's last retry), ``duplicate_next`` are sent
    twice, ``delay`` waits before each send, and :meth:`hold`/:meth:`release`
    collect deliveries and let them go in another order. :meth:`chaos` makes
    every delivery a random draw instead: dropped, doubled, delayed and
    reordered (each copy then goes on its own, retried as usual).
    """

    def __init__(self, state: FakeState) -> None:
        self.state = state
        self.deliveries: list[Delivery] = []
        self.drop_next = 0
        self.duplicate_next = 0
        self.delay = 0.0
        self._pending: list[Delivery] = []
        self._held = False
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._client: httpx.AsyncClient | None = None
        self._worker: asyncio.Task[None] | None = None
        self._rng = random.Random(11)
        self._chaos: Chaos | None = None
        self._chaos_rng = random.Random(0)
        self._chaos_tasks: set[asyncio.Task[None]] = set()

    def chaos(
        self, drop: float = 0.0, duplicate: float = 0.0, max_delay: float = 0.0, seed: int = 0
    ) -> None:
        """Turns random misbehaviour on (all zero: off), drawn from ``seed``."""
        on = bool(drop or duplicate or max_delay)
        self._chaos = Chaos(drop, duplicate, max_delay) if on else None
        self._chaos_rng = random.Random(seed)

    async def start(self) -> None:
        """Starts the delivery worker."""
        self._client = httpx.AsyncClient()
        self._worker = asyncio.create_task(self._run(), name="fake-livechat-webhooks")

    async def stop(self) -> None:
        """Stops the worker; undelivered webhooks stay pending."""
        for task in list(self._chaos_tasks):
            task.cancel()
        await asyncio.gather(*self._chaos_tasks, return_exceptions=True)
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
            self._worker = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def matches(self, hook: Webhook, action: str, chat: Chat | None, author_type: str) -> bool:
        """Applies the registration's action and filters."""
        if hook.action != action:
            return False
        filters = hook.filters
        wanted = filters.get("author_type")
        if wanted and action in ("incoming_event", "event_updated"):
            if author_type == "system":
                if self.state.config.author_filter_drops_system:
                    return False
            elif author_type != wanted:
                return False
        if filters.get("only_my_chats") and chat is not None:
            source = chat.properties.get("source", {})
            if source.get("client_id") != hook.owner_client_id:
                return False
        presence = filters.get("chat_presence")
        if isinstance(presence, dict) and chat is not None:
            present = {u.id for u in chat.users.values() if u.present}
            user_ids = presence.get("user_ids", {})
            if "values" in user_ids and not present & set(user_ids["values"]):
                return False
            if "exclude_values" in user_ids and present & set(user_ids["exclude_values"]):
                return False
        return True

    def on_emit(
        self, action: str, payload: dict[str, Any], chat: Chat | None, author_type: str
    ) -> None:
        """Queues one delivery per matching registration (``FakeState.emit``)."""
        for hook in list(self.state.webhooks.values()):
            if not self.matches(hook, action, chat, author_type):
                continue
            envelope = {
                "webhook_id": hook.id,
                "secret_key": hook.secret_key,
                "action": action,
                "organization_id": self.state.seed.organization_id,
                "payload": payload,
                "additional_data": {},
            }
            if self._chaos is not None:
                self._chaotic(self._chaos, hook, action, envelope)
                continue
            copies = 1
            if self.duplicate_next > 0:
                self.duplicate_next -= 1
                copies = 2
            for _ in range(copies):
                delivery = Delivery(len(self.deliveries) + 1, hook.id, action, hook.url, envelope)
                self.deliveries.append(delivery)
                if self.drop_next > 0:
                    self.drop_next -= 1
                    delivery.outcome = "dropped"
                    continue
                self._pending.append(delivery)
        self._notify()

    def _chaotic(self, chaos: Chaos, hook: Webhook, action: str, envelope: dict[str, Any]) -> None:
        """Queues one delivery the ``chaos`` way: each copy on its own task."""
        rng = self._chaos_rng
        copies = 2 if rng.random() < chaos.duplicate else 1
        for copy in range(copies):
            delivery = Delivery(len(self.deliveries) + 1, hook.id, action, hook.url, envelope)
            delivery.copy = copy
            self.deliveries.append(delivery)
            if rng.random() < chaos.drop:
                delivery.outcome = "dropped"
                continue
            wait = rng.uniform(0, chaos.max_delay)
            task = asyncio.create_task(self._deliver(delivery, wait))
            self._chaos_tasks.add(task)
            task.add_done_callback(self._chaos_tasks.discard)

    def _notify(self) -> None:
        if self._pending and not self._held:
            self._idle.clear()
        self._wake.set()

    def hold(self) -> None:
        """Collects deliveries without sending them."""
        self._held = True

    def release(self, order: str = "fifo") -> None:
        """Sends the held deliveries: ``fifo``, ``reverse`` or ``shuffle``."""
        if order == "reverse":
            self._pending.reverse()
        elif order == "shuffle":
            self._rng.shuffle(self._pending)
        self._held = False
        self._notify()

    async def idle(self, timeout: float = 10.0) -> None:
        """Waits until nothing is pending or in flight (held ones excepted)."""
        async with asyncio.timeout(timeout):
            await self._idle.wait()
            while self._chaos_tasks:
                await asyncio.gather(*self._chaos_tasks, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            if not self._pending or self._held:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            self._idle.clear()
            await self._deliver(self._pending.pop(0))

    async def _deliver(self, delivery: Delivery, wait: float = 0.0) -> None:
        assert self._client is not None
        config = self.state.config
        if self.delay or wait:
            await asyncio.sleep(self.delay + wait)
        for attempt in range(max(1, config.webhook_attempts)):
            if attempt:
                delays = config.webhook_retry_delays
                await asyncio.sleep(delays[min(attempt - 1, len(delays) - 1)] if delays else 0)
            try:
                response = await self._client.post(
                    delivery.url, json=delivery.envelope, timeout=config.webhook_timeout
                )
            except httpx.HTTPError as exc:
                delivery.attempts.append(type(exc).__name__)
                continue
            delivery.attempts.append(str(response.status_code))
            if response.status_code == 200:
                delivery.outcome = "delivered"
                return
        delivery.outcome = "failed"
