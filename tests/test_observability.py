"""What an on-call engineer relies on: gauges report the store, not a guess,
and every warning or error a process logs is documented."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import pytest

from hitl_service.errors import StoreUnavailable
from hitl_service.gen.hitl.v1 import hitl_service_pb2 as pb
from tests.support import TIMEOUT, rid, wait_for
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
