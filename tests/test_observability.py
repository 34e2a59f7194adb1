"""What an on-call engineer relies on: gauges report the store, not a guess,
and every warning or error a process logs is documented."""

from __future__ import annotations

import ast
import asyncio
import re
from pathlib import Path
from typing import NoReturn

import grpc
import httpx
import pytest
from prometheus_client.metrics import MetricWrapperBase

from hitl_service.app import App
from hitl_service.errors import StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.alert_rules import (
    OPERATIONS,
    Selector,
    alert_rules,
    increased,
    scrape,
    selectors,
    total,
)
from tests.scripted import Fault
from tests.support import (
    TIMEOUT,
    expect_error,
    make_user,
    rid,
    settings_read_by_source,
    source_strings,
    wait_for,
)
from tests.test_restart_and_upkeep import with_session


async def test_outbox_pending_is_not_reported_as_zero_while_the_store_is_down(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``hitl_outbox_pending`` is read from the store; when the store cannot
    be read the gauge must not fall to 0 (that is "all delivered" to a
    dashboard, and it resets HitlOutboxBacklog's ``for: 10m``)."""
    async with with_session(service_env) as (app, stub, provider, session):
        gate = provider.hold("send")

        def pending() -> float | None:
            return app.metrics.registry.get_sample_value("hitl_outbox_pending")

        try:
            send = asyncio.ensure_future(
                stub.SendMessage(
                    pb.SendMessageRequest(
                        session_id=session.id, request_id=rid(), message=pb.Message(text="hi")
                    ),
                    timeout=TIMEOUT,
                )
            )
            await wait_for(lambda: provider.waiting.get("send") == 1, what="the held send")
            outbox = app.core.outbox
            outbox.kick()
            await wait_for(lambda: pending() == 1, what="one pending item")
            failures = []

            async def down() -> tuple[int, None]:
                failures.append(1)
                raise StoreUnavailable("connection refused (test)")

            monkeypatch.setattr(app.store, "outbox_stats", down)
            outbox.kick()
            await wait_for(lambda: len(failures) >= 2, what="the loop reading a down store")
            assert pending() == 1
            monkeypatch.undo()
        finally:
            gate.set()
        await send


ROOT = Path(__file__).resolve().parent.parent


def _warning_events() -> dict[str, str]:
    """Every event logged at warning level or above: name -> where."""
    root = ROOT
    found: dict[str, str] = {}
    for package in ("hitl_service", "providers"):
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("warning", "error", "exception", "critical")
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "log"
                    and node.args
                    and isinstance(node.args[0], ast.Constant)
                    and isinstance(node.args[0].value, str)
                ):
                    found.setdefault(node.args[0].value, f"{path.relative_to(root)}:{node.lineno}")
    return found


def test_every_warning_and_error_event_is_documented() -> None:
    """An on-call engineer searching the docs for a warning the service
    logged finds what it means (docs/operations.md, or the provider's page)."""
    docs = "\n".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    missing = []
    for name, where in sorted(_warning_events().items()):
        prefix, _, rest = name.partition(".")
        if f"`{name}`" in docs:
            continue
        if rest == "store_unavailable" and f"`{prefix}.`" in docs:
            continue  # "the `*.store_unavailable` warnings (`rpc.`, ...)"
        missing.append(f"{name} ({where})")
    assert not missing, "undocumented warning/error events: " + ", ".join(missing)


def test_every_setting_the_code_reads_is_documented() -> None:
    """An operator finds every ``HITL_*`` variable the service or a provider
    reads in a configuration table (README, or the provider's page)."""
    pages = [ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    rows = [
        line for p in pages for line in p.read_text().splitlines() if line.startswith("| `HITL_")
    ]
    documented = set(re.findall(r"`(HITL_[A-Z0-9_]+)`", "\n".join(rows)))
    read = settings_read_by_source()
    assert read, "no setting names found in the source"
    assert not read - documented, f"settings in no configuration table: {sorted(read - documented)}"


async def test_every_alert_rule_uses_metrics_labels_and_values_the_service_exports(
    app: App, http: httpx.AsyncClient
) -> None:
    """The sample alerts in docs/operations.md select series that exist: a
    renamed metric, label or label value would leave a rule that never fires."""
    answer = await http.get("/metrics")
    assert answer.status_code == 200
    exported: dict[str, str] = {}  # sample name -> family name
    for line in answer.text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            suffixes = ("_bucket", "_count", "_sum") if kind == "histogram" else ("",)
            exported.update({name + suffix: name for suffix in suffixes})
    labels_of = {
        metric._name + ("_total" if metric._type == "counter" else ""): set(metric._labelnames)
        for metric in vars(app.metrics).values()
        if isinstance(metric, MetricWrapperBase)
    }
    values = source_strings() | {code.name for code in grpc.StatusCode}
    for service in pb.DESCRIPTOR.services_by_name.values():
        values |= {service.full_name, *(m.name for m in service.methods)}
    rules = alert_rules()
    assert len(rules) >= 10, "the rules were not found in docs/operations.md"
    problems = []
    for alert, expr in rules.items():
        used = selectors(expr)
        assert used, f"{alert}: no metric found in {expr!r}"
        for selector in used:
            if selector.name == "up":  # Prometheus's own, per scrape target
                continue
            family = exported.get(selector.name)
            if family is None:
                problems.append(f"{alert}: {selector.name} is not exported")
                continue
            known = labels_of.get(family, set()) | {"instance", "job"}
            if selector.name.endswith("_bucket"):
                known.add("le")
            for label, op, value in selector.matchers:
                if label not in known:
                    problems.append(f"{alert}: {selector.name} has no label {label}")
                elif op in ("=", "=~") and label not in ("instance", "job"):
                    unknown = [v for v in value.split("|") if v not in values]
                    if unknown:
                        problems.append(f"{alert}: {label} values {unknown} appear nowhere")
    assert not problems, "\n".join(problems)


async def test_alerted_series_are_exported_at_zero_from_the_start(
    app: App, http: httpx.AsyncClient
) -> None:
    """``increase()`` misses the first count of a series that appears with
    it: the series alerts compare must be there, at 0, before anything
    happened (every documented webhook outcome; provider calls that went well)."""
    samples = scrape((await http.get("/metrics")).text)
    row = next(
        line
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("| `hitl_webhook_requests_total`")
    )
    documented = set(re.findall(r"`(\w+)` \(", row.split("`outcome`:", 1)[1]))
    assert {"accepted", "unavailable"} <= documented, row
    provider = app.provider.name
    webhooks = {
        labels["outcome"]: value
        for name, labels, value in samples
        if name == "hitl_webhook_requests_total" and labels["provider"] == provider
    }
    assert webhooks == dict.fromkeys(documented - {"unknown_provider"}, 0.0)
    calls = {
        labels["operation"]: value
        for name, labels, value in samples
        if name == "hitl_provider_request_duration_seconds_count" and labels["outcome"] == "ok"
    }
    assert calls == dict.fromkeys(("upsert_user", "start", "send", "stop", "catch_up"), 0.0)


async def test_every_series_an_alert_takes_the_increase_of_is_there_before_its_first_count(
    app: App, http: httpx.AsyncClient
) -> None:
    """A rule like ``increase(x{outcome="failed"}[15m]) > 0`` misses the first
    count of a series that appears with it: the first delivery failed for
    good, the first event catch-up recovered, the first INTERNAL answer of a
    method, after each restart, would page nobody. Every series such a rule
    selects is exported at 0 from the start."""
    samples = scrape((await http.get("/metrics")).text)
    service = pb.DESCRIPTOR.services_by_name["HitlService"]
    missing = []
    for alert, expr in alert_rules().items():
        for selector in increased(expr):
            # This service runs the local provider; LiveChat's rules name theirs.
            matchers = tuple(m for m in selector.matchers if m[0] != "provider")
            mine = Selector(selector.name, matchers)
            present = [labels for name, labels, _ in samples if name == selector.name]
            if not any(mine.matches(labels) for labels in present):
                missing.append(f"{alert}: {selector.name} {selector.matchers}")
    assert not missing, "selected by increase() but not exported at start:\n" + "\n".join(missing)
    handled = {
        (labels["grpc_method"], labels["grpc_code"])
        for name, labels, _ in samples
        if name == "grpc_server_handled_total" and labels["grpc_service"] == service.full_name
    }
    assert {(m.name, code.name) for m in service.methods for code in grpc.StatusCode} <= handled
    counters = ("hitl_outbox_attempts_total", "hitl_session_timeouts_total")
    at_zero = {
        (name, tuple(sorted(labels.items())))
        for name, labels, value in samples
        if value == 0 and name in (*counters, "hitl_catch_up_events_total")
    }
    expected = {
        *(
            ("hitl_outbox_attempts_total", (("kind", kind), ("outcome", outcome)))
            for kind in ("send", "stop")
            for outcome in ("done", "retry", "failed")
        ),
        *(("hitl_session_timeouts_total", (("kind", kind),)) for kind in ("queue", "idle")),
        ("hitl_catch_up_events_total", (("provider", app.provider.name),)),
    }
    assert at_zero == expected


async def test_the_pages_tell_a_store_outage_from_a_provider_outage(
    service_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """HitlProviderUnavailable says "the provider is unreachable"; a store
    outage answers UNAVAILABLE too, and must count for HitlStoreUnavailable
    instead (each rule's first selector is the failures it counts)."""
    rules = alert_rules()
    provider_failures = selectors(rules["HitlProviderUnavailable"])[0]
    store_failures = selectors(rules["HitlStoreUnavailable"])[0]
    async with (
        with_session(service_env) as (app, stub, provider, session),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{app.http_port}") as http,
    ):

        async def counted() -> tuple[float, float]:
            samples = scrape((await http.get("/metrics")).text)
            return total(samples, provider_failures), total(samples, store_failures)

        async def any_counted() -> bool:  # metrics are written after the answer
            return sum(await counted()) > seen

        other = await make_user(stub)

        def down(**options: bool) -> NoReturn:
            raise StoreUnavailable("database is locked (test)")

        monkeypatch.setattr(app.store, "transaction", down)
        error = await expect_error(
            stub.SendMessage(
                pb.SendMessageRequest(
                    session_id=session.id, request_id=rid(), message=pb.Message(text="hi")
                ),
                timeout=TIMEOUT,
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error.reason == "STORE_UNAVAILABLE"
        monkeypatch.undo()
        seen = 0
        await wait_for(any_counted, what="the store failure counted")
        assert await counted() == (0, 1)

        provider.fail("start", Fault("unavailable", retry_after=1000))  # no time to retry
        error = await expect_error(
            stub.StartHitl(
                pb.StartHitlRequest(user_id=other.id, request_id=rid()), timeout=TIMEOUT
            ),
            grpc.StatusCode.UNAVAILABLE,
        )
        assert error.reason == "PROVIDER_UNAVAILABLE"
        seen = 1
        await wait_for(any_counted, what="the provider failure counted")
        assert await counted() == (1, 1)


def test_unavailable_reasons_are_a_fixed_documented_set() -> None:
    """``hitl_rpc_unavailable_total`` is labelled by reason: bounded only
    while every UNAVAILABLE reason is a literal in the code; and each is
    listed where the metric is documented."""
    reasons: set[str] = set()
    computed = []
    for package in ("hitl_service", "providers"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if not isinstance(node, ast.Call):
                    continue
                callee = ast.unparse(node.func)
                if callee == "Unavailable" and node.args:
                    reason = node.args[0]
                elif callee == "HitlError" and ast.unparse(node.args[0]) == "Code.UNAVAILABLE":
                    reason = node.args[1]
                else:
                    continue
                if isinstance(reason, ast.Constant) and isinstance(reason.value, str):
                    reasons.add(reason.value)
                else:
                    computed.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert not computed, "UNAVAILABLE reasons not written as literals: " + ", ".join(computed)
    assert {"STORE_UNAVAILABLE", "PROVIDER_UNAVAILABLE"} <= reasons
    row = next(
        line
        for line in (ROOT / "docs" / "operations.md").read_text().splitlines()
        if line.startswith("| `hitl_rpc_unavailable_total`")
    )
    assert not [r for r in reasons if f"`{r}`" not in row], row
