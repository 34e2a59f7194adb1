"""Shared fixtures: the service built from its production factory, on port 0."""

from __future__ import annotations

pytest_plugins = ["tests.postgres_fixture"]
