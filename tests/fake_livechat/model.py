"""The fake's data: agents, groups, customers, chats, threads, webhooks, records."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass
class Agent:
    """An agent; ``id`` is the login e-mail, ``account_id`` a UUID."""

    id: str
    account_id: str
    name: str
    pat: str = ""
    avatar: str = ""
    group_ids: set[int] = field(default_factory=lambda: {0})
    accepting: bool = True
    all_access: bool = False

    def json(self, *, present: bool = True, visibility: str = "all") -> dict[str, Any]:
        """As a chat user."""
        return {
            "id": self.id,
            "type": "agent",
            "name": self.name,
            "email": self.id,
            "avatar": self.avatar,
            "present": present,
            "events_seen_up_to": "1970-01-01T00:00:00.000000Z",
            "visibility": visibility,
        }


@dataclass
class Group:
    """A group of agents; ``0`` is General."""

    id: int
    name: str
    language_code: str = "en"


@dataclass
class Customer:
    """A customer and its cookie identity."""

    id: str
    cid: str
    cst: str
    created_at: str
    name: str = ""
    email: str = ""
    avatar: str = ""
    chat_id: str = ""

    def json(self) -> dict[str, Any]:
        """As a chat user / get_customer answer."""
        data: dict[str, Any] = {"id": self.id, "type": "customer", "created_at": self.created_at}
        for key in ("name", "email", "avatar"):
            if value := getattr(self, key):
                data[key] = value
        return data


@dataclass
class Token:
    """An issued access token."""

    value: str
    kind: str  # "customer" or "agent"
    subject: str
    expires_at: datetime
    organization_id: str


@dataclass
class ChatUser:
    """A user's membership in a chat."""

    id: str
    type: str
    present: bool = True
    visibility: str = "all"


@dataclass
class Thread:
    """A thread; only a chat's last thread can be active."""

    id: str
    created_at: str
    active: bool = True
    events: list[dict[str, Any]] = field(default_factory=list)
    user_ids: list[str] = field(default_factory=list)
    queue: dict[str, Any] | None = None
    group_ids: list[int] = field(default_factory=list)
    previous_thread_id: str | None = None
    next_thread_id: str | None = None
    counter: int = 0

    def next_event_id(self) -> str:
        """``<thread_id>_<n>``."""
        self.counter += 1
        return f"{self.id}_{self.counter}"

    def json(self) -> dict[str, Any]:
        """As in get_chat / list_threads."""
        data: dict[str, Any] = {
            "id": self.id,
            "active": self.active,
            "user_ids": list(self.user_ids),
            "events": [dict(e) for e in self.events],
            "properties": {"routing": {"continuous": True}},
            "access": {"group_ids": list(self.group_ids)},
            "created_at": self.created_at,
            "previous_thread_id": self.previous_thread_id,
            "next_thread_id": self.next_thread_id,
        }
        if self.queue is not None:
            data["queue"] = dict(self.queue)
        return data


@dataclass
class Chat:
    """A chat: users, access, properties and threads."""

    id: str
    customer_id: str
    group_ids: list[int]
    properties: dict[str, Any] = field(default_factory=dict)
    users: dict[str, ChatUser] = field(default_factory=dict)
    threads: list[Thread] = field(default_factory=list)

    @property
    def thread(self) -> Thread:
        """The last thread."""
        return self.threads[-1]

    @property
    def active(self) -> bool:
        """True while the last thread is active."""
        return bool(self.threads) and self.thread.active


@dataclass
class Webhook:
    """A webhook registration."""

    id: str
    action: str
    url: str
    secret_key: str
    owner_client_id: str
    type: str
    description: str = ""
    filters: dict[str, Any] = field(default_factory=dict)
    additional_data: list[str] = field(default_factory=list)

    def json(self, *, with_secret: bool) -> dict[str, Any]:
        """As list_webhooks shows it."""
        data: dict[str, Any] = {
            "id": self.id,
            "url": self.url,
            "description": self.description,
            "action": self.action,
            "owner_client_id": self.owner_client_id,
            "type": self.type,
            "filters": dict(self.filters),
            "additional_data": list(self.additional_data),
        }
        if with_secret:
            data["secret_key"] = self.secret_key
        return data


@dataclass
class Call:
    """A recorded API request."""

    api: str
    method: str
    body: Any
    auth: str  # "basic", "bearer", "none" or "other"
    query: dict[str, str]
    headers: dict[str, str]
    path: str = ""
    status: int = 0
    error_type: str = ""


@dataclass
class Delivery:
    """One webhook delivery and its attempts."""

    id: int
    webhook_id: str
    action: str
    url: str
    envelope: dict[str, Any]
    attempts: list[str] = field(default_factory=list)  # status codes or error names
    outcome: str = "pending"  # pending, delivered, failed, dropped
    copy: int = 0  # 1 for the second copy of a delivery sent twice
