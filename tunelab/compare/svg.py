"""Inline SVG plots drawn with the standard library: scatter points, polylines, linear and
log axes with 1-2-5 ticks, labels nudged apart so they do not overlap."""

from __future__ import annotations

import html
import math

W, H, LEFT, RIGHT, TOP, BOTTOM = 560, 360, 64, 20, 40, 52  # plot size and margins, px
COUNTS = (("B", 1e9), ("M", 1e6), ("K", 1e3), ("", 1))


def si(x: float) -> str:
    """A count in short form: 1, 10, 100K, 1M, 1B."""
    unit, size = next((u, s) for u, s in COUNTS if x >= s or s == 1)
    return f"{x / size:g}{unit}"


def linear_axis(values: list[float]) -> tuple[float, float, list[tuple[float, str]]]:
    """A padded range rounded to a 1-2-5 step, and its (tick, label); equal values widened."""
    lo, hi = min(values), max(values)
    pad = (hi - lo) * 0.05 if hi > lo else abs(lo) * 0.1 or 1.0
    lo, hi = lo - pad, hi + pad
    mag = 10 ** math.floor(math.log10((hi - lo) / 5))
    step = next(s * mag for s in (1, 2, 5, 10) if s * mag >= (hi - lo) / 5 * 0.999)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    digits = max(0, -math.floor(math.log10(step)))
    ticks = [(i * step, f"{i * step:,.{digits}f}") for i in range(first, last + 1)]
    return first * step, last * step, ticks


def log_axis(values: list[float]) -> tuple[float, float, list[tuple[float, str]]]:
    """Whole decades around the data (values are log10), labelled 1, 10, ..., 1K, 1M, 1B."""
    lo, hi = math.floor(min(values) - 0.1), math.ceil(max(values) + 0.1)
    return lo, hi, [(k, si(10.0**k)) for k in range(lo, hi + 1)]


def element(tag: str, text: str | None = None, **attrs) -> str:
    """An SVG element: `_` in names is `-` (trailing one dropped), floats print to 0.1."""
    vals = {
        k.rstrip("_").replace("_", "-"): f"{v:.1f}" if isinstance(v, float) else v
        for k, v in attrs.items()
    }
    a = "".join(f' {k}="{html.escape(str(v))}"' for k, v in vals.items())
    return f"<{tag}{a}/>" if text is None else f"<{tag}{a}>{html.escape(text)}</{tag}>"


def place_label(placed: list, x: float, y: float, text: str) -> str:
    """A label beside point (x, y), flipped left near the edge, pushed down past earlier ones."""
    width = 6.6 * len(text) + 4
    x0 = x + 9 if x + 9 + width < W - 4 else x - 9 - width
    ty = y + 4
    for _ in range(12):
        if not any(x0 < bx + bw and bx < x0 + width and abs(ty - by) < 13 for bx, by, bw in placed):
            break
        ty += 13
    placed.append((x0, ty, width))
    return element("text", text, x=x0, y=ty)


def axes(xlabel, ylabel, xt, yt, px, py) -> list[str]:
    """Grid, tick labels, axis lines and axis titles."""
    out = []
    for v, lab in xt:
        out.append(element("line", x1=px(v), x2=px(v), y1=TOP, y2=H - BOTTOM, class_="g"))
        out.append(element("text", lab, x=px(v), y=H - BOTTOM + 16, text_anchor="middle"))
    for v, lab in yt:
        out.append(element("line", x1=LEFT, x2=W - RIGHT, y1=py(v), y2=py(v), class_="g"))
        out.append(element("text", lab, x=LEFT - 6, y=py(v) + 4, text_anchor="end"))
    out.append(element("path", d=f"M{LEFT},{TOP}V{H - BOTTOM}H{W - RIGHT}", class_="ax"))
    mid_x, mid_y = (LEFT + W - RIGHT) / 2, (TOP + H - BOTTOM) / 2
    out.append(element("text", xlabel, x=mid_x, y=H - 10, text_anchor="middle", class_="at"))
    turn = f"translate(16 {mid_y}) rotate(-90)"
    out.append(element("text", ylabel, transform=turn, text_anchor="middle", class_="at"))
    return out


def svg_plot(pid, title, xlabel, ylabel, series, refs=(), xlog=False) -> str:
    """A plot: series are (name, colour, [(x, y)], as_line); refs are (name, colour, y)."""
    out = [f'<svg class="plot" id="{pid}" viewBox="0 0 {W} {H}" width="{W}" height="{H}">']
    out += [element("title", title), element("rect", width=W, height=H, fill="#fff")]
    out.append(element("text", title, x=W / 2, y=22, text_anchor="middle", class_="pt"))
    xs = [x for s in series for x, _ in s[2]]
    ys = [y for s in series for _, y in s[2]] + [y for *_, y in refs]
    if not xs:
        out.append(element("text", "nothing to plot", x=W / 2, y=H / 2, text_anchor="middle"))
        return "".join(out) + "</svg>"
    (x0, x1, xt), (y0, y1, yt) = (log_axis if xlog else linear_axis)(xs), linear_axis(ys)

    def px(x):
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def py(y):
        return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    out, placed = out + axes(xlabel, ylabel, xt, yt, px, py), []
    for name, colour, y in refs:
        dash = {"stroke": colour, "stroke_width": 2, "stroke_dasharray": "6 4"}
        out.append(element("line", x1=LEFT, x2=W - RIGHT, y1=py(y), y2=py(y), **dash))
        out.append(place_label(placed, W - RIGHT - 6.6 * len(name) - 14, py(y) - 10, name))
    for name, colour, pts, as_line in series:
        xy = [(px(x), py(y)) for x, y in pts]
        if as_line and len(xy) > 1:
            line = " ".join(f"{a:.1f},{b:.1f}" for a, b in xy)
            out.append(element("polyline", points=line, fill="none", stroke=colour, stroke_width=3))
        out += [element("circle", cx=a, cy=b, r=4 if as_line else 7, fill=colour) for a, b in xy]
        out.append(place_label(placed, *xy[-1], name))
    return "".join(out) + "</svg>"
