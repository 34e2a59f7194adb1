"""The grpc.aio server: HitlService, health, reflection, one interceptor."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from hitl_service.activity import Activity
from hitl_service.api.interceptor import ServiceInterceptor
from hitl_service.api.servicer import MAX_MESSAGE_BYTES, HitlServicer
from hitl_service.config import Settings
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from hitl_service.gen.hitl.v1 import hitl_service_pb2_grpc as pb_grpc
from hitl_service.logs import SecretRedactor

if TYPE_CHECKING:
    from hitl_service.core import HitlCore
    from hitl_service.metrics import Metrics

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HitlService"].full_name

MAX_METADATA_BYTES = 16 * 1024
"""What a call's metadata may take (docs/errors.md): gRPC's own hard limit."""

# grpc.max_connection_idle_ms for HITL_GRPC_IDLE_TIMEOUT=0: never.
_NEVER_MS = 2**31 - 1


def _options(
    max_connections: int, idle_timeout: float, handshake_timeout: float, max_calls: int
) -> tuple[tuple[str, int], ...]:
    def ms(seconds: float) -> int:
        return min(round(seconds * 1000), _NEVER_MS)

    return (
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
        # A call's metadata (headers) may take MAX_METADATA_BYTES, counted
        # as HPACK does (name + value + 32 per entry); beyond it the call is
        # RESOURCE_EXHAUSTED. gRPC's defaults refuse beyond 8 KiB only at
        # random (more often the closer to 16 KiB): the same call passed or
        # failed by chance.
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
        # Keep idle StreamEvents connections alive through proxies and NATs.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.so_reuseport", 0),
        # What connections may hold (HITL_GRPC_*). Beyond the cap a new
        # connection is closed as soon as it is accepted (the client sees
        # UNAVAILABLE), whatever it is: each holds a file descriptor, and
        # idle ones were never closed, so a flood of them took every
        # descriptor the process had. A connection with no call open for the
        # idle time gets GOAWAY (a client reconnects on its next call; an
        # open stream is a call, so StreamEvents is never cut); one that has
        # not finished its handshake (TLS, the HTTP/2 preface) in time is
        # closed.
        ("grpc.max_allowed_incoming_connections", max_connections),
        ("grpc.max_connection_idle_ms", ms(idle_timeout) or _NEVER_MS),
        ("grpc.server_handshake_timeout_ms", ms(handshake_timeout)),
        # Calls one connection carries at once (HTTP/2 MAX_CONCURRENT_STREAMS):
        # as many as the process takes (streams and unary calls), so no
        # client is held below the process's own caps. Unlimited (gRPC's
        # default), one connection opening streams and resetting them at
        # once ("rapid reset") filled the queue of calls gRPC's core keeps
        # for the service, and it answered 75 of 85 other clients' calls
        # CANCELLED; with a limit, its pushback refuses such streams early.
        ("grpc.max_concurrent_streams", min(max_calls, _NEVER_MS)),
    )


def grpc_options(settings: Settings) -> tuple[tuple[str, int], ...]:
    """The server's options with the connection limits ``settings`` give;
    one connection may carry every stream and unary call the process takes
    (HITL_STREAM_MAX_OPEN + HITL_RPC_MAX_IN_FLIGHT)."""
    return _options(
        settings.grpc_max_connections,
        settings.grpc_idle_timeout,
        settings.grpc_handshake_timeout,
        settings.stream_max_open + settings.rpc_max_in_flight,
    )


GRPC_OPTIONS = grpc_options(Settings())
"""The server's options with the default settings (the bench's floor uses them)."""


def build_grpc_server(
    core: HitlCore, settings: Settings, metrics: Metrics, activity: Activity | None = None
) -> tuple[grpc.aio.Server, health.aio.HealthServicer]:
    """The server with every service registered (not yet bound or started)."""
    server = grpc.aio.server(
        interceptors=[
            ServiceInterceptor(
                metrics,
                settings.api_tokens,
                activity,
                max_in_flight=settings.rpc_max_in_flight,
                scrub=SecretRedactor(settings.secrets()).scrub,
            )
        ],
        options=grpc_options(settings),
    )
    add_hitl_service(HitlServicer(core), server)
    health_servicer = KnownServicesHealth(max_watches=settings.stream_max_open)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer


class KnownServicesHealth(health.aio.HealthServicer):
    """grpc's health service, except that ``Watch`` of a service this server
    does not have is NOT_FOUND (as ``Check`` is) instead of a SERVICE_UNKNOWN
    stream: health needs no API token, and the reference ``Watch`` keeps the
    requested name (up to a whole 1 MiB message) for as long as the client
    holds the stream open. For the same reason at most ``max_watches``
    ``Watch`` streams are open at once (about 20 KB each: without a cap,
    anyone reaching the port could open them until memory runs out); one
    more is RESOURCE_EXHAUSTED. And a ``Watch`` ends (status OK) once it has
    sent NOT_SERVING for the shutdown: the reference one runs until it is
    cancelled, so a client with health checking held every shutdown for all
    of HITL_GRACE_SECONDS, as StreamEvents would without its own end."""

    KNOWN = frozenset({"", SERVICE_NAME})

    def __init__(self, max_watches: int = 10_000) -> None:
        super().__init__()
        self._max_watches = max_watches
        self._watches = 0
        self.stopping = False

    async def enter_graceful_shutdown(self) -> None:
        """See base class; open ``Watch`` streams end once told NOT_SERVING."""
        self.stopping = True
        await super().enter_graceful_shutdown()

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        """See base class."""
        if request.service not in self.KNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        if self._watches >= self._max_watches:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "this server has as many health watches open as HITL_STREAM_MAX_OPEN allows; "
                "use Check, or retry later",
            )
        self._watches += 1
        try:
            # It only writes to its context: this one ends it at the shutdown.
            await super().Watch(request, cast("Any", _EndsAtShutdown(self, context)))
        except _WatchOver:
            pass
        finally:
            self._watches -= 1


class _WatchOver(Exception):
    """A Watch told its client NOT_SERVING for the shutdown: it is over."""


class _EndsAtShutdown:
    """The context the reference ``Watch`` writes to: ends it (``_WatchOver``)
    once it has written NOT_SERVING while the server is stopping."""

    __slots__ = ("_context", "_health")

    def __init__(self, health_servicer: KnownServicesHealth, context: Any) -> None:
        self._health = health_servicer
        self._context = context

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(response)
        if self._health.stopping and response.status == NOT_SERVING:
            raise _WatchOver


def event_serializer(event: pb.Event | bytes) -> bytes:
    """StreamEvents' serializer: events arrive already serialized (bytes),
    once per event for every stream; a message is serialized here."""
    return event if isinstance(event, bytes) else event.SerializeToString()


class _Capture:
    """Stands in for the server to catch the generated registration's handlers."""

    def __init__(self) -> None:
        self.name = ""
        self.handlers: dict[str, Any] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        """Ignored: ``add_registered_method_handlers`` carries the same handlers."""

    def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
        self.name = name
        self.handlers = dict(handlers)


def add_hitl_service(servicer: HitlServicer, server: grpc.aio.Server) -> None:
    """Registers HitlService as the generated helper does, except that
    StreamEvents uses ``event_serializer`` (pre-serialized events pass through)."""
    capture = _Capture()
    pb_grpc.add_HitlServiceServicer_to_server(servicer, cast("grpc.aio.Server", capture))
    stream = capture.handlers["StreamEvents"]
    capture.handlers["StreamEvents"] = stream._replace(response_serializer=event_serializer)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(capture.name, capture.handlers),)
    )
    server.add_registered_method_handlers(capture.name, capture.handlers)


def bind(server: grpc.aio.Server, settings: Settings) -> int:
    """Binds the configured address (TLS when configured); returns the port."""
    try:
        if settings.tls_cert is None or settings.tls_key is None:
            port = server.add_insecure_port(settings.grpc_addr)
        else:
            client_ca = settings.tls_client_ca.read_bytes() if settings.tls_client_ca else None
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())],
                root_certificates=client_ca,
                require_client_auth=client_ca is not None,
            )
            port = server.add_secure_port(settings.grpc_addr, credentials)
    except RuntimeError:  # grpc's way of saying the address is taken
        port = 0
    if port == 0:
        raise OSError(
            f"cannot listen on {settings.grpc_addr} (HITL_GRPC_ADDR): the address is in use "
            "or not available"
        )
    return port


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
