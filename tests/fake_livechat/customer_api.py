"""Customer Chat API methods (``/v3.6/customer/action/<method>``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fake_livechat.errors import LcError
from tests.fake_livechat.model import Chat, Customer
from tests.fake_livechat.state import FakeState

Handler = Callable[[FakeState, Customer, dict[str, Any]], Any]


def _own_chat(state: FakeState, customer: Customer, chat_id: object) -> Chat:
    chat = state.chats.get(chat_id) if isinstance(chat_id, str) else None
    if chat is None or chat.customer_id != customer.id:
        raise LcError("not_found", "Chat not found")
    return chat


def _hide_notes(data: dict[str, Any]) -> dict[str, Any]:
    """Customers never see ``visibility: agents`` events."""
    for thread in [data.get("thread"), *data.get("threads", [])]:
        if isinstance(thread, dict):
            thread["events"] = [
                e for e in thread.get("events", []) if e.get("visibility") != "agents"
            ]
    return data


def _send_event(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    state.check_keys(body, {"chat_id", "event", "attach_to_last_thread"})
    chat = _own_chat(state, customer, body.get("chat_id"))
    if not chat.active and body.get("attach_to_last_thread") is not True:
        raise LcError("chat_inactive", "Chat is inactive")
    event = state._event(chat.thread, customer.id, body.get("event"))
    if event["visibility"] != "all":
        raise LcError("validation", "Customers can only send events visible to all")
    return {"event_id": state.add_event(chat, event, "customer")}


def _get_chat(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    chat = _own_chat(state, customer, body.get("chat_id"))
    return _hide_notes(state.get_chat(chat, body.get("thread_id")))


def _list_threads(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    chat = _own_chat(state, customer, body.get("chat_id"))
    return _hide_notes(state.list_threads(chat, body))


def _list_chats(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    chats = [c for c in state.chats.values() if c.customer_id == customer.id]
    return state.list_chats(chats, body, 25)


def _get_customer(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    return customer.json()


def _update_customer(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    return state.update_customer(customer, body)


def _deactivate_chat(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    chat = _own_chat(state, customer, body.get("id"))
    if not chat.active:
        raise LcError("chat_inactive", "Chat is already inactive")
    state.deactivate(chat, customer.id, "manual_archived_customer")
    return {}


def _group_statuses(state: FakeState, customer: Customer, body: dict[str, Any]) -> Any:
    ids = list(state.groups) if body.get("all") else body.get("group_ids", [])
    return {
        "groups_status": {
            str(g): "online" if state.available_agents([g]) else "online_for_queue"
            for g in ids
            if g in state.groups
        }
    }


METHODS: dict[str, Handler] = {
    "send_event": _send_event,
    "get_chat": _get_chat,
    "list_threads": _list_threads,
    "list_chats": _list_chats,
    "get_customer": _get_customer,
    "update_customer": _update_customer,
    "deactivate_chat": _deactivate_chat,
    "list_group_statuses": _group_statuses,
}
