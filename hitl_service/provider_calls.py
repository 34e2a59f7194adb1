"""Opening, probing and closing a provider (possibly a third party's): what
goes wrong there is one line, never a traceback or a hang."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from providers.errors import ProviderError

if TYPE_CHECKING:
    from providers.base import Provider


async def open_provider(provider: Provider) -> None:
    """``provider.open()``; a third-party bug there becomes one line.

    Raises:
        ProviderError: The provider's own, or any other exception (not an
            ``OSError``) of a third-party ``open``, naming the provider.
        OSError: As raised.
    """
    try:
        await provider.open()
    except (ProviderError, OSError):
        raise
    except Exception as exc:
        raise ProviderError(
            f"the {provider.name!r} provider failed to open: {type(exc).__name__}: {exc}"
        ) from exc


async def probe_provider(provider: Provider, timeout: float) -> list[str]:
    """``provider.probe()``, bounded by ``timeout`` whether or not the
    provider keeps to it; its problems in plain words."""
    try:
        async with asyncio.timeout(timeout):
            return list(await provider.probe(timeout=timeout))
    except TimeoutError:
        return [f"the provider did not answer within {timeout:g} s"]
    except ProviderError as exc:
        return [f"cannot reach the provider: {exc}"]
    except Exception as exc:  # a third-party bug: one line, as for open and close
        return [f"the probe failed: {type(exc).__name__}: {exc}"]


async def close_provider(provider: Provider, timeout: float) -> list[str]:
    """``provider.close()`` within ``timeout``; what went wrong, as problems."""
    try:
        async with asyncio.timeout(timeout):
            await provider.close()
    except TimeoutError:
        return [f"closing did not finish within {timeout:g} s"]
    except Exception as exc:
        return [f"closing failed: {type(exc).__name__}: {exc}"]
    return []
