"""Fixtures for the ticket-desk provider: a desk, and the service's
environment with the provider installed the documented way (an entry point
of a distribution on ``sys.path``, found by the registry)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.providers_contract.ticket_desk import DESK_SETTING, DESKS, Desk
from tests.support import install_providers


@pytest.fixture
def desk() -> Iterator[Desk]:
    """A desk of its own for the test; it outlives the service's restarts."""
    name = uuid.uuid4().hex
    DESKS[name] = desk = Desk(name=name)
    yield desk
    del DESKS[name]


@pytest.fixture
def env(
    service_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, desk: Desk
) -> dict[str, str]:
    """Settings for a service on the ticket desk, installed as the
    ``ticketdesk`` entry point of the ``hitl_service.providers`` group."""
    site = install_providers(
        tmp_path / "site",
        "ticketdesk-hitl",
        {"ticketdesk": "tests.providers_contract.ticket_desk:create"},
    )
    monkeypatch.syspath_prepend(str(site))
    return {
        **service_env,
        "HITL_PROVIDER": "ticketdesk",
        DESK_SETTING: desk.name,
        "HITL_PROVIDER_TIMEOUT": "1s",
        "HITL_REQUEST_BUDGET": "2s",
    }
