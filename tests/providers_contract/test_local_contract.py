"""The built-in ``local`` provider (the console) through the reusable
contract suite: media, locations and cards carried natively."""

from __future__ import annotations

import json

import pytest

from hitl_service.app import App
from providers import Agent, Author
from providers.local.provider import LocalProvider
from tests.providers_contract.contract import AgentSide, AgentSideFor, ProviderContract


class _Console:
    """The console's agent actions, as the page makes them."""

    def __init__(self, provider: LocalProvider) -> None:
        self._provider = provider

    async def take(self, chat_id: str, agent: Agent) -> None:
        await self._provider.take(chat_id, agent)

    async def reply(self, chat_id: str, agent: Agent, text: str) -> None:
        await self._provider.reply(chat_id, agent, text)

    async def close(self, chat_id: str, agent: Agent) -> None:
        await self._provider.end(chat_id, agent, "")

    def received(self, chat_id: str) -> list[str]:
        conversation = self._provider._chats[chat_id]
        return [
            json.dumps(entry, ensure_ascii=False)
            for entry in conversation.messages
            if entry["author"] == Author.USER.value
        ]


class TestContract(ProviderContract):
    @pytest.fixture
    def contract_env(self, service_env: dict[str, str]) -> dict[str, str]:
        return service_env  # HITL_PROVIDER=local, its state file in the data dir

    @pytest.fixture
    def agent_side(self) -> AgentSideFor:
        def side(app: App) -> AgentSide:
            assert isinstance(app.provider, LocalProvider)
            return _Console(app.provider)

        return side
