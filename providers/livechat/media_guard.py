"""Which caller-given media URLs the service may download (against SSRF).

A media message carries a URL the service fetches and uploads to LiveChat,
where an agent sees the file. Without a guard, a caller could make the
service read what only it can reach (a cloud metadata endpoint, an admin
page on the internal network) and hand it to the agent. So a URL is fetched
only if its host is listed in ``HITL_LIVECHAT_MEDIA_HOSTS`` or, when that is
empty, if every address the host resolves to is public. The connection then
goes to the address that was checked (the host name stays in the ``Host``
header and TLS's SNI), so a second DNS answer cannot swap in another one.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit


class MediaRefused(Exception):
    """The URL is not one the service may fetch; the message says why."""


@dataclass(frozen=True, slots=True)
class Pinned:
    """A vetted URL: where to connect, and the names the server must see."""

    url: str  # the URL with its host replaced by the checked address
    host_header: str
    sni_hostname: str


def host_allowed(host: str, patterns: tuple[str, ...]) -> bool:
    """Whether ``host`` matches ``example.com`` or ``*.example.com`` patterns."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        if pattern.startswith("*."):
            if host.endswith(pattern[1:]):
                return True
        elif host == pattern:
            return True
    return False


async def vet(url: str, patterns: tuple[str, ...]) -> Pinned:
    """Checks a media URL and pins it to one of its host's addresses.

    Raises:
        MediaRefused: Not http(s), no host, a host not in ``patterns`` (when
            set), a host that does not resolve, or (without ``patterns``) a
            host with a loopback, private, link-local or otherwise non-public
            address.
    """
    parts = urlsplit(url)
    host = parts.hostname
    if parts.scheme not in ("http", "https") or not host:
        raise MediaRefused("not an http(s) URL")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise MediaRefused("the URL has an invalid port") from None
    listed = host_allowed(host, patterns)
    if patterns and not listed:
        raise MediaRefused("the host is not in HITL_LIVECHAT_MEDIA_HOSTS")
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise MediaRefused("the host does not resolve") from None
    addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    if not addresses:
        raise MediaRefused("the host does not resolve")
    if not listed and not all(address.is_global for address in addresses):
        raise MediaRefused("the host has a private or local address")
    address = addresses[0]
    netloc = f"[{address}]" if address.version == 6 else str(address)
    if parts.port:
        netloc = f"{netloc}:{parts.port}"
    host_header = host if ":" not in host else f"[{host}]"
    if parts.port:
        host_header = f"{host_header}:{parts.port}"
    return Pinned(
        url=urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, "")),
        host_header=host_header,
        sni_hostname=host,
    )
