"""The table of medians, spreads and ratios; the target check; the plot."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import PERCENTILES, spread

SERVICE_TARGETS = ("sqlite", "postgres")
FIGURE_NAMES = {
    "rps": "req/s",
    "p50_ms": "p50 ms",
    "p99_ms": "p99 ms",
    "ms": "ms",
    "rss_mb": "RSS MB",
}
HIDDEN = frozenset({"missing"})


@dataclass(frozen=True)
class Cell:
    """One figure of one target across rounds."""

    median: float
    low: float
    high: float
    n: int

    def text(self, figure: str) -> str:
        """``median [min–max]`` with a precision that suits the figure."""
        if self.n == 0 or math.isnan(self.median):
            return "—"
        fmt = _fmt(figure)
        if self.n == 1:
            return fmt(self.median)
        return f"{fmt(self.median)} [{fmt(self.low)}–{fmt(self.high)}]"


def _fmt(figure: str) -> Callable[[float], str]:
    if figure == "rps":
        return lambda v: f"{v:,.0f}"
    if figure in ("rss_mb", "ms"):
        return lambda v: f"{v:,.0f}"
    return lambda v: f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:,.0f}"


def cells(runs: Iterable[dict[str, Any]]) -> dict[tuple[str, str, str], Cell]:
    """(scenario, figure, target) → spread across rounds."""
    values: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for run in runs:
        for figure, value in run["figures"].items():
            values[(run["scenario"], figure, run["target"])].append(float(value))
    out = {}
    for key, found in values.items():
        s = spread(found)
        out[key] = Cell(s["median"], s["min"], s["max"], int(s["n"]))
    return out


def floor_scenario(scenario: str) -> str:
    """The floor row a scenario is compared with."""
    if scenario.startswith("cross-replica "):
        return scenario.replace("cross-replica", "webhook→stream")
    return scenario


def ratio(
    cellmap: dict[tuple[str, str, str], Cell], scenario: str, figure: str, target: str
) -> float:
    """Median of ``target`` over the floor's median (NaN if either is missing)."""
    mine = cellmap.get((scenario, figure, target))
    floor = cellmap.get((floor_scenario(scenario), figure, "floor"))
    if mine is None or floor is None or not floor.median or math.isnan(floor.median):
        return math.nan
    return mine.median / floor.median


def _order(runs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    for run in runs:
        for figure in run["figures"]:
            key = (run["scenario"], figure)
            if figure not in HIDDEN and key not in seen:
                seen.append(key)
    return seen


def table(results: dict[str, Any]) -> str:
    """The Markdown table: floor, each service target, and its ratio to the floor."""
    runs = results["runs"]
    cellmap = cells(runs)
    targets = [t for t in SERVICE_TARGETS if any(r["target"] == t for r in runs)]
    head = ["scenario", "figure", "floor"]
    for target in targets:
        head += [f"hitl {target}", "× floor"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for scenario, figure in _order(runs):
        floor = cellmap.get((floor_scenario(scenario), figure, "floor"))
        row = [scenario, FIGURE_NAMES.get(figure, figure)]
        if floor is None:
            row.append("—")
        elif scenario.startswith("cross-replica"):
            row.append(f"({floor.text(figure)})")
        else:
            row.append(floor.text(figure))
        for target in targets:
            cell = cellmap.get((scenario, figure, target))
            row.append(cell.text(figure) if cell else "—")
            r = ratio(cellmap, scenario, figure, target)
            row.append("—" if math.isnan(r) or cell is None else f"{r:.2f}")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Check:
    """One target of the issue, evaluated on a run."""

    name: str
    value: str
    ok: bool | None  # None: not measured


def checks(results: dict[str, Any], soak: dict[str, Any] | None = None) -> list[Check]:
    """The issue's targets, judged on the medians of this run."""
    runs = results["runs"]
    cellmap = cells(runs)
    out: list[Check] = []

    def median(scenario: str, figure: str, target: str) -> float:
        cell = cellmap.get((scenario, figure, target))
        return cell.median if cell else math.nan

    def add(name: str, value: float, ok: bool, fmt: str) -> None:
        if math.isnan(value):
            out.append(Check(name, "not measured", None))
        else:
            out.append(Check(name, fmt.format(value), ok))

    for target in SERVICE_TARGETS:
        if not any(r["target"] == target for r in runs):
            continue
        r = ratio(cellmap, "SendMessage c=16", "rps", target)
        add(f"SendMessage c=16 throughput ≥ 50 % of floor ({target})", r, r >= 0.5, "{:.0%}")
        r = ratio(cellmap, "SendMessage c=1", "p50_ms", target)
        add(f"SendMessage c=1 p50 ≤ 2× floor ({target})", r, r <= 2.0, "{:.2f}×")
        ingest = [s for s, _ in _order(runs) if s.startswith("webhook ingest")]
        if ingest:
            r = ratio(cellmap, ingest[0], "rps", target)
            add(f"webhook ingest ≥ 40 % of floor ({target})", r, r >= 0.4, "{:.0%}")
        if target == "sqlite":
            r = ratio(cellmap, "webhook→stream 500/s", "p99_ms", target)
            add("webhook→stream p99 ≤ 2.5× floor at 500/s (sqlite)", r, r <= 2.5, "{:.2f}×")
        fan = [s for s, _ in _order(runs) if s.startswith("fan-out")]
        if fan:
            v = median(fan[0], "p99_ms", target)
            add(f"{fan[0]} p99 ≤ 50 ms ({target})", v, v <= 50, "{:.1f} ms")
        v = median("start-up to SERVING", "ms", target)
        add(f"start-up to SERVING ≤ 1 s ({target})", v, v <= 1000, "{:.0f} ms")
    for scenario in dict.fromkeys(s for s, _ in _order(runs)):
        if scenario.startswith("cross-replica"):
            v = median(scenario, "p99_ms", "postgres")
            add(f"{scenario} p99 ≤ 20 ms (postgres)", v, v <= 20, "{:.1f} ms")
        if scenario.startswith("RSS"):
            v = median(scenario, "rss_mb", "sqlite")
            add(f"{scenario} ≤ 250 MB (sqlite)", v, v <= 250, "{:.0f} MB")
    if soak is not None:
        worst, drift = float(soak["max_deviation_pct"]), float(soak["drift_pct"])
        out.append(
            Check(
                f"RSS flat ±5 % over a {soak['minutes']:g}-minute soak (after warm-up)",
                f"every sample within {worst:.1f} % of the median; {drift:+.1f} % "
                "from the first to the last",
                worst <= 5 and abs(drift) <= 5,
            )
        )
    return out


def checks_text(found: list[Check]) -> str:
    """The checks as a Markdown list."""
    mark = {True: "met", False: "MISSED", None: "not measured"}
    return "\n".join(f"- {mark[c.ok]}: {c.name}: {c.value}" for c in found)


def plot(results: dict[str, Any], path: Path) -> None:
    """Latency percentiles per scenario and target (medians across rounds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in results["runs"] if r.get("lat")]
    scenarios: list[str] = []
    for run in runs:
        if run["scenario"] not in scenarios:
            scenarios.append(run["scenario"])
    if not scenarios:
        return
    cols = 3
    rows = math.ceil(len(scenarios) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    colors = {"floor": "#555555", "sqlite": "#1f77b4", "postgres": "#d62728"}
    labels = [f"p{p:g}" for p in PERCENTILES]
    for ax, scenario in zip(axes.flat, scenarios, strict=False):
        by_target: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for run in runs:
            if run["scenario"] == scenario:
                by_target[run["target"]].append(run["lat"])
        for target, lats in by_target.items():
            ys = []
            for pct in PERCENTILES:
                vals = sorted(float(lat.get(f"p{pct:g}_ms", math.nan)) for lat in lats)
                ys.append(vals[len(vals) // 2] if vals else math.nan)
            ax.plot(labels, ys, marker="o", label=target, color=colors.get(target))
        ax.set_title(scenario, fontsize=10)
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(scenarios) :]:
        ax.axis("off")
    meta = results.get("meta", {})
    fig.suptitle(
        f"hitl-service latency percentiles vs floor ({meta.get('stamp', '')}, "
        f"median of {meta.get('rounds', '?')} rounds)",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
