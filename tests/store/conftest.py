"""The ``store`` fixture: every contract test runs on SQLite and on PostgreSQL.

``backend`` names the database a test uses and makes more stores on it
(reopen, a second replica); ``store`` is one opened store; ``open_store``
opens more, closing them all after the test.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from hitl_service.secret import Secret
from hitl_service.store.base import Store
from hitl_service.store.postgres import PostgresStore
from hitl_service.store.sqlite import SqliteStore


@dataclass(frozen=True)
class Backend:
    """One database, and how to build stores on it.

    Attributes:
        name: ``"sqlite"`` or ``"postgresql"`` (``Store.backend``).
        target: The SQLite path or the PostgreSQL DSN.
    """

    name: str
    target: str

    def make(self, **options: Any) -> Store:
        """A new, unopened store on the same database.

        ``options`` are PostgresStore keyword arguments (ignored for SQLite).
        """
        if self.name == "sqlite":
            return SqliteStore(Path(self.target))
        options = {"pool_min": 1, "pool_max": 4, **options}
        return PostgresStore(Secret(self.target), **options)

    async def execute(self, *statements: str) -> None:
        """Runs raw SQL on the database, outside any store (as another release would)."""
        if self.name == "sqlite":
            conn = sqlite3.connect(self.target)
            try:
                for statement in statements:
                    conn.execute(statement)
                conn.commit()
            finally:
                conn.close()
            return
        pg = await asyncpg.connect(self.target)
        try:
            for statement in statements:
                await pg.execute(statement)
        finally:
            await pg.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """The database under test: a fresh SQLite file or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return Backend("sqlite", str(tmp_path / "hitl.db"))
    dsn: str = request.getfixturevalue("postgres_dsn")
    return Backend("postgresql", dsn)


OpenStore = Callable[..., Awaitable[Store]]


@pytest.fixture
async def open_store(backend: Backend) -> AsyncIterator[OpenStore]:
    """Opens stores on the test's database; all are closed after the test."""
    opened: list[Store] = []

    async def make(**options: Any) -> Store:
        store = backend.make(**options)
        await store.open()
        opened.append(store)
        return store

    try:
        yield make
    finally:
        for store in reversed(opened):
            await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> Store:
    """An opened store on a fresh database."""
    return await open_store()


@pytest.fixture
async def monitor(postgres_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database, for looking at locks and backends."""
    conn = await asyncpg.connect(postgres_dsn)
    try:
        yield conn
    finally:
        await conn.close()
