"""The dashboard's charts as inline SVG, built on the server: no script draws them, so
they render under a strict Content-Security-Policy and without network access. Colours
come from CSS classes (dashboard.css), which follow the light or dark scheme."""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from pgbeat.api import words

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 22


def _frame(
    label: str, body: list[str], y_ticks: list[tuple[float, str]], x_ticks: list[tuple[float, str]]
) -> Markup:
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
        'preserveAspectRatio="none">',
        f"<title>{escape(label)}</title>",
    ]
    for y, text in y_ticks:
        parts.append(f'<line class="grid" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>')
        parts.append(
            f'<text class="tick" x="{LEFT - 4}" y="{y + 4:.1f}" text-anchor="end">{escape(text)}</text>'
        )
    for x, text in x_ticks:
        parts.append(
            f'<text class="tick" x="{x:.1f}" y="{HEIGHT - 6}" text-anchor="middle">{escape(text)}</text>'
        )
    parts.extend(body)
    parts.append("</svg>")
    return Markup("".join(parts))


def _x_ticks(start: datetime, minutes: int, slot: float) -> list[tuple[float, str]]:
    return [
        (LEFT + (i + 0.5) * slot, (start + timedelta(minutes=i)).strftime("%H:%M"))
        for i in range(0, minutes, 10)
    ]


def _nice_max(value: float) -> float:
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if value <= step * magnitude:
            return step * magnitude
    return 10 * magnitude


def runs_per_minute(rows: Sequence, start: datetime, minutes: int = 60) -> Markup:
    """Bars of finished runs per minute, failures stacked on successes."""
    by_minute = {row["minute"]: row for row in rows}
    top = _nice_max(max((row["succeeded"] + row["failed"] for row in rows), default=0))
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / minutes
    body = []
    for i in range(minutes):
        minute = start + timedelta(minutes=i)
        row = by_minute.get(minute)
        if row is None:
            continue
        x = LEFT + i * slot + 1
        base = TOP + plot_h
        for cls, count in (("ok", row["succeeded"]), ("bad", row["failed"])):
            if not count:
                continue
            h = plot_h * count / top
            base -= h
            body.append(
                f'<rect class="bar {cls}" x="{x:.1f}" y="{base:.1f}" width="{slot - 2:.1f}" height="{h:.1f}">'
                f"<title>{minute:%H:%M}: {count} {'succeeded' if cls == 'ok' else 'failed'}</title></rect>"
            )
    total = sum(row["succeeded"] + row["failed"] for row in rows)
    label = f"Runs finished per minute over the last hour: {total} in all"
    y_ticks = [(TOP + plot_h * (1 - f), f"{top * f:g}") for f in (0, 0.5, 1)]
    return _frame(label, body, y_ticks, _x_ticks(start, minutes, slot))


def lateness(rows: Sequence, start: datetime, minutes: int = 60) -> Markup:
    """p50 and p99 lateness (start - slot) per minute, on a log scale from 0.1 ms."""
    plot_h = HEIGHT - TOP - BOTTOM
    slot = (WIDTH - LEFT - RIGHT) / minutes
    values = [row[q] for row in rows for q in ("p50", "p99") if row[q] is not None]
    floor_ms = 0.1
    top_ms = max(10.0, 10 ** math.ceil(math.log10(max(max(values, default=1.0), floor_ms))))
    span = math.log10(top_ms / floor_ms)

    def y(ms: float) -> float:
        return TOP + plot_h * (1 - math.log10(max(ms, floor_ms) / floor_ms) / span)

    body = []
    for q in ("p50", "p99"):
        points = []
        for row in rows:
            if row[q] is None:
                continue
            i = round((row["minute"] - start).total_seconds() / 60)
            cx, cy = LEFT + (i + 0.5) * slot, y(row[q])
            points.append(f"{cx:.1f},{cy:.1f}")
            body.append(
                f'<circle class="dot {q}" cx="{cx:.1f}" cy="{cy:.1f}" r="2.5">'
                f"<title>{row['minute']:%H:%M} {q}: {words.milliseconds(row[q])}</title></circle>"
            )
        if len(points) > 1:
            body.insert(0, f'<polyline class="line {q}" points="{" ".join(points)}"/>')
    y_ticks = []
    ms = floor_ms
    while ms <= top_ms * 1.0001:
        y_ticks.append((y(ms), words.milliseconds(ms).replace(".0 ms", " ms")))
        ms *= 100 if span > 4 else 10
    label = "Lateness (start - slot) per minute over the last hour, p50 and p99"
    return _frame(label, body, y_ticks, _x_ticks(start, minutes, slot))


def history_strip(runs: Sequence, cells: int) -> Markup:
    """A task's last runs, oldest left, one coloured cell each."""
    size, gap = 9, 2
    width = cells * (size + gap)
    counts: dict[str, int] = {}
    body = []
    for i, run in enumerate(reversed(runs)):
        counts[run["state"]] = counts.get(run["state"], 0) + 1
        x = width - (len(runs) - i) * (size + gap)
        body.append(
            f'<rect class="cell s-{escape(run["state"])}" x="{x}" y="0" width="{size}" height="{size * 2}">'
            f"<title>run {run['id']}: {escape(run['state'])}, slot {run['scheduled_for']:%Y-%m-%d %H:%M:%S}"
            f"</title></rect>"
        )
    summary = ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no runs yet"
    return Markup(
        f'<svg class="strip" viewBox="0 0 {width} {size * 2}" width="{width}" height="{size * 2}" role="img" '
        f'aria-label="last {len(runs)} runs: {escape(summary)}">{"".join(body)}</svg>'
    )
