"""Bounded in-memory facts about chats, shared by webhooks, catch-up and calls.

Nothing here is needed for correctness after a restart (dedupe keys come from
payload ids, echoes are also recognized by id shapes and custom-id prefixes);
the memory makes names, assignees and echo filtering better while it lasts.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Final, Generic, TypeVar

from providers.livechat.models import LcUser, is_customer_id
from providers.types import Agent

OWN_CUSTOM_ID_PREFIX: Final = "hitl:"
"""Prefix of the ``custom_id`` of events the bridge itself creates (the
handoff summary and transcript), so their echoes are known after a restart."""

K = TypeVar("K")
V = TypeVar("V")


class Lru(Generic[K, V]):
    """A small LRU map: the oldest entry goes when it is full."""

    def __init__(self, capacity: int) -> None:
        self._data: OrderedDict[K, V] = OrderedDict()
        self._capacity = capacity

    def get(self, key: K) -> V | None:
        """The value, marking it recently used."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: K, value: V) -> None:
        """Stores a value, evicting the oldest past capacity."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self._capacity:
            self._data.popitem(last=False)

    def pop(self, key: K) -> V | None:
        """Removes and returns a value."""
        return self._data.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def __len__(self) -> int:
        return len(self._data)


@dataclass(slots=True)
class ChatFacts:
    """What the provider has learned about one chat."""

    agents: dict[str, Agent] = field(default_factory=dict)
    customers: set[str] = field(default_factory=set)
    assignee: str = ""
    start_group: str | None = None  # the group our own start-up transfer targets
    stopped_by_us: bool = False


class ChatMemory:
    """Per-chat caches plus the bridge's own identities and sent custom ids.

    Args:
        own_ids: Ids that are the bridge itself (the account id inside the
            agent token, the configured agent e-mail).
        capacity: How many chats (and custom ids) to remember.
    """

    def __init__(self, own_ids: set[str], capacity: int = 4096) -> None:
        self._own_ids = {i for i in own_ids if i}
        self._learned: Lru[str, bool] = Lru(16)
        self._chats: Lru[str, ChatFacts] = Lru(capacity)
        # Echoes come back within seconds, and an unanswered send matters for
        # LiveChat's 15 s server timeout: the latest ``capacity`` ids are plenty
        # (each entry costs ~160 bytes; 4x as many grew a soak's RSS by ~5 MB
        # before the caches were full).
        # custom id -> monotonic time it was sent at while unanswered, else 0.0
        self._custom_ids: Lru[str, float] = Lru(capacity)
        self._own_events: Lru[str, bool] = Lru(capacity)

    def facts(self, chat_id: str) -> ChatFacts:
        """The facts of a chat, created empty when unknown."""
        facts = self._chats.get(chat_id)
        if facts is None:
            facts = ChatFacts()
            self._chats.put(chat_id, facts)
        return facts

    def known(self, chat_id: str) -> ChatFacts | None:
        """The facts of a chat, or None."""
        return self._chats.get(chat_id)

    def is_own(self, user_id: str) -> bool:
        """True for the bridge's own agent identities."""
        return bool(user_id) and (user_id in self._own_ids or user_id in self._learned)

    def learn_own(self, user_id: str) -> None:
        """Remembers an id seen authoring the bridge's own events."""
        if user_id and not is_customer_id(user_id) and user_id not in self._own_ids:
            self._learned.put(user_id, True)

    def is_customer(self, chat_id: str, user_id: str) -> bool:
        """True when ``user_id`` is a customer (by id shape or by the chat's users)."""
        if is_customer_id(user_id) and user_id not in self._own_ids:
            return True
        facts = self.known(chat_id)
        return facts is not None and user_id in facts.customers

    def remember_users(self, chat_id: str, users: tuple[LcUser, ...]) -> None:
        """Caches the names and avatars of a chat's agents and its customer."""
        facts = self.facts(chat_id)
        for user in users:
            if user.type == "customer":
                facts.customers.add(user.id)
            elif not self.is_own(user.id):
                facts.agents[user.id] = Agent(id=user.id, name=user.name, avatar_url=user.avatar)

    def agent(self, chat_id: str, agent_id: str) -> Agent:
        """The agent with its cached name and avatar (just the id if unknown)."""
        facts = self.known(chat_id)
        if facts is not None and agent_id in facts.agents:
            return facts.agents[agent_id]
        return Agent(id=agent_id)

    def sent_custom_id(self, custom_id: str, at: float = 0.0) -> None:
        """Remembers a ``custom_id`` our customer sent, to drop its echo.

        ``at`` is the monotonic time the send started; it counts until
        :meth:`answered` says LiveChat answered that send.
        """
        self._custom_ids.put(custom_id, at)

    def answered(self, custom_id: str) -> None:
        """LiveChat answered the send of ``custom_id`` (whatever it said)."""
        if custom_id in self._custom_ids:
            self._custom_ids.put(custom_id, 0.0)

    def unanswered_since(self, custom_id: str) -> float | None:
        """Monotonic time of this process's last send of ``custom_id`` that got no
        answer (a timeout, a lost connection); None if there is none."""
        at = self._custom_ids.get(custom_id)
        return at or None

    def is_sent_custom_id(self, custom_id: str) -> bool:
        """True for a ``custom_id`` we sent (or our own prefix)."""
        return bool(custom_id) and (
            custom_id.startswith(OWN_CUSTOM_ID_PREFIX) or custom_id in self._custom_ids
        )

    def created_events(self, event_ids: list[str]) -> None:
        """Remembers event ids the bridge created (start/resume answers)."""
        for event_id in event_ids:
            self._own_events.put(event_id, True)

    def is_own_event(self, event_id: str) -> bool:
        """True for an event the bridge created."""
        return event_id in self._own_events
