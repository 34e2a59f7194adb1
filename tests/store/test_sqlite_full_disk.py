"""SQLite on a full disk: what an open that fails says."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path
from types import SimpleNamespace

import pytest

from hitl_service.errors import StoreUnavailable
from hitl_service.store.sqlite import SqliteStore


@pytest.mark.parametrize(("free", "named"), [(40_000, True), (10**9, False)])
async def test_an_open_that_fails_on_a_full_disk_names_the_free_space(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, free: int, named: bool
) -> None:
    """On a full disk SQLite's open fails with "disk I/O error" alone (it
    cannot grow its shared-memory file; seen in a drill): the error says
    how little is free, and nothing more when there is room."""

    def full(self: SqliteStore) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    def usage(path: Path) -> SimpleNamespace:
        assert path == tmp_path
        return SimpleNamespace(total=10**10, used=10**10 - free, free=free)

    monkeypatch.setattr(SqliteStore, "_open_blocking", full)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    with pytest.raises(StoreUnavailable) as refused:
        await SqliteStore(tmp_path / "hitl.db").open()
    assert "disk I/O error" in str(refused.value)
    assert ("(its file system has 0.0 MB free)" in str(refused.value)) is named, refused.value
