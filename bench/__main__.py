"""``python -m bench``: the benchmark (``make bench``); ``python -m bench soak``
for the RSS soak (``make soak``). See ``bench/README.md``."""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import report
from bench.runner import GROUPS, Options, run


def _cpus(raw: str) -> tuple[int, ...]:
    return tuple(int(p) for p in raw.split(",") if p.strip())


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="hitl-service against the floor of its own stack (see bench/README.md).",
    )
    parser.add_argument("command", nargs="?", default="run", choices=("run", "soak", "report"))
    parser.add_argument("--quick", action="store_true", help="1 round, short runs (~2 min)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3)")
    parser.add_argument("--duration", type=float, help="seconds measured per run (default 2.5)")
    parser.add_argument("--warmup", type=float, help="seconds of warm-up per closed-loop run")
    parser.add_argument(
        "--only", default="", help=f"comma-separated groups among {', '.join(GROUPS)}"
    )
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument(
        "--webhook-provider",
        choices=("auto", "livechat", "scripted"),
        default="auto",
        help="auto: the LiveChat provider on the fake LiveChat if it works, else scripted",
    )
    parser.add_argument("--server-cpus", default="0", help="CPUs of the servers (default 0)")
    parser.add_argument("--generator-cpus", default="1", help="CPUs of the generators (default 1)")
    parser.add_argument("--no-pin", action="store_true", help="let the OS place every process")
    parser.add_argument(
        "--loop",
        choices=("auto", "asyncio", "uvloop"),
        default="auto",
        help="HITL_EVENT_LOOP for the floor and the service",
    )
    parser.add_argument("--fanout-rate", type=int, help="events/s in the fan-out run (default 10)")
    parser.add_argument(
        "--memory-sessions", type=int, help="sessions in the memory run (default 10000)"
    )
    parser.add_argument("--minutes", type=float, default=5.0, help="soak length (default 5)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="results folder")
    parser.add_argument("--file", type=Path, help="report: the results JSON to print")
    return parser


def options(args: argparse.Namespace) -> Options:
    """Options from the command line (``--quick`` first, explicit values win)."""
    opts = Options(out=args.out)
    if args.quick:
        opts = replace(
            opts,
            rounds=1,
            duration=1.5,
            warmup=0.5,
            memory_sessions=2000,
            startup_samples=2,
            quick=True,
        )
    if args.rounds:
        opts = replace(opts, rounds=args.rounds)
    if args.duration:
        opts = replace(opts, duration=args.duration)
    if args.warmup is not None:
        opts = replace(opts, warmup=args.warmup)
    if args.only:
        wanted = tuple(g.strip() for g in args.only.split(",") if g.strip())
        unknown = set(wanted) - set(GROUPS)
        if unknown:
            raise SystemExit(f"unknown group(s): {', '.join(sorted(unknown))}")
        opts = replace(opts, groups=wanted)
    if args.fanout_rate:
        opts = replace(opts, fanout_rate=args.fanout_rate)
    if args.memory_sessions:
        opts = replace(opts, memory_sessions=args.memory_sessions)
    server, generator = _cpus(args.server_cpus), _cpus(args.generator_cpus)
    if args.no_pin:
        server = generator = ()
    return replace(
        opts,
        postgres=not args.no_postgres,
        webhook_provider=args.webhook_provider,
        server_cpus=server,
        generator_cpus=generator,
        loop=args.loop,
    )


def save(results: dict[str, Any], out: Path, soak: dict[str, Any] | None = None) -> Path:
    """Writes ``<stamp>.json`` and ``<stamp>.png``, and copies them to ``latest.*``."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = results["meta"]["stamp"]
    path = out / f"{stamp}.json"
    path.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    report.plot(results, out / f"{stamp}.png")
    shutil.copyfile(path, out / "latest.json")
    if (out / f"{stamp}.png").exists():
        shutil.copyfile(out / f"{stamp}.png", out / "latest.png")
    return path


def print_report(results: dict[str, Any], soak: dict[str, Any] | None = None) -> None:
    """The table, the target check and the notes."""
    meta = results["meta"]
    print()
    print(
        f"hitl-service vs floor, {meta['stamp']}: {meta['rounds']} round(s) × "
        f"{meta['duration_s']}s, median [min–max]; servers on CPU "
        f"{meta['server_cpus'] or 'any'}, generators on CPU "
        f"{meta['generator_cpus'] or 'any'}; loop {meta['event_loop']}, uvicorn http "
        f"{meta['uvicorn_http']}; webhooks {meta['webhook_provider']}"
    )
    print()
    print(report.table(results))
    print()
    print(report.checks_text(report.checks(results, soak or results.get("soak"))))
    if results.get("notes"):
        print()
        print("notes:")
        for note in results["notes"]:
            print(f"- {note}")


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = build_parser().parse_args(argv)
    if args.command == "report":
        path = args.file or args.out / "latest.json"
        results = json.loads(path.read_text(encoding="utf-8"))
        print_report(results)
        return 0
    opts = options(args)
    if args.command == "soak":
        from bench.soak import soak

        soak_result = asyncio.run(soak(opts, minutes=args.minutes))
        print(json.dumps({k: v for k, v in soak_result.items() if k != "samples"}, indent=1))
        print(report.checks_text(report.checks({"runs": []}, soak_result)))
        out = opts.out
        out.mkdir(parents=True, exist_ok=True)
        (out / f"soak-{soak_result['stamp']}.json").write_text(
            json.dumps(soak_result, indent=1) + "\n"
        )
        latest = out / "latest.json"
        if latest.exists():  # the soak belongs next to the latest bench table
            results = json.loads(latest.read_text(encoding="utf-8"))
            results["soak"] = soak_result
            latest.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        flat = float(soak_result["max_deviation_pct"]) <= 5 and abs(soak_result["drift_pct"]) <= 5
        return 0 if flat else 1
    results = asyncio.run(run(opts))
    path = save(results, opts.out)
    print_report(results)
    print(f"\nraw results: {path} (plot: {path.with_suffix('.png')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
