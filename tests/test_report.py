"""The compare report: per-method aggregation, winners, Markdown, HTML with SVG plots, files."""

from __future__ import annotations

import copy
import os
import re
import shutil
import statistics
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tunelab.compare.report import (
    render_html,
    render_markdown,
    summarise,
    winners,
    write_reports,
)

CHROMIUM = Path("/usr/bin/chromium")
BLUE, ORANGE = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)  # the first two trained methods' colours
TOTAL = 134_515_008


def record(
    method,
    seed=42,
    acc=0.8,
    trainable=0,
    memory=800.0,
    seconds=0.0,
    artifact=0,
    switch=0.02,
    history=(),
    status="ok",
    error=None,
) -> dict:
    """One record as `tunelab compare` writes it."""
    return {
        "method": method,
        "seed": seed,
        "status": status,
        "error": error,
        "metrics": {"accuracy": acc, "macro_f1": acc - 0.01, "n": 872},
        "trainable_parameters": trainable,
        "total_parameters": TOTAL + (trainable if method in ("lora", "prompt-tuning") else 0),
        "peak_memory_mb": memory,
        "train_seconds": seconds,
        "train_examples_per_second": 800 / seconds if seconds else 0.0,
        "eval_examples_per_second": 14.2,
        "artifact_bytes": artifact,
        "task_switch_ms": switch,
        # a step without a validation value has no "validation" key
        "history": [
            {"step": s, "loss": 1 / s} | ({} if v is None else {"validation": v})
            for s, v in history
        ],
        "artifact": None if not trainable else f"runs/cmp/{method}-seed{seed}",
    }


def make_results(records: list[dict]) -> dict:
    return {
        "format": 1,
        "task": "sst2",
        "task_kind": "classification",
        "split": "dev",
        "metric": "accuracy",
        "model": {
            "name": "smollm2-135m-instruct",
            "fingerprint": "f093aeb5a4bf1fb7",
            "parameters": TOTAL,
        },
        "budget": {"steps": 100, "batch_size": 8, "grad_accum": 1, "seeds": [42, 43]},
        "command": "tunelab compare --task sst2 --seeds 42,43 --out runs/cmp",
        "machine": {"cpu": "AMD EPYC", "cores": 2, "memory_gb": 23.4, "gpu": None},
        "versions": {"tunelab": "0.1.0", "torch": "2.13.0", "python": "3.12.3"},
        "records": records,
    }


PREFIX_ERROR = "RuntimeError: shape mismatch <prefix 20 x 576> (see runs/cmp/prefix.log)"


@pytest.fixture
def results() -> dict:
    curve = [(25, 0.70), (50, None), (75, 0.79), (100, 0.82)]
    return make_results(
        [
            record("zero-shot", acc=0.55, memory=790.2, switch=0.01),
            record("in-context", acc=0.62, memory=905.7, switch=0.05),
            record(
                "prompt-tuning",
                acc=0.78,
                trainable=15_360,
                memory=1500.0,
                seconds=120.0,
                artifact=61_568,
                switch=0.31,
                history=[(25, 0.6), (50, 0.7), (100, 0.78)],
            ),
            record(
                "prompt-tuning",
                seed=43,
                acc=0.82,
                trainable=15_360,
                memory=1520.0,
                seconds=124.0,
                artifact=61_568,
                switch=0.35,
                history=[(25, 0.62), (100, 0.8)],
            ),
            record(
                "lora",
                acc=0.86,
                trainable=921_600,
                memory=1700.0,
                seconds=130.0,
                artifact=3_700_000,
                switch=2.4,
                history=curve,
            ),
            # a failed seed whose partial numbers must not leak into lora's aggregate
            record(
                "lora",
                seed=43,
                acc=0.0,
                trainable=921_600,
                memory=99_999.0,
                status="failed",
                error="killed by signal 9 (out of memory)",
            ),
            record(
                "full",
                acc=0.84,
                trainable=TOTAL,
                memory=2900.0,
                seconds=300.0,
                artifact=269_030_016,
                switch=850.0,
                history=[(50, 0.8), (100, 0.84)],
            ),
            record("prefix", status="failed", error=PREFIX_ERROR, trainable=0, memory=None),
        ]
    )


def by_method(rows: list[dict]) -> dict[str, dict]:
    return {r["method"]: r for r in rows}


def test_summarise_aggregates_ok_seeds(results):
    rows = summarise(results)
    assert [r["method"] for r in rows] == [
        "zero-shot",
        "in-context",
        "prompt-tuning",
        "lora",
        "full",
        "prefix",
    ]
    rows = by_method(rows)
    pt = rows["prompt-tuning"]
    assert pt["seeds"] == 2 and pt["failed"] == []
    assert pt["metric"] == pytest.approx(0.80)
    assert pt["metric_std"] == pytest.approx(statistics.stdev([0.78, 0.82]))
    assert pt["metric_std"] == pytest.approx(0.0282843, abs=1e-6)  # sample, not population
    assert pt["peak_memory_mb"] == pytest.approx(1510.0)
    assert pt["peak_memory_mb_std"] == pytest.approx(14.1421356)
    assert pt["task_switch_ms"] == pytest.approx(0.33)
    assert pt["metrics"]["macro_f1"][0] == pytest.approx(0.79)
    assert pt["trainable_percent"] == pytest.approx(100 * 15_360 / (TOTAL + 15_360))
    assert pt["curve"] == [(25, pytest.approx(0.61)), (50, 0.7), (100, pytest.approx(0.79))]
    lora = rows["lora"]  # the failed seed is left out of every number
    assert lora["seeds"] == 1 and lora["metric"] == 0.86 and lora["metric_std"] is None
    assert lora["peak_memory_mb"] == 1700.0
    assert lora["failed"] == ["killed by signal 9 (out of memory)"]
    assert lora["curve"] == [(25, 0.70), (75, 0.79), (100, 0.82)]  # step 50 had no validation
    prefix = rows["prefix"]
    assert prefix["seeds"] == 0 and prefix["metric"] is None and prefix["failed"] == [PREFIX_ERROR]
    assert rows["zero-shot"]["trainable_parameters"] == 0
    assert rows["zero-shot"]["trainable_percent"] == 0


def test_winners(results):
    assert winners(summarise(results)) == {
        "metric": "lora",
        "parameters": "prompt-tuning",
        "memory": "prompt-tuning",  # costs: trained methods only, not the baselines
        "task_switch": "prompt-tuning",
        "artifact": "prompt-tuning",
    }


def test_winners_ties_go_to_the_first():
    rows = summarise(make_results([record("lora", acc=0.8), record("full", acc=0.8)]))
    assert winners(rows)["metric"] == "lora"
    assert winners(rows)["parameters"] is None  # nothing trained
    assert winners([])["metric"] is None


def test_markdown(results):
    md = render_markdown(results)
    title, opening = md.split("\n\n")[:2]
    assert title == "# sst2 on smollm2-135m-instruct (dev split)"
    assert "**lora** scored the best accuracy (0.8600)" in opening
    assert "**prompt-tuning** trains the fewest parameters (15,360)" in opening
    assert "**prompt-tuning** needs the least peak memory (1,510.0 MB)" in opening
    assert "**prompt-tuning** saves the smallest artifact (61.6 KB)" in opening
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Method | Seeds | Resources: Trainable parameters")
    assert "Accuracy: Macro-F1" in table[0] and "Deployment: Serving" in table[0]
    assert {line.split(" | ")[0][2:] for line in table[1:]} == {
        "zero-shot",
        "in-context",
        "prompt-tuning",
        "lora",
        "full",
        "prefix",
    }
    cells = {line.split(" | ")[0][2:]: line for line in table[1:]}
    assert "0.8000 ± 0.0283" in cells["prompt-tuning"]
    assert "±" not in cells["lora"] and "0.8600" in cells["lora"]
    assert "921,600 (0.68 %)" in cells["lora"]
    assert "3.7 MB" in cells["lora"] and "2.40 ms" in cells["lora"]
    assert "0.33 ms" in cells["prompt-tuning"] and "1,510.0 MB" in cells["prompt-tuning"]
    assert "a model copy per task" in cells["full"] and "every weight" in cells["full"]
    assert "per-row prompts in one batch" in cells["prompt-tuning"]
    assert "failed" in cells["prefix"]
    failed = md.split("## Failed")[1].split("##")[0]
    assert f"**prefix** (seed 42): {PREFIX_ERROR}" in failed
    assert "**lora** (seed 43): killed by signal 9" in failed
    run = md.split("## Run")[1]
    for line in (
        "- Budget: steps 100, batch size 8, grad accum 1, seeds 42, 43",
        "- Machine: AMD EPYC, 2 cores, 23.4 GB memory, GPU: none",
        "- Command: `tunelab compare --task sst2 --seeds 42,43 --out runs/cmp`",
    ):
        assert line in run
    assert "torch 2.13.0" in run and "134,515,008 parameters" in run


def svgs(page: str) -> dict[str, str]:
    return dict(re.findall(r'<svg class="plot" id="([^"]+)"[^>]*>(.*?)</svg>', page, re.S))


def texts(svg: str) -> set[str]:
    return set(re.findall(r"<text[^>]*>([^<]*)</text>", svg))


def test_html(results):
    page = render_html(results)
    plots = svgs(page)
    assert list(plots) == ["plot-params", "plot-memory", "plot-curves"]
    for svg in plots.values():
        assert re.search(r"<title>[^<]+</title>", svg)
        assert "nan" not in svg and "inf" not in svg
    params = texts(plots["plot-params"])
    assert {"prompt-tuning", "lora", "full", "zero-shot", "in-context"} <= params
    assert {"1M", "100M"} <= params and "Trainable parameters (log scale)" in params
    assert "stroke-dasharray" in plots["plot-params"]  # zero-shot/in-context as reference lines
    memory = texts(plots["plot-memory"])
    assert {"zero-shot", "in-context", "prompt-tuning", "lora", "full"} <= memory
    assert "Peak memory (MB)" in memory and "Accuracy" in memory
    curves = texts(plots["plot-curves"])
    assert {"prompt-tuning", "lora", "full"} <= curves and "zero-shot" not in curves
    assert len(re.findall(r'<g id="line-', plots["plot-curves"])) == 3
    assert "prefix" not in params | memory | curves  # failed: not plotted
    # the same content as the Markdown, as HTML
    assert "<strong>lora</strong> scored the best accuracy" in page
    assert page.count("<tr>") == 2 + 6  # two header rows, one row per method
    assert "0.8000 ± 0.0283" in page and "Architecture impact" in page
    assert "&lt;prefix 20 x 576&gt;" in page and "<prefix 20" not in page
    # self-contained: nothing fetched from anywhere
    assert "http://" not in page and "https://" not in page
    # (plots refer to their own markers and clip paths by #fragment only)
    assert not re.search(r"\b(src|href)\s*=\s*\"(?!#)|@import|url\((?!#)|<script|<link", page, re.I)


DEGENERATE = {
    "one trained method": [record("lora", trainable=921_600, memory=1700.0, artifact=3_700_000)],
    "baselines only": [record("zero-shot"), record("in-context", acc=0.8)],
    "equal values": [
        record("lora", acc=0.5, trainable=1000, memory=900.0, history=[(10, 0.5)]),
        record("head", acc=0.5, trainable=1000, memory=900.0, history=[(10, 0.5)]),
    ],
    "all failed": [record("lora", status="failed", error="boom")],
    "no records": [],
}


@pytest.mark.parametrize("name", DEGENERATE)
def test_degenerate_inputs_render(name, tmp_path):
    results = make_results(copy.deepcopy(DEGENERATE[name]))
    md, page = render_markdown(results), render_html(results)
    assert md.startswith("# sst2") and "## Run" in md
    plots = svgs(page)
    assert list(plots) == ["plot-params", "plot-memory", "plot-curves"]
    assert not re.search(r"nan|inf", "".join(plots.values()))
    if name == "one trained method":
        assert (
            "**lora** scored the best accuracy" in md and "nothing to plot" in plots["plot-curves"]
        )
    if name == "all failed":
        assert "No method finished" in md and "boom" in md


def test_write_reports(results, tmp_path):
    out = tmp_path / "cmp"
    md, page = write_reports(results, out)
    assert (md, page) == (out / "report.md", out / "report.html")
    assert md.read_text(encoding="utf-8") == render_markdown(results)
    assert page.read_text(encoding="utf-8") == render_html(results)
    assert sorted(os.listdir(out)) == ["report.html", "report.md"]  # no temporary files left
    write_reports(results, out)  # overwriting is fine too
    assert sorted(os.listdir(out)) == ["report.html", "report.md"]


def read_png(path: Path) -> tuple[int, int, int, bytes]:
    """(width, height, bytes per pixel, pixels) of an 8-bit RGB/RGBA non-interlaced PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        elif kind == b"IEND":
            break
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unsupported PNG {header}"
    bpp = 3 if colour == 2 else 4
    raw, stride = zlib.decompress(bytes(idat)), width * bpp
    pixels, prev = bytearray(), bytearray(stride)
    for y in range(height):
        start = y * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        unfilter(kind, line, prev, bpp)
        pixels += line
        prev = line
    return width, height, bpp, bytes(pixels)


def unfilter(kind: int, line: bytearray, prev: bytearray, bpp: int) -> None:
    """Undo one scanline's filter in place (0 none, 1 sub, 2 up, 3 average, 4 Paeth)."""
    if kind == 0:
        return
    for i in range(len(line)):
        a = line[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        if kind == 1:
            line[i] = (line[i] + a) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + b) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (a + b) // 2) & 0xFF
        elif kind == 4:
            p = a + b - c
            pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
            pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
            line[i] = (line[i] + pred) & 0xFF
        else:
            raise AssertionError(f"bad PNG filter type {kind}")


def count_colour(pixels: bytes, bpp: int, rgb: tuple[int, int, int], tol: int = 24) -> int:
    r0, g0, b0 = rgb
    return sum(
        1
        for i in range(0, len(pixels), bpp)
        if abs(pixels[i] - r0) <= tol
        and abs(pixels[i + 1] - g0) <= tol
        and abs(pixels[i + 2] - b0) <= tol
    )


def png_chunk(kind: bytes, body: bytes) -> bytes:
    crc = struct.pack(">I", zlib.crc32(kind + body))
    return struct.pack(">I", len(body)) + kind + body + crc


def test_png_decoder_handles_every_filter(tmp_path):
    width, bpp = 3, 3
    rows = [bytes(range(k * 9, k * 9 + 9)) for k in range(5)]
    raw, prev = bytearray(), bytes(width * bpp)
    for kind, row in enumerate(rows):  # encode row k with filter k
        enc = bytearray()
        for i, x in enumerate(row):
            a = row[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            p = a + b - c
            paeth = min((abs(p - a), 0, a), (abs(p - b), 1, b), (abs(p - c), 2, c))[2]
            pred = (0, a, b, (a + b) // 2, paeth)[kind]
            enc.append((x - pred) & 0xFF)
        raw += bytes([kind]) + enc
        prev = row
    ihdr = struct.pack(">IIBBBBB", width, 5, 8, 2, 0, 0, 0)  # 8-bit RGB
    path = tmp_path / "filters.png"
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(bytes(raw)))
        + png_chunk(b"IEND", b"")
    )
    assert read_png(path) == (width, 5, bpp, b"".join(rows))


@pytest.mark.skipif(not CHROMIUM.exists(), reason="/usr/bin/chromium is not installed")
def test_html_in_a_browser(results, tmp_path):
    _, page = write_reports(results, tmp_path / "out")
    png, profile = tmp_path / "shot.png", tmp_path / "profile"
    profile.mkdir()
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1200,2400",
        f"--screenshot={png}",
        page.resolve().as_uri(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert png.is_file(), f"no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    if os.environ.get("TUNELAB_KEEP_SCREENSHOT"):
        shutil.copy(png, os.environ["TUNELAB_KEEP_SCREENSHOT"])
    width, height, bpp, pixels = read_png(png)
    assert (width, height) == (1200, 2400)
    blue, orange = count_colour(pixels, bpp, BLUE), count_colour(pixels, bpp, ORANGE)
    assert blue >= 300 and orange >= 300, f"plots look blank: {blue} blue, {orange} orange pixels"


def test_the_report_shows_zero_shot_start_and_best_validation():
    def trained(seed, start, best, best_step):
        return record("prompt-tuning", seed=seed, trainable=15_360) | {
            "validation_zero_shot": 0.52,
            "validation_start": start,
            "best_validation": best,
            "best_step": best_step,
        }

    results = make_results(
        [record("zero-shot", acc=0.55), trained(1, 0.48, 0.48, 0), trained(2, 0.50, 0.70, 40)]
    )
    md = render_markdown(results)
    assert "Validation: Zero-shot → start → best" in md
    # means over the two seeds; the first seed's run ended holding its start
    assert "0.5200 → 0.4900 → 0.5900 (start kept on 1 of 2 seeds)" in md
    assert "a run that training never improved on validation keeps its start" in md
    assert "0.5200 → 0.4900" in render_html(results)
    # results from before the start was measured: no column
    for r in results["records"]:
        r.pop("validation_start", None)
    assert "Zero-shot → start" not in render_markdown(results)
