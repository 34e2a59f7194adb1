"""Logging: structlog configured once at start-up, one JSON (or console)
stream for our logs and the standard library's (grpc, uvicorn, asyncio).

Secrets are kept out by design (they live in ``Secret``, whose ``str`` is
masked); ``redact_secrets`` is the second line of defence: it masks known
secret-bearing keys and any value that contains a registered secret.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Iterable, MutableMapping
from typing import Any, TextIO, cast
from urllib.parse import quote, quote_plus

import orjson
import structlog
from structlog.typing import EventDict, Processor, WrappedLogger

from hitl_service.secret import Secret

_SECRET_KEYS = frozenset(
    {
        "authorization",
        "password",
        "secret",
        "secret_key",
        "token",
        "access_token",
        "refresh_token",
        "agent_token",
        "api_token",
        "cookie",
        "cookies",
        "set-cookie",
        "__lc_cid",
        "__lc_cst",
        "webhook_secret",
        "pat",
        "dsn",
    }
)
_MASK = "**********"


class SecretRedactor:
    """A structlog processor masking secrets in every event.

    Keys that name secrets are masked whatever their value; string values
    that contain a registered secret have it replaced.
    """

    def __init__(self, secrets: Iterable[Secret] = ()) -> None:
        self._values: list[str] = []
        self._secret_key: dict[str, bool] = {}  # key -> names a secret (cached: keys repeat)
        self.register(secrets)

    def register(self, secrets: Iterable[Secret]) -> None:
        """Adds secret values to look for (empty and very short ones skipped),
        with their forms in a URL (a library error may quote the URL it
        called, the secret percent-encoded in it)."""
        for secret in secrets:
            value = secret.reveal()
            if len(value) < 6:
                continue
            for form in (value, quote(value, safe=""), quote_plus(value, safe="")):
                if form not in self._values:
                    self._values.append(form)
        # Longest first: a secret that contains another is masked whole,
        # not left in pieces around the shorter one's mask.
        self._values.sort(key=len, reverse=True)

    def __call__(self, logger: WrappedLogger, method_name: str, event_dict: EventDict) -> EventDict:
        # Runs for every log line (one per RPC and webhook): plain numbers,
        # booleans and None under ordinary keys are skipped without a call.
        secret_key, values = self._secret_key, self._values
        for key, value in list(event_dict.items()):
            named = secret_key.get(key)
            if named is None:
                named = secret_key[key] = key.lower() in _SECRET_KEYS
            if named:
                event_dict[key] = self._clean(key, value)
            elif type(value) is str:
                for secret in values:
                    if secret in value:
                        event_dict[key] = value = value.replace(secret, _MASK)
            elif not (value is None or isinstance(value, int | float)):
                event_dict[key] = self._clean(key, value)
        return event_dict

    def scrub(self, text: str) -> str:
        """``text`` with every registered secret masked."""
        for secret in self._values:
            if secret in text:
                text = text.replace(secret, _MASK)
        return text

    def _clean(self, key: str, value: Any) -> Any:
        if key.lower() in _SECRET_KEYS and value not in (None, ""):
            return _MASK
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, MutableMapping):
            return {k: self._clean(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self._clean("", v) for v in value]
        return value


def configure_logging(
    *, log_format: str, level: str, redactor: SecretRedactor, cache: bool = True
) -> None:
    """Configures structlog and routes standard-library logging through it."""
    # Tracebacks are rendered before the redactor, which runs last, so an
    # exception's message is masked too: as data in JSON (without frame
    # locals: they hold end-user text and, in the wrong frame, credentials),
    # as text on the console.
    exceptions: Processor = (
        structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        if log_format == "json"
        else structlog.processors.format_exc_info
    )
    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Processor = (
        structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
        if log_format == "console"
        else _json_renderer()
    )
    numeric = logging.getLevelName(level.upper())
    stderr = cast("TextIO", _LineSink(sys.stderr))
    structlog.configure(
        processors=[
            *shared,
            structlog.processors.StackInfoRenderer(),
            exceptions,
            redactor,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        # One write per line, newline included (print() makes two).
        logger_factory=structlog.WriteLoggerFactory(stderr),
        cache_logger_on_first_use=cache,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name, exceptions, redactor],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(numeric)
    # Chatty libraries: their INFO lines duplicate our canonical ones.
    for name in ("uvicorn.access", "httpx", "httpcore", "asyncio"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))
    for name, kind in (
        ("asyncpg.pool", _ErrorWithoutTraceback),
        ("grpc._cython.cygrpc", _PeerGoneIsAWarning),
    ):
        library = logging.getLogger(name)
        if not any(isinstance(f, kind) for f in library.filters):
            library.addFilter(kind())


class _LineSink:
    """Standard error for log lines: a line that cannot be written is dropped.

    With the log collector gone (a closed pipe: ``EPIPE``), or standard error
    a file on a full disk (``ENOSPC``), every write raises. Raised from a log
    call, it failed whatever logged: a StartHitl that had opened its handoff
    answered UNKNOWN ("Unexpected BrokenPipeError"), and a process starting
    stopped at its first line. Nothing is left to report the loss on.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            return 0

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._stream.flush()


class _ErrorWithoutTraceback(logging.Filter):
    """asyncpg's pool warns "Failed to restore the pool connection floor;
    retrying" with a whole traceback each time it cannot reconnect (an
    expected outage: a database restart, a failover): the error's text is
    what helps, a traceback of asyncpg's internals reads as a crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR and record.exc_info and record.exc_info[1]:
            exc = record.exc_info[1]
            _one_line(record, f"{type(exc).__name__}: {exc}")
        return True


class _PeerGoneIsAWarning(logging.Filter):
    """grpc.aio logs "ExecuteBatchError raised in core by servicer method"
    at ERROR, with a traceback, when its core refuses to write a call's
    answer: the call is over, mostly because its client went away while a
    stream was blocked in a write (a reader that stopped, then left). That
    is the client's doing, already told by the call's ``rpc.done`` line
    (``CANCELLED``), and must not page anyone: it stays, as one warning
    line without gRPC's internals."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if type(exc).__name__ == "ExecuteBatchError" and record.levelno >= logging.ERROR:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            _one_line(record, "the call was over before its answer was written")
        return True


def _one_line(record: logging.LogRecord, why: str) -> None:
    """``record`` as its message and ``why``, without its traceback."""
    record.msg = f"{record.getMessage()}: {why}"
    record.args = None
    record.exc_info = record.exc_text = None


def _json_renderer() -> Processor:
    """One JSON object per line, encoded by orjson (a line per RPC and
    webhook: the standard library's encoder cost more than the rest of the
    pipeline); what orjson refuses (integers beyond 64 bits, lone
    surrogates) goes through the standard library."""
    stdlib = json.JSONEncoder(default=_fallback).encode

    def render(logger: WrappedLogger, method_name: str, event_dict: EventDict) -> str:
        try:
            return orjson.dumps(event_dict, default=_fallback, option=_ORJSON_OPTIONS).decode()
        except orjson.JSONEncodeError:
            return stdlib(event_dict)

    return render


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS


def _fallback(value: Any) -> Any:
    """Like structlog's: ``__structlog__()`` if the object has one, else ``repr``."""
    to_log = getattr(value, "__structlog__", None)
    return to_log() if callable(to_log) else repr(value)
