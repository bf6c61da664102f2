"""The compare report's plots, drawn with matplotlib as SVG text to inline in report.html (the page
stays one self-contained file). Text stays text (`svg.fonttype: none`): searchable, and sharp at
any zoom."""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass

SIZE = (5.6, 3.6)  # inches; 100 dpi: 560 x 360 px
COUNTS = (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))


def si(x: float) -> str:
    """A count in short form: 1, 10, 100K, 1M, 1B."""
    unit, size = next((u, s) for u, s in COUNTS if x >= s or s == 1)
    return f"{x / size:g}{unit}"


@dataclass
class Series:
    """Points of one method: drawn as a line (`line`), or as a cloud; `hollow` marks points
    drawn open (pruned trials)."""

    name: str
    colour: str
    points: list[tuple[float, float]]
    line: bool = False
    hollow: list[bool] | None = None
    guide: bool = False  # a dashed guide without markers or label (the Pareto frontier)


def _figure():
    import matplotlib

    matplotlib.use("Agg")  # no screen needed
    import matplotlib.pyplot as plt

    plt.rcParams.update({"svg.fonttype": "none", "font.size": 9, "svg.hashsalt": "tunelab"})
    fig, ax = plt.subplots(figsize=SIZE, dpi=100)
    ax.grid(True, color="#eeeeee")
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig, ax


def _svg(fig, pid: str, title: str) -> str:
    """The figure as an inline <svg class="plot" id=...> with a <title> for screen readers."""
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg") :]  # drop the XML prolog and doctype
    # inline in HTML the namespaces are implied; the metadata names a licence URL
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    text = re.sub(r"<svg ", f'<svg class="plot" id="{pid}" ', text, count=1)
    head_end = text.index(">") + 1
    return text[:head_end] + f"<title>{_escape(title)}</title>" + text[head_end:]


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _label(ax, x: float, y: float, name: str) -> None:
    ax.annotate(name, (x, y), xytext=(6, 4), textcoords="offset points", fontsize=9)


def plot(
    pid: str,
    title: str,
    xlabel: str,
    ylabel: str,
    series: list[Series],
    refs: list[tuple[str, str, float]] = (),
    xlog: bool = False,
    counts: bool = False,
) -> str:
    """One plot: `series` of points or lines, `refs` (name, colour, y) as dashed lines across
    (untrained baselines). `counts`: x tick labels as 1K, 1M, ..."""
    fig, ax = _figure()
    ax.set_title(title, fontsize=11, fontweight="bold")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    pts = [p for s in series for p in s.points if all(map(math.isfinite, p))]
    if not pts:
        ax.text(0.5, 0.5, "nothing to plot", ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return _svg(fig, pid, title)
    if xlog:
        ax.set_xscale("log")
    for name, colour, y in refs:
        ax.axhline(y, color=colour, linestyle=(0, (6, 4)), linewidth=1.5)
        ax.annotate(name, (1, y), xycoords=("axes fraction", "data"), xytext=(-4, 3),
                    textcoords="offset points", ha="right", fontsize=9)  # fmt: skip
    for s in series:
        xy = [p for p in s.points if all(map(math.isfinite, p))]
        if not xy:
            continue
        xs, ys = zip(*xy)
        if s.guide:
            ax.plot(xs, ys, color=s.colour, linewidth=1.5, linestyle=(0, (4, 3)), zorder=1,
                    gid=f"guide-{s.name}")  # fmt: skip
            continue
        if s.line and len(xy) > 1:
            ax.plot(xs, ys, color=s.colour, linewidth=2.5, marker="o", markersize=4,
                    gid=f"line-{s.name}")  # fmt: skip
        else:
            hollow = s.hollow or [False] * len(xy)
            full = [(x, y) for (x, y), h in zip(xy, hollow) if not h]
            open_ = [(x, y) for (x, y), h in zip(xy, hollow) if h]
            if full:
                ax.scatter(*zip(*full), s=46, color=s.colour, zorder=3, gid=f"points-{s.name}")
            if open_:
                ax.scatter(*zip(*open_), s=46, facecolors="none", edgecolors=s.colour, zorder=3,
                           gid=f"open-{s.name}")  # fmt: skip
        _label(ax, xs[-1], ys[-1], s.name)
    if counts:
        from matplotlib.ticker import FuncFormatter

        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: si(v) if v > 0 else "0"))
    ys = [y for _, y in pts] + [y for *_, y in refs]
    pad = (max(ys) - min(ys)) * 0.08 or 0.05
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
    fig.tight_layout()
    return _svg(fig, pid, title)


def frontier(points: list[tuple[str, float, float]]) -> list[str]:
    """Names on the accuracy-versus-cost frontier of (name, cost, score) points: none is both
    cheaper (or as cheap) and at least as good, with one of the two strictly."""
    return [
        n
        for n, c, s in points
        if not any((c2 <= c and s2 >= s) and (c2 < c or s2 > s) for n2, c2, s2 in points if n2 != n)
    ]
