"""``hitl-service``: serve, check, demo, and provider subcommands.

Every failure a person can fix is printed as one plain line naming the
setting; no tracebacks for configuration mistakes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import io
import os
import shlex
import signal
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import structlog

from hitl_service.config import ConfigError, Settings, load_environment

if TYPE_CHECKING:
    from providers.base import Provider
    from providers.types import WebhookBatch

log = structlog.get_logger(__name__)

EXIT_CONFIG = 2
EXIT_PROBLEMS = 1
EVENT_LOOPS = ("auto", "asyncio", "uvloop")
_T = TypeVar("_T")


def loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``HITL_EVENT_LOOP`` names; None means asyncio's own.

    ``auto`` (the default) takes uvloop when it is installed (the ``speed``
    extra), else asyncio's loop. grpc.aio, uvicorn and asyncpg all run on
    either.

    Raises:
        ConfigError: An unknown name, or ``uvloop`` when it is not installed.
    """
    name = name.strip().lower() or "auto"
    if name not in EVENT_LOOPS:
        raise ConfigError("HITL_EVENT_LOOP", f"must be one of {', '.join(EVENT_LOOPS)}")
    if name == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if name == "uvloop":
            raise ConfigError(
                "HITL_EVENT_LOOP", "uvloop is not installed (pip install 'hitl-service[speed]')"
            ) from None
        return None
    return uvloop.new_event_loop


def run_with_loop(main: Coroutine[Any, Any, _T], name: str = "auto") -> _T:
    """Runs ``main`` to completion on the event loop ``name`` selects."""
    try:
        factory = loop_factory(name)
    except ConfigError:
        main.close()
        raise
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)


def _settings(args: argparse.Namespace) -> Settings:
    """Environment (.env, then process) overlaid by command-line flags."""
    env = load_environment()
    for flag, variable in (
        ("provider", "HITL_PROVIDER"),
        ("grpc_addr", "HITL_GRPC_ADDR"),
        ("http_addr", "HITL_HTTP_ADDR"),
        ("store_url", "HITL_STORE_URL"),
        ("log_format", "HITL_LOG_FORMAT"),
    ):
        value = getattr(args, flag, None)
        if value:
            env[variable] = value
    return Settings.from_env(env)


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--provider", help="overrides HITL_PROVIDER")
    parser.add_argument("--grpc-addr", help="overrides HITL_GRPC_ADDR")
    parser.add_argument("--http-addr", help="overrides HITL_HTTP_ADDR")
    parser.add_argument("--store-url", help="overrides HITL_STORE_URL")
    parser.add_argument(
        "--log-format", choices=("json", "console"), help="overrides HITL_LOG_FORMAT"
    )


def _version() -> str:
    """The installed distribution's version ("unknown" when run from a tree
    that was never installed). Looked up only when asked: it reads the
    installed distributions' metadata, which ``serve`` has no use for."""
    from importlib import metadata

    try:
        return metadata.version("hitl-service")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="hitl-service",
        description="Hand a chatbot conversation to a human agent and back.",
    )
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the service")
    _add_overrides(serve)
    check = commands.add_parser("check", help="validate settings and probe store and provider")
    _add_overrides(check)
    demo = commands.add_parser(
        "demo", help="terminal client: start a handoff and chat with the agent"
    )
    demo.add_argument("--target", default="", help="gRPC address (default: HITL_GRPC_ADDR)")
    demo.add_argument("--name", default="Demo User", help="the end user's name")
    demo.add_argument("--user", default="demo-user", help="the end user's external id")
    demo.add_argument("--title", default="Demo handoff", help="title shown to the agent")
    demo.add_argument("--message", action="append", default=[], help="a line to send (repeatable)")
    demo.add_argument("--group", default="", help="group to route to")
    demo.add_argument("--token", default="", help="API token, if HITL_API_TOKENS is set")
    demo.add_argument(
        "--exit-after-send",
        action="store_true",
        help="leave the handoff open and exit once the messages are sent",
    )
    return parser


def _provider_commands_note() -> str:
    """The end of ``hitl-service --help``: the providers' own commands
    (``hitl-service livechat register-webhooks``, ...) are no subcommands of
    the parser, so the help says where they are. Only built for the help:
    listing the installed providers reads the distributions' metadata."""
    from providers.registry import available_providers

    return (
        "A provider's own commands run as 'hitl-service PROVIDER COMMAND' (providers: "
        f"{', '.join(available_providers())}); 'hitl-service PROVIDER --help' lists them "
        "(a provider may need its settings for that)."
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hitl-service`` command."""
    try:
        return _main(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:  # Ctrl-C in check or a provider command: no traceback
        print("hitl-service: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The output's reader left (`| head`): no traceback, and none again
        # when the interpreter flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str]) -> int:
    parser = build_parser()
    if argv and argv[0] not in ("serve", "check", "demo", "-h", "--help", "--version"):
        return _provider_command(argv)
    if not argv or argv[0] in ("-h", "--help"):
        parser.epilog = _provider_commands_note()
    args = parser.parse_args(argv)
    if args.version:
        print(f"hitl-service {_version()}")
        return 0
    if args.command is None:
        parser.print_help()
        return EXIT_CONFIG
    try:
        settings = _settings(args) if args.command != "demo" else Settings.from_env()
        if args.command == "serve":
            return run_with_loop(_serve(settings), settings.env.get("HITL_EVENT_LOOP", "auto"))
        if args.command == "check":
            loop_factory(settings.env.get("HITL_EVENT_LOOP", "auto"))  # as serve would
    except ConfigError as exc:
        print(f"hitl-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        _configure_logs(settings)  # stderr, as configured: stdout is the report
        return asyncio.run(_check(settings, sys.stdout))
    from hitl_service.demo import run_demo

    try:
        return asyncio.run(run_demo(args, settings, sys.stdout))
    except KeyboardInterrupt:  # Ctrl-C: leave as --exit-after-send does
        print("demo: interrupted; the handoff stays open (Ctrl-D ends it)", file=sys.stderr)
        return 130


def _configure_logs(settings: Settings) -> None:
    """Log lines as ``HITL_LOG_FORMAT`` and ``HITL_LOG_LEVEL`` say, to stderr,
    with the secrets masked: for ``serve`` and for the commands beside it,
    whose own output (a report, a command's result) goes to stdout."""
    from hitl_service.logs import SecretRedactor, configure_logging

    redactor = SecretRedactor(settings.secrets())
    configure_logging(log_format=settings.log_format, level=settings.log_level, redactor=redactor)


async def _serve(settings: Settings) -> int:
    from hitl_service.app import build_app, open_files_wanted
    from hitl_service.errors import StoreUnavailable
    from providers.errors import ProviderConfigError, ProviderError

    _configure_logs(settings)
    # In JSON, every line is a log line: ``service.ready`` has the ports.
    console = settings.log_format == "console"
    scrub = _scrubber(settings)
    raise_open_files_limit(open_files_wanted(settings))
    try:
        app = build_app(settings)
    except ConfigError as exc:
        return _fatal(console, "configuration error", scrub(str(exc)), EXIT_CONFIG)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if not await _start_unless_stopped(app.start(), stop):
            # SIGTERM/SIGINT while the start waited (a migration behind
            # another replica's, a database that does not answer).
            if console:
                print("hitl-service: stopped before it was serving", file=sys.stderr)
            else:
                log.info("service.stopped_before_serving")
            await app.stop(grace=0)
            return 0
    except ProviderConfigError as exc:  # found when the provider opens (its files)
        code = _fatal(console, "configuration error", scrub(str(exc)), EXIT_CONFIG)
        await app.stop(grace=0)
        return code
    except (StoreUnavailable, OSError, ProviderError) as exc:
        code = _fatal(console, "cannot start", scrub(str(exc)), EXIT_PROBLEMS)
        await app.stop(grace=0)
        return code
    if console:
        _print_banner(app, sys.stderr)
    freeze_startup_heap()
    await stop.wait()
    stop.clear()  # a second SIGTERM or SIGINT sets it again: it skips the delay
    delay = settings.shutdown_delay
    if console:
        waiting = f"not ready, serving for {delay:g} s more, then " if delay else ""
        print(f"hitl-service: stopping ({waiting}draining calls and the outbox)", file=sys.stderr)
    else:
        log.info("service.stopping", delay_seconds=delay)
    await app.stop(delay=delay, cut_short=stop)
    return 0


def _fatal(console: bool, what: str, error: str, code: int) -> int:
    """The last words of a ``serve`` that cannot run: one plain line, or in
    JSON one ``service.start_failed`` object like every other line (a log
    shipper drops what does not parse)."""
    if console:
        print(f"hitl-service: {what}: {error}", file=sys.stderr)
    else:
        log.error("service.start_failed", reason=what, error=error, exit_code=code)
    return code


async def _start_unless_stopped(start: Coroutine[Any, Any, None], stop: asyncio.Event) -> bool:
    """Runs ``start``; True once it is done, False if ``stop`` came first
    (``start`` is then cancelled). Its errors are raised."""
    starting = asyncio.ensure_future(start)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopping.cancel()
    if starting.done():
        starting.result()
        return True
    starting.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await starting
    return False


def raise_open_files_limit(wanted: int) -> None:
    """Raises this process's soft limit on open files to its hard limit, as
    servers commonly do: the soft one is often 1024 (systemd's default, with
    a hard limit of 524288), which a few hundred gRPC and webhook
    connections use up long before HITL_GRPC_MAX_CONNECTIONS. Under an
    infinite hard limit (macOS) it asks for ``wanted``, since the kernel
    refuses an infinite soft one; a limit the system refuses leaves the
    soft one as it is."""
    if sys.platform == "win32":
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else hard
    if soft == resource.RLIM_INFINITY or soft >= target:
        return
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def freeze_startup_heap() -> None:
    """Takes what start-up built out of the cyclic garbage collector's sight.

    Modules, descriptors, servers and connections live as long as the
    process; frozen, they are no longer scanned by every full collection,
    which then looks only at what requests created. Under webhook load the
    full collections had paused the loop 20-50 ms each (the p99 of
    webhook -> stream and of the 1000-stream fan-out); frozen, 7-10 ms.
    Called once the service is up, in the serving process only (tests start
    many services in one process and must not freeze their garbage).
    """
    gc.collect()
    gc.freeze()


def _print_banner(app: object, out: TextIO) -> None:
    from hitl_service.app import App

    assert isinstance(app, App)
    host = app.settings.http_addr.rpartition(":")[0]
    http = f"http://{host}:{app.http_port}"
    grpc_host = app.settings.grpc_addr.rpartition(":")[0]
    # A provider whose backend sends no webhooks (local) says so.
    webhooks = f" /webhooks/{app.provider.name}" if getattr(app.provider, "webhooks", True) else ""
    lines = [
        f"hitl-service is serving with the {app.provider.name} provider",
        f"  gRPC     {grpc_host}:{app.grpc_port}  (hitl.v1.HitlService, health, reflection)",
        f"  HTTP     {http}  (/healthz /readyz /metrics{webhooks})",
    ]
    paths = {getattr(route, "path", "") for route in app.sidecar.routes}
    if "/console" in paths:
        lines.append(f"  console  {http}/console  <- open this to act as the agent")
    demo = _demo_command(f"{grpc_host}:{app.grpc_port}")
    lines.append(f"  try it:  {demo}   (in another terminal)")
    print("\n".join(lines), file=out, flush=True)


def _demo_command(target: str) -> str:
    """The demo against this process: the ``hitl-service`` it was started as
    (``.venv/bin/hitl-service`` under ``make run``, wherever pip put it
    otherwise) or ``python -m hitl_service``, with ``--target`` unless the
    gRPC address is the default the demo reads (a ``--grpc-addr`` flag or
    port 0 gives another)."""
    script = sys.argv[0]
    if os.path.basename(script) == "hitl-service":
        command = shlex.quote(script)
    else:
        command = f"{shlex.quote(sys.executable)} -m hitl_service"
    command += " demo"
    if target != Settings.grpc_addr:
        command += f" --target {shlex.quote(target)}"
    return command


class _ScrubbedOut(io.StringIO):
    """Passes a provider command's output on with the configured secrets
    masked: a command may print an error from its backend, which can quote
    what it was sent (LiveChat's validation message naming the secret_key)."""

    def __init__(self, out: TextIO, scrub: Callable[[str], str]) -> None:
        super().__init__()
        self._out = out
        self._scrub = scrub

    def write(self, text: str) -> int:
        self._out.write(self._scrub(text))
        self._out.flush()
        return len(text)


class _NoService:
    """The sink of a provider built outside ``serve`` (``check``, provider
    commands): no core runs to store what it delivers, so every batch is
    refused as in a store outage, and the provider keeps its events (and
    does not acknowledge them to its backend) for the service."""

    async def deliver(self, batch: WebhookBatch) -> int:
        from providers.errors import ProviderUnavailable

        raise ProviderUnavailable(
            "no service runs in this command to store events; the service receives them"
        )


def _scrubber(settings: Settings) -> Callable[[str], str]:
    """Masks the configured secrets in text printed for a person: a
    provider's error may carry its own (a library error naming the URL it
    called, key and all)."""
    from hitl_service.logs import SecretRedactor

    return SecretRedactor(settings.secrets()).scrub


async def _check(settings: Settings, out: TextIO) -> int:
    """Validates settings and probes store and provider; plain-words report."""
    from prometheus_client import CollectorRegistry

    from hitl_service.app import load_provider
    from hitl_service.clock import SystemClock
    from hitl_service.errors import StoreUnavailable
    from hitl_service.provider_calls import close_provider, probe_provider
    from hitl_service.store import open_store
    from providers.errors import ProviderConfigError

    scrub = _scrubber(settings)
    problems = 0
    out.write(
        f"settings: ok (provider {settings.provider}, gRPC {settings.grpc_addr}, "
        f"HTTP {settings.http_addr})\n"
    )
    path = settings.store_url.path
    if (
        settings.store_url.scheme == "sqlite"
        and path is not None
        and str(path) != ":memory:"
        and not path.exists()
    ):
        # Opening would create (and migrate) it: a mistyped path would get a
        # fresh, empty database that looks fine. Look, do not touch.
        where = settings.store_url.redacted()
        parent = next(p for p in path.absolute().parents if p.exists())
        if parent.is_dir() and os.access(parent, os.W_OK | os.X_OK):
            out.write(
                f"store: ok ({where} does not exist yet: serve creates it; "
                "check the path if it should be there)\n"
            )
        else:
            problems += 1
            out.write(
                f"store: PROBLEM (HITL_STORE_URL): cannot create {where}: {parent} "
                "is not a writable directory\n"
            )
    else:
        try:
            store = open_store(settings)
        except ConfigError as exc:
            out.write(f"store: PROBLEM: {exc}\n")
            return EXIT_CONFIG
        try:
            await store.open()
            version = await store.schema_version()
            out.write(f"store: ok ({settings.store_url.redacted()}, schema version {version})\n")
        except StoreUnavailable as exc:
            problems += 1
            out.write(f"store: PROBLEM (HITL_STORE_URL): {scrub(str(exc))}\n")
        finally:
            await store.close()
    try:
        provider = load_provider(
            settings, sink=_NoService(), clock=SystemClock(), registry=CollectorRegistry()
        )
    except ConfigError as exc:
        out.write(f"provider {settings.provider}: PROBLEM: {scrub(str(exc))}\n")
        return EXIT_CONFIG
    try:
        found = await _open_within(provider, settings.provider_timeout)
    except ProviderConfigError as exc:
        out.write(f"provider {provider.name}: PROBLEM: {scrub(str(exc))}\n")
        return EXIT_CONFIG
    if not found:
        try:
            found += await probe_provider(provider, settings.provider_timeout)
        finally:
            found += await close_provider(provider, settings.provider_timeout)
    if found:
        problems += len(found)
        for problem in found:
            out.write(f"provider {provider.name}: PROBLEM: {scrub(problem)}\n")
    else:
        out.write(f"provider {provider.name}: ok\n")
    out.write("all checks passed\n" if not problems else f"{problems} problem(s) found\n")
    return 0 if not problems else EXIT_PROBLEMS


async def _open_within(provider: Provider, timeout: float) -> list[str]:
    """Opens a provider outside ``serve`` (``check``, provider commands),
    within ``timeout``, as its probe and close are: a backend that does not
    answer cannot hang the command. Returns the problems, none once open;
    a provider that failed to open is closed again (what the open set up, a
    client or a task, is let go).

    Raises:
        ProviderConfigError: A setting the provider cannot use.
    """
    from hitl_service.provider_calls import close_provider, open_provider
    from providers.errors import ProviderConfigError, ProviderError

    bound = asyncio.timeout(timeout)
    try:
        async with bound:
            await open_provider(provider)
    except ProviderConfigError:
        raise
    except (ProviderError, OSError) as exc:  # OSError: TimeoutError too
        why = f"it did not finish within {timeout:g} s" if bound.expired() else str(exc)
        return [f"cannot open the provider: {why}", *await close_provider(provider, timeout)]
    return []


def _provider_command(argv: list[str]) -> int:
    """``hitl-service <provider> <args>``: the provider's own subcommands."""
    from providers.registry import available_providers

    name, rest = argv[0], argv[1:]
    if name not in available_providers():
        print(
            f"hitl-service: unknown command {name!r}; try serve, check, demo, or a provider "
            f"name ({', '.join(available_providers())})",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        env = load_environment()
        env["HITL_PROVIDER"] = name
        settings = Settings.from_env(env)
    except ConfigError as exc:
        print(f"hitl-service: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    _configure_logs(settings)
    return asyncio.run(_run_provider_command(settings, rest))


async def _run_provider_command(settings: Settings, argv: list[str]) -> int:
    from prometheus_client import CollectorRegistry

    from hitl_service.app import load_provider
    from hitl_service.clock import SystemClock
    from hitl_service.provider_calls import close_provider
    from providers.base import SupportsCommands
    from providers.errors import ProviderConfigError, ProviderError

    scrub = _scrubber(settings)
    try:
        provider = load_provider(
            settings, sink=_NoService(), clock=SystemClock(), registry=CollectorRegistry()
        )
    except ConfigError as exc:  # a factory's error may carry the provider's secrets
        print(f"hitl-service: configuration error: {scrub(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    if not isinstance(provider, SupportsCommands):
        print(f"hitl-service: the {provider.name} provider has no commands", file=sys.stderr)
        return EXIT_CONFIG
    try:
        problems = await _open_within(provider, settings.provider_timeout)
    except ProviderConfigError as exc:
        print(f"hitl-service: configuration error: {scrub(str(exc))}", file=sys.stderr)
        return EXIT_CONFIG
    if problems:
        for problem in problems:
            print(f"hitl-service {provider.name}: {scrub(problem)}", file=sys.stderr)
        return EXIT_PROBLEMS
    try:
        return await provider.run_command(argv, _ScrubbedOut(sys.stdout, scrub))
    except ProviderError as exc:
        print(f"hitl-service {provider.name}: {scrub(str(exc))}", file=sys.stderr)
        return EXIT_PROBLEMS
    except Exception as exc:
        # A provider's bug: one line for the person at the terminal, the
        # traceback in the (redacted) log.
        log.exception("provider.command_failed", provider=provider.name)
        print(
            f"hitl-service {provider.name}: the command failed: "
            f"{type(exc).__name__}: {scrub(str(exc))}",
            file=sys.stderr,
        )
        return EXIT_PROBLEMS
    finally:
        for problem in await close_provider(provider, settings.provider_timeout):
            print(f"hitl-service {provider.name}: {scrub(problem)}", file=sys.stderr)
