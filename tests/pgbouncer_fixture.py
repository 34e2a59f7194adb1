"""PgBouncer for tests: a throwaway pooler in front of the test PostgreSQL server.

A pytest plugin (``tests/conftest.py`` registers it). Fixtures:

``pgbouncer_factory`` (function)
    ``Callable[..., PgBouncer]``: starts a ``pgbouncer`` process on a free
    ``127.0.0.1`` port in front of ``postgres_server`` (every database of
    that server, through a ``*`` entry), with its configuration, user list
    and log in a temporary directory; stopped after the test. Keyword
    arguments become ``[pgbouncer]`` settings (defaults: ``pool_mode =
    transaction``, ``default_pool_size = 2``). ``PgBouncer.url(dsn)`` is
    ``dsn`` (from ``postgres_dsn``) through the pooler.

``pgbouncer`` (function)
    The default ``PgBouncer`` (transaction pooling, two server connections
    per database and user).

Clients authenticate with SCRAM against a user list holding the application
role's password, which PgBouncer also uses to log in to PostgreSQL. The
binary is ``pgbouncer`` on ``PATH`` or ``/usr/sbin/pgbouncer`` (Debian);
missing, the tests skip, or fail with ``HITL_REQUIRE_POSTGRES=1`` (CI).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from tests.ports import free_port
from tests.postgres_fixture import (
    REQUIRE_ENV,
    PostgresServer,
    RunAs,
    _traversable_tmp,
)

DEBIAN_BINARY = "/usr/sbin/pgbouncer"
START_TIMEOUT = 30.0


def find_pgbouncer() -> str | None:
    """The ``pgbouncer`` binary, or None."""
    found = shutil.which("pgbouncer")
    if found:
        return found
    return DEBIAN_BINARY if os.access(DEBIAN_BINARY, os.X_OK) else None


def _unavailable(why: str) -> None:
    """Skips (or, with ``HITL_REQUIRE_POSTGRES=1``, fails) a PgBouncer test."""
    message = (
        f"PgBouncer tests NOT RUN: {why}. Install it (Debian: `apt-get install "
        f"pgbouncer`); CI sets {REQUIRE_ENV}=1 so this is an error there."
    )
    if os.environ.get(REQUIRE_ENV, "").strip() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _quoted(value: str) -> str:
    """A user-list field: double quotes, inner quotes doubled."""
    return '"' + value.replace('"', '""') + '"'


class PgBouncer:
    """One ``pgbouncer`` process in a temporary directory."""

    def __init__(self, binary: str, root: Path, server: PostgresServer, run_as: RunAs) -> None:
        self.binary = binary
        self.root = root
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._server = server
        self._run_as = run_as

    @property
    def log_path(self) -> Path:
        return self.root / "pgbouncer.log"

    def log(self) -> str:
        """What PgBouncer logged so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def url(self, dsn: str) -> str:
        """``dsn`` (a database of the test server) through this pooler."""
        parts = urlsplit(dsn)
        auth = parts.netloc.rpartition("@")[0]
        netloc = f"{auth}@127.0.0.1:{self.port}" if auth else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, parts.query, ""))

    def _write_config(self, port: int, settings: dict[str, object]) -> Path:
        admin = urlsplit(self._server.admin_url)
        app = urlsplit(self._server.url_for("postgres"))
        users = self.root / "userlist.txt"
        users.write_text(
            f"{_quoted(app.username or '')} {_quoted(app.password or '')}\n", encoding="utf-8"
        )
        users.chmod(0o600)
        merged: dict[str, object] = {
            "listen_addr": "127.0.0.1",
            "listen_port": port,
            "unix_socket_dir": "",
            "auth_type": "scram-sha-256",
            "auth_file": users,
            "logfile": self.log_path,
            "pool_mode": "transaction",
            "default_pool_size": 2,
            "min_pool_size": 0,
            "reserve_pool_size": 0,
            "max_client_conn": 500,
            **settings,
        }
        config = self.root / "pgbouncer.ini"
        lines = [
            "[databases]",
            f"* = host={admin.hostname or '127.0.0.1'} port={admin.port or 5432}",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in merged.items()),
        ]
        config.write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._run_as.chown(self.root)
        return config

    def start(self, **settings: object) -> PgBouncer:
        """Starts PgBouncer on a free port; returns once it lets a client in."""
        for _ in range(5):
            port = free_port()
            config = self._write_config(port, settings)
            self.proc = subprocess.Popen(
                [self.binary, str(config)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                **self._run_as.popen_kwargs(),
            )
            self.port = port
            if self._wait_ready():
                return self
            self.stop()
            if "Address already in use" not in self.log():
                break
        raise RuntimeError(f"pgbouncer did not start; its log:\n{self.log()}")

    def _wait_ready(self) -> bool:
        """Polls a login through the pooler; False if the process ended."""
        target = self.url(self._server.url_for("postgres"))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                return False
            try:
                _in_thread(_login(target))
            except (OSError, asyncpg.PostgresError) as exc:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"pgbouncer does not let clients in ({exc!r}); log:\n{self.log()}"
                    ) from None
                time.sleep(0.05)  # a poll interval, not synchronization
            else:
                return True

    def stop(self) -> None:
        """SIGTERM (PgBouncer shuts down at once), then SIGKILL after 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _in_thread(coro: Coroutine[Any, Any, None]) -> None:
    """Runs ``coro`` on an event loop of its own (a test's loop may be running here)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _login(url: str) -> None:
    conn = await asyncpg.connect(url, timeout=5, statement_cache_size=0)
    try:
        await conn.fetchval("SELECT 1")
    finally:
        await conn.close(timeout=5)


@pytest.fixture
def pgbouncer_factory(request: pytest.FixtureRequest) -> Iterator[Callable[..., PgBouncer]]:
    """Starts PgBouncer processes in front of ``postgres_server``; stops them after the test."""
    binary = find_pgbouncer()
    if binary is None:
        _unavailable(f"no pgbouncer on PATH or at {DEBIAN_BINARY}")
        raise AssertionError("unreachable")  # pragma: no cover - skip/fail raise
    # Only now: without PgBouncer, no PostgreSQL server is started for nothing.
    postgres_server: PostgresServer = request.getfixturevalue("postgres_server")
    run_as = RunAs.pick()  # PgBouncer refuses to run as root, like PostgreSQL
    base = Path(tempfile.mkdtemp(prefix="hitl-pgbouncer-", dir=_traversable_tmp()))
    run_as.chown(base)
    made: list[PgBouncer] = []

    def start(**settings: object) -> PgBouncer:
        root = base / f"pgbouncer{len(made) + 1}"
        root.mkdir(mode=0o700)
        bouncer = PgBouncer(binary, root, postgres_server, run_as)
        made.append(bouncer)
        return bouncer.start(**settings)

    try:
        yield start
    finally:
        for bouncer in made:
            with contextlib.suppress(OSError, subprocess.SubprocessError):
                bouncer.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def pgbouncer(pgbouncer_factory: Callable[..., PgBouncer]) -> PgBouncer:
    """PgBouncer in transaction mode, two server connections per database and user."""
    return pgbouncer_factory()
