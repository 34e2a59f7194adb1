"""Shared fixtures: the service built by its production factory, serving on
127.0.0.1 port 0, reached through a real gRPC channel and real HTTP.

Fixtures:
    service_env: environment for ``Settings.from_env`` (tests may add to it).
    app: the started ``App`` (local provider unless ``provider_factory`` is
        overridden); stopped after the test.
    stub: a ``HitlServiceStub`` on a real aio channel to the app.
    http: an ``httpx.AsyncClient`` for the sidecar.
    scripted_app / scripted_stub / scripted: the same with ``ScriptedProvider``.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import httpx
import pytest
import structlog
from prometheus_client import CollectorRegistry

from hitl_service.app import App, build_app
from hitl_service.config import Settings
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from tests import scripted as scripted_module

if TYPE_CHECKING:
    from hitl_service.clock import Clock
    from providers.base import ProviderFactory

pytest_plugins = ["tests.postgres_fixture", "tests.pgbouncer_fixture"]

# The service's settings exported in the developer's shell (HITL_API_TOKENS,
# say) would reach every service the tests start as a process, which inherit
# this environment: each test says what it runs with. The tests' own knobs
# (HITL_TEST_*, HITL_REQUIRE_*) stay.
for _name in [n for n in os.environ if n.startswith("HITL_")]:
    if not _name.startswith(("HITL_TEST_", "HITL_REQUIRE_")):
        del os.environ[_name]


@pytest.fixture(autouse=True)
def _fresh_logging() -> None:
    """Each test starts with default structlog config and empty context."""
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def service_env(tmp_path: Path) -> dict[str, str]:
    """Settings for a service on free ports with its own SQLite file."""
    return {
        "HITL_PROVIDER": "local",
        "HITL_GRPC_ADDR": "127.0.0.1:0",
        "HITL_HTTP_ADDR": "127.0.0.1:0",
        "HITL_STORE_URL": f"sqlite:///{tmp_path}/hitl.db",
        "HITL_DATA_DIR": str(tmp_path / "data"),
        "HITL_LOG_FORMAT": "json",
        "HITL_PROVIDER_TIMEOUT": "2s",
        "HITL_REQUEST_BUDGET": "5s",
    }


async def start_app(
    env: dict[str, str], *, provider_factory: ProviderFactory | None = None, **kwargs: Any
) -> App:
    """Builds and starts a service the way production does."""
    app = build_app(
        Settings.from_env(env),
        registry=CollectorRegistry(),
        provider_factory=provider_factory,
        **kwargs,
    )
    await app.start()
    return app


@asynccontextmanager
async def scripted_on_clock(
    env: dict[str, str], clock: Clock
) -> AsyncIterator[tuple[App, pb_grpc.HitlServiceAsyncStub, scripted_module.ScriptedProvider]]:
    """A started service on ``ScriptedProvider`` whose clock the test moves."""
    env["HITL_PROVIDER"] = "scripted"
    app = await start_app(env, provider_factory=scripted_module.create, clock=clock)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
            provider = app.provider
            assert isinstance(provider, scripted_module.ScriptedProvider)
            yield app, pb_grpc.HitlServiceStub(channel), provider
    finally:
        await app.stop(grace=1)


@pytest.fixture
async def app(service_env: dict[str, str]) -> AsyncIterator[App]:
    """A started service on the local provider."""
    service = await start_app(service_env)
    yield service
    await service.stop(grace=1)


@pytest.fixture
async def stub(app: App) -> AsyncIterator[pb_grpc.HitlServiceAsyncStub]:
    """A stub on a real channel to ``app``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.grpc_port}") as channel:
        yield pb_grpc.HitlServiceStub(channel)


@pytest.fixture
async def http(app: App) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client for ``app``'s sidecar."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as client:
        yield client


@pytest.fixture
async def scripted_app(service_env: dict[str, str]) -> AsyncIterator[App]:
    """A started service on the scripted provider."""
    service_env["HITL_PROVIDER"] = "scripted"
    service = await start_app(service_env, provider_factory=scripted_module.create)
    yield service
    await service.stop(grace=1)


@pytest.fixture
def scripted(scripted_app: App) -> scripted_module.ScriptedProvider:
    """The scripted provider inside ``scripted_app``."""
    provider = scripted_app.provider
    assert isinstance(provider, scripted_module.ScriptedProvider)
    return provider


@pytest.fixture
async def scripted_stub(scripted_app: App) -> AsyncIterator[pb_grpc.HitlServiceAsyncStub]:
    """A stub on a real channel to ``scripted_app``."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{scripted_app.grpc_port}") as channel:
        yield pb_grpc.HitlServiceStub(channel)
