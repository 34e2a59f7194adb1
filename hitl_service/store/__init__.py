"""Storage: the ``Store`` interface and its backends, chosen by URL scheme."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hitl_service.config import ConfigError
from hitl_service.store.base import DuplicateKey, OpenSessionExists, Store, Tx

if TYPE_CHECKING:
    from hitl_service.activity import Activity
    from hitl_service.config import Settings


def open_store(
    settings: Settings, activity: Activity | None = None, *, exclusive: bool = False
) -> Store:
    """Builds (does not yet open) the store ``HITL_STORE_URL`` names.

    ``activity``: the process's requests in progress (the SQLite store
    groups COMMITs while there are several). ``exclusive``: a serving
    process; an SQLite file another process serves from is refused.

    Raises:
        ConfigError: A PostgreSQL URL without asyncpg (the ``postgres`` extra).
    """
    url = settings.store_url
    if url.scheme == "sqlite":
        from hitl_service.store.sqlite import SqliteStore

        assert url.path is not None  # parse_store_url sets it for sqlite
        return SqliteStore(
            url.path,
            activity=activity,
            synchronous=settings.sqlite_synchronous,
            exclusive=exclusive,
        )
    try:
        from hitl_service.store.postgres import PostgresStore  # needs the postgres extra
    except ModuleNotFoundError as exc:
        if exc.name != "asyncpg":
            raise
        raise ConfigError(
            "HITL_STORE_URL",
            "a postgresql:// URL needs the postgres extra, which is not installed "
            "(pip install 'hitl-service[postgres]')",
        ) from None

    return PostgresStore(
        url.dsn,
        pool_min=settings.store_pool_min,
        pool_max=settings.store_pool_max,
        poll_only=settings.store_poll_only,
        statement_cache_size=settings.store_statement_cache,
    )


__all__ = ["DuplicateKey", "OpenSessionExists", "Store", "Tx", "open_store"]
