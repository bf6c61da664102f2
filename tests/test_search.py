"""`tunelab tune` and `tunelab compare --tune` on a tiny llama: a seeded search, pruning, a
search killed mid-trial that resumes into the same study, and a reported split that selection
never reads."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tunelab.__main__ import main
from tunelab.compare.search import Search, space

TRIAL_KEYS = ("number", "params", "state", "value", "curve")


def tune_args(task, model, out, trials=3, steps=20) -> list[str]:
    return (
        f"tune --task {task} --model {model} --method prompt-tuning --trials {trials} "
        f"--out {out} --seed 7 --set steps={steps} --set eval_every=5 --set save_every=5 "
        "--set batch_size=4"
    ).split()


def trials_of(out) -> list[dict]:
    found = json.loads((out / "search.json").read_text())["trials"]
    return [{k: t[k] for k in TRIAL_KEYS} for t in found]


def test_search_killed_mid_trial_resumes_into_the_same_study(tiny_model_dir, tiny_task, tmp_path):
    """kill -9 of the search while trial 1 trains; --resume takes the trial over (from its
    checkpoint) and the study ends as an uninterrupted one with the same seed does."""
    ref = tmp_path / "ref"
    assert main(tune_args(tiny_task, tiny_model_dir, ref)) == 0
    expected = trials_of(ref)
    assert [t["number"] for t in expected] == [0, 1, 2]
    assert expected[0]["params"] == {"lr": 0.03}  # trial 0 is the method's default
    assert len({t["params"]["lr"] for t in expected}) == 3  # the sampler proposes new rates
    # steps 0 (the start), 5, 10, 15, 20
    assert all(t["state"] == "complete" and len(t["curve"]) == 5 for t in expected)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "tunelab", *tune_args(tiny_task, tiny_model_dir, out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    progress = out / "trials" / "prompt-tuning-001" / "progress.jsonl"
    deadline = time.time() + 300
    while not (progress.is_file() and len(progress.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, "the search ended too early"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # the search only: its trial dies with it
    proc.wait()
    time.sleep(1)
    assert not (out / "search.json").exists()
    assert main(tune_args(tiny_task, tiny_model_dir, out)) == 2  # the study is there: say so
    assert main([*tune_args(tiny_task, tiny_model_dir, out), "--resume"]) == 0
    assert trials_of(out) == expected
    log = (out / "trials" / "prompt-tuning-001" / "run.log").read_text()
    assert "resumed from" in log  # continued from its checkpoint, not started again


def test_a_trailing_trial_is_pruned_and_recorded(tiny_model_dir, tiny_task, tmp_path):
    import optuna

    common = ["--task", str(tiny_task), "--model", str(tiny_model_dir)]
    # 4 steps: the median pruner's warmup (a third of the steps) is over by step 0
    sets = ["steps=4", "eval_every=2", "batch_size=4"]
    search = Search(
        method="prompt-tuning",
        out=tmp_path / "s",
        n_trials=4,
        steps=4,
        train_args=[*common, *[x for s in sets for x in ("--set", s)]],
        knobs=space("prompt-tuning", []),
        eval_every=2,
    )
    search.out.mkdir()
    study = search.study(resume=False)
    lr = optuna.distributions.FloatDistribution(1e-3, 0.3, log=True)
    for rate in (0.01, 0.02, 0.05):  # three earlier trials at perfect validation throughout
        study.add_trial(
            optuna.trial.create_trial(
                params={"lr": rate},
                distributions={"lr": lr},
                value=1.0,
                intermediate_values={0: 1.0, 2: 1.0, 4: 1.0},
            )
        )
    found = search.run(resume=True)
    (pruned,) = [t for t in found if t.number == 0]
    assert pruned.state == "pruned" and pruned.params == {"lr": 0.03}
    # never pruned on its start alone: stopped at its first validation after it
    assert [c["step"] for c in pruned.curve] == [0, 2]
    assert max(c["validation"] for c in pruned.curve) < 1.0
    assert not (search.out / "trials" / "prompt-tuning-000" / "tunelab.json").exists()


def test_selection_never_reads_the_reported_split(tiny_model_dir, tiny_task, tmp_path, capsys):
    """The test file is unreadable as data until the final runs: the search finishes, and only
    the runs that report on it fail, naming it."""
    with open(tiny_task.parent / "test.jsonl", "a") as f:
        f.write(json.dumps({"text": "a poisoned row", "label": "maybe"}) + "\n")
    out = tmp_path / "cmp"
    code = main(
        f"compare --task {tiny_task} --model {tiny_model_dir} --out {out} --tune 2 --seeds 1 "
        "--methods prompt-tuning --set steps=4 --set eval_every=2 --set batch_size=4".split()
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    trials = results["tuning"]["prompt-tuning"]["trials"]
    assert [t["state"] for t in trials] == ["complete", "complete"]
    assert results["records"] and all(r["status"] == "failed" for r in results["records"])
    assert all("label 'maybe' is not in the verbalizer" in r["error"] for r in results["records"])


def test_compare_tune_reports_default_and_tuned_with_intervals(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    out = tmp_path / "cmp"
    args = (
        f"compare --task {tiny_task} --model {tiny_model_dir} --out {out} --tune 2 --seeds 1,2 "
        "--methods zero-shot,prompt-tuning --set steps=4 --set eval_every=2 --set batch_size=4"
    ).split()
    assert main(args) == 0
    printed = capsys.readouterr()
    results = json.loads((out / "results.json").read_text())
    assert results["format"] == 2 and results["budget"]["trials"] == 2
    assert results["budget"]["search_examples"] == 2 * 4 * 4
    tuning = results["tuning"]["prompt-tuning"]
    assert [t["number"] for t in tuning["trials"]] == [0, 1] and tuning["knobs"] == ["lr"]
    best = tuning["best"]
    configs = {(r["method"], r["config"], r["seed"]) for r in results["records"]}
    assert ("zero-shot", "default", 1) in configs
    assert {("prompt-tuning", "tuned", 1), ("prompt-tuning", "tuned", 2)} <= configs
    if best["number"] != 0:  # the defaults get their own runs unless they won the search
        assert {("prompt-tuning", "default", 1), ("prompt-tuning", "default", 2)} <= configs
    tuned = [r for r in results["records"] if r["config"] == "tuned"]
    assert all(r["params"] == best["params"] for r in tuned)
    assert all(len(r["per_row"]) == r["metrics"]["n"] == 16 for r in tuned)
    md = (out / "report.md").read_text()
    assert "## Default versus tuned" in md and "95% interval" in md
    assert "2 trials x 4 steps x 4 rows" in md
    page = (out / "report.html").read_text()
    assert 'id="plot-sensitivity"' in page
    assert "vs best" in printed.out
    # another compare into the same folder must not replace these results
    assert main(args) == 2
    assert "not empty; pass --resume" in capsys.readouterr().err
    assert main([*args, "--resume"]) == 0
    assert "done before, kept" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        ("--tune 2 --search depth", "--search depth: unknown knob"),
        ("--search r", "--search needs --tune"),
        ("--tune 2 --search r,init,weight_decay", "at most two knobs"),
    ],
)
def test_compare_tune_rejects_bad_search_options(tiny_task, tmp_path, capsys, extra, message):
    code = main(f"compare --task {tiny_task} --out {tmp_path / 'o'} {extra}".split())
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_search_space_holds_the_literature_rates_and_the_defaults():
    from tunelab import methods

    for method, config in methods.CONFIGS.items():
        (lr, *_) = space(method, [])
        assert lr.low <= config().lr <= lr.high, method
    assert space("prompt-tuning", [])[0].high >= 0.3  # Lester et al.'s rate
    assert [k.name for k in space("lora", ["r", "init"])] == ["lr", "r"]  # init: not LoRA's
    residual = space("prompt-tuning", ["reparameterize"])[1]
    assert residual.choices == ("none", "residual")
    assert [k.name for k in space("hybrid", ["reparameterize"])] == [
        "lr",
        "prompt_lr",
        residual.name,
    ]
    assert [k.name for k in space("lora", ["reparameterize"])] == ["lr"]


def test_a_default_outside_the_space_widens_it(tmp_path):
    """Trial 0 runs the user's --set values: the space must hold them."""
    search = Search(
        method="lora",
        out=tmp_path,
        n_trials=2,
        steps=4,
        train_args=["--set", "lr=0.05", "--set", "r=12"],
        knobs=space("lora", ["r"]),
    )
    lr, r = search.knobs
    assert (lr.low, lr.high) == (1e-5, 0.05) and 12 in r.choices and 4 in r.choices
