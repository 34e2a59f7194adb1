"""Prometheus collectors, all on one registry passed in (no global state).

gRPC metrics keep the names dashboards know (go-grpc-prometheus); ours use
the ``hitl_`` prefix, base units and bounded labels (never session, chat or
user ids).
"""

from __future__ import annotations

from typing import TypeVar

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb

_M = TypeVar("_M", bound=MetricWrapperBase)

_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)


WEBHOOK_OUTCOMES = (
    *("accepted", "duplicate", "ignored", "rejected", "too_large"),
    *("timeout", "disconnected", "unavailable", "overloaded", "failed"),
)
PROVIDER_OPERATIONS = ("upsert_user", "start", "send", "stop", "catch_up")
OUTBOX_KINDS = ("send", "stop")
OUTBOX_OUTCOMES = ("done", "retry", "failed")
TIMEOUT_KINDS = ("queue", "idle")


class Metrics:
    """Every collector the service exports."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.grpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", rpc, registry=registry
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total",
            "RPCs completed on the server, by status code.",
            (*rpc, "grpc_code"),
            registry=registry,
        )
        self.grpc_msg_received = Counter(
            "grpc_server_msg_received_total", "Messages received.", rpc, registry=registry
        )
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent_total", "Messages sent.", rpc, registry=registry
        )
        self.grpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time to handle an RPC (streams: until they end).",
            rpc,
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.webhooks = Counter(
            "hitl_webhook_requests_total",
            "Inbound webhook deliveries by outcome "
            "(accepted, duplicate, ignored, rejected, too_large, timeout, disconnected, "
            "unavailable, overloaded, failed, unknown_provider).",
            ("provider", "outcome"),
            registry=registry,
        )
        self.http_connections_shed = Counter(
            "hitl_http_connections_shed_total",
            "Sidecar connections closed because HITL_HTTP_MAX_CONNECTIONS were open: "
            "idle (an open one with no request in progress, to make room), "
            "new (the new one: every open one had a request in progress).",
            ("closed",),
            registry=registry,
        )
        self.webhook_seconds = Histogram(
            "hitl_webhook_duration_seconds",
            "Time from receiving a webhook to answering it.",
            ("provider",),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.events_appended = Counter(
            "hitl_events_appended_total",
            "Events committed to the log, by kind.",
            ("kind",),
            registry=registry,
        )
        # Only UNAVAILABLE: its reasons are literals in our code (a bounded
        # set), while FAILED_PRECONDITION may carry the provider's own codes.
        # The reason tells a provider outage from a store outage.
        self.rpc_unavailable = Counter(
            "hitl_rpc_unavailable_total",
            "RPCs answered UNAVAILABLE, by method and ErrorInfo reason "
            "(STORE_UNAVAILABLE, PROVIDER_UNAVAILABLE, DELIVERY_PENDING, STOP_PENDING, ...).",
            ("grpc_method", "reason"),
            registry=registry,
        )
        self.provider_seconds = Histogram(
            "hitl_provider_request_duration_seconds",
            "Provider calls by operation and outcome (ok, unavailable, rejected, error).",
            ("provider", "operation", "outcome"),
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.outbox_depth = Gauge(
            "hitl_outbox_pending",
            "Provider calls (sends, stops) waiting to be delivered.",
            registry=registry,
        )
        self.outbox_outcomes = Counter(
            "hitl_outbox_attempts_total",
            "Outbox delivery attempts by kind and outcome (done, retry, failed).",
            ("kind", "outcome"),
            registry=registry,
        )
        self.active_sessions = Gauge(
            "hitl_sessions_open",
            "Sessions not ended or failed (refreshed by the maintenance loop).",
            registry=registry,
        )
        self.clock_skew = Gauge(
            "hitl_clock_skew_seconds",
            "This replica's clock minus the database's (PostgreSQL; refreshed every minute).",
            registry=registry,
        )
        self.stream_subscribers = Gauge(
            "hitl_stream_subscribers",
            "Open StreamEvents streams on this replica.",
            registry=registry,
        )
        self.catch_up_events = Counter(
            "hitl_catch_up_events_total",
            "Events recovered by catch-up that no webhook had delivered.",
            ("provider",),
            registry=registry,
        )
        self.timeouts = Counter(
            "hitl_session_timeouts_total",
            "Sessions ended by a timeout, by kind (queue, idle).",
            ("kind",),
            registry=registry,
        )

    def start_at_zero(self, provider: str) -> None:
        """Exports the series alerts compare at 0 from the start: Prometheus's
        ``increase()`` cannot see the first count of a series that appears
        with it (after every restart), so a rule like "starts done, yet no
        webhook" would misjudge its first window, and one like "a delivery
        failed" or "catch-up recovered an event" would miss the first such
        incident of each process. Every status code of every HitlService
        method too, as go-grpc-prometheus does (the first INTERNAL answer)."""
        for outcome in WEBHOOK_OUTCOMES:
            self.child(self.webhooks, provider, outcome)
        for operation in PROVIDER_OPERATIONS:
            self.child(self.provider_seconds, provider, operation, "ok")
        for kind in OUTBOX_KINDS:
            for outcome in OUTBOX_OUTCOMES:
                self.child(self.outbox_outcomes, kind, outcome)
        for kind in TIMEOUT_KINDS:
            self.child(self.timeouts, kind)
        for closed in ("idle", "new"):
            self.child(self.http_connections_shed, closed)
        self.child(self.catch_up_events, provider)
        service = pb.DESCRIPTOR.services_by_name["HitlService"]
        for method in service.methods:
            grpc_type = "server_stream" if method.server_streaming else "unary"
            for code in grpc.StatusCode:
                self.child(self.grpc_handled, grpc_type, service.full_name, method.name, code.name)

    def child(self, metric: _M, *labels: str) -> _M:
        """``metric.labels(*labels)``, looked up once: ``labels()`` takes a
        lock and hashes its arguments on every call, and hot paths (every
        message, every event) ask for the same few children again and again."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found  # type: ignore[return-value]  # the child of a _M is a _M

    def appended(self, kind: str) -> None:
        """Counts one event committed to the log."""
        self.child(self.events_appended, kind).inc()
