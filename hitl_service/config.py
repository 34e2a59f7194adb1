"""Settings from the environment (plus ``.env`` and command-line flags).

Every problem is reported as a ``ConfigError`` naming the variable to fix;
``hitl-service serve`` prints it as one line and exits.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from dotenv import dotenv_values

from hitl_service.secret import Secret

LogFormat = Literal["json", "console"]
SqliteSync = Literal["normal", "full"]
_LEVELS = ("debug", "info", "warning", "error")
# HITL_RETENTION's floor: a StartHitl or SendMessage retried within the
# 48 h idempotency window must still find the session its record names.
MIN_RETENTION = 2 * 86400.0
# Its ceiling, and every duration's: the prune's cutoff (now - retention)
# and the next turns (now + interval) must be dates (years 1 to 9999);
# beyond them every sweep raised.
MAX_RETENTION = 36500 * 86400.0
MAX_ABANDON_AFTER = 12 * 3600.0
# The pre-stop delay holds a process that says it is not ready: minutes
# more are a mistake (a value meant in milliseconds), which the
# orchestrator's grace period would cut with SIGKILL before the drain.
MAX_SHUTDOWN_DELAY = 600.0
# HITL_GRPC_MAX_CONNECTIONS's ceiling: gRPC's core takes its connection
# quota as a C int below INT_MAX, and aborts the process (SIGABRT, a failed
# check) on 2**31 - 1, or raises OverflowError beyond it, when the server
# is built.
MAX_GRPC_CONNECTIONS = 2**31 - 2
MIN_GRPC_IDLE_TIMEOUT = 0.1


MIN_API_TOKEN_LENGTH = 16
"""The shortest ``HITL_API_TOKENS`` entry accepted."""


class ConfigError(ValueError):
    """A setting is missing or malformed."""

    def __init__(self, variable: str, message: str) -> None:
        super().__init__(f"{variable}: {message}")
        self.variable = variable


SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY", "PRIVATE_KEY", "CREDENTIAL")
"""Words naming a secret setting (``providers.base.ProviderDeps.env`` says so)."""


@dataclass(frozen=True, slots=True)
class StoreUrl:
    """A parsed ``HITL_STORE_URL``; ``repr`` hides any password."""

    scheme: Literal["sqlite", "postgresql"]
    path: Path | None = None  # sqlite
    dsn: Secret = field(default_factory=lambda: Secret(""))  # postgresql

    def redacted(self) -> str:
        """The URL with any password masked, for logs and ``check``."""
        if self.scheme == "sqlite":
            return f"sqlite:///{self.path}"
        parts = urlsplit(self.dsn.reveal())
        user = (
            f"{parts.username}:***@"
            if parts.password
            else f"{parts.username}@"
            if parts.username
            else ""
        )
        return f"{parts.scheme}://{user}{_hosts(parts.netloc)}{parts.path}"


def _hosts(netloc: str) -> str:
    """The ``host[:port]`` list of a PostgreSQL URL's authority (libpq and
    asyncpg accept several, comma-separated, for failover)."""
    return netloc.rpartition("@")[2]


def _userinfo_cut_short(netloc: str, path: str, query: str, fragment: str) -> bool:
    """Whether a '/', '?' or '#' in the user name or password ended the URL's
    authority early, leaving the rest of the password where the host, port
    and database name are read (and shown, by ``redacted``): an '@' after
    the authority, unless it is in a query value (``?user=me@corp``)."""
    if "@" in netloc:
        return False
    first_key = re.split("[=&]", query, maxsplit=1)[0]
    return "@" in path or "@" in fragment or "@" in first_key


def _host_names(netloc: str) -> list[str]:
    """The host names of a PostgreSQL URL's authority, ports checked."""
    names = []
    for entry in _hosts(netloc).split(","):
        host, port = entry, ""
        if entry.startswith("["):  # [v6] or [v6]:port
            host, _, rest = entry.partition("]")
            host += "]"
            port = rest[1:] if rest.startswith(":") else ("?" if rest else "")
        elif ":" in entry:
            host, _, port = entry.partition(":")
        if port and not (re.fullmatch("[0-9]{1,5}", port) and 0 < int(port) < 65536):
            raise ConfigError("HITL_STORE_URL", "the PostgreSQL URL has a malformed port")
        names.append(host)
    return names


@dataclass(frozen=True)
class Settings:
    """Everything the core reads from its environment.

    Provider settings (``HITL_<PROVIDER>_*``) stay in ``env`` and are parsed
    by the provider itself.
    """

    provider: str = "local"
    grpc_addr: str = "127.0.0.1:50051"
    http_addr: str = "127.0.0.1:8080"
    store_url: StoreUrl = field(
        default_factory=lambda: StoreUrl("sqlite", path=Path("./var/hitl.db"))
    )
    data_dir: Path = Path("./var")
    log_format: LogFormat = "json"
    log_level: str = "info"
    http_max_body: int = 1024 * 1024
    http_request_timeout: float = 30.0
    # Webhook (and provider route) requests handled at once: each may hold
    # up to http_max_body until it is answered, so 256 of them hold at most
    # 256 MiB at the default body limit (LiveChat's webhooks are mostly a
    # few KB; an incoming_chat carries the whole transcript of the start it
    # reports, which can pass 1 MiB: README, HITL_HTTP_MAX_BODY).
    http_max_in_flight: int = 256
    # Open sidecar connections (one file descriptor each): at the cap, the
    # oldest one with no request in progress is closed to make room for a
    # new one (the new one, when every open one has a request in progress),
    # so a flood of them on the webhook port cannot take the descriptors
    # gRPC, the store and provider calls need (2,500 idle ones took all of
    # a 2,000 limit). Counted in open_files_wanted (app.py).
    http_max_connections: int = 512
    provider_timeout: float = 10.0
    request_budget: float = 25.0
    stream_max_seconds: float = 3600.0
    stream_max_open: int = 10_000
    # Unary HitlService calls handled at once: each holds a few tasks and
    # ~60 KB until its deadline; with the provider hung and callers
    # retrying, nothing else would bound them.
    rpc_max_in_flight: int = 1000
    # Open gRPC connections (one file descriptor each, ~9 KB): beyond the
    # cap a new one is closed at once, so a flood of them on the gRPC port
    # cannot take the descriptors the store, the sidecar and provider calls
    # need (20,000 idle ones exhausted a 20,000 limit: nothing else opened).
    grpc_max_connections: int = 10_000
    # A connection with no call for this long is told GOAWAY and closed
    # (clients reconnect on their next call; an open stream is a call);
    # one that has not finished its TLS and HTTP/2 handshake in
    # grpc_handshake_timeout is closed.
    grpc_idle_timeout: float = 300.0
    grpc_handshake_timeout: float = 20.0
    # Each buffered event is a few objects every full garbage collection
    # scans: 4096 (up to twice that held) cost 7-10 ms pauses under webhook
    # load, 1024 cost 3-5 ms (bench/README.md).
    stream_buffer: int = 1024
    queue_timeout: float = 0.0
    idle_timeout: float = 0.0
    reconcile_interval: float = 300.0
    grace_seconds: float = 10.0
    # From SIGTERM, this long not ready (/readyz 503, gRPC health
    # NOT_SERVING) while still serving, so load balancers stop routing here
    # before the listeners close; 0: the shutdown starts at once.
    shutdown_delay: float = 0.0
    retention: float = 0.0  # ended sessions are deleted this long after; 0 keeps them
    # A start given up without the provider's answer may have opened a
    # chat: this long after, unless the user has a handoff open again (a
    # retry reuses the chat), the provider is asked to close it; 0: never.
    abandon_after: float = 600.0
    api_tokens: tuple[Secret, ...] = ()
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    store_pool_min: int = 2
    store_pool_max: int = 10
    store_poll_only: bool = False
    store_statement_cache: int = 100
    # normal: a commit survives a crash of the process; full: also a power
    # loss, for an fsync of the WAL per COMMIT (shared by a group commit).
    sqlite_synchronous: SqliteSync = "normal"
    env: Mapping[str, str] = field(default_factory=dict, repr=False)

    def secrets(self) -> list[Secret]:
        """Every configured secret: the API tokens, a PostgreSQL DSN, and
        each ``HITL_*`` setting whose name says it holds one (see
        ``SECRET_WORDS``), for masking what the service shows and logs."""
        found: list[Secret] = list(self.api_tokens)
        if self.store_url.scheme == "postgresql":
            found.append(self.store_url.dsn)
        for key, value in self.env.items():
            upper = key.upper()
            if upper.startswith("HITL_") and any(w in upper for w in SECRET_WORDS):
                # Stripped, as the settings are read: a secret mounted from a
                # file often ends in a newline, and the bare value is what is
                # sent (and what a backend may quote back).
                for part in (v.strip() for v in value.split(",")):
                    found.extend(Secret(form) for form in (part, *_basic_parts(part)) if form)
        return found

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Parses settings; ``env`` defaults to ``.env`` overlaid by ``os.environ``.

        Raises:
            ConfigError: A value is malformed.
        """
        if env is None:
            env = load_environment()
        get = env.get
        default_format: LogFormat = "console" if sys.stderr.isatty() else "json"
        raw_format = get("HITL_LOG_FORMAT", default_format)
        if raw_format not in ("json", "console"):
            raise ConfigError(
                "HITL_LOG_FORMAT", f"must be json or console, not {_shown(raw_format)}"
            )
        log_format: LogFormat = "json" if raw_format == "json" else "console"
        log_level = get("HITL_LOG_LEVEL", "info").lower()
        if log_level not in _LEVELS:
            raise ConfigError("HITL_LOG_LEVEL", f"must be one of {', '.join(_LEVELS)}")
        provider = get("HITL_PROVIDER", "local").strip()
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", provider):
            raise ConfigError("HITL_PROVIDER", f"{_shown(provider)} is not a provider name")
        tls = {
            name: _optional_path(env, f"HITL_GRPC_TLS_{name.upper()}")
            for name in ("cert", "key", "client_ca")
        }
        if (tls["cert"] is None) != (tls["key"] is None):
            raise ConfigError(
                "HITL_GRPC_TLS_KEY", "set both HITL_GRPC_TLS_CERT and HITL_GRPC_TLS_KEY"
            )
        if tls["client_ca"] is not None and tls["cert"] is None:
            raise ConfigError("HITL_GRPC_TLS_CLIENT_CA", "needs HITL_GRPC_TLS_CERT and _KEY too")
        if tls["cert"] is not None and tls["key"] is not None:
            _check_tls(tls["cert"], tls["key"], tls["client_ca"])
        raw_sync = get("HITL_SQLITE_SYNCHRONOUS", "normal").strip().lower()
        if raw_sync not in ("normal", "full"):
            raise ConfigError(
                "HITL_SQLITE_SYNCHRONOUS", f"must be normal or full, not {_shown(raw_sync)}"
            )
        sqlite_synchronous: SqliteSync = "full" if raw_sync == "full" else "normal"
        tokens = tuple(
            Secret(t.strip()) for t in get("HITL_API_TOKENS", "").split(",") if t.strip()
        )
        if any(len(t.reveal()) < MIN_API_TOKEN_LENGTH for t in tokens):
            # Guessable, and too short for the log redactor to look for.
            raise ConfigError(
                "HITL_API_TOKENS",
                f"each token must be at least {MIN_API_TOKEN_LENGTH} characters "
                "(e.g. from `openssl rand -hex 32`)",
            )
        return cls(
            provider=provider,
            grpc_addr=parse_addr("HITL_GRPC_ADDR", get("HITL_GRPC_ADDR", cls.grpc_addr)),
            http_addr=parse_addr("HITL_HTTP_ADDR", get("HITL_HTTP_ADDR", cls.http_addr)),
            store_url=parse_store_url(get("HITL_STORE_URL", "sqlite:///./var/hitl.db")),
            data_dir=Path(get("HITL_DATA_DIR", "./var")),
            log_format=log_format,
            log_level=log_level,
            http_max_body=_int(env, "HITL_HTTP_MAX_BODY", cls.http_max_body, minimum=1024),
            http_request_timeout=_duration(
                env, "HITL_HTTP_REQUEST_TIMEOUT", cls.http_request_timeout, 0.1
            ),
            http_max_in_flight=_int(
                env, "HITL_HTTP_MAX_IN_FLIGHT", cls.http_max_in_flight, minimum=1
            ),
            http_max_connections=_int(
                env, "HITL_HTTP_MAX_CONNECTIONS", cls.http_max_connections, minimum=1
            ),
            provider_timeout=_duration(env, "HITL_PROVIDER_TIMEOUT", cls.provider_timeout, 0.1),
            request_budget=_duration(env, "HITL_REQUEST_BUDGET", cls.request_budget, 0.1),
            stream_max_seconds=_duration(env, "HITL_STREAM_MAX_SECONDS", 3600.0, 1.0),
            stream_max_open=_int(env, "HITL_STREAM_MAX_OPEN", cls.stream_max_open, minimum=1),
            stream_buffer=_int(env, "HITL_STREAM_BUFFER", cls.stream_buffer, minimum=16),
            rpc_max_in_flight=_int(env, "HITL_RPC_MAX_IN_FLIGHT", cls.rpc_max_in_flight, minimum=1),
            grpc_max_connections=_int(
                env,
                "HITL_GRPC_MAX_CONNECTIONS",
                cls.grpc_max_connections,
                minimum=1,
                maximum=MAX_GRPC_CONNECTIONS,
            ),
            grpc_idle_timeout=_grpc_idle_timeout(env),
            grpc_handshake_timeout=_duration(
                env, "HITL_GRPC_HANDSHAKE_TIMEOUT", cls.grpc_handshake_timeout, 0.1
            ),
            queue_timeout=_duration(env, "HITL_QUEUE_TIMEOUT", 0.0, 0.0),
            idle_timeout=_duration(env, "HITL_IDLE_TIMEOUT", 0.0, 0.0),
            reconcile_interval=_duration(
                env, "HITL_RECONCILE_INTERVAL", cls.reconcile_interval, 0.0
            ),
            grace_seconds=_duration(env, "HITL_GRACE_SECONDS", cls.grace_seconds, 0.0),
            shutdown_delay=_shutdown_delay(env),
            retention=_retention(env),
            abandon_after=_abandon_after(env),
            api_tokens=tokens,
            tls_cert=tls["cert"],
            tls_key=tls["key"],
            tls_client_ca=tls["client_ca"],
            store_pool_min=_int(env, "HITL_STORE_POOL_MIN", cls.store_pool_min, minimum=1),
            store_pool_max=_int(env, "HITL_STORE_POOL_MAX", cls.store_pool_max, minimum=1),
            store_poll_only=_bool(env, "HITL_STORE_POLL_ONLY", default=False),
            # 0 turns asyncpg's prepared-statement cache off, for PgBouncer in
            # transaction mode before 1.21 (or without max_prepared_statements).
            store_statement_cache=_int(
                env, "HITL_STORE_STATEMENT_CACHE", cls.store_statement_cache, minimum=0
            ),
            sqlite_synchronous=sqlite_synchronous,
            env=dict(env),
        )


def load_environment(dotenv: Path = Path(".env")) -> dict[str, str]:
    """``.env`` (if present) overlaid by the process environment.

    Raises:
        ConfigError: ``.env`` exists but cannot be read (permissions, not UTF-8).
    """
    merged: dict[str, str] = {}
    if dotenv.is_file():
        try:
            values = dotenv_values(dotenv)
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise ConfigError(str(dotenv), f"cannot be read: {reason}") from None
        merged.update({k: v for k, v in values.items() if v is not None})
    merged.update(os.environ)
    return merged


def _basic_parts(value: str) -> tuple[str, ...]:
    """For a secret in HTTP Basic form, base64 of ``user:password`` (like
    LiveChat's agent token around its PAT): the decoded text and the
    password, which is what a backend's error would quote; else nothing."""
    try:
        decoded = base64.b64decode(value, validate=True).decode()
    except (ValueError, UnicodeDecodeError):
        return ()
    user, colon, password = decoded.partition(":")
    return (decoded, password) if colon and user and password.isprintable() else ()


def parse_store_url(raw: str) -> StoreUrl:
    """Parses ``sqlite:///relative.db``, ``sqlite:////abs.db`` or ``postgresql://…``.

    Raises:
        ConfigError: Anything else; the message never repeats a password.
    """
    var = "HITL_STORE_URL"
    if raw.startswith("sqlite:"):
        if not raw.startswith("sqlite:///") or len(raw) == len("sqlite:///"):
            raise ConfigError(
                var, "an SQLite URL looks like sqlite:///relative/path.db or sqlite:////abs/path.db"
            )
        return StoreUrl("sqlite", path=Path(raw[len("sqlite:///") :]))
    if raw.startswith(("postgresql://", "postgres://")):
        try:
            parts = urlsplit(raw)
        except ValueError:  # an unclosed [v6 address
            raise ConfigError(var, "the PostgreSQL URL is malformed") from None
        if _userinfo_cut_short(parts.netloc, parts.path, parts.query, parts.fragment):
            raise ConfigError(
                var,
                "the PostgreSQL URL has an '@' after its host: percent-encode '/', '?', "
                "'#' and '@' in the user name, password and database name (%2F, %3F, %23, %40)",
            )
        hosts = _host_names(parts.netloc)
        if len(hosts) > 1 and not all(hosts):
            raise ConfigError(var, "the PostgreSQL URL lists an empty host")
        if not hosts[0] and "host=" not in parts.query:
            raise ConfigError(var, "the PostgreSQL URL names no host")
        return StoreUrl("postgresql", dsn=Secret(raw))
    scheme = raw.split(":", 1)[0] if ":" in raw else ""
    shown = "a value without a scheme"
    # Only a scheme is quoted: the text before a colon may be anything else,
    # such as a libpq key=value DSN with its password.
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,31}", scheme):
        shown = f"scheme {_shown(scheme)}"
    raise ConfigError(var, f"expected sqlite:///PATH or postgresql://..., got {shown}")


def parse_addr(variable: str, raw: str) -> str:
    """Validates ``host:port`` (``[v6]:port`` too); port 0 means any free port."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9_.-]+):([0-9]{1,5})", raw.strip())
    if match is None or int(match.group(2)) > 65535:
        raise ConfigError(variable, f"expected HOST:PORT, got {_shown(raw)}")
    return raw.strip()


def _int(
    env: Mapping[str, str],
    variable: str,
    default: int,
    *,
    minimum: int,
    maximum: int | None = None,
) -> int:
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(variable, f"expected a whole number, got {_shown(raw)}") from None
    if value < minimum:
        raise ConfigError(variable, f"must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(variable, f"must be at most {maximum}")
    return value


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "": 1.0}


def _duration(env: Mapping[str, str], variable: str, default: float, minimum: float) -> float:
    raw = env.get(variable)
    if raw is None or raw.strip() == "":
        return default
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|)\s*", raw)
    if match is None:
        raise ConfigError(variable, f"expected a duration like 30s, 5m or 1h, got {_shown(raw)}")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if value < minimum:
        raise ConfigError(variable, f"must be at least {minimum}s")
    if value > MAX_RETENTION:
        # Dates a duration away (timeouts, intervals) must stay within the
        # calendar: far beyond it, every upkeep pass failed with an overflow.
        raise ConfigError(variable, "must be at most 36500d (100 years)")
    return value


def _retention(env: Mapping[str, str]) -> float:
    value = _duration(env, "HITL_RETENTION", 0.0, 0.0)
    if 0 < value < MIN_RETENTION:
        raise ConfigError(
            "HITL_RETENTION",
            "must be 0 (keep everything) or at least 2d: a request retried within "
            "the 48 h idempotency window must still find its session",
        )
    return value  # at most MAX_RETENTION, as every duration (``_duration``)


def _grpc_idle_timeout(env: Mapping[str, str]) -> float:
    value = _duration(env, "HITL_GRPC_IDLE_TIMEOUT", Settings.grpc_idle_timeout, 0.0)
    if 0 < value < MIN_GRPC_IDLE_TIMEOUT:
        # 1ms: every new connection was told GOAWAY ("connection idle")
        # before its first call, and every call ran into its deadline;
        # under 0.5ms it rounded to 0 ms, which gRPC took as never.
        raise ConfigError(
            "HITL_GRPC_IDLE_TIMEOUT",
            "must be 0 (never) or at least 100ms: shorter, a connection is closed "
            "before its first call",
        )
    return value


def _shutdown_delay(env: Mapping[str, str]) -> float:
    value = _duration(env, "HITL_SHUTDOWN_DELAY_SECONDS", Settings.shutdown_delay, 0.0)
    if value > MAX_SHUTDOWN_DELAY:
        raise ConfigError(
            "HITL_SHUTDOWN_DELAY_SECONDS",
            "must be at most 10m: a few seconds let load balancers see the replica "
            "not ready; the orchestrator's grace period has to cover it and the drain",
        )
    return value


def _abandon_after(env: Mapping[str, str]) -> float:
    value = _duration(env, "HITL_ABANDON_AFTER", Settings.abandon_after, 0.0)
    if value > MAX_ABANDON_AFTER:
        raise ConfigError(
            "HITL_ABANDON_AFTER",
            "must be at most 12h: the close is retried like a stop, for up to 24 h "
            "after the start failed",
        )
    return value


def _bool(env: Mapping[str, str], variable: str, *, default: bool) -> bool:
    raw = env.get(variable, "").strip().lower()
    if raw == "":
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(variable, f"expected true or false, got {_shown(raw)}")


def _shown(raw: str) -> str:
    """A setting's value quoted for an error, cut short (a pasted file is
    no one-line error)."""
    return repr(raw if len(raw) <= 80 else raw[:80] + "...")


def _check_tls(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Loads the PEM files as gRPC will, so a bad one is named here (gRPC
    itself only says that it cannot bind the address)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # gRPC's TLS (BoringSSL) has no security levels: keys and signatures
    # OpenSSL's default level calls weak (RSA-1024, SHA-1) still serve.
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        # An encrypted key gets no password (gRPC cannot use one): no prompt.
        context.load_cert_chain(cert, key, password=lambda: b"")
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(
            "HITL_GRPC_TLS_CERT",
            f"{cert} and HITL_GRPC_TLS_KEY {key} are not a PEM certificate chain and "
            f"its unencrypted private key ({_ssl_reason(exc)})",
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                "HITL_GRPC_TLS_CLIENT_CA",
                f"{client_ca} holds no PEM CA certificate ({_ssl_reason(exc)})",
            ) from None


def _ssl_reason(exc: ssl.SSLError | OSError) -> str:
    return str(getattr(exc, "reason", None) or exc.strerror or type(exc).__name__)


def _optional_path(env: Mapping[str, str], variable: str) -> Path | None:
    raw = env.get(variable, "").strip()
    if not raw:
        return None
    path = Path(raw)
    try:
        found = path.is_file()
    except (OSError, ValueError):  # a name too long for the file system
        found = False
    if not found:
        raise ConfigError(variable, f"no readable file at {_shown(raw)}")
    return path
