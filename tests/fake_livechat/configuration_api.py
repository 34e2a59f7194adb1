"""Configuration API methods (``/v3.6/configuration/action/<method>``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tests.fake_livechat.errors import LcError
from tests.fake_livechat.model import Agent
from tests.fake_livechat.state import FakeState

Handler = Callable[[FakeState, Agent, dict[str, Any]], Any]


def _group_json(state: FakeState, group_id: int) -> dict[str, Any]:
    group = state.group(group_id)
    members = [a for a in state.agents.values() if group_id in a.group_ids]
    return {
        "id": group.id,
        "name": group.name,
        "language_code": group.language_code,
        "routing_status": "accepting_chats" if state.available_agents([group_id]) else "offline",
        "agent_priorities": {a.id: "normal" for a in members},
    }


def _list_groups(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    return [_group_json(state, g) for g in sorted(state.groups)]


def _get_group(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    return _group_json(state, body.get("id"))  # type: ignore[arg-type]


def _register(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    return state.register_webhook(body)


def _list_webhooks(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    owner = body.get("owner_client_id")
    if not isinstance(owner, str) or not owner:
        raise LcError("validation", "owner_client_id is required")
    show = state.config.list_webhooks_shows_secret
    return [w.json(with_secret=show) for w in state.webhooks.values() if w.owner_client_id == owner]


def _unregister(state: FakeState, agent: Agent, body: dict[str, Any]) -> Any:
    hook = state.webhooks.get(body.get("id"))  # type: ignore[arg-type]
    if hook is None or hook.owner_client_id != body.get("owner_client_id"):
        raise LcError("not_found", "Webhook not found")
    del state.webhooks[hook.id]
    return {}


METHODS: dict[str, Handler] = {
    "list_groups": _list_groups,
    "get_group": _get_group,
    "register_webhook": _register,
    "list_webhooks": _list_webhooks,
    "unregister_webhook": _unregister,
    "get_license_webhooks_state": lambda s, a, b: {"license_webhooks_enabled": True},
}
