"""Reports for `tunelab compare`: results.json aggregated per method, with intervals and paired
tests when runs kept their per-row scores, written as Markdown and as a self-contained HTML page
with inline SVG plots (compare/plots.py)."""

from __future__ import annotations

import html
import os
import re
import tempfile
from itertools import groupby
from pathlib import Path

from tunelab.compare.plots import Series, frontier, plot, si
from tunelab.compare.runs import BASELINES
from tunelab.compare.search import show_params
from tunelab.compare.summary import VALIDATION, summarise, tuning_rows, winners

SECONDARY = {
    "accuracy_calibrated": "Calibrated accuracy",  # content-free (evaluate/calibrate.py)
    "macro_f1": "Macro-F1",
    "macro_f1_calibrated": "Calibrated macro-F1",
    "exact_set_match": "Exact-set match",
    "token_f1": "Token F1",
}
SHARED = "one frozen backbone serves many tasks, per-row prompts in one batch"
# method: (what training changes, how it is deployed)
PHRASES = {
    "zero-shot": ("nothing trained", "the stock model serves every task"),
    "in-context": ("nothing trained", "the stock model; demonstrations ride in every request"),
    "prompt-tuning": ("input embeddings only, model frozen", SHARED),
    "prefix": ("per-layer key/value prefix, model frozen", SHARED),
    "lora": ("low-rank updates beside frozen weights", "one backbone, per-row adapters"),
    "freeze": ("top blocks only", "shared lower blocks, a copy of the top blocks per task"),
    "head": ("new output layer", "one backbone, a small head per task"),
    "full": ("every weight", "a model copy per task"),
    "hybrid": ("LoRA core + soft prompt", "one backbone, per-row adapters and prompts"),
}
COST = (  # winners key, what the winner does, row field, number format
    ("parameters", "trains the fewest parameters", "trainable_parameters", "int"),
    ("memory", "needs the least peak memory", "peak_memory_mb", "MB"),
    ("artifact", "saves the smallest artifact", "artifact_bytes", "bytes"),
    ("task_switch", "switches tasks fastest", "task_switch_ms", "ms"),
)
FORMATS = {"int": "{:,.0f}", "MB": "{:,.1f} MB", "s": "{:,.1f} s", "rate": "{:,.1f}"}
SIZES = (("GB", 1e9), ("MB", 1e6), ("KB", 1e3), ("B", 1))
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")
GREYS = ("#555555", "#999999")
NOTE = (
    "Scores are means over the seeds that finished; ± is the sample standard deviation (2+ "
    "seeds). Peak memory is the process peak on CPU, peak allocated on GPU."
)
NOTE_INTERVAL = (
    "The 95% interval is a bootstrap over the test rows and the seeds (what another sample of "
    "test rows and another training run could give); with one seed it covers the test rows "
    "only. A method is tied with the best when the 95% interval of its paired difference from "
    "the best (the same test rows for both) holds 0. Pareto: no other method is at least as "
    "accurate while costing no more in trainable parameters, peak memory, artifact size and "
    "training time."
)
NOTE_VALIDATION = (
    "Validation (the validation split, means over seeds): the backbone alone (zero-shot), the "
    "method's initialisation before its first step (start; it differs from zero-shot where the "
    "method adds parts that change answers, such as a soft prompt), and the best validation "
    "step, whose weights the artifact holds. The start competes for best: a run that training "
    "never improved on validation keeps its start."
)
CSS = """body{font:14px/1.45 system-ui,sans-serif;color:#222;max-width:1160px;margin:24px auto;
padding:0 16px}h1{font-size:22px}h2{font-size:17px;margin-top:28px}.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12px}code{background:#f3f3f3;padding:1px 4px}
th,td{border:1px solid #ccc;padding:4px 6px;vertical-align:top;text-align:left}
td.n{white-space:nowrap}td.t{min-width:130px}
thead tr:first-child th{background:#e8eef6;text-align:center}thead th{background:#f3f5f8}
tbody tr:nth-child(even){background:#fafafa}.plots{display:flex;flex-wrap:wrap;gap:12px}
svg.plot{border:1px solid #ddd;max-width:100%;height:auto}"""


def _fmt(x, kind: str = "int", std=None) -> str:
    """A number for humans: int 1,234,567 | pct 0.68 % | MB 12.3 MB | s 4.5 s | rate 6.6 |
    ms 0.31 ms | bytes 3.7 MB (0: none) | si 100K | score 0.8123 ± 0.0100; None is a dash."""
    if x is None:
        return "—"
    if kind == "pct":
        return f"{x:.1f} %" if x >= 1 or x == 0 else f"{x:.2g} %"
    if kind == "ms":
        return f"{x:,.2f} ms" if x >= 0.01 or x == 0 else f"{x:.1g} ms"
    if kind == "bytes":
        unit, size = next((u, s) for u, s in SIZES if x >= s or s == 1)
        return "none" if x <= 0 else f"{x / size:,.{0 if size == 1 else 1}f} {unit}"
    if kind == "si":
        return si(x)
    if kind == "score":
        return f"{x:.4f}" + ("" if std is None else f" ± {std:.4f}")
    return FORMATS[kind].format(x)


def _metric_label(results: dict) -> str:
    return results.get("metric", "accuracy").replace("_", " ").capitalize()


def _title(results: dict) -> str:
    model = (results.get("model") or {}).get("name", "?")
    return f"{results.get('task', '?')} on {model} ({results.get('split', '?')} split)"


def _opening(results: dict, rows: list[dict]) -> str:
    """The verdict paragraph, in Markdown with **bold** method names: the best method with its
    interval, the methods tied with it, those below it and by how much, the compute each was
    given, and who wins on cost."""
    w, by = winners(rows), {r["method"]: r for r in rows}
    if w["metric"] is None:
        return "No method finished, so there is no winner to report."
    best = by[w["metric"]]
    score = _fmt(best["metric"], "score")
    text = f"**{w['metric']}** scored the best {_metric_label(results).lower()} ({score}"
    if best["interval"] is not None:
        ci = best["interval"]
        text += f", 95% interval {ci.low:.4f}-{ci.high:.4f}, {_seeds(best['seeds'])}"
    text += ")."
    tied = [r for r in rows if r["verdict"] == "tied"]
    below = [r for r in rows if r["verdict"] == "below"]
    if tied:
        text += (
            " Not significantly different from it (tied at 95%): "
            + ", ".join(f"**{r['method']}** ({_fmt(r['metric'], 'score')})" for r in tied)
            + "."
        )
    if below:
        text += (
            " Below it: "
            + ", ".join(
                f"**{r['method']}** by {r['paired'].difference:.4f} "
                f"({r['paired'].low:.4f}-{r['paired'].high:.4f})"
                for r in sorted(below, key=lambda r: r["paired"].difference)
            )
            + "."
        )
    text += _budget_sentence(results)
    cost = [f"**{w[k]}** {says} ({_fmt(by[w[k]][f], kind)})" for k, says, f, kind in COST if w[k]]
    if cost:
        text += " On cost, " + ", ".join(cost[:-1]) + (" and " if cost[1:] else "") + cost[-1] + "."
    return text


def _seeds(n: int) -> str:
    return f"{n} seed" + ("s" if n != 1 else "")


def _budget_sentence(results: dict) -> str:
    """What every trained method was given, in one sentence ("" without a search)."""
    b, tuning = results.get("budget") or {}, results.get("tuning") or {}
    if not tuning:
        return ""
    rows = (b.get("batch_size") or 0) * (b.get("grad_accum") or 1)
    knobs = sorted({k for t in tuning.values() for k in (t or {}).get("knobs") or []})
    return (
        f" Every trained method got the same search: {b.get('trials')} trials x "
        f"{b.get('steps')} steps x {rows} rows ({', '.join(knobs)} searched; chosen on the "
        f"validation split), then its best settings trained on {_seeds(len(b.get('seeds') or []))}."
    )


def _columns(results: dict, rows: list[dict]) -> list[tuple]:
    """(group, header, cell function) for the comparison table."""
    extra = [k for k in SECONDARY if any(r["metrics"].get(k, (None,))[0] is not None for r in rows)]

    def score(key):
        def cell(r):
            mean, std = r["metrics"].get(key, (None, None))
            return _fmt(mean, "score", std) if r["seeds"] else "failed"

        return cell

    def params(r):
        n = r["trainable_parameters"]
        return _fmt(n) if not n else f"{_fmt(n)} ({_fmt(r['trainable_percent'], 'pct')})"

    def interval(r):
        ci = r["interval"]
        return "—" if ci is None else f"{ci.low:.4f}-{ci.high:.4f}"

    def versus(r):
        if r["verdict"] in (None, "best"):
            return r["verdict"] or "—"
        p = r["paired"]
        return f"{r['verdict']}: {-p.difference:+.4f} ({-p.high:+.4f} to {-p.low:+.4f})"

    def pareto(r):
        if r["pareto"] is None:
            return "—"
        return "frontier" if r["pareto"] else f"dominated by {r['dominated_by']}"

    def gain(r):
        if r["over_untrained"] is None:
            return "—"
        name, p = r["over_untrained"]
        sure = "" if p.low > 0 else ", not significant"
        return f"{p.difference:+.4f} ({p.low:+.4f} to {p.high:+.4f}{sure}) over {name}"

    def validation(r):
        if all(r[k] is None for k in VALIDATION):
            return "—"
        text = " → ".join(_fmt(r[k], "score") for k in VALIDATION)
        if r["kept_start"]:
            text += f" (start kept on {r['kept_start']} of {_seeds(r['seeds'])})"
        return text

    stats_cols = []
    if any(r["interval"] is not None for r in rows):
        stats_cols = [("Accuracy", "95% interval", interval), ("Accuracy", "vs best", versus)]
    if any(r["over_untrained"] is not None for r in rows):
        stats_cols.append(("Accuracy", "Gain over untrained", gain))
    return [
        ("", "Method", lambda r: r["method"]),
        ("", "Seeds", lambda r: str(r["seeds"])),
        ("Resources", "Trainable parameters", params),
        ("Resources", "Peak memory", lambda r: _fmt(r["peak_memory_mb"], "MB")),
        ("Resources", "Training time", lambda r: _fmt(r["train_seconds"] or None, "s")),
        ("Resources", "Train ex/s", lambda r: _fmt(r["train_examples_per_second"] or None, "rate")),
        ("Architecture impact", "What changes", lambda r: PHRASES.get(r["method"], ("—", "—"))[0]),
        ("Task adaptation", "Artifact", lambda r: _fmt(r["artifact_bytes"], "bytes")),
        ("Task adaptation", "Task switch", lambda r: _fmt(r["task_switch_ms"], "ms")),
        ("Accuracy", _metric_label(results), score(results.get("metric", "accuracy"))),
        *stats_cols,
        *[("Accuracy", SECONDARY[k], score(k)) for k in extra],
        *([("Validation", "Zero-shot → start → best", validation)] if _has_start(rows) else []),
        ("Deployment", "Serving", lambda r: PHRASES.get(r["method"], ("—", "—"))[1]),
        ("Deployment", "Pareto", pareto),
    ]


def _has_start(rows: list[dict]) -> bool:
    """Whether any method's runs measured their start (runs from before it did not)."""
    return any(r.get("validation_start") is not None for r in rows)


def _failures(results: dict) -> list[str]:
    return [
        f"**{r.get('method', '?')}** (seed {r.get('seed', '?')}): {r.get('error') or 'no error'}"
        for r in results.get("records") or []
        if r.get("status") != "ok"
    ]


def _details(results: dict) -> list[tuple[str, str]]:
    """(label, Markdown text) lines about the model, budget, machine, versions and command."""
    model, mach = results.get("model") or {}, results.get("machine") or {}

    def join(d: dict) -> str:
        vals = {
            k: ", ".join(map(str, v)) if isinstance(v, list) else v
            for k, v in d.items()
            if v is not None
        }
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in vals.items()) or "—"

    return [
        ("Model", f"{model.get('name', '?')} ({_fmt(model.get('parameters'))} parameters, "
                  f"fingerprint {model.get('fingerprint', '?')})"),
        ("Budget", join(results.get("budget") or {})),
        *([("Label words", _verbalizer_text(results["verbalizer"]))]
          if results.get("verbalizer") else []),
        ("Machine", f"{mach.get('cpu', '?')}, {mach.get('cores', '?')} cores, "
                    f"{mach.get('memory_gb', '?')} GB memory, GPU: {mach.get('gpu') or 'none'}"),
        ("Versions", join(results.get("versions") or {})),
        ("Command", f"`{results.get('command', '?')}`"),
    ]  # fmt: skip


def _verbalizer_text(v: dict) -> str:
    """Which verbalizer every method used: the task's, or the one `--label-words auto` found."""
    words = "; ".join(f"{label}: {', '.join(ws)}" for label, ws in (v.get("words") or {}).items())
    if v.get("source") != "auto":
        return f"the task's own ({words})" if words else "the task's own"
    own = "; ".join(f"{label}: {', '.join(ws)}" for label, ws in v["task_words"].items())
    return (
        f"{words}, searched on the {v['rows']} {v['searched_on']} rows by `tunelab label-words` "
        f"(training accuracy {v['training_accuracy']:.4f}; the task's own {own}: "
        f"{v['task_training_accuracy']:.4f})"
    )


def _params_text(params: dict | None) -> str:
    if not params:
        return "—"
    return show_params(params)


def _tuning_table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Default versus tuned, per tuned method: (headers, rows of cells)."""
    label = _metric_label(results)

    def score(row: dict) -> str:
        if not row["seeds"]:
            return "failed"
        ci = row["interval"]
        text = _fmt(row["metric"], "score", row["metric_std"])
        return text + (f" [{ci.low:.4f}-{ci.high:.4f}]" if ci else "")

    headers = ["Method", "Default settings", f"Default {label.lower()}", "Tuned settings",
               f"Tuned {label.lower()}", "Trials (pruned, failed)", "Best validation"]  # fmt: skip
    cells = []
    for t in tuning_rows(results):
        best = t["best"] or {}
        cells.append([
            t["method"],
            _params_text(t["default_params"]),
            score(t["default"]),
            _params_text(best.get("params")) + (" (the defaults)" if best.get("number") == 0
                                                else ""),
            score(t["tuned"]),
            f"{t['trials']} ({t['pruned']}, {t['failed']})",
            _fmt(best.get("value"), "score") if best else "—",
        ])  # fmt: skip
    return headers, cells


TUNING_NOTE = (
    "Both rows of a method ran on the same seeds and were scored on the same split; [ ] is the "
    "95% bootstrap interval. The search chose on the validation split only (best validation: "
    "the best trial's score there); the defaults are trial 0 of every search, so a search can "
    "only match or beat them on validation."
)


def render_markdown(results: dict) -> str:
    """The report as Markdown: verdict, comparison table, default versus tuned, failures and
    run details."""
    rows = summarise(results)
    cols = _columns(results, rows)

    def line(cells) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [f"# {_title(results)}", "", _opening(results, rows), "", "## Comparison", ""]
    out.append(line(f"{g}: {h}" if g else h for g, h, _ in cols))
    out.append("|" + "---|" * len(cols))
    out += [line(f(r) for *_, f in cols) for r in rows] + ["", NOTE]
    if _has_start(rows):
        out += ["", NOTE_VALIDATION]
    if any(r["interval"] is not None for r in rows):
        out += ["", NOTE_INTERVAL]
    if results.get("tuning"):
        headers, cells = _tuning_table(results)
        out += ["", "## Default versus tuned", "", line(headers), "|" + "---|" * len(headers)]
        out += [line(c) for c in cells] + ["", TUNING_NOTE]
    if failed := _failures(results):
        out += ["", "## Failed", "", *(f"- {f}" for f in failed)]
    out += ["", "## Run", "", *(f"- {k}: {v}" for k, v in _details(results))]
    return "\n".join(out) + "\n"


def _plots(results: dict, rows: list[dict]) -> list[str]:
    """Metric against trainable parameters and memory (the accuracy-versus-cost frontier
    dashed), validation curves, and with a search its sensitivity: validation score against
    learning rate, one point per trial."""
    ok = [r for r in rows if r["seeds"]]
    base = {r["method"] for r in rows if not (r["trainable_parameters"] or 0) > 0}
    base -= {r["method"] for r in rows if not r["seeds"] and r["method"] not in BASELINES}
    grey, pal = iter(GREYS * 9), iter(PALETTE * 9)
    colour = {r["method"]: next(grey if r["method"] in base else pal) for r in rows}
    for m in results.get("tuning") or {}:
        colour.setdefault(m, next(pal))
    scored, label = [r for r in ok if r["metric"] is not None], _metric_label(results)

    def points(key: str, rs) -> list[Series]:
        return [Series(r["method"], colour[r["method"]], [(r[key], r["metric"])]) for r in rs]

    trained = [r for r in scored if r["method"] not in base]
    refs = [(r["method"], colour[r["method"]], r["metric"]) for r in scored if r["method"] in base]
    memory = [r for r in scored if r["peak_memory_mb"] is not None]
    curves = [Series(r["method"], colour[r["method"]], r["curve"], line=True) for r in ok
              if r["curve"]]  # fmt: skip
    out = [
        plot("plot-params", f"{label} against trainable parameters",
             "Trainable parameters (log scale)", label,
             points("trainable_parameters", trained) + _frontier(trained, "trainable_parameters"),
             refs, xlog=True, counts=True),
        plot("plot-memory", f"{label} against peak memory", "Peak memory (MB)", label,
             points("peak_memory_mb", memory) + _frontier(memory, "peak_memory_mb")),
        plot("plot-curves", "Validation during training", "Training step",
             f"Validation {label.lower()}", curves),
    ]  # fmt: skip
    if results.get("tuning"):
        out.append(_sensitivity(results, colour, label))
    return out


def _frontier(rows: list[dict], key: str) -> list[Series]:
    """The 2-D frontier of (cost, metric) as a dashed grey line, when it joins 2+ methods."""
    pts = [(r["method"], r[key], r["metric"]) for r in rows if r[key] and r[key] > 0]
    keep = set(frontier(pts))
    line = sorted((c, m) for n, c, m in pts if n in keep)
    return [Series("frontier", "#999999", line, guide=True)] if len(line) > 1 else []


def _sensitivity(results: dict, colour: dict, label: str) -> str:
    """Each trial's best validation score against its learning rate; pruned trials hollow."""
    series = []
    for method, t in (results.get("tuning") or {}).items():
        pts, hollow = [], []
        for trial in (t or {}).get("trials") or []:
            lr, curve = trial["params"].get("lr"), trial.get("curve") or []
            if lr and curve and trial["state"] in ("complete", "pruned"):
                pts.append((lr, max(c["validation"] for c in curve)))
                hollow.append(trial["state"] == "pruned")
        order = sorted(range(len(pts)), key=lambda i: pts[i][0])
        series.append(Series(method, colour[method], [pts[i] for i in order],
                             hollow=[hollow[i] for i in order]))  # fmt: skip
    return plot("plot-sensitivity", "Sensitivity to the learning rate (one point per trial)",
                "Learning rate (log scale)", f"Best validation {label.lower()}", series,
                xlog=True)  # fmt: skip


def _inline(md: str) -> str:
    """Escaped HTML for a line of Markdown with **bold** and `code`."""
    text = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(md, quote=False))
    return re.sub(r"`(.+?)`", r"<code>\1</code>", text)


def _html_table(results: dict, rows: list[dict]) -> str:
    """The comparison table with a header row of column groups; numbers kept on one line."""
    cols, e = _columns(results, rows), html.escape
    groups = [(g, len(list(c))) for g, c in groupby(cols, key=lambda c: c[0])]
    head = "".join(f'<th colspan="{n}">{e(g)}</th>' for g, n in groups)
    head += "</tr><tr>" + "".join(f"<th>{e(h)}</th>" for _, h, _ in cols)
    kinds = ["t" if g in ("Architecture impact", "Deployment") else
             "w" if g in ("Accuracy", "Validation") else "n" for g, *_ in cols]  # fmt: skip
    cells = ["".join(f'<td class="{k}">{e(f(r))}</td>' for k, (*_, f) in zip(kinds, cols))
             for r in rows]  # fmt: skip
    body = "".join(f"<tr>{c}</tr>" for c in cells)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_html(results: dict) -> str:
    """The Markdown report's content as one self-contained page, plus the SVG plots."""
    rows, e = summarise(results), html.escape
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(_title(results))}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(_title(results))}</h1><p>{_inline(_opening(results, rows))}</p>",
        f'<h2>Comparison</h2><div class="scroll">{_html_table(results, rows)}</div>',
        f"<p>{e(NOTE)}</p>",
    ]
    if _has_start(rows):
        parts.append(f"<p>{e(NOTE_VALIDATION)}</p>")
    if any(r["interval"] is not None for r in rows):
        parts.append(f"<p>{e(NOTE_INTERVAL)}</p>")
    if results.get("tuning"):
        headers, cells = _tuning_table(results)
        head = "".join(f"<th>{e(h)}</th>" for h in headers)
        body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>"
                       for row in cells)  # fmt: skip
        parts.append(
            f'<h2>Default versus tuned</h2><div class="scroll"><table><thead><tr>{head}'
            f"</tr></thead><tbody>{body}</tbody></table></div><p>{e(TUNING_NOTE)}</p>"
        )
    parts.append('<h2>Plots</h2><div class="plots">' + "".join(_plots(results, rows)) + "</div>")
    if failed := _failures(results):
        parts.append("<h2>Failed</h2><ul>" + "".join(f"<li>{_inline(f)}</li>" for f in failed))
        parts.append("</ul>")
    details = "".join(f"<li>{e(k)}: {_inline(v)}</li>" for k, v in _details(results))
    parts.append(f"<h2>Run</h2><ul>{details}</ul></body></html>\n")
    return "\n".join(parts)


def write_reports(results: dict, out_dir: Path) -> tuple[Path, Path]:
    """Write report.md and report.html into `out_dir`, each through a temporary file in the same
    folder renamed into place; return their paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / "report.md", out_dir / "report.html"
    for path, text in zip(paths, (render_markdown(results), render_html(results))):
        fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a report is for sharing
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return paths
