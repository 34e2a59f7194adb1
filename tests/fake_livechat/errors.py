"""Errors the fake answers with."""

from __future__ import annotations

from typing import Any


class LcError(Exception):
    """A chat/configuration API error: ``{"error": {"type", "message", "data?"}}``."""

    def __init__(self, type_: str, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message
        self.data = data

    def body(self) -> dict[str, Any]:
        """The JSON error body."""
        error: dict[str, Any] = {"type": self.type, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return {"error": error}


class OAuthError(Exception):
    """An accounts API error: ``401 {"oauth_exception", "exception_description"}``."""

    def __init__(self, kind: str, description: str, status: int = 401) -> None:
        super().__init__(f"{kind}: {description}")
        self.kind = kind
        self.description = description
        self.status = status

    def body(self) -> dict[str, str]:
        """The JSON error body."""
        return {"oauth_exception": self.kind, "exception_description": self.description}
