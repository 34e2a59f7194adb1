"""probe: names the wrong setting; unreachable LiveChat raises."""

from __future__ import annotations

import base64

import pytest

from providers.errors import ProviderUnavailable
from providers.livechat import LiveChatProvider
from tests.fake_livechat import FakeLiveChat
from tests.livechat.conftest import MakeProvider


async def test_everything_right(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    assert await provider.probe(timeout=5) == []
    assert fake.calls("get_group")[0].body == {"id": 0}


async def test_repeated_probes_reuse_one_customer(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    await provider.probe(timeout=5)
    await provider.probe(timeout=5)
    await provider.probe(timeout=5)
    assert len(fake.state.customers) == 1


def only(problems, setting: str) -> str:
    assert len(problems) == 1, problems
    assert problems[0].startswith(setting + ":"), problems
    return str(problems[0])


async def test_bad_agent_token(make_provider: MakeProvider, fake: FakeLiveChat) -> None:
    token = base64.b64encode(f"{fake.state.seed.bridge_account_id}:dal:nope".encode()).decode()
    provider = await make_provider(HITL_LIVECHAT_AGENT_TOKEN=token)
    text = only(await provider.probe(timeout=5), "HITL_LIVECHAT_AGENT_TOKEN")
    assert "dal:nope" not in text


async def test_bad_organization_id(make_provider: MakeProvider) -> None:
    provider = await make_provider(
        HITL_LIVECHAT_ORGANIZATION_ID="11111111-2222-4333-8444-555555555555"
    )
    only(await provider.probe(timeout=5), "HITL_LIVECHAT_ORGANIZATION_ID")


async def test_bad_group(make_provider: MakeProvider) -> None:
    provider = await make_provider(HITL_LIVECHAT_GROUP_ID="77")
    text = only(await provider.probe(timeout=5), "HITL_LIVECHAT_GROUP_ID")
    assert "77" in text


async def test_bad_client_id(make_provider: MakeProvider) -> None:
    provider = await make_provider(HITL_LIVECHAT_CLIENT_ID="not-our-app")
    only(await provider.probe(timeout=5), "HITL_LIVECHAT_CLIENT_ID")


async def test_bad_redirect_uri(make_provider: MakeProvider) -> None:
    provider = await make_provider(HITL_LIVECHAT_REDIRECT_URI="https://elsewhere.example/cb")
    only(await provider.probe(timeout=5), "HITL_LIVECHAT_REDIRECT_URI")


async def test_group_scope_missing(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    fake.add_fault("get_group", error_type="authorization")
    text = only(await provider.probe(timeout=5), "HITL_LIVECHAT_AGENT_TOKEN")
    assert "groups" in text


async def test_organization_refused_on_the_customer_api(
    provider: LiveChatProvider, fake: FakeLiveChat
) -> None:
    fake.add_fault(
        "list_chats", api="customer", error_type="validation", message="organization_id is invalid"
    )
    only(await provider.probe(timeout=5), "HITL_LIVECHAT_ORGANIZATION_ID")


async def test_unreachable_raises(provider: LiveChatProvider, fake: FakeLiveChat) -> None:
    fake.add_fault("list_chats", kind="status", status=503)
    with pytest.raises(ProviderUnavailable):
        await provider.probe(timeout=5)
