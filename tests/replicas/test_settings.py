"""Settings for running replicas on PostgreSQL (no database needed)."""

from __future__ import annotations

import pytest

from hitl_service.config import ConfigError, Settings
from hitl_service.store import open_store
from hitl_service.store.postgres import PostgresStore

DSN = "postgresql://app:pw@db.internal:5432/hitl"


class TestStoreSettings:
    def test_defaults(self) -> None:
        settings = Settings.from_env({"HITL_STORE_URL": DSN})
        assert settings.store_url.scheme == "postgresql"
        assert (settings.store_pool_min, settings.store_pool_max) == (2, 10)
        assert settings.store_poll_only is False
        assert settings.store_statement_cache == 100  # asyncpg's own default

    def test_pgbouncer_in_transaction_mode(self) -> None:
        settings = Settings.from_env(
            {
                "HITL_STORE_URL": DSN,
                "HITL_STORE_POOL_MIN": "1",
                "HITL_STORE_POOL_MAX": "20",
                "HITL_STORE_POLL_ONLY": "true",
                "HITL_STORE_STATEMENT_CACHE": "0",
            }
        )
        assert (settings.store_pool_min, settings.store_pool_max) == (1, 20)
        assert settings.store_poll_only is True
        assert settings.store_statement_cache == 0
        store = open_store(settings)  # built, not opened: no database needed
        assert isinstance(store, PostgresStore)
        assert store._statement_cache_size == 0
        assert store._poll_only is True
        assert "pw" not in repr(store)

    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("HITL_STORE_STATEMENT_CACHE", "-1"),
            ("HITL_STORE_STATEMENT_CACHE", "off"),
            ("HITL_STORE_POOL_MAX", "0"),
            ("HITL_STORE_POLL_ONLY", "sometimes"),
        ],
    )
    def test_bad_values_name_the_variable(self, variable: str, value: str) -> None:
        with pytest.raises(ConfigError) as caught:
            Settings.from_env({"HITL_STORE_URL": DSN, variable: value})
        assert caught.value.variable == variable
