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
from typing import Final
from urllib.parse import urlsplit, urlunsplit


class MediaRefused(Exception):
    """The URL is not one the service may fetch; the message says why."""


@dataclass(frozen=True, slots=True)
class Pinned:
    """A vetted URL: where to connect, and the names the server must see."""

    url: str  # the URL with its host replaced by the checked address
    host_header: str
    sni_hostname: str


# IPv6 ranges that carry an IPv4 address in their last 32 bits: NAT64's
# well-known prefix, IPv4-translated and IPv4-compatible addresses. A gateway
# or the host's own stack may turn them into that IPv4 address, so they are
# only as public as it is (``is_global`` judges the IPv6 form alone).
_EMBEDS_IPV4_LOW32: Final = (
    ipaddress.IPv6Network("64:ff9b::/96"),
    ipaddress.IPv6Network("::ffff:0:0:0/96"),
    ipaddress.IPv6Network("::/96"),
)
# Local-use NAT64 (RFC 8215): what it translates to is the network's choice.
_LOCAL_NAT64: Final = ipaddress.IPv6Network("64:ff9b:1::/48")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for (mapped, 6to4, Teredo, NAT64)."""
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if any(address in net for net in _EMBEDS_IPV4_LOW32):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def is_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Whether ``address``, and any IPv4 address it embeds, is globally routable."""
    if not address.is_global:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        if address in _LOCAL_NAT64:
            return False
        return all(embedded.is_global for embedded in _embedded_ipv4(address))
    return True


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
            address (also in IPv6 forms that embed an IPv4 address).
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
    if not listed and not all(is_public(address) for address in addresses):
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
