"""A provider built by ``hitl-service check`` (or a provider command),
with no service running."""

from __future__ import annotations

import asyncio
import io

import pytest

from hitl_service.cli import _check
from hitl_service.config import Settings
from providers import ProviderUnavailable, WebhookBatch
from tests.providers_contract.ticket_desk import Desk


async def test_check_gives_the_provider_a_sink_that_refuses_events(
    env: dict[str, str], desk: Desk
) -> None:
    """The sink was None (``ProviderDeps.sink`` says ``EventSink``): a
    provider pushing from ``open`` crashed on it; one delivering events its
    backend sent meanwhile must learn they were not stored."""
    out = io.StringIO()
    assert await _check(Settings.from_env(env), out) == 0, out.getvalue()
    assert desk.sink is not None
    with pytest.raises(ProviderUnavailable):
        await desk.sink.deliver(WebhookBatch(action="desk"))


async def test_check_answers_when_open_hangs(env: dict[str, str], desk: Desk) -> None:
    """A backend that does not answer while the provider opens: ``check``
    reports it within the provider timeout, as for the probe and close."""

    async def hang() -> None:
        await asyncio.Event().wait()

    desk.hooks["open"] = hang
    out = io.StringIO()
    assert await asyncio.wait_for(_check(Settings.from_env(env), out), 30) == 1
    assert "provider ticketdesk: PROBLEM: cannot open the provider: it did not" in out.getvalue()
