"""PostgreSQL for tests: a throwaway cluster for the whole test session.

A pytest plugin (``tests/conftest.py`` registers it). Fixtures:

``postgres_server`` (session)
    A :class:`PostgresServer`: the server PostgreSQL tests use, with
    ``create_database()`` / ``drop_database()`` helpers. Started on first use:
    ``initdb`` into a temporary directory (as an unprivileged system user when
    the tests run as root: ``postgres`` if it exists, else ``nobody``), then
    ``pg_ctl start`` on a free ``127.0.0.1`` port with ``fsync=off`` and its
    unix socket inside the temporary directory; stopped and removed at the
    end of the session.

``postgres_dsn`` (function)
    ``str``: the DSN of a fresh, empty database (no schema; a store migrates
    it at ``open()``), dropped after the test. Two stores, or two service
    processes, opened on the same DSN share one database (multi-replica
    tests). The role is a non-superuser that owns the database, like a
    production service account, and the DSN carries its password.

``postgres_database_factory`` (function)
    ``Callable[[], str]``: more fresh databases in one test (each dropped
    after it).

``postgres_cluster_factory`` (function)
    ``Callable[[], PgCluster]``: a private, started cluster a test may stop,
    start and restart (outage and reconnect tests); removed after the test.
    Needs the server binaries even when ``HITL_TEST_POSTGRES_URL`` is set.

Environment:

``HITL_TEST_POSTGRES_URL``
    Use this server instead of starting one (``postgresql://user:pw@host/db``;
    the role needs ``CREATEDB``). Databases are created on it per test.
``HITL_REQUIRE_POSTGRES=1``
    No server binaries and no URL is an error instead of a skip (CI sets it).

``HITL_TEST_POSTGRES_BIN``
    The directory of ``initdb`` and ``pg_ctl`` (picks a server version).
    Unset: ``PATH``, then ``/usr/lib/postgresql/*/bin`` (newest first).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg
import pytest

from tests.ports import free_port as _free_port

URL_ENV = "HITL_TEST_POSTGRES_URL"
REQUIRE_ENV = "HITL_REQUIRE_POSTGRES"
BIN_ENV = "HITL_TEST_POSTGRES_BIN"

SUPERUSER = "postgres"
SUPERUSER_PASSWORD = "hitl-test-superuser-pw"
APP_ROLE = "hitl_test"
APP_PASSWORD = "hitl-test-app-pw"

_T = TypeVar("_T")


# --- finding binaries and a user to run them as ---------------------------------


def find_bin_dir() -> Path | None:
    """The directory holding ``initdb``, ``pg_ctl`` and ``postgres``, or None."""
    chosen = os.environ.get(BIN_ENV, "").strip()
    if chosen:
        directory = Path(chosen)
        return (
            directory
            if (directory / "initdb").exists() and (directory / "pg_ctl").exists()
            else None
        )
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).resolve().parent
    candidates = sorted(
        Path("/usr/lib/postgresql").glob("*/bin"),
        key=lambda p: _version_key(p.parent.name),
        reverse=True,
    )
    for directory in candidates:
        if (directory / "initdb").exists() and (directory / "pg_ctl").exists():
            return directory
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name)) or (0,)


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user the server runs as (None fields: the current user)."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def pick(cls) -> RunAs:
        """``postgres`` or ``nobody`` when we are root (PostgreSQL refuses root)."""
        if os.geteuid() != 0:
            return cls()
        for name in ("postgres", "nobody"):
            try:
                entry = pwd.getpwnam(name)
            except KeyError:
                continue
            return cls(entry.pw_uid, entry.pw_gid)
        raise RuntimeError(
            "running as root, and neither a 'postgres' nor a 'nobody' user exists to run "
            "PostgreSQL as (PostgreSQL refuses to run as root): create one, e.g. "
            "`useradd --system postgres`"
        )

    def popen_kwargs(self) -> dict[str, Any]:
        """``subprocess`` arguments that drop to this user in the child."""
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def chown(self, path: Path) -> None:
        """Gives ``path`` (recursively) to this user."""
        if self.uid is None:
            return
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid if self.gid is not None else -1)
            for name in dirs + files:
                os.lchown(Path(root) / name, self.uid, self.gid if self.gid is not None else -1)


def _traversable_tmp() -> str:
    """A temp directory the unprivileged user can reach (pytest's own is 0700)."""
    base = Path(tempfile.gettempdir()).resolve()
    for part in (base, *base.parents):
        if not os.stat(part).st_mode & 0o001:
            return "/tmp"  # noqa: S108 - sticky, world-traversable; our subdir is 0700
    return str(base)


# --- clusters --------------------------------------------------------------------


@dataclass
class PgInstall:
    """Server binaries, the user to run them as, and a pristine ``initdb`` output.

    ``initdb`` runs once per session; every cluster starts from a copy.
    """

    bin_dir: Path
    run_as: RunAs
    base: Path
    _pristine: Path | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _count: int = 0

    def _run(self, *args: str | Path, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(a) for a in args],
            cwd=self.base,
            capture_output=True,
            text=True,
            check=check,
            timeout=120,
            env={**os.environ, "LC_ALL": "C", "LANG": "C"},
            **self.run_as.popen_kwargs(),
        )

    def pristine(self) -> Path:
        """A freshly initialized (never started) data directory."""
        with self._lock:
            if self._pristine is None:
                pwfile = self.base / "superuser.pw"
                pwfile.write_text(SUPERUSER_PASSWORD + "\n", encoding="utf-8")
                self.run_as.chown(pwfile)
                data = self.base / "pristine"
                try:
                    self._run(
                        self.bin_dir / "initdb",
                        "-D",
                        data,
                        "-U",
                        SUPERUSER,
                        f"--pwfile={pwfile}",
                        "--auth-local=trust",
                        "--auth-host=scram-sha-256",
                        "-E",
                        "UTF8",
                        "--no-locale",
                        "--no-sync",
                        "--no-instructions",
                    )
                except subprocess.CalledProcessError as exc:
                    raise RuntimeError(f"initdb failed:\n{exc.stdout}\n{exc.stderr}") from None
                finally:
                    pwfile.unlink()
                self._pristine = data
            return self._pristine

    def new_cluster(self) -> PgCluster:
        """A stopped cluster in a fresh copy of the pristine data directory."""
        pristine = self.pristine()
        with self._lock:
            self._count += 1
            root = self.base / f"cluster{self._count}"
        root.mkdir(mode=0o700)
        shutil.copytree(pristine, root / "data", symlinks=True)
        (root / "data").chmod(0o700)
        (root / "sock").mkdir(mode=0o700)
        self.run_as.chown(root)
        return PgCluster(self, root)


@dataclass
class PgCluster:
    """One PostgreSQL server in a temporary directory; superuser ``postgres``."""

    install: PgInstall
    root: Path
    port: int = 0
    running: bool = False

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def log_path(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres", *, user: str = SUPERUSER, password: str = "") -> str:
        """A TCP URL for ``database`` (the superuser's when no user is given)."""
        password = password or (SUPERUSER_PASSWORD if user == SUPERUSER else "")
        auth = f"{quote(user)}:{quote(password)}@" if password else f"{quote(user)}@"
        return f"postgresql://{auth}127.0.0.1:{self.port}/{quote(database)}"

    def start(self) -> None:
        """Starts the server (on the port it had before, else a free one)."""
        attempts = 1 if self.port else 5
        for _ in range(attempts):
            port = self.port or _free_port()
            options = " ".join(
                [
                    f"-p {port}",
                    f"-k {self.root / 'sock'}",
                    "-c listen_addresses=127.0.0.1",
                    "-c fsync=off",
                    "-c synchronous_commit=off",
                    "-c full_page_writes=off",
                    "-c max_connections=200",
                ]
            )
            result = self.install._run(
                self.install.bin_dir / "pg_ctl",
                "-D",
                self.data,
                "-l",
                self.log_path,
                "-w",
                "-t",
                "60",
                "-o",
                options,
                "start",
                check=False,
            )
            if result.returncode == 0:
                self.port = port
                self.running = True
                return
            log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
            if "could not bind" not in log and "already in use" not in log:
                break
        raise RuntimeError(
            f"pg_ctl start failed ({result.returncode}):\n{result.stdout}\n{result.stderr}\n"
            f"--- server log ---\n{log}"
        )

    def stop(self, mode: str = "fast") -> None:
        """Stops the server; ``mode`` is pg_ctl's (smart, fast, immediate)."""
        if not self.running:
            return
        self.install._run(
            self.install.bin_dir / "pg_ctl", "-D", self.data, "-m", mode, "-w", "stop"
        )
        self.running = False

    def restart(self) -> None:
        """Stops (fast) and starts again on the same port."""
        self.stop()
        self.start()

    def destroy(self) -> None:
        """Stops the server at once and removes its files."""
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def create_app_role(self) -> None:
        """Creates the non-superuser role test databases belong to."""
        admin = _AdminLoop(self.url())
        try:
            # The role name and password are our own constants: nothing to escape.
            admin.execute(f"CREATE ROLE {APP_ROLE} LOGIN PASSWORD '{APP_PASSWORD}'")
        finally:
            admin.close()


# --- the server tests use ------------------------------------------------------


class _AdminLoop:
    """An event loop in its own thread, holding one admin connection.

    The fixtures are synchronous (a session-scoped fixture must not share a
    test's event loop), so admin SQL runs on this private loop.
    """

    def __init__(self, url: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._conn: asyncpg.Connection = self.run(asyncpg.connect(url, timeout=30))

    def run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=120)

    def execute(self, sql: str) -> None:
        self.run(self._conn.execute(sql))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run(self._conn.close(timeout=10))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()


class PostgresServer:
    """The server PostgreSQL tests use: a throwaway cluster or ``HITL_TEST_POSTGRES_URL``.

    Attributes:
        admin_url: Where databases are created (superuser of our own cluster,
            or the given URL).
        cluster: Our own cluster, or None when using an external server.
    """

    def __init__(
        self, admin_url: str, *, app_user: str, app_password: str, cluster: PgCluster | None
    ):
        self.admin_url = admin_url
        self.cluster = cluster
        self._app_user = app_user
        self._app_password = app_password
        self._admin = _AdminLoop(admin_url)
        self._prefix = f"hitl_t{os.getpid()}_{secrets.token_hex(3)}"
        self._count = 0
        self._lock = threading.Lock()

    def url_for(self, database: str) -> str:
        """A URL for ``database`` as the application role."""
        parts = urlsplit(self.admin_url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        port = f":{parts.port}" if parts.port else ""
        auth = quote(self._app_user)
        if self._app_password:
            auth += ":" + quote(self._app_password)
        netloc = f"{auth}@{host}{port}"
        return urlunsplit((parts.scheme, netloc, "/" + quote(database), parts.query, ""))

    def create_database(self) -> tuple[str, str]:
        """Creates an empty database; returns (name, URL as the application role)."""
        with self._lock:
            self._count += 1
            name = f"{self._prefix}_{self._count}"
        self._admin.execute(f'CREATE DATABASE "{name}" OWNER "{self._app_user}" TEMPLATE template0')
        return name, self.url_for(name)

    def drop_database(self, name: str) -> None:
        """Drops a database, disconnecting whoever still uses it."""
        self._admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def close(self) -> None:
        self._admin.close()


# --- fixtures ----------------------------------------------------------------------


def _unavailable(why: str) -> None:
    """Skips (or, with ``HITL_REQUIRE_POSTGRES=1``, fails) a PostgreSQL test."""
    message = (
        f"PostgreSQL tests NOT RUN: {why}. Install the server (Debian: `apt-get install "
        f"postgresql`) or set {URL_ENV}=postgresql://user:password@host:port/db; "
        f"CI sets {REQUIRE_ENV}=1 so this is an error there."
    )
    if os.environ.get(REQUIRE_ENV, "").strip() in ("1", "true", "yes"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def postgres_install() -> Iterator[PgInstall]:
    """Server binaries and a scratch directory for clusters (session)."""
    bin_dir = find_bin_dir()
    if bin_dir is None:
        _unavailable(f"no initdb/pg_ctl in ${BIN_ENV}, on PATH or in /usr/lib/postgresql/*/bin")
        raise AssertionError("unreachable")  # pragma: no cover - skip/fail raise
    run_as = RunAs.pick()
    base = Path(tempfile.mkdtemp(prefix="hitl-pg-", dir=_traversable_tmp()))
    run_as.chown(base)
    install = PgInstall(bin_dir, run_as, base)
    try:
        yield install
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The PostgreSQL server for this test session (see the module docstring)."""
    url = os.environ.get(URL_ENV, "").strip()
    if url:
        parts = urlsplit(url)
        server = PostgresServer(
            url, app_user=parts.username or "", app_password=parts.password or "", cluster=None
        )
        try:
            yield server
        finally:
            server.close()
        return
    install: PgInstall = request.getfixturevalue("postgres_install")
    cluster = install.new_cluster()
    try:
        cluster.start()
        cluster.create_app_role()
        server = PostgresServer(
            cluster.url(), app_user=APP_ROLE, app_password=APP_PASSWORD, cluster=cluster
        )
        try:
            yield server
        finally:
            server.close()
    finally:
        cluster.destroy()


@pytest.fixture
def postgres_database_factory(postgres_server: PostgresServer) -> Iterator[Callable[[], str]]:
    """Makes fresh empty databases (URLs); drops them after the test."""
    made: list[str] = []

    def make() -> str:
        name, url = postgres_server.create_database()
        made.append(name)
        return url

    try:
        yield make
    finally:
        for name in made:
            postgres_server.drop_database(name)


@pytest.fixture
def postgres_dsn(postgres_database_factory: Callable[[], str]) -> str:
    """The URL of a fresh, empty database, dropped after the test."""
    return postgres_database_factory()


@pytest.fixture
def postgres_cluster_factory(postgres_install: PgInstall) -> Iterator[Callable[[], PgCluster]]:
    """Starts private clusters a test may stop and restart; removed afterwards."""
    made: list[PgCluster] = []

    def make() -> PgCluster:
        cluster = postgres_install.new_cluster()
        made.append(cluster)
        cluster.start()
        return cluster

    try:
        yield make
    finally:
        for cluster in made:
            cluster.destroy()
