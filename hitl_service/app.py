"""The composition root: builds every part from settings and runs them.

``build_app`` is the only place that wires concrete classes together; tests
call it with a fake clock, an injected HTTP transport or store, and get the
same service production runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import socket
import sys
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog
from prometheus_client import CollectorRegistry

from hitl_service.activity import Activity
from hitl_service.clock import Clock, SystemClock
from hitl_service.config import ConfigError
from hitl_service.core import HitlCore
from hitl_service.core.context import CoreContext
from hitl_service.core.retry import ProviderCalls
from hitl_service.errors import StoreUnavailable
from hitl_service.metrics import Metrics
from hitl_service.provider_calls import close_provider, open_provider
from hitl_service.server import NOT_SERVING, SERVICE_NAME, SERVING, bind, build_grpc_server
from hitl_service.sidecar import (
    ConnectionLimit,
    EmbeddedServer,
    ProviderRoutesError,
    build_http_server,
    build_sidecar,
)
from hitl_service.store import open_store
from providers.base import ProviderDeps
from providers.errors import ProviderConfigError, ProviderUnavailable
from providers.registry import (
    ProviderLoadError,
    UnknownProviderError,
    available_providers,
    load_provider_factory,
)

if TYPE_CHECKING:
    import grpc
    import httpx
    from grpc_health.v1 import health
    from starlette.applications import Starlette

    from hitl_service.config import Settings
    from hitl_service.core.ingest import Ingestor
    from hitl_service.store.base import Store
    from providers.base import Provider, ProviderFactory
    from providers.types import WebhookBatch

log = structlog.get_logger(__name__)


class _LateSink:
    """The provider's EventSink, bound to the core once the core exists."""

    def __init__(self) -> None:
        self._ingestor: Ingestor | None = None

    def bind(self, ingestor: Ingestor) -> None:
        self._ingestor = ingestor

    async def deliver(self, batch: WebhookBatch) -> int:
        if self._ingestor is None:
            raise RuntimeError("events arrived before the core was built")
        try:
            return await self._ingestor.deliver(batch)
        except StoreUnavailable as exc:
            # Providers know only their own errors (they never import the
            # store); this one tells them to answer "retry later".
            log.warning("sink.store_unavailable", action=batch.action, error=str(exc))
            raise ProviderUnavailable("storage unavailable; retry later") from exc


def load_provider(
    settings: Settings,
    *,
    sink: Any,
    clock: Clock,
    registry: CollectorRegistry,
    http_transport: httpx.AsyncBaseTransport | None = None,
    factory: ProviderFactory | None = None,
) -> Provider:
    """Builds the configured provider (or the one ``factory`` makes).

    Raises:
        ConfigError: Unknown provider name, a provider that cannot be
            imported or built, or a bad provider setting.
    """
    name = settings.provider
    if factory is None:
        try:
            factory = load_provider_factory(name)
        except UnknownProviderError:
            known = ", ".join(available_providers())
            raise ConfigError(
                "HITL_PROVIDER", f"no provider named {name!r} (known: {known})"
            ) from None
        except ProviderLoadError as exc:
            raise ConfigError("HITL_PROVIDER", str(exc)) from None
    deps = ProviderDeps(
        env=settings.env,
        sink=sink,
        clock=clock,
        registry=registry,
        data_dir=settings.data_dir,
        http_transport=http_transport,
    )
    try:
        return factory(deps)
    except ProviderConfigError as exc:
        raise ConfigError(exc.setting, str(exc).removeprefix(f"{exc.setting}: ")) from None
    except Exception as exc:
        # A third-party factory's bug: one line naming the provider, never a
        # traceback (the CLI prints this at start-up).
        raise ConfigError(
            "HITL_PROVIDER",
            f"the {name!r} provider failed to start: {type(exc).__name__}: {exc}",
        ) from None


@dataclass
class App:
    """The whole service: store, provider, core, gRPC server and sidecar."""

    settings: Settings
    store: Store
    provider: Provider
    core: HitlCore
    metrics: Metrics
    grpc_server: grpc.aio.Server
    health: health.aio.HealthServicer
    sidecar: Starlette
    activity: Activity
    grpc_port: int = 0
    http_port: int = 0
    _http: EmbeddedServer | None = None
    _http_task: asyncio.Task[None] | None = None
    _started: list[str] = field(default_factory=list)

    async def start(self) -> None:
        """Opens the store and provider, starts serving, then reports SERVING.

        Raises:
            StoreUnavailable: The store cannot be opened.
            OSError: A listen address is taken.
        """
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        await self.store.open()
        self._started.append("store")
        await open_provider(self.provider)
        self._started.append("provider")
        await self.core.start()
        self._started.append("core")
        self.grpc_port = bind(self.grpc_server, self.settings)
        await self.grpc_server.start()
        self._started.append("grpc")
        host, _, port = self.settings.http_addr.rpartition(":")
        sock = _listen(host.strip("[]"), int(port), "HITL_HTTP_ADDR")
        self.http_port = sock.getsockname()[1]
        self._http = build_http_server(
            self.sidecar,
            host.strip("[]"),
            self.http_port,
            request_timeout=self.settings.http_request_timeout,
            connections=ConnectionLimit(self.settings.http_max_connections, self.metrics),
        )
        self._http_task = asyncio.create_task(self._http.serve(sockets=[sock]), name="sidecar")
        self._started.append("http")
        await self.health.set(SERVICE_NAME, SERVING)
        await self.health.set("", SERVING)
        open_files = open_files_limit()
        log.info(
            "service.ready",
            provider=self.provider.name,
            store=self.store.backend,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            open_files_limit=open_files,
        )
        cap, http_cap = self.settings.grpc_max_connections, self.settings.http_max_connections
        if open_files is not None and open_files < open_files_wanted(self.settings):
            log.warning(
                "service.open_files_low",
                open_files_limit=open_files,
                grpc_max_connections=cap,
                http_max_connections=http_cap,
                problem=(
                    f"HITL_GRPC_MAX_CONNECTIONS ({cap}) gRPC and HITL_HTTP_MAX_CONNECTIONS "
                    f"({http_cap}) sidecar connections leave fewer than "
                    f"{OPEN_FILES_BESIDES_CONNECTIONS} of the {open_files} files this process "
                    "may open for the store and provider calls: raise the limit "
                    "(ulimit -n, LimitNOFILE) or lower the caps"
                ),
            )
        exposure = api_exposure(self.settings)
        if exposure:
            log.warning("service.api_exposed", grpc_addr=self.settings.grpc_addr, problem=exposure)
        in_flight = self.settings.http_max_in_flight
        if http_cap <= in_flight:
            log.warning(
                "service.http_connections_low",
                http_max_connections=http_cap,
                http_max_in_flight=in_flight,
                problem=(
                    f"HITL_HTTP_MAX_CONNECTIONS ({http_cap}) is not above "
                    f"HITL_HTTP_MAX_IN_FLIGHT ({in_flight}): when every sidecar connection "
                    "has a request in progress, probes and further webhooks are closed "
                    "unanswered instead of getting /readyz or a 503 with Retry-After; "
                    "raise HITL_HTTP_MAX_CONNECTIONS well above it"
                ),
            )

    async def stop(
        self,
        grace: float | None = None,
        *,
        delay: float = 0.0,
        cut_short: asyncio.Event | None = None,
    ) -> None:
        """Graceful shutdown in the documented order; safe to call twice.

        Args:
            grace: Seconds for calls, then outbox attempts, to finish
                (``HITL_GRACE_SECONDS`` if None).
            delay: Seconds to go on serving, not ready, before the listeners
                close (``HITL_SHUTDOWN_DELAY_SECONDS``; ``serve`` passes it).
            cut_short: Set (a second SIGTERM or SIGINT), it ends the delay.
        """
        grace = self.settings.grace_seconds if grace is None else grace
        if "grpc" in self._started:
            await self.health.enter_graceful_shutdown()
        self.sidecar.state.stopping.set()
        if delay > 0 and "http" in self._started:
            await self._pre_stop_delay(delay, cut_short or asyncio.Event())
        if self._http is not None and self._http_task is not None:
            self.sidecar.state.draining.set()  # streamed answers end now
            await self._http.drain(self._http_task)
            self._http = self._http_task = None
        self.core.close_streams()
        if "grpc" in self._started:
            await self.grpc_server.stop(grace)
        if "core" in self._started:
            await self.core.stop(grace)
        if "provider" in self._started:
            # A provider that fails or hangs here must not keep the store open.
            for problem in await close_provider(self.provider, self.settings.provider_timeout):
                log.warning("provider.close_failed", error=problem)
        if "store" in self._started:
            await self.store.close()
        self._started.clear()
        log.info("service.stopped")

    async def _pre_stop_delay(self, delay: float, cut_short: asyncio.Event) -> None:
        """Serves on, not ready, until ``delay`` passes or ``cut_short`` is
        set: a load balancer that still routes here until its next probe
        gets answers instead of refused connections (LiveChat retries a
        webhook only a few times)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(cut_short.wait(), delay)
            log.info("service.shutdown_delay_skipped")


def _listen(host: str, port: int, variable: str) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port} ({variable}): {exc.strerror}") from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


def build_app(
    settings: Settings,
    *,
    clock: Clock | None = None,
    http_transport: httpx.AsyncBaseTransport | None = None,
    store: Store | None = None,
    registry: CollectorRegistry | None = None,
    provider_factory: ProviderFactory | None = None,
) -> App:
    """Wires the service from settings (nothing is started or opened).

    ``provider_factory`` replaces the registry lookup (tests use scripted
    providers).

    Raises:
        ConfigError: A setting is wrong; the message names the variable.
    """
    clock = clock or SystemClock()
    registry = registry or CollectorRegistry()
    sink = _LateSink()
    provider = load_provider(
        settings,
        sink=sink,
        clock=clock,
        registry=registry,
        http_transport=http_transport,
        factory=provider_factory,
    )
    activity = Activity()
    store = store or open_store(settings, activity, exclusive=True)
    metrics = Metrics(registry)
    metrics.start_at_zero(provider.name)
    ctx = CoreContext(
        store=store,
        provider=provider,
        clock=clock,
        settings=settings,
        metrics=metrics,
        calls=ProviderCalls(
            provider=provider.name,
            clock=clock,
            metrics=metrics,
            call_timeout=settings.provider_timeout,
        ),
        owner=f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}",
    )
    core = HitlCore(ctx)
    sink.bind(core.ingestor)
    grpc_server, health_servicer = build_grpc_server(core, settings, metrics, activity)
    try:
        sidecar = build_sidecar(core, provider, settings, metrics, activity)
    except ProviderRoutesError as exc:
        raise ConfigError("HITL_PROVIDER", str(exc)) from None
    return App(
        settings=settings,
        store=store,
        provider=provider,
        core=core,
        metrics=metrics,
        grpc_server=grpc_server,
        health=health_servicer,
        sidecar=sidecar,
        activity=activity,
    )


# Open files a process needs beside its gRPC and sidecar connections (each
# capped: HITL_GRPC_MAX_CONNECTIONS, HITL_HTTP_MAX_CONNECTIONS): the
# store's (PostgreSQL's pool and LISTEN, or SQLite's files), provider calls,
# the process's own, and sidecar connections just accepted beyond the cap
# (up to its listen backlog at once, until they are closed).
OPEN_FILES_BESIDES_CONNECTIONS = 512


def open_files_wanted(settings: Settings) -> int:
    """The open files the process should be allowed: both connection caps
    and ``OPEN_FILES_BESIDES_CONNECTIONS`` (11,024 by default)."""
    return (
        settings.grpc_max_connections
        + settings.http_max_connections
        + OPEN_FILES_BESIDES_CONNECTIONS
    )


def open_files_limit() -> int | None:
    """This process's soft limit on open files; None where there is none."""
    if sys.platform == "win32":
        return None
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def api_exposure(settings: Settings) -> str:
    """Why the API is open to anyone who reaches it ("" when it is not): it
    listens beyond loopback and asks for no credentials. Warned at start-up,
    since the defaults (loopback, no tokens) are meant for one machine."""
    host = settings.grpc_addr.rpartition(":")[0].strip("[]")
    if host == "localhost" or settings.api_tokens or settings.tls_client_ca is not None:
        return ""
    with contextlib.suppress(ValueError):
        if ipaddress.ip_address(host).is_loopback:
            return ""
    return (
        "the gRPC API listens beyond loopback and asks for no credentials: set "
        "HITL_API_TOKENS (or HITL_GRPC_TLS_CLIENT_CA for client certificates)"
    )
