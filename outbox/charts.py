"""The admin's picture of the last hour, drawn on the server as SVG.

No JavaScript and no build: activity_chart() returns an <svg> element the
changelist's summary includes. Per minute, a bar of the events completed
(green) with the events failed (red) stacked on it, scaled to the busiest
minute (left axis); over the bars, the ready backlog the workers counted as
a line, scaled to its own peak (right axis). Every bar carries a <title>
with its minute's figures, which the browser shows on hover. Only numbers
and times go into the markup, each escaped by format_html.
"""

from collections.abc import Sequence

from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from outbox.activity import Minute

WIDTH = 720
HEIGHT = 170
LEFT = 44
RIGHT = 56
TOP = 12
BOTTOM = 24
COMPLETED_COLOUR = "#2e7d32"
FAILED_COLOUR = "#c62828"
READY_COLOUR = "#2f6fb0"


def activity_chart(minutes: Sequence[Minute]) -> SafeString:
    """Return the chart of these minutes, oldest first, as an <svg> element."""
    plot_width = WIDTH - LEFT - RIGHT
    plot_height = HEIGHT - TOP - BOTTOM
    slot = plot_width / max(len(minutes), 1)
    busiest = max((m.completed + m.failed for m in minutes), default=0) or 1
    peak_ready = max((m.ready or 0 for m in minutes), default=0) or 1
    bottom = TOP + plot_height

    def height(value: int, top: int) -> float:
        return plot_height * value / top

    bars = format_html_join(
        "",
        '<g class="outbox-chart-minute"><title>{} UTC: {} completed, {} failed, {}'
        "</title>"
        '<rect class="outbox-chart-completed" x="{}" y="{}" width="{}"'
        ' height="{}" fill="{}"/>'
        '<rect class="outbox-chart-failed" x="{}" y="{}" width="{}"'
        ' height="{}" fill="{}"/></g>',
        (
            (
                minute.start.strftime("%H:%M"),
                minute.completed,
                minute.failed,
                "ready not counted"
                if minute.ready is None
                else f"{minute.ready} ready",
                _at(LEFT + index * slot + 0.5),
                _at(bottom - height(minute.completed, busiest)),
                _at(max(slot - 1, 0.5)),
                _at(height(minute.completed, busiest)),
                COMPLETED_COLOUR,
                _at(LEFT + index * slot + 0.5),
                _at(bottom - height(minute.completed + minute.failed, busiest)),
                _at(max(slot - 1, 0.5)),
                _at(height(minute.failed, busiest)),
                FAILED_COLOUR,
            )
            for index, minute in enumerate(minutes)
        ),
    )
    lines = format_html_join(
        "",
        '<polyline class="outbox-chart-ready" points="{}" fill="none" stroke="{}"'
        ' stroke-width="2"/>',
        (
            (" ".join(f"{x:.1f},{y:.1f}" for x, y in run), READY_COLOUR)
            for run in _ready_runs(minutes, slot, bottom, plot_height, peak_ready)
        ),
    )
    return format_html(
        '<svg class="outbox-chart" role="img" aria-labelledby="outbox-chart-title"'
        ' viewBox="0 0 {width} {height}" width="{width}" height="{height}"'
        ' xmlns="http://www.w3.org/2000/svg" font-size="11"'
        ' font-family="sans-serif">'
        '<title id="outbox-chart-title">Events completed and failed per minute,'
        " and the ready backlog, over the last {count} minutes</title>"
        '<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}"'
        ' stroke="#999"/>'
        "{bars}{lines}"
        '<text x="{axis_left}" y="{top_text}" text-anchor="end"'
        ' class="outbox-chart-busiest" fill="{completed}">{busiest}/min</text>'
        '<text x="{axis_left}" y="{bottom}" text-anchor="end" fill="#666">0</text>'
        '<text x="{axis_right}" y="{top_text}" class="outbox-chart-peak-ready"'
        ' fill="{ready}">{peak_ready} ready</text>'
        '<text x="{left}" y="{label_y}" fill="#666">{count} min ago</text>'
        '<text x="{right}" y="{label_y}" text-anchor="end" fill="#666">now</text>'
        "</svg>",
        width=WIDTH,
        height=HEIGHT,
        count=len(minutes),
        left=LEFT,
        right=WIDTH - RIGHT,
        bottom=bottom,
        axis_left=LEFT - 4,
        axis_right=WIDTH - RIGHT + 4,
        top_text=TOP + 8,
        label_y=HEIGHT - 6,
        bars=bars,
        lines=lines,
        busiest=busiest if any(m.completed or m.failed for m in minutes) else 0,
        peak_ready=max((m.ready or 0 for m in minutes), default=0),
        completed=COMPLETED_COLOUR,
        ready=READY_COLOUR,
    )


def _at(coordinate: float) -> str:
    return f"{coordinate:.1f}"


def _ready_runs(
    minutes: Sequence[Minute],
    slot: float,
    bottom: float,
    plot_height: float,
    peak: int,
) -> list[list[tuple[float, float]]]:
    """Return the ready line's points, split where a minute was not counted."""
    runs: list[list[tuple[float, float]]] = [[]]
    for index, minute in enumerate(minutes):
        if minute.ready is None:
            if runs[-1]:
                runs.append([])
            continue
        x = LEFT + (index + 0.5) * slot
        runs[-1].append((x, bottom - plot_height * minute.ready / peak))
    # A lone point draws nothing as a polyline: give it a short segment.
    return [
        run if len(run) > 1 else [*run, (run[0][0] + 1, run[0][1])]
        for run in runs
        if run
    ]
