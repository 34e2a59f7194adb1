"""Finds provider factories by name: built-ins first, then entry points.

Nothing is imported until a provider is configured, so a broken or heavy
provider costs nothing when another one is used.
"""

from __future__ import annotations

from importlib import import_module
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    from providers.base import ProviderFactory

ENTRY_POINT_GROUP = "hitl_service.providers"

_BUILTIN = {
    "livechat": "providers.livechat:create",
    "local": "providers.local:create",
}


class UnknownProviderError(LookupError):
    """No built-in or installed provider has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class ProviderLoadError(ImportError):
    """A provider is registered under this name but cannot be imported."""

    def __init__(self, name: str, cause: BaseException) -> None:
        super().__init__(f"the {name!r} provider cannot be loaded: {type(cause).__name__}: {cause}")
        self.name = name


def available_providers() -> list[str]:
    """Names of the built-in and installed providers, sorted."""
    names = set(_BUILTIN)
    names.update(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    return sorted(names)


def load_provider_factory(name: str) -> ProviderFactory:
    """Imports and returns the factory registered under ``name``.

    A built-in name wins over an entry point of the same name.

    Raises:
        UnknownProviderError: Nothing is registered under ``name``.
        ProviderLoadError: An installed provider's entry point fails to
            import (a missing dependency, a bug at import time).
    """
    if (ref := _BUILTIN.get(name)) is not None:
        module, _, attr = ref.partition(":")
        return cast("ProviderFactory", getattr(import_module(module), attr))
    for ep in entry_points(group=ENTRY_POINT_GROUP, name=name):
        try:
            return cast("ProviderFactory", ep.load())
        except Exception as exc:  # whatever a third-party import raises
            raise ProviderLoadError(name, exc) from exc
    raise UnknownProviderError(name)
