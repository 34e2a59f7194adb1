"""A provider whose ``routes()`` fails (say, it builds them from a client
that only ``open`` creates): the start stops with one line naming the
provider, as for a failing factory, instead of a traceback."""

from __future__ import annotations

import pytest

from hitl_service.app import build_app
from hitl_service.config import ConfigError, Settings
from tests.providers_contract.ticket_desk import Desk


async def test_a_failing_routes_is_a_configuration_error(env: dict[str, str], desk: Desk) -> None:
    desk.routes_error = AttributeError("'NoneType' object has no attribute 'app'")
    with pytest.raises(ConfigError) as raised:
        build_app(Settings.from_env(env))
    assert raised.value.variable == "HITL_PROVIDER"
    assert "'ticketdesk' provider failed to start: routes(): AttributeError" in str(raised.value)
