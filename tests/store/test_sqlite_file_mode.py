"""The SQLite database holds credentials (LiveChat customer tokens and
identity cookies) and transcripts: only its owner may read it."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from hitl_service.store.sqlite import SqliteStore
from tests.store.factories import make_user


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """The usual umask, under which a plain create is readable by everyone."""
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.usefixtures("permissive_umask")
async def test_a_new_database_and_its_wal_are_private(tmp_path: Path) -> None:
    path = tmp_path / "hitl.db"
    store = SqliteStore(path, exclusive=True)
    await store.open()
    try:
        async with store.transaction() as tx:
            await tx.insert_user(make_user())
        files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
        assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    finally:
        await store.close()


@pytest.mark.usefixtures("permissive_umask")
async def test_an_existing_database_keeps_its_mode(tmp_path: Path) -> None:
    path = tmp_path / "hitl.db"
    first = SqliteStore(path)
    await first.open()
    await first.close()
    path.chmod(0o640)  # the operator's choice (a group of readers, say)
    again = SqliteStore(path)
    await again.open()
    try:
        assert mode(path) == 0o640
    finally:
        await again.close()
