"""A rollback: this release opened on a database a newer release migrated."""

from __future__ import annotations

from structlog.testing import capture_logs

from hitl_service.store.migrations import migrations
from tests.store.conftest import Backend, OpenStore

NEWEST = max(version for version, _ in migrations("sqlite"))


async def test_opening_a_schema_newer_than_this_release_says_so(
    backend: Backend, open_store: OpenStore
) -> None:
    store = await open_store()
    await store.close()
    await backend.execute(  # as a newer release would have
        f"INSERT INTO schema_version (version, applied_at) VALUES ({NEWEST + 1}, '2030-01-01')"
    )
    with capture_logs() as logs:
        reopened = await open_store()
    assert await reopened.schema_version() == NEWEST + 1
    newer = [e for e in logs if e["event"] == "store.schema_newer"]
    assert newer, [e["event"] for e in logs]
    assert newer[0]["version"] == NEWEST + 1
    assert newer[0]["known"] == NEWEST
