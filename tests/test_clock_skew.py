"""Replicas compare each other's times (outbox leases, upkeep turns,
timeouts): each compares its clock with the database's and warns when it
is out of step."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from structlog.testing import capture_logs

from hitl_service.clock import SystemClock
from hitl_service.core.maintenance import CLOCK_SKEW_WARNING
from tests.conftest import start_app
from tests.support import ShiftedClock, wait_for

pytestmark = [pytest.mark.postgres]


def _pg_env(service_env: dict[str, str], dsn: str) -> dict[str, str]:
    return {**service_env, "HITL_STORE_URL": dsn, "HITL_STORE_POOL_MIN": "1"}


@pytest.mark.parametrize("offset", [0.0, 120.0, -120.0])
async def test_a_replica_reports_its_clock_against_the_databases(
    service_env: dict[str, str], postgres_dsn: str, offset: float
) -> None:
    clock = ShiftedClock(SystemClock())
    clock.offset = offset
    app = await start_app(_pg_env(service_env, postgres_dsn), clock=clock)
    try:
        with capture_logs() as logs:
            await app.core.maintenance.sweep_clock(force=True)
        skew = app.metrics.registry.get_sample_value("hitl_clock_skew_seconds")
    finally:
        await app.stop(grace=1)
    assert skew is not None
    assert abs(skew - offset) < 1.0
    warnings = [e for e in logs if e["event"] == "maintenance.clock_skew"]
    if abs(offset) > CLOCK_SKEW_WARNING:
        # (The loop's own first comparison may fall in the same moment.)
        assert {(e["log_level"], round(e["seconds"])) for e in warnings} == {
            ("warning", round(offset))
        }
    else:
        assert warnings == []


async def test_the_loop_checks_the_clock_when_it_starts(
    service_env: dict[str, str], postgres_dsn: str
) -> None:
    clock = ShiftedClock(SystemClock())
    clock.offset = 120.0
    app = await start_app(_pg_env(service_env, postgres_dsn), clock=clock)
    try:
        registry = app.metrics.registry
        await wait_for(
            lambda: (registry.get_sample_value("hitl_clock_skew_seconds") or 0) > 100,
            what="the first comparison",
        )
    finally:
        await app.stop(grace=1)


async def test_sqlite_has_no_second_clock(service_env: dict[str, str]) -> None:
    clock = ShiftedClock(SystemClock())
    clock.offset = 120.0
    app = await start_app(service_env, clock=clock)
    try:
        assert await app.store.database_time() is None
        await app.core.maintenance.sweep_clock()
        assert app.metrics.registry.get_sample_value("hitl_clock_skew_seconds") == 0.0
    finally:
        await app.stop(grace=1)


async def test_postgres_tells_its_time(service_env: dict[str, str], postgres_dsn: str) -> None:
    app = await start_app(_pg_env(service_env, postgres_dsn))
    try:
        before = datetime.now(UTC)
        database = await app.store.database_time()
        after = datetime.now(UTC)
    finally:
        await app.stop(grace=1)
    assert database is not None
    # The same machine's clock, read between our two readings.
    assert before <= database <= after
