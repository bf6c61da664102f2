"""results.json aggregated per method: means and spreads over seeds, 95% intervals and paired
tests against the best method (stats.py) where runs kept per-row scores, the Pareto frontier
over accuracy and cost, and per tuned method its defaults against its search's best."""

from __future__ import annotations

import math
import statistics

from tunelab.compare import stats
from tunelab.compare.runs import BASELINES

FIELDS = (
    "trainable_parameters", "peak_memory_mb", "train_seconds", "train_examples_per_second",
    "eval_examples_per_second", "artifact_bytes", "task_switch_ms",
)  # fmt: skip
VALIDATION = ("validation_zero_shot", "validation_start", "best_validation")
PARETO_COSTS = ("trainable_parameters", "peak_memory_mb", "artifact_bytes", "train_seconds")


def _stats(values) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (None below two values) of the finite numbers."""
    vals = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    vals = [v for v in vals if math.isfinite(v)]
    if not vals:
        return None, None
    return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None


def _curve(records: list[dict]) -> list[tuple[float, float]]:
    """(step, validation) averaged over seeds at each step that has a validation value."""
    by_step: dict[float, list[float]] = {}
    for rec in records:
        for h in rec.get("history") or []:
            if isinstance(h.get("validation"), int | float) and "step" in h:
                by_step.setdefault(h["step"], []).append(h["validation"])
    return sorted((step, statistics.fmean(v)) for step, v in by_step.items())


def _main_records(results: dict) -> dict[str, list[dict]]:
    """Records by method: a tuned method's tuned runs, any other method's runs."""
    tuned = set(results.get("tuning") or {})
    by_method: dict[str, list[dict]] = {}
    for rec in results.get("records") or []:
        method = rec.get("method", "?")
        if method in tuned and rec.get("config") != "tuned":
            continue
        by_method.setdefault(method, []).append(rec)
    for method in tuned:  # a method whose every tuned run failed still shows, as failed
        if method not in by_method and (results["tuning"][method] or {}).get("best") is None:
            by_method[method] = [
                {"method": method, "status": "failed", "error": "no trial finished"}
            ]
    return by_method


def _aggregate(method: str, recs: list[dict], headline: str, model_params) -> dict:
    ok = [r for r in recs if r.get("status") == "ok"]
    failed = [r.get("error") or "unknown error" for r in recs if r.get("status") != "ok"]
    row: dict = {"method": method, "seeds": len(ok), "failed": failed, "curve": _curve(ok)}
    names = dict.fromkeys([headline, *(k for r in ok for k in r.get("metrics") or {})])
    names.pop("n", None)
    row["metrics"] = {k: _stats((r.get("metrics") or {}).get(k) for r in ok) for k in names}
    row["metric"], row["metric_std"] = row["metrics"][headline]
    for field in (*FIELDS, *VALIDATION, "total_parameters"):
        row[field], row[field + "_std"] = _stats(r.get(field) for r in ok)
    # runs whose training never beat its start on validation: their artifact is the start
    row["kept_start"] = sum(r.get("best_step") == 0 for r in ok)
    total, trained = row["total_parameters"] or model_params, row["trainable_parameters"]
    row["trainable_percent"] = 100 * trained / total if trained is not None and total else None
    per_row = [r["per_row"] for r in ok if r.get("per_row")]
    same = per_row and all(len(x) == len(per_row[0]) for x in per_row)
    row["scores"] = per_row if same and len(per_row) == len(ok) else None
    row["interval"] = stats.interval(row["scores"]) if row["scores"] else None
    row["paired"], row["verdict"], row["over_untrained"] = None, None, None
    return row


def summarise(results: dict) -> list[dict]:
    """One row per method, in first-appearance order: mean and `<field>_std` of the headline
    metric ("metric") and each numeric field over ok seeds, "metrics" {name: (mean, std)},
    "seeds" (ok count), "trainable_percent", "failed" (errors), "curve" (validation), the
    validation scores of the zero-shot backbone, the start and the best step (VALIDATION) and
    "kept_start" (runs that ended holding their step-0 weights); where
    the runs kept per-row scores, "interval" (95%), and "paired" (against the best) with
    "verdict": best, tied or below. A tuned method's row is its tuned runs."""
    headline = results.get("metric", "accuracy")
    model_params = (results.get("model") or {}).get("parameters")
    rows = [
        _aggregate(method, recs, headline, model_params)
        for method, recs in _main_records(results).items()
    ]
    _compare_with_best(rows)
    _mark_pareto(rows)
    return rows


def _compare_with_best(rows: list[dict]) -> None:
    scored = [r for r in rows if r["interval"] is not None]
    if not scored or len({len(r["scores"][0]) for r in scored}) != 1:
        return  # no per-row scores, or scored on different rows: nothing to pair
    best = max(scored, key=lambda r: r["metric"])
    untrained = [r for r in scored if r["method"] in BASELINES]
    base = max(untrained, key=lambda r: r["metric"]) if untrained else None
    for r in scored:
        if base is not None and r["method"] not in BASELINES:  # what training bought
            r["over_untrained"] = (base["method"], stats.paired(r["scores"], base["scores"]))
        if r is best:
            r["verdict"] = "best"
            continue
        r["paired"] = stats.paired(best["scores"], r["scores"])
        r["verdict"] = "tied" if r["paired"].tied else "below"


def _mark_pareto(rows: list[dict]) -> None:
    """Set "pareto": True on the accuracy-versus-cost frontier (every cost in PARETO_COSTS), False
    when another method is at least as accurate and costs no more, None when unknown."""
    ok = [r for r in rows if r["seeds"] and r["metric"] is not None]
    for r in rows:
        r["pareto"], r["dominated_by"] = None, None
    for r in ok:
        costs = [r[c] or 0 for c in PARETO_COSTS]
        for o in ok:
            if o is r:
                continue
            other = [o[c] or 0 for c in PARETO_COSTS]
            no_worse = o["metric"] >= r["metric"] and all(a <= b for a, b in zip(other, costs))
            if no_worse and (o["metric"] > r["metric"] or other != costs):
                r["dominated_by"] = o["method"]
                break
        r["pareto"] = r["dominated_by"] is None


def tuning_rows(results: dict) -> list[dict]:
    """Per tuned method: its defaults' runs against its tuned runs, and what the search found."""
    headline = results.get("metric", "accuracy")
    model_params = (results.get("model") or {}).get("parameters")
    out = []
    for method, t in (results.get("tuning") or {}).items():
        recs = [r for r in results.get("records") or [] if r.get("method") == method]
        best = (t or {}).get("best")
        tuned = _aggregate(method, [r for r in recs if r.get("config") == "tuned"], headline,
                           model_params)  # fmt: skip
        default_recs = [r for r in recs if r.get("config") == "default"]
        if best and best.get("number") == 0:  # the defaults won the search: the same runs
            default_recs = [r for r in recs if r.get("config") == "tuned"]
        default = _aggregate(method, default_recs, headline, model_params)
        found = (t or {}).get("trials") or []
        out.append({
            "method": method,
            "default": default,
            "tuned": tuned,
            "default_params": (t or {}).get("default"),
            "best": best,
            "trials": len(found),
            "pruned": sum(x["state"] == "pruned" for x in found),
            "failed": sum(x["state"] == "failed" for x in found),
            "found": found,
        })  # fmt: skip
    return out


def winners(rows: list[dict]) -> dict:
    """The best method per criterion ("metric", "parameters", "memory", "task_switch",
    "artifact"; costs among trained methods only), None where none qualifies; ties: the first."""
    ok = [r for r in rows if r["seeds"]]
    trained = [r for r in ok if (r["trainable_parameters"] or 0) > 0]

    def pick(cands: list[dict], key: str, best=min) -> str | None:
        cands = [r for r in cands if r[key] is not None]
        return best(cands, key=lambda r: r[key])["method"] if cands else None

    # costs are compared among methods that adapt the model: an untrained baseline always
    # "wins" them and says nothing about which method to choose
    return {
        "metric": pick(ok, "metric", max),
        "parameters": pick(trained, "trainable_parameters"),
        "memory": pick(trained, "peak_memory_mb"),
        "task_switch": pick(trained, "task_switch_ms"),
        "artifact": pick(trained, "artifact_bytes"),
    }
