"""Store contract tests (both backends) and PostgreSQL-specific tests."""
