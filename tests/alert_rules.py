"""The sample Prometheus alerts of docs/operations.md, read for tests: each
rule's ``expr``, the series selectors in it, and their value in a scrape.

Enough PromQL for the rules we publish (selectors with ``=``, ``!=``, ``=~``,
``!~`` matchers), not a PromQL engine.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

OPERATIONS = Path(__file__).resolve().parent.parent / "docs" / "operations.md"

# Words of PromQL (functions, operators, modifiers) the rules may use.
PROMQL_WORDS = frozenset(
    {
        *("sum", "min", "max", "avg", "count", "rate", "irate", "increase", "delta"),
        *("histogram_quantile", "absent", "vector", "time", "changes", "resets"),
        *("and", "or", "unless", "by", "without", "on", "ignoring"),
        *("group_left", "group_right", "bool", "offset"),
    }
)
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)")


@dataclass(frozen=True)
class Selector:
    """``name{label op "value", ...}``."""

    name: str
    matchers: tuple[tuple[str, str, str], ...]

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether a sample with ``labels`` is selected (regexes are anchored)."""
        for label, op, value in self.matchers:
            actual = labels.get(label, "")
            if op == "=" and actual != value:
                return False
            if op == "!=" and actual == value:
                return False
            if op == "=~" and not re.fullmatch(value, actual):
                return False
            if op == "!~" and re.fullmatch(value, actual):
                return False
        return True


def alert_rules() -> dict[str, str]:
    """Alert name -> its ``expr`` (one line or a ``|`` block)."""
    text = OPERATIONS.read_text()
    block = text.split("## Sample alerts", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    rules: dict[str, str] = {}
    lines = block.splitlines()
    name = ""
    for index, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("- alert:"):
            name = stripped.removeprefix("- alert:").strip()
        elif stripped.startswith("expr:") and name:
            value = stripped.removeprefix("expr:").strip()
            if value == "|":
                indent = len(line) - len(line.lstrip()) + 1
                body = []
                for following in lines[index + 1 :]:
                    if following.strip() and len(following) - len(following.lstrip()) < indent:
                        break
                    body.append(following.strip())
                value = " ".join(part for part in body if part)
            rules[name] = value
    return rules


def selectors(expr: str) -> list[Selector]:
    """The series selectors of ``expr``, in order (bare metric names too)."""
    found: list[tuple[int, Selector]] = []
    for match in _SELECTOR.finditer(expr):
        matchers = tuple(
            (m.group(1), m.group(2), m.group(3)) for m in _MATCHER.finditer(match.group(2))
        )
        found.append((match.start(), Selector(match.group(1), matchers)))
    rest = _SELECTOR.sub(lambda m: " " * len(m.group(0)), expr)
    rest = _GROUPING.sub(lambda m: " " * len(m.group(0)), rest)
    rest = re.sub(r"\[[^\]]*\]|\"[^\"]*\"", lambda m: " " * len(m.group(0)), rest)
    for match in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(?![\w(])", rest):
        if match.group(1) not in PROMQL_WORDS:
            found.append((match.start(), Selector(match.group(1), ())))
    return [selector for _, selector in sorted(found, key=lambda pair: pair[0])]


Scrape = list[tuple[str, dict[str, str], float]]


def scrape(text: str) -> Scrape:
    """Every sample of a ``/metrics`` answer: (name, labels, value)."""
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def total(samples: Scrape, selector: Selector) -> float:
    """The sum of the samples ``selector`` picks (0 when none)."""
    return sum(
        value
        for name, labels, value in samples
        if name == selector.name and selector.matches(labels)
    )


_INCREASE = re.compile(r"\bincrease\(\s*([a-zA-Z_:][\w:]*\s*(?:\{[^}]*\})?)\s*\[")


def increased(expr: str) -> list[Selector]:
    """The selectors ``expr`` takes an ``increase()`` of."""
    return [selectors(match.group(1))[0] for match in _INCREASE.finditer(expr)]


def increase(before: Scrape, after: Scrape, selector: Selector) -> float:
    """``increase()`` over the window between two scrapes, as Prometheus
    computes it: a series absent from ``before`` appeared within the window,
    and its first sample is its first known value, so the count it appeared
    with is not an increase."""
    earlier = {
        (name, tuple(sorted(labels.items()))): value
        for name, labels, value in before
        if name == selector.name and selector.matches(labels)
    }
    return sum(
        value - earlier[key]
        for name, labels, value in after
        if name == selector.name
        and selector.matches(labels)
        and (key := (name, tuple(sorted(labels.items())))) in earlier
    )
