"""HITL_SQLITE_SYNCHRONOUS reaches every SQLite connection the store opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from hitl_service.config import Settings
from hitl_service.store import open_store
from hitl_service.store.sqlite import SqliteStore

# PRAGMA synchronous answers with a number: 1 NORMAL, 2 FULL.
LEVELS = {"normal": 1, "full": 2}


@pytest.mark.parametrize(("value", "expected"), [("", "normal"), ("FULL", "full")])
async def test_synchronous_setting_applies_to_each_connection(
    tmp_path: Path, value: str, expected: str
) -> None:
    env = {"HITL_STORE_URL": f"sqlite:///{tmp_path / 'hitl.db'}"}
    if value:
        env["HITL_SQLITE_SYNCHRONOUS"] = value
    store = open_store(Settings.from_env(env))
    assert isinstance(store, SqliteStore)
    await store.open()
    try:
        connections = [store._writer, store._reader, store._checkpointer]
        levels = {c.execute("PRAGMA synchronous").fetchone()[0] for c in connections if c}
        assert len([c for c in connections if c]) == 3
        assert levels == {LEVELS[expected]}
    finally:
        await store.close()
