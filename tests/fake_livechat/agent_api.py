"""Agent Chat API methods (``/v3.6/agent/action/<method>``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fake_livechat.errors import LcError
from tests.fake_livechat.model import Agent
from tests.fake_livechat.state import FakeState, obj

Handler = Callable[[FakeState, Agent, dict[str, Any]], Any]


def _get_chat(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    chat = state.chat(body.get("chat_id"))
    state._access(chat, agent)
    return state.get_chat(chat, body.get("thread_id"))


def _list_threads(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    chat = state.chat(body.get("chat_id"))
    state._access(chat, agent)
    return state.list_threads(chat, body)


def _list_chats(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    chats = [
        c for c in state.chats.values() if agent.all_access or set(c.group_ids) & agent.group_ids
    ]
    filters = obj(body.get("filters"))
    if "active" in filters:
        chats = [c for c in chats if c.active == filters["active"]]
    return state.list_chats(list(reversed(chats)), body, 100)


def _get_customer(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    customer = state.customers.get(body.get("id"))  # type: ignore[arg-type]
    if customer is None:
        raise LcError("not_found", "Customer not found")
    data = customer.json()
    data["chat_ids"] = [customer.chat_id] if customer.chat_id else []
    return data


def _update_customer(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    customer = state.customers.get(body.get("id"))  # type: ignore[arg-type]
    if customer is None:
        raise LcError("not_found", "Customer not found")
    return state.update_customer(customer, body)


def _add_user(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    chat = state.chat(body.get("chat_id"))
    state._requester_present(chat, agent, body.get("ignore_requester_presence"))
    user_type, visibility = body.get("user_type"), body.get("visibility")
    if user_type not in ("agent", "customer") or visibility not in ("all", "agents"):
        raise LcError("validation", "user_type and visibility are required")
    state.add_user(
        chat, str(body.get("user_id")), user_type, visibility, requester_id=state.author_id(agent)
    )
    return {}


def _remove_user(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    chat = state.chat(body.get("chat_id"))
    if body.get("user_type") != "agent":
        raise LcError("validation", "Only agents can be removed")
    state.remove_user(chat, str(body.get("user_id")), requester_id=state.author_id(agent))
    return {}


def _agents_for_transfer(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    chat = state.chat(body.get("chat_id"))
    return [
        {"agent_id": a.id, "total_active_chats": 0}
        for a in state.available_agents(chat.group_ids, agent.id)
    ]


METHODS: dict[str, Handler] = {
    "start_chat": FakeState.start_chat,
    "resume_chat": FakeState.resume_chat,
    "send_event": FakeState.agent_send_event,
    "deactivate_chat": FakeState.deactivate_chat,
    "transfer_chat": FakeState.transfer_chat,
    "get_chat": _get_chat,
    "list_threads": _list_threads,
    "list_chats": _list_chats,
    "get_customer": _get_customer,
    "update_customer": _update_customer,
    "add_user_to_chat": _add_user,
    "remove_user_from_chat": _remove_user,
    "list_agents_for_transfer": _agents_for_transfer,
}
