"""The built-in local provider: a human side with an agent console page."""

from providers.local.provider import LocalProvider, create

__all__ = ["LocalProvider", "create"]
