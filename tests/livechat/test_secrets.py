"""Secrets never reach logs or error messages."""

from __future__ import annotations

import base64
import json

import pytest
import structlog

from providers.errors import ProviderError
from providers.livechat import LiveChatProvider
from providers.types import Message
from tests.fake_livechat import FakeClock, FakeLiveChat
from tests.livechat.conftest import WEBHOOK_SECRET, MakeProvider, Receiver, start_session


async def test_full_flow_leaks_no_secret(
    make_provider: MakeProvider,
    fake: FakeLiveChat,
    clock: FakeClock,
    receiver: Receiver,
    provider: LiveChatProvider,
) -> None:
    errors: list[BaseException] = []
    with structlog.testing.capture_logs() as logs:
        session = await start_session(provider, title="Refund")
        tokens = [session.user.state["access_token"], *session.user.state["cookies"].values()]
        await provider.send(
            session.chat, session.user, Message("hi"), request_id="m1", uncertain=False, timeout=5
        )
        clock.advance(9 * 3600)
        await provider.send(
            session.chat,
            session.user,
            Message("later"),
            request_id="m2",
            uncertain=False,
            timeout=5,
        )
        tokens.append(session.user.state["access_token"])
        fake.state.expire_customer_tokens()
        await provider.send(
            session.chat,
            session.user,
            Message("again"),
            request_id="m3",
            uncertain=False,
            timeout=5,
        )
        tokens.append(session.user.state["access_token"])
        fake.agent_join(session.chat_id)
        fake.agent_message(session.chat_id, text="reply")
        await fake.delivery.idle()
        await provider.catch_up(session.chat, session.user, "", timeout=5)
        await provider.probe(timeout=5)
        # Failures whose messages must be clean too.
        for body in (b"{", json.dumps({"secret_key": "wrong-guess-123", "action": "x"}).encode()):
            try:
                provider.parse_webhook({}, body)
            except ProviderError as exc:
                errors.append(exc)
        bad_token = base64.b64encode(
            f"{fake.state.seed.bridge_account_id}:dal:bad-pat-456".encode()
        ).decode()
        bad = await make_provider(HITL_LIVECHAT_AGENT_TOKEN=bad_token)
        problems = await bad.probe(timeout=5)
        for method in (start_session(bad),):
            try:
                await method
            except ProviderError as exc:
                errors.append(exc)
        fake.add_fault("send_event", kind="lost_response")
        try:
            await provider.send(
                session.chat,
                session.user,
                Message("x"),
                request_id="m4",
                uncertain=False,
                timeout=5,
            )
        except ProviderError as exc:
            errors.append(exc)
        await provider.stop(session.chat, session.user, "done", timeout=5)

    secrets = [
        WEBHOOK_SECRET,
        fake.state.seed.bridge_pat,
        fake.agent_token,
        "dal:bad-pat-456",
        bad_token,
        "wrong-guess-123",
        *tokens,
    ]
    assert len(errors) == 4
    haystacks = [
        repr(logs),
        *(str(e) + repr(e) for e in errors),
        *problems,
        repr(provider.settings),
        repr(session.user),  # its state holds the customer's token and cookies
    ]
    for secret in secrets:
        for haystack in haystacks:
            assert secret not in haystack
    assert logs  # the flow did log


def test_settings_hold_secrets_masked(tmp_path) -> None:
    from tests.livechat.conftest import offline_provider

    provider = offline_provider(tmp_path)
    assert WEBHOOK_SECRET not in repr(provider.settings.webhook_secrets)
    import pickle

    with pytest.raises(TypeError):
        pickle.dumps(provider.settings.agent_token)
