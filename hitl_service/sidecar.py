"""The HTTP sidecar: provider webhooks, health, readiness and metrics.

Starlette on uvicorn in the same event loop as the gRPC server, on its own
port. A webhook is answered 200 only after its events are committed; bad
input gets a 4xx with a JSON reason, never a stack trace; beyond
``HITL_HTTP_MAX_IN_FLIGHT`` requests in progress, a 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import structlog
import uvicorn
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from structlog.contextvars import bind_contextvars, clear_contextvars
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from hitl_service.activity import Activity
from hitl_service.codec import kind_to_json
from hitl_service.config import Settings
from hitl_service.domain import DeadLetter, new_id
from hitl_service.errors import StoreUnavailable
from hitl_service.logs import SecretRedactor
from hitl_service.provider_calls import probe_provider
from hitl_service.store.rows import dumps
from providers.errors import WebhookRejected

if TYPE_CHECKING:
    from hitl_service.core import HitlCore
    from hitl_service.metrics import Metrics
    from hitl_service.store.base import Store
    from providers.base import Provider
    from providers.types import WebhookBatch

log = structlog.get_logger(__name__)


class BodyTooLarge(Exception):
    """The request body is over the limit."""


async def read_body(request: Request, limit: int) -> bytes:
    """Reads the body, refusing more than ``limit`` bytes without buffering it."""
    declared = request.headers.get("content-length", "")
    # ASCII digits only: int() takes '²' and other scripts' digits, and
    # raises past 4300 of them (the HTTP parser may not have refused either).
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > limit):
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def error(status: int, reason: str, **extra: object) -> JSONResponse:
    """A 4xx/5xx answer with a JSON reason."""
    return JSONResponse({"error": reason, **extra}, status_code=status)


class BodyRefused(Exception):
    """The body was not read; ``response`` says why, ``outcome`` in one word."""

    def __init__(self, outcome: str, response: Response) -> None:
        super().__init__(outcome)
        self.outcome = outcome
        self.response = response


async def read_bounded_body(request: Request, settings: Settings) -> bytes:
    """The body, within ``HITL_HTTP_MAX_BODY`` and ``HITL_HTTP_REQUEST_TIMEOUT``.

    Raises:
        BodyRefused: Too large (413), too slow (408) or cut short (400).
    """
    try:
        async with asyncio.timeout(settings.http_request_timeout):
            return await read_body(request, settings.http_max_body)
    except TimeoutError:
        # A sender that stalls mid-body holds a connection and up to
        # HITL_HTTP_MAX_BODY of buffer: not for longer than this.
        response = error(408, "the body did not arrive in time")
        response.headers["Connection"] = "close"
        raise BodyRefused("timeout", response) from None
    except BodyTooLarge:
        raise BodyRefused(
            "too_large", error(413, f"body larger than {settings.http_max_body} bytes")
        ) from None
    except ClientDisconnect:
        raise BodyRefused(
            "disconnected", error(400, "the client disconnected before sending the whole body")
        ) from None


class Admission:
    """At most ``HITL_HTTP_MAX_IN_FLIGHT`` provider-route requests (webhooks,
    the provider's own routes) in progress at once, counted in
    ``Activity.http``: each may hold up to ``HITL_HTTP_MAX_BODY`` of body
    until it is answered. One beyond it is answered 503 at once, before its
    body is read. ``/healthz``, ``/readyz`` and ``/metrics`` never come here:
    probes and scrapes get through an overload.

    (uvicorn's ``limit_concurrency`` would count connections, idle keep-alive
    ones too, refuse the probes with them, and answer in plain text.)
    """

    def __init__(self, activity: Activity, limit: int, *, warn_every: float = 60.0) -> None:
        self._activity = activity
        self._limit = limit
        self._warn_every = warn_every
        self._warned_at = float("-inf")
        self._refused = 0  # since the last warning

    def admit(self) -> bool:
        """Counts a request in, or says it is one too many (then ``release``
        is not called for it)."""
        if self._activity.http < self._limit:
            self._activity.http += 1
            return True
        self._refused += 1
        now = time.monotonic()
        if now - self._warned_at >= self._warn_every:
            # One line a minute at most, however many are refused (each
            # webhook's own webhook.done line says "overloaded"): ``refused``
            # counts them since the previous line.
            log.warning("http.overloaded", limit=self._limit, refused=self._refused)
            self._warned_at = now
            self._refused = 0
        return False

    def release(self) -> None:
        """Counts an admitted request out."""
        self._activity.http -= 1

    @staticmethod
    def refusal() -> Response:
        """The answer to a request beyond the limit: nothing was read, so
        nothing acknowledged is lost (LiveChat retries a non-200 webhook)."""
        response = error(503, "too many requests in progress; nothing was read: retry later")
        response.headers["Retry-After"] = "1"
        return response


def _bounded_body(app: ASGIApp, settings: Settings, admission: Admission) -> ASGIApp:
    """``app`` (a provider's route), admitted by ``admission`` and given its
    request's body only once it arrived within the limits webhooks have: the
    uvicorn protocol times out idle connections only, so a stalled body would
    hold one for good. The request counts until its answer starts (a
    streamed answer, like the console's event stream, holds no body)."""

    async def bounded(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        if not admission.admit():
            await admission.refusal()(scope, receive, send)
            return
        admitted = True

        def release() -> None:
            nonlocal admitted
            if admitted:
                admitted = False
                admission.release()

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                release()
            await send(message)

        try:
            try:
                body = await read_bounded_body(Request(scope, receive), settings)
            except BodyRefused as refused:
                await refused.response(scope, receive, sending)
                return
            replayed = False

            async def replay() -> Message:
                nonlocal replayed
                if replayed:
                    return await receive()  # e.g. the disconnect a stream waits for
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}

            await app(scope, replay, sending)
        finally:
            release()

    return bounded


class _AnsweredAtShutdown:
    """Middleware around every route: a request the shutdown cuts short is answered.

    The sidecar gives requests in progress ``HTTP_DRAIN_SECONDS`` to finish
    (``EmbeddedServer.drain``), then cancels the rest. Let through, that
    cancellation reached uvicorn, which logged it with a traceback at error
    level and answered a plain 500. Here the request is answered 503 with
    ``Retry-After`` instead (the sender retries it on another replica or
    after the restart; whatever it did is in the store or undone), or, if
    its answer had started, that answer is ended.
    """

    def __init__(self, app: ASGIApp, draining: asyncio.Event) -> None:
        self.app = app
        self.draining = draining

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.draining.is_set() or task is None:
                raise
            task.uncancel()  # the drain's cancel, answered here
            if started:
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                return
            response = error(503, "the service is shutting down; retry later")
            response.headers["Retry-After"] = "1"
            await response(scope, receive, send)


def _head_size(scope: Scope) -> int:
    """The bytes of a request's line and headers as they were sent (but for
    the spelling of the HTTP version and of the header names' case)."""
    raw_path = scope.get("raw_path") or scope["path"].encode()
    query = scope.get("query_string", b"")
    # "METHOD SP path[?query] SP HTTP/1.1 CRLF", the headers, "CRLF"
    size = len(scope["method"]) + len(raw_path) + (len(query) + 1 if query else 0) + 14
    for name, value in scope["headers"]:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


class _BoundedHead:
    """Middleware around every route: a request whose line and headers pass
    ``MAX_HEAD_BYTES`` is answered 431, even one that arrived whole.

    The HTTP protocol (``_timed_protocol``, h11's own limit) bounds a head
    while it is still arriving, counting after each read: a complete head
    that came in one read (uvicorn reads up to 256 KiB at once) got past
    them and was served, up to four times the documented limit.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.refusal = error(
            431,
            f"request line and headers larger than {MAX_HEAD_BYTES} bytes",
        )
        self.refusal.headers["Connection"] = "close"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and _head_size(scope) > MAX_HEAD_BYTES:
            await self.refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _with_bounded_bodies(
    routes: Sequence[BaseRoute], settings: Settings, admission: Admission
) -> list[BaseRoute]:
    for route in routes:
        if isinstance(route, Route | Mount):
            route.app = _bounded_body(route.app, settings, admission)
    return list(routes)


class Readiness:
    """Caches the provider probe: readiness checks come often, probes cost."""

    def __init__(self, store: Store, provider: Provider, *, ttl: float = 30.0) -> None:
        self._store = store
        self._provider = provider
        self._ttl = ttl
        self._checked_at = float("-inf")
        self._problems: list[str] = []
        # The probe in flight: checks that come meanwhile (probes of several
        # load balancers, kubelets) wait for it instead of each asking a
        # provider that is already failing or slow.
        self._probing: asyncio.Task[None] | None = None
        # The store ping in flight, shared the same way: a database that
        # hangs (frozen, a dead network path) holds one ping, not one per probe.
        self._pinging: asyncio.Task[None] | None = None

    async def check(self, timeout: float) -> dict[str, str]:
        """Problems by component; empty when ready. Answers within about
        ``timeout`` even if the store does not: cancelling a query on a
        PostgreSQL that does not answer takes longer than the ping's own
        timeout, and a probe waiting that long is a probe that failed."""
        problems: dict[str, str] = {}
        if self._pinging is None:
            self._pinging = asyncio.create_task(self._ping())
            self._pinging.add_done_callback(_retrieve)  # when every waiter gave up
        now = time.monotonic()
        if self._probing is None and (now - self._checked_at >= self._ttl or self._problems):
            # Alongside the ping, not after it: a partition that holds the
            # database holds the provider too, and the check has one timeout.
            self._probing = asyncio.create_task(self._probe(timeout, now))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(self._pinging)
        except (StoreUnavailable, TimeoutError) as exc:
            # The detail names the database (host, user), and /readyz shares
            # the listener with public webhooks: logs only.
            detail = str(exc) or f"no answer within {timeout:g}s"
            log.warning("readyz.store_unavailable", error=detail)
            problems["store"] = "unavailable"
        if self._probing is not None:
            # Shielded: a check whose client hung up leaves the probe to the others.
            await asyncio.shield(self._probing)
        if self._problems:
            problems["provider"] = "; ".join(self._problems)
        return problems

    async def _ping(self) -> None:
        try:
            await self._store.ping()
        finally:
            self._pinging = None

    async def _probe(self, timeout: float, started: float) -> None:
        try:
            self._problems = await probe_provider(self._provider, timeout)
            self._checked_at = started
        finally:
            self._probing = None


def _retrieve(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


def _shortened(text: str, limit: int = 64) -> str:
    """What is logged and answered of a request's path: anyone can send any
    (up to the 64 KiB request head), and a copy of each request is no answer
    and no log line."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class ProviderRoutesError(Exception):
    """The provider's ``routes()`` failed (a third-party bug); the message
    names the provider and the error in one line."""


def _provider_routes(provider: Provider) -> Sequence[BaseRoute]:
    try:
        return list(provider.routes())
    except Exception as exc:
        raise ProviderRoutesError(
            f"the {provider.name!r} provider failed to start: routes(): {type(exc).__name__}: {exc}"
        ) from exc


def build_sidecar(
    core: HitlCore,
    provider: Provider,
    settings: Settings,
    metrics: Metrics,
    activity: Activity | None = None,
) -> Starlette:
    """The sidecar app with the generic routes plus the provider's own."""
    activity = activity or Activity()
    admission = Admission(activity, settings.http_max_in_flight)
    readiness = Readiness(core.ctx.store, provider)
    scrub = SecretRedactor(settings.secrets()).scrub
    # Set when the service starts shutting down (``App.stop``): /readyz says
    # so, provider routes with streamed answers end them (``Provider.routes``),
    # and requests the drain cuts short are answered (``_AnsweredAtShutdown``).
    draining = asyncio.Event()
    # Set at SIGTERM, before the pre-stop delay (HITL_SHUTDOWN_DELAY_SECONDS,
    # while everything is still served) and the drain: /readyz says 503.
    stopping = asyncio.Event()

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if stopping.is_set() or draining.is_set():
            # Until the listener closes (after the pre-stop delay): gRPC
            # health says NOT_SERVING from the same moment.
            problems = {"service": "shutting down"}
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        problems = await readiness.check(timeout=min(5.0, settings.provider_timeout))
        if problems:
            # A provider's error may carry its own secrets (a library error
            # naming the URL it called), and this listener faces webhook senders.
            problems = {part: scrub(problem) for part, problem in problems.items()}
            return JSONResponse({"status": "unavailable", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready", "store": "ok", "provider": "ok"})

    async def metrics_endpoint(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def webhook(request: Request) -> Response:
        """Request context, metrics and one log line around ``_webhook``."""
        name = request.path_params["provider"]
        shown = _shortened(name)
        activity.current += 1
        clear_contextvars()
        raw_id = request.headers.get("x-request-id", "")
        request_id = raw_id[:128] if raw_id.isprintable() and raw_id else secrets.token_hex(8)
        bind_contextvars(request_id=request_id, route="webhook", provider=shown)
        started = time.perf_counter()
        outcome = ["failed"]
        admitted = admission.admit()
        try:
            if admitted:
                response = await _webhook(request, name, shown, outcome)
            else:
                outcome[0] = "overloaded"
                response = admission.refusal()
            response.headers["X-Request-Id"] = request_id
            return response
        except asyncio.CancelledError:
            outcome[0] = "unavailable"  # cut by the shutdown: answered 503
            raise
        finally:
            activity.current -= 1
            if admitted:
                admission.release()
            elapsed = time.perf_counter() - started
            label = name if name == provider.name else "unknown"
            metrics.child(metrics.webhooks, label, outcome[0]).inc()
            metrics.child(metrics.webhook_seconds, label).observe(elapsed)
            log.info("webhook.done", outcome=outcome[0], duration_ms=round(elapsed * 1000, 3))

    async def _webhook(request: Request, name: str, shown: str, outcome: list[str]) -> Response:
        if name != provider.name:
            outcome[0] = "unknown_provider"
            return error(404, f"no provider named {shown!r} is configured here")
        try:
            body = await read_bounded_body(request, settings)
        except BodyRefused as refused:
            outcome[0] = refused.outcome
            return refused.response
        try:
            batch = provider.parse_webhook(request.headers, body)
        except WebhookRejected as exc:
            outcome[0] = "rejected"
            # Why (a wrong secret, the wrong organization, a payload this
            # release cannot read): each has another fix, and only the
            # sender would otherwise see the answer.
            bind_contextvars(status=exc.status, rejected=exc.reason[:200])
            return error(exc.status, exc.reason)
        try:
            result = await core.ingest(batch)
        except StoreUnavailable as exc:
            outcome[0] = "unavailable"
            log.warning("webhook.store_unavailable", error=str(exc))
            return JSONResponse(
                {"error": "storage unavailable; retry later"},
                status_code=503,
                headers={"Retry-After": "5"},
            )
        except Exception:
            outcome[0] = "failed"
            error_id = new_id("dl")
            log.exception("webhook.process_failed", error_id=error_id, action=batch.action)
            await _keep_failed(core, provider.name, batch, error_id)
            return error(500, "the events could not be processed", error_id=error_id)
        outcome[0] = result.outcome
        bind_contextvars(action=batch.action, events=result.added)
        if batch.ignored:
            # Why the provider took nothing from it (an echo, a note, an event
            # type it does not know): otherwise the line says only "ignored".
            bind_contextvars(ignored=batch.ignored[:200])
        return JSONResponse(
            {
                "accepted": result.added,
                "duplicates": result.duplicates,
                "ignored": result.ignored + result.foreign,
            }
        )

    routes: list[BaseRoute] = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_endpoint, methods=["GET"]),
        Route("/webhooks/{provider}", webhook, methods=["POST"]),
        *_with_bounded_bodies(_provider_routes(provider), settings, admission),
    ]

    async def not_found(request: Request, exc: Exception) -> Response:
        return error(404, f"no route {_shortened(request.url.path, 256)}")

    async def method_not_allowed(request: Request, exc: Exception) -> Response:
        return error(405, f"{request.method} is not allowed on {_shortened(request.url.path, 256)}")

    async def server_error(request: Request, exc: Exception) -> Response:
        error_id = secrets.token_hex(6)
        path = _shortened(request.url.path, 256)
        log.error("http.internal_error", error_id=error_id, path=path, exc_info=exc)
        return error(500, "internal error", error_id=error_id)

    app = Starlette(
        routes=routes,
        exception_handlers={404: not_found, 405: method_not_allowed, 500: server_error},
        middleware=[
            Middleware(_BoundedHead),
            Middleware(_AnsweredAtShutdown, draining=draining),
        ],
    )
    app.state.draining = draining
    app.state.stopping = stopping
    return app


async def _keep_failed(core: HitlCore, provider: str, batch: WebhookBatch, letter_id: str) -> None:
    """Keeps a batch that failed to process, for inspection.

    The normalized events are kept, not the raw body, which may carry the
    provider's secret.
    """
    try:
        body = dumps(
            {
                "action": batch.action,
                "events": [
                    {
                        "external_chat_id": e.external_chat_id,
                        "dedupe_key": e.dedupe_key,
                        "kind": _describe(e.kind),
                        "occurred_at": e.occurred_at.isoformat() if e.occurred_at else None,
                    }
                    for e in batch.events
                ],
            }
        ).encode("utf-8", "backslashreplace")  # whatever text made the batch fail
        async with core.ctx.store.transaction() as tx:
            await tx.add_dead_letter(
                DeadLetter(letter_id, provider, core.ctx.clock.now(), "ingest failed", body)
            )
    except Exception:
        log.exception("webhook.dead_letter_failed", error_id=letter_id)


def _describe(kind: object) -> object:
    """An event kind as JSON, or its type name if it cannot be encoded."""
    try:
        return kind_to_json(kind)  # type: ignore[arg-type]  # may be anything here
    except (TypeError, AttributeError, ValueError):
        return {"unencodable": type(kind).__name__}


HTTP_DRAIN_SECONDS = 5
"""How long requests in progress may take to finish at shutdown."""


class EmbeddedServer(uvicorn.Server):
    """uvicorn inside our event loop: ``hitl-service serve`` owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """No-op: uvicorn would otherwise replace our signal handlers."""
        yield

    @property
    def port(self) -> int:
        """The bound port (useful with port 0)."""
        sockets = self.servers[0].sockets if self.servers else ()
        return int(sockets[0].getsockname()[1]) if sockets else 0

    async def drain(self, serving: asyncio.Task[None], timeout: float = HTTP_DRAIN_SECONDS) -> None:
        """Stops ``serving`` (the task running ``serve``): no new connections,
        requests in progress get ``timeout`` seconds to finish, and those
        still running then are cancelled, which answers them 503
        (``_AnsweredAtShutdown``). uvicorn's own limit, a second later, is
        only a backstop: it would log each one with a traceback."""
        self.should_exit = True
        await asyncio.wait({serving}, timeout=timeout)
        if not serving.done():
            cut = [task for task in self.server_state.tasks if not task.done()]
            if cut:
                log.warning("http.requests_cut", requests=len(cut), after_seconds=timeout)
            for task in cut:
                task.cancel()
        await serving


MAX_HEAD_BYTES = 64 * 1024
"""The most a request line and headers may take together (431 beyond it)."""

HTTP_BACKLOG = 128
"""The sidecar's listen backlog: connections the kernel queues for it."""


def _raw_error(status: bytes, reason: str) -> bytes:
    """A whole HTTP/1.1 answer with a JSON reason, for the protocol to write
    when no request reached the app (the connection closes after it)."""
    body = dumps({"error": reason}).encode()
    return (
        b"HTTP/1.1 %s\r\ncontent-type: application/json\r\nconnection: close\r\n"
        b"content-length: %d\r\n\r\n%s" % (status, len(body), body)
    )


class ConnectionLimit:
    """At most ``HITL_HTTP_MAX_CONNECTIONS`` sidecar connections open at
    once, counted from their accept to their close. Each holds a file
    descriptor, and the process shares its descriptors with gRPC, the store
    and provider calls: 2,500 connections to the webhook port took all of a
    2,000 limit, and gRPC stopped accepting until they went away.

    A new connection at the limit closes the oldest open one with no request
    in progress (an idle keep-alive one, or one still sending its request's
    head), so idle connections, a flood's or anyone's, cannot lock probes
    and webhooks out: only connections with a request in progress keep their
    place. When every open one has, the new one is closed at once instead.
    Either is counted in ``hitl_http_connections_shed_total`` and warned as
    ``http.connections_full`` at most once a minute. The cost is one dict
    insertion and removal per connection; requests cost nothing more.
    """

    def __init__(
        self, limit: int, metrics: Metrics | None = None, *, warn_every: float = 60.0
    ) -> None:
        self.limit = limit
        # Open connections, oldest first (a dict keeps insertion order).
        self.open: dict[_Connection, None] = {}
        self._shed = (
            None
            if metrics is None
            else (
                metrics.child(metrics.http_connections_shed, "idle"),
                metrics.child(metrics.http_connections_shed, "new"),
            )
        )
        self._warn_every = warn_every
        self._warned_at = float("-inf")
        self._closed_idle = 0  # since the last warning
        self._refused = 0

    def admit(self, connection: _Connection) -> bool:
        """Counts a new connection in, closing the oldest idle one if the
        limit is reached; False: every open one has a request in progress,
        and the caller closes the new one (it is not counted)."""
        open_ = self.open
        if len(open_) >= self.limit:
            victim = next((c for c in open_ if c.idle()), None)
            if victim is None:
                self._shedding(refused=True)
                return False
            del open_[victim]
            victim.transport.close()
            self._shedding(refused=False)
        open_[connection] = None
        return True

    def release(self, connection: _Connection) -> None:
        """Counts a connection out (one closed to make room already is)."""
        self.open.pop(connection, None)

    def _shedding(self, *, refused: bool) -> None:
        if refused:
            self._refused += 1
        else:
            self._closed_idle += 1
        if self._shed is not None:
            self._shed[refused].inc()
        now = time.monotonic()
        if now - self._warned_at >= self._warn_every:
            log.warning(
                "http.connections_full",
                limit=self.limit,
                closed_idle=self._closed_idle,
                refused=self._refused,
            )
            self._warned_at = now
            self._closed_idle = self._refused = 0


class _Connection(Protocol):
    """What ``ConnectionLimit`` needs of a connection's protocol."""

    transport: asyncio.Transport

    def idle(self) -> bool: ...


def _timed_protocol(
    timeout: float, max_head: int = MAX_HEAD_BYTES, limit: ConnectionLimit | None = None
) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection on which no request is
    being handled ``timeout`` seconds after it opened or after its last
    response: uvicorn has no timeout for a request's headers, so a client
    sending them byte by byte (or not at all) would hold a connection (a
    file descriptor shared with gRPC and the store) for good.

    With httptools, it also answers 431 and closes once a request's line
    and headers pass ``max_head`` bytes: uvicorn's httptools protocol keeps
    them all in memory without a limit (one unauthenticated connection grew
    the process by 400 MB in a second, and each header is joined piece by
    piece). h11 has a limit of its own, which ``build_http_server`` sets to
    ``MAX_HEAD_BYTES`` too (beyond it: a 400). Both count a head still
    arriving; a complete one is measured by ``_BoundedHead``. A request the
    parser refuses is answered 400 with a JSON reason.

    With ``limit``, connections beyond it are shed (``ConnectionLimit``);
    one closed at once never reaches uvicorn's protocol."""
    base: Any = AutoHTTPProtocol
    refusal = _raw_error(
        b"431 Request Header Fields Too Large",
        f"request line and headers larger than {max_head} bytes",
    )

    class TimedProtocol(base):  # type: ignore[misc]
        _request_timer: asyncio.TimerHandle | None = None
        _head_bytes = -1  # received since the request began; -1: not in its head
        _head_began = False  # in the chunk being parsed
        _refused = False  # closed at once by the connection limit

        def connection_made(self, transport: asyncio.Transport) -> None:
            if limit is not None:
                self.transport = transport  # read if it is shed later
                if not limit.admit(self):
                    self._refused = True
                    transport.close()
                    return
            super().connection_made(transport)
            self._arm_request_timer()

        def idle(self) -> bool:
            """No request in progress: none yet, or the last one answered."""
            return self.cycle is None or bool(self.cycle.response_complete)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            began, self._head_began = self._head_began, False
            if self._head_bytes < 0:
                return
            if began and not (self.cycle is None or self.cycle.response_complete):
                # Pipelined behind a request still being answered: this
                # chunk may hold much of that one's body; count from the next.
                return
            # Counted after parsing: at most one read's worth beyond the limit.
            self._head_bytes += len(data)
            if self._head_bytes > max_head and not self.transport.is_closing():
                self._head_bytes = -1
                if self.cycle is None or self.cycle.response_complete:
                    self.transport.write(refusal)  # else a pipelined answer is being written
                self.transport.close()

        def send_400_response(self, msg: str) -> None:
            """A request the HTTP parser refused: the reason as JSON, like
            every other 4xx (uvicorn answers in plain text)."""
            self.transport.write(_raw_error(b"400 Bad Request", msg))
            self.transport.close()

        def on_message_begin(self) -> None:  # httptools only
            super().on_message_begin()
            self._head_bytes, self._head_began = 0, True

        def on_headers_complete(self) -> None:  # httptools only
            self._head_bytes = -1
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm_request_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            if limit is not None:
                limit.release(self)
            if self._request_timer is not None:
                self._request_timer.cancel()
            super().connection_lost(exc)

        def _arm_request_timer(self) -> None:
            if self._request_timer is not None:
                self._request_timer.cancel()
            self._request_timer = self.loop.call_later(timeout, self._request_timed_out)

        def _request_timed_out(self) -> None:
            idle = self.cycle is None or self.cycle.response_complete
            if idle and not self.transport.is_closing():
                self.transport.close()

    return TimedProtocol


def build_http_server(
    app: Starlette,
    host: str,
    port: int,
    *,
    request_timeout: float = 30.0,
    connections: ConnectionLimit | None = None,
) -> EmbeddedServer:
    """A uvicorn server for the sidecar, with our logging and no lifespan;
    at most ``connections.limit`` connections open (by default
    ``HITL_HTTP_MAX_CONNECTIONS``' default, without metrics)."""
    if connections is None:
        connections = ConnectionLimit(Settings.http_max_connections)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        http=_timed_protocol(request_timeout, limit=connections),
        # Connections accepted at once: the event loop accepts all that wait
        # (asyncio up to this many) each time the port is readable, and each
        # holds a descriptor until the connection limit closes it a few loop
        # turns later, so uvicorn's 2048 let a burst of 2,500 reach a 2,000
        # descriptor limit in spite of the limit (128 kept it under 750).
        # Linux's own cap on it was 128 until 5.4; beyond it, clients retry.
        backlog=HTTP_BACKLOG,
        # Without httptools (the ``speed`` extra), h11 parses: its own limit
        # (16 KiB by default) made the same head limit.
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        # EmbeddedServer.drain cuts requests at HTTP_DRAIN_SECONDS; this is
        # uvicorn's backstop (whatever ``serve`` was stopped by).
        timeout_graceful_shutdown=HTTP_DRAIN_SECONDS + 1,
    )
    return EmbeddedServer(config)
