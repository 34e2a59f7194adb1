"""The fake LiveChat's state and the rules of its methods.

Methods raise :class:`LcError` like LiveChat would and call ``emit`` for each
webhook the real platform would fire. Everything is synchronous, so each call
is atomic within the event loop.
"""

from __future__ import annotations

import random
import secrets
import string
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from tests.fake_livechat.clock import FakeClock, rfc3339
from tests.fake_livechat.config import FakeConfig
from tests.fake_livechat.errors import LcError, OAuthError
from tests.fake_livechat.model import (
    Agent,
    Call,
    Chat,
    ChatUser,
    Customer,
    Group,
    Thread,
    Token,
    Webhook,
)

Emit = Callable[[str, dict[str, Any], "Chat | None", str], None]
"""(action, payload, chat, author_type of an incoming_event or "")."""


def obj(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ``{}``."""
    return value if isinstance(value, dict) else {}


_EVENT_TYPES = {"message", "file", "rich_message", "system_message", "custom", "filled_form"}
_BUTTON_TYPES = {"webview", "message", "url", "phone"}
_URL_LIFETIME = 24 * 3600  # an uploaded file's URL, unless used in an event


@dataclass
class Seed:
    """Credentials and ids the fake starts with."""

    organization_id: str = "0b8e6f3e-2f0c-4a9e-b8a1-7d2c5e9f1a33"
    client_id: str = "fake-client-id-0123456789abcdef"
    redirect_uris: tuple[str, ...] = ("https://bridge.example.com/livechat/callback",)
    bridge_account_id: str = "5b3c2a1d-8e7f-4a6b-9c0d-1e2f3a4b5c6d"
    bridge_email: str = "bridge@acme.example"
    bridge_pat: str = "dal:fake-personal-access-token-0001"
    agents: tuple[tuple[str, str, str], ...] = (
        ("jane@acme.example", "Jane Doe", "https://cdn.example/jane.png"),
        ("joe@acme.example", "Joe Roe", ""),
    )
    groups: tuple[tuple[int, str], ...] = ((0, "General"), (19, "Support"))
    seed: int = 7


@dataclass
class FakeState:
    """Everything the fake knows. Tests may read and change it directly."""

    config: FakeConfig = field(default_factory=FakeConfig)
    clock: FakeClock = field(default_factory=FakeClock)
    seed: Seed = field(default_factory=Seed)
    base_url: str = "http://127.0.0.1"
    agents: dict[str, Agent] = field(default_factory=dict)
    groups: dict[int, Group] = field(default_factory=dict)
    customers: dict[str, Customer] = field(default_factory=dict)
    tokens: dict[str, Token] = field(default_factory=dict)
    chats: dict[str, Chat] = field(default_factory=dict)
    webhooks: dict[str, Webhook] = field(default_factory=dict)
    files: dict[str, tuple[bytes, str, str, float]] = field(default_factory=dict)
    sent_files: set[str] = field(default_factory=set)  # used in an event: never expire
    calls: list[Call] = field(default_factory=list)
    emitted: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    emit: Emit | None = None

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed.seed)
        bridge = Agent(
            id=self.seed.bridge_email,
            account_id=self.seed.bridge_account_id,
            name="HITL Bridge",
            pat=self.seed.bridge_pat,
            group_ids={group_id for group_id, _ in self.seed.groups},
            accepting=False,
            all_access=True,
        )
        self.agents[bridge.id] = bridge
        for email, name, avatar in self.seed.agents:
            self.agents[email] = Agent(
                id=email,
                account_id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
                name=name,
                avatar=avatar,
                group_ids={group_id for group_id, _ in self.seed.groups},
                accepting=False,
            )
        for group_id, name in self.seed.groups:
            self.groups[group_id] = Group(group_id, name)

    # -- helpers -----------------------------------------------------------------

    @property
    def bridge(self) -> Agent:
        """The agent behind the seeded PAT."""
        return self.agents[self.seed.bridge_email]

    def now(self) -> str:
        """The fake time as LiveChat writes it."""
        return rfc3339(self.clock.now())

    def new_id(self, length: int = 10) -> str:
        """A LiveChat-style upper-case id."""
        alphabet = string.ascii_uppercase + string.digits
        return "".join(self._rng.choice(alphabet) for _ in range(length))

    def author_id(self, agent: Agent) -> str:
        """Whose id authors what ``agent`` sends with a PAT (knob ``pat_author``)."""
        return agent.account_id if self.config.pat_author == "account_id" else agent.id

    def _emit(
        self, action: str, payload: dict[str, Any], chat: Chat | None, author_type: str = ""
    ) -> None:
        self.emitted.append((action, payload))
        if self.emit is not None:
            self.emit(action, payload, chat, author_type)

    def chat(self, chat_id: object) -> Chat:
        """The chat or ``not_found``."""
        chat = self.chats.get(chat_id) if isinstance(chat_id, str) else None
        if chat is None:
            raise LcError("not_found", "Chat not found")
        return chat

    def group(self, group_id: object) -> Group:
        """The group or the configured unknown-group error."""
        group = (
            self.groups.get(group_id)
            if isinstance(group_id, int) and not isinstance(group_id, bool)
            else None
        )
        if group is None:
            raise LcError(self.config.unknown_group_error, "Group not found")
        return group

    def chat_json(self, chat: Chat, thread: Thread | None = None) -> dict[str, Any]:
        """A chat as get_chat answers it."""
        return {
            "id": chat.id,
            "thread": (thread or chat.thread).json(),
            "users": [self.user_json(u) for u in chat.users.values()],
            "properties": chat.properties,
            "access": {"group_ids": list(chat.group_ids)},
            "is_followed": False,
        }

    def user_json(self, member: ChatUser) -> dict[str, Any]:
        """A chat user object."""
        if member.type == "customer":
            customer = self.customers.get(member.id)
            data: dict[str, Any] = (
                customer.json() if customer else {"id": member.id, "type": "customer"}
            )
            data["present"] = member.present
            return data
        agent = self.agents.get(member.id)
        if agent is None:
            return {"id": member.id, "type": "agent", "present": member.present}
        return agent.json(present=member.present, visibility=member.visibility)

    def check_keys(self, body: dict[str, Any], allowed: set[str]) -> None:
        """Rejects unknown top-level keys when the knob says LiveChat does (❓)."""
        if self.config.reject_unknown_keys and (extra := set(body) - allowed):
            raise LcError("validation", f"Unexpected keys: {', '.join(sorted(extra))}")

    def _event(
        self, thread: Thread, author: str, raw: object, *, force_all: bool = False
    ) -> dict[str, Any]:
        if not isinstance(raw, dict):
            raise LcError("validation", "event must be an object")
        kind = raw.get("type")
        if kind not in _EVENT_TYPES or kind == "system_message":
            raise LcError("validation", f"Unsupported event type: {kind!r}")
        event: dict[str, Any] = {"type": kind}
        if kind == "message":
            text = raw.get("text")
            if not isinstance(text, str) or not text:
                raise LcError("validation", "text is required")
            if len(text.encode("utf-8")) > self.config.max_text_bytes:
                raise LcError("validation", "text is too long")
            event["text"] = text
        elif kind == "file":
            url = raw.get("url")
            stored = self._cdn_file(url)
            if stored is None:
                raise LcError("validation", "url must be a LiveChat CDN URL")
            content, name, content_type, _ = stored
            event.update(url=url, name=name, content_type=content_type, size=len(content))
            if content_type.startswith("image/"):
                event.update(width=64, height=64, thumbnail_url=url, thumbnail2x_url=url)
        elif kind == "rich_message":
            if raw.get("template_id") not in ("cards", "sticker", "quick_replies", "ecommerce"):
                raise LcError("validation", "template_id is invalid")
            elements = raw.get("elements")
            if not isinstance(elements, list) or not 0 < len(elements) <= 10:
                raise LcError("validation", "elements must hold 1 to 10 items")
            for element in elements:
                buttons = element.get("buttons", []) if isinstance(element, dict) else None
                if not isinstance(buttons, list) or len(buttons) > 13:
                    raise LcError("validation", "at most 13 buttons per element")
                for button in buttons:
                    if (
                        not isinstance(button, dict)
                        or not isinstance(button.get("text"), str)
                        or button.get("type") not in _BUTTON_TYPES
                    ):
                        raise LcError(
                            "validation",
                            "a button needs a text and a type (webview, message, url or phone)",
                        )
            event.update(template_id=raw["template_id"], elements=elements)
        else:
            for key in ("content", "form_id", "fields"):
                if key in raw:
                    event[key] = raw[key]
        visibility = raw.get("visibility", raw.get("recipients", "all"))
        if visibility not in ("all", "agents"):
            raise LcError("validation", "visibility must be all or agents")
        event["visibility"] = "all" if force_all else visibility
        if isinstance(raw.get("custom_id"), str):
            event["custom_id"] = raw["custom_id"]
        if isinstance(raw.get("properties"), dict):
            event["properties"] = raw["properties"]
        event["id"] = thread.next_event_id()
        event["author_id"] = author
        event["created_at"] = self.now()
        return event

    def _system_event(self, thread: Thread, system_type: str, text: str) -> dict[str, Any]:
        return {
            "id": thread.next_event_id(),
            "type": "system_message",
            "system_message_type": system_type,
            "text": text,
            "created_at": self.now(),
            "visibility": "all",
        }

    def _file_id(self, url: object) -> str:
        prefix = f"{self.base_url}/cdn/"
        if not isinstance(url, str) or not url.startswith(prefix):
            return ""
        return url[len(prefix) :].split("/", 1)[0]

    def _cdn_file(self, url: object) -> tuple[bytes, str, str, float] | None:
        return self.file(self._file_id(url))

    def file(self, file_id: str) -> tuple[bytes, str, str, float] | None:
        """An uploaded file; gone 24 h after the upload unless used in an event."""
        stored = self.files.get(file_id)
        if stored is None:
            return None
        if file_id not in self.sent_files and self.clock.monotonic() - stored[3] > _URL_LIFETIME:
            return None
        return stored

    def _keep_files(self, events: list[dict[str, Any]]) -> None:
        """Files used in stored events keep their URLs for good."""
        for event in events:
            if event.get("type") == "file" and (file_id := self._file_id(event.get("url"))):
                self.sent_files.add(file_id)

    def _new_thread(self, chat: Chat, group_ids: list[int]) -> Thread:
        previous = chat.threads[-1] if chat.threads else None
        thread = Thread(id=self.new_id(), created_at=self.now(), group_ids=group_ids)
        if previous is not None:
            previous.next_thread_id = thread.id
            thread.previous_thread_id = previous.id
        chat.threads.append(thread)
        return thread

    def _join(self, chat: Chat, user_id: str, user_type: str, visibility: str = "all") -> None:
        member = chat.users.get(user_id)
        if member is None:
            chat.users[user_id] = ChatUser(user_id, user_type, True, visibility)
        else:
            member.present = True
            member.visibility = visibility
        if user_id not in chat.thread.user_ids:
            chat.thread.user_ids.append(user_id)

    def _requester_present(self, chat: Chat, agent: Agent, ignore: object) -> None:
        member = chat.users.get(agent.id)
        if ignore is not True and (member is None or not member.present):
            raise LcError("validation", "Requester is not a user of this chat")

    def _access(self, chat: Chat, agent: Agent) -> None:
        if not agent.all_access and not set(chat.group_ids) & agent.group_ids:
            raise LcError("missing_access", "No access to the chat's group")

    # -- accounts ------------------------------------------------------------------

    def customer_token(
        self, body: object, cookies: dict[str, str], bearer: str
    ) -> tuple[dict[str, Any], Customer]:
        """The customer token grants (``cookie`` and ``agent_token``)."""
        if not isinstance(body, dict):
            raise OAuthError("invalid_request", "body must be a JSON object")
        grant = body.get("grant_type")
        if body.get("client_id") != self.seed.client_id:
            raise OAuthError("invalid_client", "client_id is unknown")
        if grant == "cookie":
            if self.config.require_response_type and body.get("response_type") != "token":
                raise OAuthError("invalid_request", "response_type must be token")
            if body.get("organization_id") != self.seed.organization_id:
                raise OAuthError("invalid_request", "organization_id is invalid")
            if body.get("redirect_uri") not in self.seed.redirect_uris:
                raise OAuthError("invalid_request", "redirect_uri mismatch")
            customer = next(
                (
                    c
                    for c in self.customers.values()
                    if c.cid == cookies.get("__lc_cid") and c.cst == cookies.get("__lc_cst")
                ),
                None,
            )
            if customer is None:
                customer = self.add_customer()
        elif grant == "agent_token":
            token = self.tokens.get(bearer)
            if token is None or token.kind != "agent":
                raise OAuthError("invalid_grant", "a valid OAuth agent token is required")
            entity = body.get("entity_id")
            customer = (
                self.customers.get(entity) if isinstance(entity, str) else self.add_customer()
            )
            if customer is None:
                raise OAuthError("invalid_request", "entity_id is unknown")
        else:
            raise OAuthError("unsupported_grant_type", f"grant_type {grant!r} is not supported")
        value = "dal:" + secrets.token_urlsafe(24)
        self.tokens[value] = Token(
            value,
            "customer",
            customer.id,
            self.clock.now() + timedelta(seconds=self.config.token_lifetime),
            self.seed.organization_id,
        )
        answer: dict[str, Any] = {
            "access_token": value,
            "entity_id": customer.id,
            "expires_in": self.config.token_lifetime,
            "token_type": "Bearer",
            "organization_id": self.seed.organization_id,
        }
        if grant == "agent_token":
            answer["client_id"] = self.seed.client_id
        return answer, customer

    def add_customer(self) -> Customer:
        """A new customer with fresh cookies."""
        customer = Customer(
            id=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            cid=str(uuid.UUID(int=self._rng.getrandbits(128), version=4)),
            cst=secrets.token_hex(16),
            created_at=self.now(),
        )
        self.customers[customer.id] = customer
        return customer

    def expire_customer_tokens(self) -> None:
        """Makes every issued customer token expired (without moving time)."""
        for token in self.tokens.values():
            if token.kind == "customer":
                token.expires_at = self.clock.now() - timedelta(seconds=1)

    def customer_for_token(self, value: str) -> Customer:
        """The customer a Bearer token belongs to, or ``authentication``."""
        token = self.tokens.get(value)
        if token is None or token.kind != "customer" or token.expires_at <= self.clock.now():
            raise LcError("authentication", "Invalid access token")
        return self.customers[token.subject]

    def agent_for_basic(self, account_id: str, pat: str) -> Agent:
        """The agent of a PAT (Basic ``account_id:PAT``), or ``authentication``."""
        for agent in self.agents.values():
            if (
                agent.pat
                and agent.account_id == account_id
                and secrets.compare_digest(agent.pat, pat)
            ):
                return agent
        raise LcError("authentication", "Invalid access token")

    def agent_for_bearer(self, value: str) -> Agent:
        """The agent of an OAuth agent token; PATs and customer tokens fail."""
        token = self.tokens.get(value)
        if token is None or token.kind != "agent" or token.expires_at <= self.clock.now():
            raise LcError("authentication", "Invalid access token")
        return self.agents[token.subject]

    def issue_agent_token(self, agent_id: str) -> str:
        """An OAuth agent token (for the ``agent_token`` grant and Bearer calls)."""
        value = "dal:" + secrets.token_urlsafe(24)
        self.tokens[value] = Token(
            value,
            "agent",
            agent_id,
            self.clock.now() + timedelta(seconds=28800),
            self.seed.organization_id,
        )
        return value

    # -- agent chat API ------------------------------------------------------------

    def start_chat(self, agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
        """Agent ``start_chat``."""
        self.check_keys(body, {"chat", "active", "continuous"})
        spec = obj(body.get("chat"))
        users = spec.get("users", [])
        if not isinstance(users, list):
            raise LcError("validation", "chat.users must be an array")
        customers = [u for u in users if isinstance(u, dict) and u.get("type") == "customer"]
        if len(customers) != 1:
            raise LcError("validation", "Exactly one customer is required")
        customer = self.customers.get(str(customers[0].get("id")))
        if customer is None:
            raise LcError("validation", "Customer not found")
        if customer.chat_id and self.config.start_existing_customer_error:
            raise LcError(self.config.start_existing_customer_error, "Customer already has a chat")
        group_ids = self._group_ids(spec)
        chat = Chat(
            id=self.new_id(),
            customer_id=customer.id,
            group_ids=group_ids,
            properties={
                "source": {"client_id": self.seed.client_id}
                if self.config.pat_chats_have_client_id
                else {},
                "routing": {"continuous": body.get("continuous") is True},
            },
        )
        self._new_thread(chat, group_ids)
        thread_spec = obj(spec.get("thread"))
        events = [
            self._event(chat.thread, self.author_id(agent), e, force_all=True)
            for e in thread_spec.get("events", [])
        ]
        self.chats[chat.id] = chat
        customer.chat_id = chat.id
        self._join(chat, customer.id, "customer")
        self._join(chat, agent.id, "agent")
        chat.thread.events.extend(events)
        self._keep_files(events)
        if body.get("active") is False:
            chat.thread.active = False
        self._announce_chat(chat, events)
        return {
            "chat_id": chat.id,
            "thread_id": chat.thread.id,
            "event_ids": [e["id"] for e in events],
        }

    def _group_ids(self, spec: dict[str, Any]) -> list[int]:
        access = obj(spec.get("access"))
        group_ids = access.get("group_ids", [0])
        if not isinstance(group_ids, list) or not group_ids:
            raise LcError("validation", "access.group_ids must be a non-empty array")
        for group_id in group_ids:
            self.group(group_id)
        return list(group_ids)

    def _announce_chat(self, chat: Chat, events: list[dict[str, Any]]) -> None:
        self._emit("incoming_chat", {"chat": self.chat_json(chat)}, chat)
        if self.config.initial_events_webhook:
            for event in events:
                self._emit(
                    "incoming_event",
                    {"chat_id": chat.id, "thread_id": chat.thread.id, "event": dict(event)},
                    chat,
                    "agent",
                )

    def resume_chat(self, agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
        """Agent ``resume_chat``: a new thread in an inactive chat."""
        self.check_keys(body, {"chat", "active", "continuous"})
        spec = obj(body.get("chat"))
        chat = self.chat(spec.get("id"))
        self._access(chat, agent)
        if chat.active:
            raise LcError(self.config.resume_active_error, "Chat is already active")
        group_ids = self._group_ids(spec) if "access" in spec else list(chat.group_ids)
        thread_spec = obj(spec.get("thread"))
        raw_events = thread_spec.get("events", [])
        if not isinstance(raw_events, list):
            raise LcError("validation", "thread.events must be an array")
        # A refused event refuses the whole call, which changes nothing.
        scratch = Thread(id="CHECK", created_at="")
        for raw in raw_events:
            self._event(scratch, self.author_id(agent), raw, force_all=True)
        chat.group_ids = group_ids
        for member in chat.users.values():
            member.present = member.type == "customer"
        self._new_thread(chat, group_ids)
        events = [
            self._event(chat.thread, self.author_id(agent), e, force_all=True) for e in raw_events
        ]
        self._join(chat, chat.customer_id, "customer")
        self._join(chat, agent.id, "agent")
        chat.thread.events.extend(events)
        self._keep_files(events)
        self._announce_chat(chat, events)
        return {"thread_id": chat.thread.id, "event_ids": [e["id"] for e in events]}

    def agent_send_event(self, agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
        """Agent ``send_event``: the requester must be a chat user."""
        self.check_keys(body, {"chat_id", "event", "attach_to_last_thread"})
        chat = self.chat(body.get("chat_id"))
        member = chat.users.get(agent.id)
        if member is None:
            raise LcError("validation", "Requester is not a user of this chat")
        if not chat.active:
            raise LcError("chat_inactive", "Chat is inactive")
        event = self._event(chat.thread, self.author_id(agent), body.get("event"))
        if member.visibility == "agents" and event["visibility"] == "all":
            raise LcError("validation", "Supervisors can only send events visible to agents")
        return {"event_id": self.add_event(chat, event, "agent")}

    def add_event(self, chat: Chat, event: dict[str, Any], author_type: str) -> str:
        """Appends an event to the active thread and fires ``incoming_event``."""
        chat.thread.events.append(event)
        self._keep_files([event])
        self._emit(
            "incoming_event",
            {"chat_id": chat.id, "thread_id": chat.thread.id, "event": dict(event)},
            chat,
            author_type,
        )
        return str(event["id"])

    def deactivate(self, chat: Chat, user_id: str | None, system_type: str) -> None:
        """Closes the active thread and fires ``chat_deactivated``."""
        thread = chat.thread
        event = self._system_event(thread, system_type, "Chat closed")
        thread.events.append(event)
        thread.active = False
        thread.queue = None
        for member in chat.users.values():
            if member.type == "agent":
                member.present = False
        self._emit(
            "incoming_event",
            {"chat_id": chat.id, "thread_id": thread.id, "event": dict(event)},
            chat,
            "system",
        )
        payload: dict[str, Any] = {"chat_id": chat.id, "thread_id": thread.id}
        if user_id is not None:
            payload["user_id"] = user_id
        self._emit("chat_deactivated", payload, chat)

    def deactivate_chat(self, agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
        """Agent ``deactivate_chat``."""
        self.check_keys(body, {"id", "ignore_requester_presence"})
        chat = self.chat(body.get("id"))
        self._access(chat, agent)
        if not chat.active:
            if self.config.deactivate_inactive == "noop":
                return {}
            raise LcError("chat_inactive", "Chat is already inactive")
        self._requester_present(chat, agent, body.get("ignore_requester_presence"))
        self.deactivate(chat, self.author_id(agent), "manual_archived_agent")
        return {}

    def available_agents(self, group_ids: list[int], exclude: str = "") -> list[Agent]:
        """Agents of these groups accepting chats."""
        return [
            a
            for a in self.agents.values()
            if a.accepting
            and a.id != exclude
            and a.id != self.bridge.id
            and a.group_ids & set(group_ids)
        ]

    def transfer_chat(self, agent: Agent, body: dict[str, Any]) -> dict[str, Any]:
        """Agent ``transfer_chat``: assign, queue, or refuse."""
        self.check_keys(
            body, {"id", "target", "ignore_agents_availability", "ignore_requester_presence"}
        )
        chat = self.chat(body.get("id"))
        self._access(chat, agent)
        if not chat.active:
            raise LcError("chat_inactive", "Chat is inactive")
        self._requester_present(chat, agent, body.get("ignore_requester_presence"))
        target = obj(body.get("target")) or {"type": "group", "ids": list(chat.group_ids)}
        ids = target.get("ids")
        if not isinstance(ids, list) or not ids:
            raise LcError("validation", "target.ids must be a non-empty array")
        ignore = body.get("ignore_agents_availability") is True
        if target.get("type") == "agent":
            agents = [self.agents.get(i) for i in ids]
            if any(a is None for a in agents):
                raise LcError("validation", "Agent not found")
            self._assign(
                chat, [a.id for a in agents if a], list(chat.group_ids), agent.id, "manual"
            )
            return {}
        if target.get("type") != "group":
            raise LcError("validation", "target.type must be group or agent")
        for group_id in ids:
            self.group(group_id)
        available = self.available_agents(ids)
        if available and (self.config.auto_assign or not ignore):
            chat.group_ids = list(ids)
            self._assign(chat, [available[0].id], list(ids), agent.id, "manual")
            return {}
        if not ignore:
            raise LcError("validation", "Cannot assign any agent from requested groups")
        self.queue(chat, list(ids), requester_id=self.author_id(agent), reason="manual")
        return {}

    def queue(
        self, chat: Chat, group_ids: list[int], *, requester_id: str | None, reason: str
    ) -> None:
        """Puts the chat in the groups' queue and fires ``chat_transferred``."""
        chat.group_ids = group_ids
        chat.thread.group_ids = group_ids
        for member in chat.users.values():
            if (
                member.type == "agent"
                and member.id != self.bridge.id
                and member.visibility == "all"
            ):
                member.present = False
        position = 1 + sum(
            1
            for c in self.chats.values()
            if c.active and c.thread.queue is not None and c.id != chat.id
        )
        chat.thread.queue = {
            "position": position,
            "wait_time": 60 * position,
            "queued_at": self.now(),
        }
        payload: dict[str, Any] = {
            "chat_id": chat.id,
            "thread_id": chat.thread.id,
            "reason": reason,
            "transferred_to": {"group_ids": group_ids},
            "queue": dict(chat.thread.queue),
        }
        if requester_id is not None:
            payload["requester_id"] = requester_id
        self._emit("chat_transferred", payload, chat)

    def _assign(
        self,
        chat: Chat,
        agent_ids: list[str],
        group_ids: list[int],
        requester: str | None,
        reason: str,
    ) -> None:
        chat.thread.queue = None
        payload: dict[str, Any] = {
            "chat_id": chat.id,
            "thread_id": chat.thread.id,
            "reason": reason,
            "transferred_to": {"agent_ids": agent_ids, "group_ids": group_ids},
        }
        if requester is not None:
            payload["requester_id"] = requester
        self._emit("chat_transferred", payload, chat)
        for agent_id in agent_ids:
            self.add_user(chat, agent_id, "agent", "all", requester_id=requester, reason=reason)

    def add_user(
        self,
        chat: Chat,
        user_id: str,
        user_type: str,
        visibility: str,
        *,
        requester_id: str | None,
        reason: str = "manual",
    ) -> None:
        """Adds a user and fires ``user_added_to_chat``."""
        if not chat.active:
            raise LcError("chat_inactive", "Chat is inactive")
        if user_type == "customer":
            if visibility != "all":
                raise LcError("validation", "A customer must be added with visibility all")
            if any(u.type == "customer" and u.id != user_id for u in chat.users.values()):
                raise LcError("validation", "A chat can have only one customer")
            user = self.customers[user_id].json()
        else:
            agent = self.agents.get(user_id)
            if agent is None:
                raise LcError("validation", "Agent not found")
            user = agent.json(visibility=visibility)
        if visibility == "all":
            chat.thread.queue = None
        self._join(chat, user_id, user_type, visibility)
        payload: dict[str, Any] = {
            "chat_id": chat.id,
            "thread_id": chat.thread.id,
            "user": user,
            "user_type": user_type,
            "reason": reason,
        }
        if requester_id is not None:
            payload["requester_id"] = requester_id
        self._emit("user_added_to_chat", payload, chat)

    def remove_user(
        self, chat: Chat, user_id: str, *, requester_id: str | None, reason: str = "manual"
    ) -> None:
        """Removes an agent and fires ``user_removed_from_chat``."""
        member = chat.users.get(user_id)
        if member is None or member.type != "agent":
            raise LcError("validation", "Only agents who are chat users can be removed")
        member.present = False
        payload: dict[str, Any] = {
            "chat_id": chat.id,
            "thread_id": chat.thread.id,
            "user_id": user_id,
            "user_type": "agent",
            "reason": reason,
        }
        if requester_id is not None:
            payload["requester_id"] = requester_id
        self._emit("user_removed_from_chat", payload, chat)

    def get_chat(self, chat: Chat, thread_id: object) -> dict[str, Any]:
        """``get_chat`` answer (latest thread unless one is named)."""
        thread = chat.thread
        if thread_id is not None:
            found = [t for t in chat.threads if t.id == thread_id]
            if not found:
                raise LcError("not_found", "Thread not found")
            thread = found[0]
        return self.chat_json(chat, thread)

    def list_threads(self, chat: Chat, body: dict[str, Any]) -> dict[str, Any]:
        """``list_threads`` with ``sort_order``, ``limit`` and ``page_id``."""
        threads = list(chat.threads)
        page = body.get("page_id")
        if isinstance(page, str) and page.startswith("p:"):
            order, offset, limit = page[2:].split(":")
            start, size = int(offset), int(limit)
        else:
            order = body.get("sort_order", "desc")
            size = body.get("limit", 3)
            if not isinstance(size, int) or not 0 < size <= 100:
                raise LcError("validation", "limit must be 1 to 100")
            start = 0
        if order == "desc":
            threads.reverse()
        chunk = threads[start : start + size]
        answer: dict[str, Any] = {
            "threads": [t.json() for t in chunk],
            "found_threads": len(threads),
        }
        if start + size < len(threads):
            answer["next_page_id"] = f"p:{order}:{start + size}:{size}"
        if start > 0:
            answer["previous_page_id"] = f"p:{order}:{max(0, start - size)}:{size}"
        return answer

    def list_chats(self, chats: list[Chat], body: dict[str, Any], max_limit: int) -> dict[str, Any]:
        """``list_chats`` (no paging beyond the first page)."""
        limit = body.get("limit", 10)
        if not isinstance(limit, int) or not 0 < limit <= max_limit:
            raise LcError("validation", f"limit must be 1 to {max_limit}")
        summaries = [
            {
                "id": c.id,
                "last_thread_summary": {
                    "id": c.thread.id,
                    "active": c.active,
                    "created_at": c.thread.created_at,
                },
                "users": [self.user_json(u) for u in c.users.values()],
                "access": {"group_ids": c.group_ids},
            }
            for c in chats[:limit]
        ]
        return {"chats_summary": summaries, "found_chats": len(chats), "total_chats": len(chats)}

    def update_customer(self, customer: Customer, body: dict[str, Any]) -> dict[str, Any]:
        """``update_customer`` (agent or customer API)."""
        fields = {k: body[k] for k in ("name", "email", "avatar") if k in body}
        if not fields and "session_fields" not in body:
            raise LcError("validation", "At least one field is required")
        for key, value in fields.items():
            if not isinstance(value, str):
                raise LcError("validation", f"{key} must be a string")
            if key == "email" and "@" not in value:
                raise LcError("validation", "email is invalid")
            setattr(customer, key, value)
        return {}

    def upload(self, name: str, content: bytes, content_type: str) -> dict[str, Any]:
        """``upload_file``: stores the bytes on the fake CDN."""
        if len(content) > self.config.max_upload_bytes:
            raise LcError("entity_too_large", "File is too large")
        if name.lower().endswith((".exe", ".bat", ".cmd", ".msi", ".scr", ".com")):
            raise LcError("validation", "File type is not allowed")
        file_id = self.new_id(16).lower()
        self.files[file_id] = (content, name, content_type, self.clock.monotonic())
        return {"url": f"{self.base_url}/cdn/{file_id}/{name}"}

    # -- configuration API ---------------------------------------------------------

    def register_webhook(self, body: dict[str, Any]) -> dict[str, Any]:
        """``register_webhook``: at most 3 per action per client."""
        for key in ("action", "secret_key", "url", "owner_client_id", "type"):
            if not isinstance(body.get(key), str) or not body[key]:
                raise LcError("validation", f"{key} is required")
        if body["owner_client_id"] != self.seed.client_id:
            raise LcError("validation", "owner_client_id is not your app")
        if len(body["url"]) > 500:
            raise LcError("validation", "url is too long")
        same = [
            w
            for w in self.webhooks.values()
            if w.action == body["action"] and w.owner_client_id == body["owner_client_id"]
        ]
        if len(same) >= 3:
            raise LcError("limit_reached", "At most 3 webhooks per action")
        hook = Webhook(
            id=self.new_id(32).lower(),
            action=body["action"],
            url=body["url"],
            secret_key=body["secret_key"],
            owner_client_id=body["owner_client_id"],
            type=body["type"],
            description=body.get("description", "")
            if isinstance(body.get("description"), str)
            else "",
            filters=body.get("filters", {}) if isinstance(body.get("filters"), dict) else {},
            additional_data=body.get("additional_data", [])
            if isinstance(body.get("additional_data"), list)
            else [],
        )
        self.webhooks[hook.id] = hook
        return {"id": hook.id}
