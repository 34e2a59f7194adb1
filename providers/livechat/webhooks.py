"""Verifies and normalizes LiveChat webhook deliveries.

Answers (as ``WebhookRejected`` statuses; the sidecar turns them into HTTP):

- 400: the body is not a JSON object, or a known action has the wrong shape;
- 401: ``secret_key`` is missing or matches no active secret (checked before
  anything else is read), or ``organization_id`` names another organization
  (a delivery for someone else is not trusted; nothing is recorded);
- otherwise a batch, possibly empty with ``ignored`` saying why (unknown or
  unused actions, internal notes, echoes): the sidecar answers 200.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog

from hitl_service.secret import Secret, matches_any
from providers.errors import WebhookRejected
from providers.livechat import normalize
from providers.livechat.memory import ChatMemory
from providers.livechat.models import (
    as_str,
    loads_json,
    parse_chat,
    parse_event,
    parse_queue,
    parse_user,
    str_list,
)
from providers.types import InboundEvent, WebhookBatch

log = structlog.get_logger(__name__)

# Actions LiveChat may send that carry nothing the core needs.
_UNUSED_ACTIONS: Final = frozenset(
    {
        "event_updated",
        "event_deleted",
        "events_marked_as_seen",
        "chat_access_updated",
        "chat_properties_updated",
        "chat_properties_deleted",
        "thread_properties_updated",
        "thread_properties_deleted",
        "thread_tagged",
        "thread_untagged",
        "incoming_rich_message_postback",
        "incoming_sneak_peek",
        "incoming_customer",
        "customer_session_fields_updated",
        "agent_deleted",
        "routing_status_set",
    }
)


# Event types of LiveChat's v3.6 docs; one outside them is new (see
# ``WebhookParser._unknown_type``). Only message, file and rich_message carry
# something for the end user.
_KNOWN_EVENT_TYPES: Final = frozenset(
    {"message", "file", "rich_message", "system_message", "form", "filled_form", "custom", "system"}
)


def _bad(reason: str) -> WebhookRejected:
    return WebhookRejected(400, reason)


def _require_str(payload: Mapping[str, Any], key: str) -> str:
    value = payload.get(key)
    if not isinstance(value, str) or not value:
        raise _bad(f"payload.{key} is missing or not a string")
    return value


class WebhookParser:
    """Turns one delivery into a WebhookBatch.

    Args:
        secrets: Every active webhook secret (current and previous).
        organization_id: The configured organization (lower-case UUID).
        memory: Caches shared with the provider.
    """

    def __init__(
        self, secrets: tuple[Secret, ...], organization_id: str, memory: ChatMemory
    ) -> None:
        self._secrets = secrets
        self._organization_id = organization_id.lower()
        self._memory = memory
        self._warned_types: set[str] = set()
        self._handlers: dict[str, Callable[[dict[str, Any]], WebhookBatch]] = {
            "incoming_event": self._incoming_event,
            "incoming_chat": self._incoming_chat,
            "user_added_to_chat": self._user_added,
            "user_removed_from_chat": self._user_removed,
            "chat_transferred": self._chat_transferred,
            "chat_deactivated": self._chat_deactivated,
        }

    def parse(self, headers: Mapping[str, str], body: bytes) -> WebhookBatch:
        """Verifies and normalizes a delivery; see the module docstring."""
        del headers  # LiveChat authenticates with the body's secret_key only
        try:
            envelope = loads_json(body)
        except (ValueError, RecursionError):
            raise _bad("the body is not JSON") from None
        if not isinstance(envelope, dict):
            raise _bad("the body is not a JSON object")
        secret = envelope.get("secret_key")
        if not isinstance(secret, str) or not matches_any(secret, self._secrets):
            raise WebhookRejected(401, "secret_key is missing or wrong")
        organization = envelope.get("organization_id")
        if organization is not None and (
            not isinstance(organization, str) or organization.lower() != self._organization_id
        ):
            raise WebhookRejected(401, "organization_id is not the configured organization")
        action = envelope.get("action")
        if not isinstance(action, str) or not action:
            raise _bad("action is missing or not a string")
        handler = self._handlers.get(action)
        if handler is None:
            why = "action not used" if action in _UNUSED_ACTIONS else "unknown action"
            return WebhookBatch(action=action[:64], ignored=f"{why} {action[:64]}")
        payload = envelope.get("payload")
        if not isinstance(payload, dict):
            raise _bad("payload is missing or not an object")
        return handler(payload)

    def _batch(self, action: str, events: list[InboundEvent], why: str = "") -> WebhookBatch:
        return WebhookBatch(action=action, events=tuple(events), ignored="" if events else why)

    def _incoming_event(self, payload: dict[str, Any]) -> WebhookBatch:
        chat_id = _require_str(payload, "chat_id")
        if not isinstance(payload.get("event"), dict):
            raise _bad("payload.event is missing or not an object")
        event = parse_event(payload["event"])
        if event is None:
            raise _bad("payload.event.id is missing")
        inbound, why = normalize.message_event(
            self._memory, chat_id, event, as_str(payload.get("thread_id"))
        )
        if inbound is None and event.type not in _KNOWN_EVENT_TYPES:
            self._unknown_type(event.type, chat_id)
        return self._batch("incoming_event", [inbound] if inbound else [], why)

    def _unknown_type(self, event_type: str, chat_id: str) -> None:
        """Warns, once per type, of an event type LiveChat added since: its
        content reaches nobody until the bridge learns it."""
        event_type = event_type[:64]
        if event_type in self._warned_types or len(self._warned_types) >= 100:
            return
        self._warned_types.add(event_type)
        log.warning("livechat.unknown_event_type", event_type=event_type, chat_id=chat_id[:64])

    def _incoming_chat(self, payload: dict[str, Any]) -> WebhookBatch:
        if not isinstance(payload.get("chat"), dict):
            raise _bad("payload.chat is missing or not an object")
        chat = parse_chat(payload["chat"])
        if chat is None:
            raise _bad("payload.chat.id is missing")
        self._memory.remember_users(chat.id, chat.users)
        events: list[InboundEvent] = []
        if chat.thread is not None:
            for event in chat.thread.events:
                # Learns the bridge's agent id from its own summary's echo.
                normalize.message_event(self._memory, chat.id, event)
            if chat.thread.active and chat.thread.queue is not None:
                events.append(normalize.queued_event(chat.id, chat.thread.id, chat.thread.queue))
        return self._batch("incoming_chat", events, "a chat started")

    def _user_added(self, payload: dict[str, Any]) -> WebhookBatch:
        chat_id = _require_str(payload, "chat_id")
        if not isinstance(payload.get("user"), dict):
            raise _bad("payload.user is missing or not an object")
        user = parse_user(payload["user"])
        if user is None:
            raise _bad("payload.user.id is missing")
        user_type = as_str(payload.get("user_type"))
        if user_type and user_type != user.type:
            user = dataclasses.replace(user, type=user_type)
        inbound, why = normalize.agent_added(
            self._memory,
            chat_id,
            as_str(payload.get("thread_id")),
            user,
            as_str(payload.get("requester_id")),
        )
        return self._batch("user_added_to_chat", [inbound] if inbound else [], why)

    def _user_removed(self, payload: dict[str, Any]) -> WebhookBatch:
        chat_id = _require_str(payload, "chat_id")
        user_id = _require_str(payload, "user_id")
        if as_str(payload.get("user_type")) == "customer":
            return self._batch("user_removed_from_chat", [], "the customer left")
        inbound, why = normalize.agent_removed(
            self._memory,
            chat_id,
            as_str(payload.get("thread_id")),
            user_id,
            as_str(payload.get("reason")),
            as_str(payload.get("requester_id")),
        )
        return self._batch("user_removed_from_chat", [inbound] if inbound else [], why)

    def _chat_transferred(self, payload: dict[str, Any]) -> WebhookBatch:
        chat_id = _require_str(payload, "chat_id")
        target = payload.get("transferred_to")
        if target is None:  # absent or null: a router transfer with nowhere named
            target = {}
        if not isinstance(target, dict):
            raise _bad("payload.transferred_to is not an object")
        events, why = normalize.transferred(
            self._memory,
            chat_id,
            as_str(payload.get("thread_id")),
            requester=as_str(payload.get("requester_id")),
            reason=as_str(payload.get("reason")),
            group_ids=str_list(target.get("group_ids")),
            agent_ids=str_list(target.get("agent_ids")),
            queue=parse_queue(payload.get("queue")),
        )
        return self._batch("chat_transferred", events, why)

    def _chat_deactivated(self, payload: dict[str, Any]) -> WebhookBatch:
        chat_id = _require_str(payload, "chat_id")
        event = normalize.ended(
            self._memory,
            chat_id,
            as_str(payload.get("thread_id")),
            as_str(payload.get("user_id")),
        )
        return self._batch("chat_deactivated", [event])
