"""Ports for servers a test starts on a port it must know in advance (to
restart a process on the same address, or to tell a client where nothing
listens yet)."""

from __future__ import annotations

import random
import socket
from pathlib import Path

_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
_LOWEST = 10_000
# Not the ``random`` module's generator, which pytest-randomly reseeds alike
# before every test.
_PICK = random.SystemRandom()


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = (int(part) for part in _RANGE_FILE.read_text().split())
    except (OSError, ValueError):
        return 32_768, 60_999  # Linux's default
    return low, high


def free_port() -> int:
    """A port nothing listens on now, below the kernel's ephemeral range.

    ``bind(("127.0.0.1", 0))`` hands out an ephemeral port, which the kernel
    may give to any outgoing connection (a database client, another test's
    HTTP client) before the server binds it: a CI run lost a test to
    "Address already in use" so. A port below that range is never handed
    out by itself; one is picked at random and checked free.
    """
    low, _ = _ephemeral_range()
    if low - _LOWEST >= 1_000:
        for _ in range(50):
            port = _PICK.randrange(_LOWEST, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind(("127.0.0.1", port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
