"""``hitl-service serve`` with a sampler inside, for the churn run (scripts/churn.py).

Runs exactly what ``python -m hitl_service serve`` runs (same settings, same
start-up and shutdown), plus one asyncio task that every
``CHURN_PROBE_EVERY`` seconds (default 10) appends one JSON line to
``CHURN_PROBE_OUT`` with what only the process itself can see:

- ``tasks``: ``len(asyncio.all_tasks())``, and ``task_names`` (task names
  with their digits and hex ids folded, so ``outbox-<id>`` tasks count
  together);
- ``sizes``: the length of every dict, set, list, deque and LRU reachable
  through attributes from the ``App`` and from every object of a
  ``hitl_service``/``providers`` class that existed when it was built (the
  interceptor, the servicer, the provider's memory...), by attribute path;
  a per-session or per-chat structure that is never pruned shows here as a
  path whose length follows the number of sessions ever seen;
- ``pool``: the provider's httpx connection pool (connections by state);
- ``gc``: objects the collector tracks, by type (those with 5 or more),
  after a full collection (so cycles awaiting one are not counted; objects
  made at start-up are frozen out of its sight).

It also reads ``CHURN_PROBE_CONTROL`` (a JSON file the run writes) on each
tick: ``clock_offset`` seconds are added to the wall clock the service
(core, store writes, provider) is given, and a higher ``prune`` number runs
the hourly prune at the next sweep. So a 10-minute run can step past
``HITL_RETENTION`` (minimum 2 days) and watch the prune keep the store flat.
Nothing of this is in the service: it costs the service nothing.

    CHURN_PROBE_OUT=/tmp/probe.jsonl .venv/bin/python scripts/churn_probe.py
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import gc
import json
import os
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import hitl_service.app as app_module  # noqa: E402 - after the path set-up
from hitl_service import cli  # noqa: E402
from hitl_service.clock import SystemClock  # noqa: E402

OURS = ("hitl_service", "providers", "grpc_health", "httpx", "httpcore", "starlette", "uvicorn")
CONTAINERS = (dict, set, frozenset, list, collections.deque)
_SAMPLERS: set[asyncio.Task[None]] = set()
_FOLD = re.compile(r"[0-9a-f]{6,}|\d+")


class OffsetClock(SystemClock):
    """The system clock, with wall time moved by ``offset`` seconds."""

    offset = 0.0

    def now(self) -> datetime:
        """See base class."""
        return datetime.now(UTC) + timedelta(seconds=self.offset)


def _ours(obj: object) -> bool:
    module = getattr(type(obj), "__module__", "")
    return isinstance(module, str) and module.startswith(OURS)


def _attributes(obj: object) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    with_dict = getattr(obj, "__dict__", None)
    if isinstance(with_dict, dict):
        found.extend(with_dict.items())
    for klass in type(obj).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if isinstance(slot, str) and slot not in ("__dict__", "__weakref__"):
                with contextlib.suppress(AttributeError):  # an unset slot
                    found.append((slot, getattr(obj, slot)))
    return found


def sizes(roots: list[tuple[str, object]], max_depth: int = 8) -> dict[str, int]:
    """Lengths of the containers reachable from ``roots`` by attributes.

    Items of a container are looked into when they are objects of ours (a
    few of each container), under ``path[*]``; the largest length wins.
    """
    seen: set[int] = set()
    out: dict[str, int] = {}

    def note(path: str, length: int) -> None:
        out[path] = max(length, out.get(path, 0))

    def visit(obj: object, path: str, depth: int) -> None:
        if id(obj) in seen or depth > max_depth:
            return
        seen.add(id(obj))
        for bound in ("_capacity", "_size"):  # a bounded cache says so
            if isinstance(getattr(obj, bound, None), int):
                note(f"{path}#{bound}", getattr(obj, bound))
        for name, value in _attributes(obj):
            here = f"{path}.{name}"
            if isinstance(value, CONTAINERS):
                note(here, len(value))
                items = value.values() if isinstance(value, dict) else value
                for n, item in enumerate(list(items)[:3]):
                    if _ours(item):
                        visit(item, f"{here}[*]", depth + 1)
                    elif n == 0 and isinstance(item, CONTAINERS):
                        note(f"{here}[*]", len(item))
            elif _ours(value):
                if hasattr(value, "__len__") and not isinstance(value, type):
                    with contextlib.suppress(Exception):  # a probe must not fail the run
                        note(here, len(value))
                visit(value, here, depth + 1)

    for name, root in roots:
        visit(root, name, 0)
    # Module-level containers of ours (caches keyed by SQL text, say).
    for module_name, module in list(sys.modules.items()):
        if module_name.startswith(("hitl_service", "providers")):
            for name, value in list(vars(module).items()):
                if isinstance(value, CONTAINERS) and not name.startswith("__"):
                    note(f"{module_name}:{name}", len(value))
                elif hasattr(value, "cache_info"):  # functools.lru_cache
                    info = value.cache_info()
                    note(f"{module_name}:{name}()", info.currsize)
                    if info.maxsize is not None:
                        note(f"{module_name}:{name}()#_capacity", info.maxsize)
    return out


def pool_state(app: Any) -> dict[str, int]:
    """The provider's httpx pool: connections by state."""
    client = getattr(getattr(app.provider, "client", None), "_http", None)
    pool = getattr(getattr(client, "_transport", None), "_pool", None)
    if pool is None:
        return {}
    states: collections.Counter[str] = collections.Counter()
    for connection in list(getattr(pool, "connections", [])):
        info = repr(connection)
        states["idle" if "IDLE" in info else "active" if "ACTIVE" in info else "other"] += 1
    states["total"] = sum(states.values())
    states["requests_queued"] = len(getattr(pool, "_requests", []))
    return dict(states)


async def sampler(app: Any, roots: list[tuple[str, object]], clock: OffsetClock) -> None:
    """Writes a sample every CHURN_PROBE_EVERY seconds; obeys the control file."""
    out_path = os.environ.get("CHURN_PROBE_OUT")
    if not out_path:
        return
    every = float(os.environ.get("CHURN_PROBE_EVERY", "10"))
    control = os.environ.get("CHURN_PROBE_CONTROL", "")
    prune_seen = 0
    with open(out_path, "a", encoding="utf-8") as out:  # noqa: ASYNC230 - a local file
        while True:
            await asyncio.sleep(every)
            try:
                wanted = json.loads(Path(control).read_text() or "{}")  # noqa: ASYNC240
            except (OSError, ValueError):  # none yet (or half written)
                wanted = {}
            clock.offset = float(wanted.get("clock_offset", clock.offset))
            if int(wanted.get("prune", 0)) > prune_seen:
                prune_seen = int(wanted["prune"])
                app.core.maintenance._last_prune = float("-inf")
            began = time.perf_counter()
            tasks = asyncio.all_tasks()
            names = collections.Counter(_FOLD.sub("#", t.get_name()) for t in tasks)
            gc.collect()  # count what is alive, not cycles waiting for a collection
            types = collections.Counter(type(o).__qualname__ for o in gc.get_objects())
            sample = {
                "t": time.time(),
                "tasks": len(tasks),
                "task_names": dict(names.most_common(20)),
                "subscribers": app.core.hub.subscribers,
                "sizes": sizes(roots),
                "pool": pool_state(app),
                "gc": {name: n for name, n in types.items() if n >= 5},
                "gc_total": sum(types.values()),
                "clock_offset": clock.offset,
            }
            sample["probe_ms"] = round(1000 * (time.perf_counter() - began), 1)
            out.write(json.dumps(sample) + "\n")
            out.flush()


def install() -> None:
    """Wraps ``build_app`` so the service gets the offset clock and the sampler."""
    real_build_app = app_module.build_app

    def build_app(settings: Any, **kwargs: Any) -> Any:
        clock = OffsetClock()
        app = real_build_app(settings, clock=clock, **kwargs)
        # The objects of ours that exist now (interceptor, servicer, health,
        # provider parts) are roots besides the App: the gRPC server holds
        # some of them where no Python attribute reaches.
        built = [o for o in gc.get_objects() if _ours(o) and not isinstance(o, type)]
        roots: list[tuple[str, object]] = [("app", app)]
        roots += [(type(o).__qualname__, o) for o in built]
        task = asyncio.get_running_loop().create_task(
            sampler(app, roots, clock), name="churn-probe"
        )
        _SAMPLERS.add(task)  # a reference, for as long as it runs
        task.add_done_callback(_SAMPLERS.discard)
        return app

    app_module.build_app = build_app


if __name__ == "__main__":
    install()
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
