"""Numbered plain-SQL migrations per dialect (``sqlite/``, ``postgres/``).

Shipped migrations are never edited; every schema change adds a file to
both trees.
"""

from __future__ import annotations

from importlib import resources

import structlog

log = structlog.get_logger(__name__)


def migrations(dialect: str) -> list[tuple[int, str]]:
    """(version, SQL) of every migration file of ``dialect``, in order."""
    folder = resources.files(__name__) / dialect
    found = [
        (int(entry.name[:4]), entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql") and entry.name[:4].isdigit()
    ]
    return sorted(found)


def statements(sql: str) -> list[str]:
    """Splits a migration into statements.

    Migrations keep semicolons out of string literals and comments out of
    statement text, so a plain split is exact.
    """
    lines = [line.split("--", 1)[0] for line in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


def warn_if_newer(backend: str, current: int, known: list[tuple[int, str]]) -> None:
    """Logs ``store.schema_newer`` when a newer release migrated the database
    (a rollback, or an old replica left running): this code neither knows
    nor maintains what the newer migrations added. See docs/operations.md,
    "Upgrades and rollbacks"."""
    newest = max((version for version, _ in known), default=0)
    if current > newest:
        log.warning("store.schema_newer", backend=backend, version=current, known=newest)
