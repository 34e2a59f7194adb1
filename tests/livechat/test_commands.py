"""register-webhooks / unregister-webhooks / --help."""

from __future__ import annotations

import io
from typing import Any

import pytest

from providers.base import SupportsCommands
from providers.livechat import LiveChatProvider
from tests.fake_livechat import FakeLiveChat
from tests.fake_livechat.model import Webhook
from tests.livechat.conftest import WEBHOOK_SECRET, MakeProvider

URL = "https://bridge.example.com/webhooks/livechat"
ACTIONS = {
    "incoming_event",
    "incoming_chat",
    "user_added_to_chat",
    "user_removed_from_chat",
    "chat_transferred",
    "chat_deactivated",
}


async def run(provider: LiveChatProvider, *argv: str) -> tuple[int, str]:
    out = io.StringIO()
    status = await provider.run_command(list(argv), out)
    return status, out.getvalue()


def made_by_hand(fake: FakeLiveChat, action: str, url: str, **fields: str) -> dict[str, Any]:
    """A webhook of this app registered outside the command (in LiveChat's console)."""
    return fake.state.register_webhook(
        {
            "action": action,
            "url": url,
            "secret_key": "other",
            "owner_client_id": fake.state.seed.client_id,
            "type": "license",
            **fields,
        }
    )


async def test_provider_supports_commands(provider: LiveChatProvider) -> None:
    assert isinstance(provider, SupportsCommands)


async def test_register_creates_every_webhook(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    status, text = await run(provider, "register-webhooks", "--url", URL)
    assert status == 0, text
    hooks = list(fake.state.webhooks.values())
    assert {h.action for h in hooks} == ACTIONS
    for hook in hooks:
        assert hook.url == URL
        assert hook.secret_key == WEBHOOK_SECRET
        assert hook.owner_client_id == fake.state.seed.client_id
        assert hook.type == "license"
    [incoming] = [h for h in hooks if h.action == "incoming_event"]
    assert incoming.filters == {"author_type": "agent"}
    assert text.count("registered:") == 6
    assert WEBHOOK_SECRET not in text


async def test_register_is_idempotent(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    await run(provider, "register-webhooks", "--url", URL)
    ids = set(fake.state.webhooks)
    status, text = await run(provider, "register-webhooks", "--url", URL)
    assert status == 0
    assert set(fake.state.webhooks) == ids
    assert text.count("ok:") == 6
    assert "done: 0 change(s)" in text


async def test_register_replaces_changed_webhooks(
    provider: LiveChatProvider, make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    await run(provider, "register-webhooks", "--url", URL)
    rotated = await make_provider(HITL_LIVECHAT_WEBHOOK_SECRET="a-new-secret")
    status, text = await run(rotated, "register-webhooks", "--url", URL + "/v2")
    assert status == 0
    assert len(fake.state.webhooks) == 6
    assert {h.url for h in fake.state.webhooks.values()} == {URL + "/v2"}
    assert {h.secret_key for h in fake.state.webhooks.values()} == {"a-new-secret"}
    assert "differs in URL, secret" in text
    assert "a-new-secret" not in text


class _Watched(dict[str, Webhook]):
    """The fake's webhooks, recording every moment an action had none."""

    def __init__(self, hooks: dict[str, Webhook]) -> None:
        super().__init__(hooks)
        self.gaps: list[str] = []

    def __delitem__(self, key: str) -> None:
        action = self[key].action
        super().__delitem__(key)
        if not any(h.action == action for h in self.values()):
            self.gaps.append(action)


@pytest.mark.parametrize("shown", [True, False])
async def test_a_rotated_secret_replaces_every_webhook_without_a_gap(
    provider: LiveChatProvider, make_provider: MakeProvider, fake: FakeLiveChat, shown: bool
) -> None:
    """Whether ``list_webhooks`` shows ``secret_key`` is unconfirmed: when it
    does not, the secret cannot be compared and the webhook is replaced.
    New before old: LiveChat delivers nothing between an unregister and a
    register."""
    fake.set_config(list_webhooks_shows_secret=shown)
    await run(provider, "register-webhooks", "--url", URL)
    fake.state.webhooks = watched = _Watched(fake.state.webhooks)
    rotated = await make_provider(
        HITL_LIVECHAT_WEBHOOK_SECRET="a-new-secret",
        HITL_LIVECHAT_WEBHOOK_SECRET_PREVIOUS=WEBHOOK_SECRET,
    )
    status, text = await run(rotated, "register-webhooks", "--url", URL)
    assert status == 0, text
    assert {h.secret_key for h in fake.state.webhooks.values()} == {"a-new-secret"}
    assert len(fake.state.webhooks) == 6
    assert watched.gaps == []
    assert "a-new-secret" not in text


async def test_a_replacement_livechat_refuses_as_a_duplicate_removes_the_old_one_first(
    provider: LiveChatProvider, make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    """Whether LiveChat refuses a second webhook for the same URL and action
    is unknown; if it does, the rotation still goes through."""
    await run(provider, "register-webhooks", "--url", URL)
    fake.add_fault("register_webhook", error_type="already_exists")
    rotated = await make_provider(HITL_LIVECHAT_WEBHOOK_SECRET="a-new-secret")
    status, text = await run(rotated, "register-webhooks", "--url", URL)
    assert status == 0, text
    assert {h.secret_key for h in fake.state.webhooks.values()} == {"a-new-secret"}
    assert len(fake.state.webhooks) == 6


async def test_a_replacement_at_the_limit_removes_the_old_one_first(
    provider: LiveChatProvider, make_provider: MakeProvider, fake: FakeLiveChat
) -> None:
    await run(provider, "register-webhooks", "--url", URL)
    for n in range(2):  # two made by hand: with ours, the action is full
        made_by_hand(fake, "chat_deactivated", f"https://other.example/{n}")
    status, text = await run(provider, "register-webhooks", "--url", URL + "/v2")
    assert status == 0, text
    ours = [h for h in fake.state.webhooks.values() if h.action == "chat_deactivated"]
    assert sorted(h.url for h in ours) == sorted(
        [URL + "/v2", "https://other.example/0", "https://other.example/1"]
    )


async def test_register_keeps_webhooks_made_by_hand(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    manual = made_by_hand(
        fake, "incoming_event", "https://other.example/hook", description="made in the console"
    )
    await run(provider, "register-webhooks", "--url", URL)
    assert manual["id"] in fake.state.webhooks
    status, _ = await run(provider, "unregister-webhooks")
    assert status == 0
    assert list(fake.state.webhooks) == [manual["id"]]


async def test_unregister_by_url(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    await run(provider, "register-webhooks", "--url", URL)
    status, text = await run(provider, "unregister-webhooks", "--url", "https://nope.example")
    assert status == 0
    assert "removed 0" in text
    assert len(fake.state.webhooks) == 6
    await run(provider, "unregister-webhooks", "--url", URL)
    assert fake.state.webhooks == {}


async def test_limit_reached_is_reported(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    for n in range(3):
        made_by_hand(fake, "chat_deactivated", f"https://other.example/{n}")
    status, text = await run(provider, "register-webhooks", "--url", URL)
    assert status == 1
    assert "failed:" in text
    assert "LIMIT_REACHED" in text or "limit_reached" in text


async def test_help_and_usage_errors(provider: LiveChatProvider) -> None:
    status, text = await run(provider, "--help")
    assert status == 0
    assert "register-webhooks" in text
    status, text = await run(provider, "register-webhooks", "--help")
    assert status == 0
    assert "--url" in text
    status, text = await run(provider, "register-webhooks")
    assert status == 2
    assert "--url" in text
    status, text = await run(provider)
    assert status == 2
    status, text = await run(provider, "register-webhooks", "--url", "not a url")
    assert status == 2
    status, text = await run(provider, "frobnicate")
    assert status == 2
