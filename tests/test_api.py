"""The Python API (tunelab/api.py) on a tiny llama: what it returns is what the artifact and the
command show, bad settings raise (never exit), progress=False prints nothing, and the commands
themselves call it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import tunelab
from tunelab.__main__ import main
from tunelab.errors import SettingError, TunelabError

TINY = dict(steps=4, batch_size=4, eval_every=2)


def test_train_returns_what_the_artifact_holds_and_progress_false_prints_nothing(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    task = tunelab.load_task(tiny_task)
    out = tmp_path / "run"
    run = tunelab.train(
        task, method="prompt-tuning", out=out, model=str(tiny_model_dir), progress=False, **TINY
    )
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""  # no lines, no progress bars
    meta = json.loads((out / "tunelab.json").read_text())
    assert run.out == out and run.split == "test" and run.steps == 4
    assert json.loads(json.dumps(run.metrics)) == meta["metrics"]["test"]
    assert run.metrics["n"] == 16 and 0 <= run.metrics["accuracy"] <= 1
    for key in ("best_validation", "best_step", "validation_start", "validation_zero_shot"):
        assert run.validation[key] == meta["metrics"][key], key
    assert run.validation["best_validation"] is not None
    assert meta["train_config"]["batch_size"] == 4 and meta["train_config"]["eval_every"] == 2


def test_train_progress_prints_what_the_command_prints_while_it_works(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    run = tunelab.train(
        str(tiny_task), "lora", out=tmp_path / "run", model=str(tiny_model_dir), r=2, **TINY
    )
    printed = capsys.readouterr()
    assert "task tiny: 40 train, 8 validation, 16 test" in printed.out
    assert "lora: " in printed.out and "trainable of" in printed.out
    assert "artifact:" not in printed.out  # the result is returned, not printed
    assert "train" in printed.err  # the progress bar
    assert run.method == "lora"
    assert json.loads((tmp_path / "run" / "tunelab.json").read_text())["method_config"]["r"] == 2


@pytest.mark.parametrize(
    "settings, key, message",
    [
        (dict(lr="fast"), "lr", "lr=fast: expected float"),
        (dict(steps=2.5), "steps", "steps=2.5: expected int"),
        (dict(stepz=3), "stepz", "stepz: unknown setting (known:"),
        (dict(num_virtual_tokens=True), "num_virtual_tokens", "expected int"),
    ],
)
def test_a_bad_setting_raises_naming_it_and_does_not_exit(
    tiny_model_dir, tiny_task, tmp_path, settings, key, message
):
    with pytest.raises(SettingError) as e:  # not SystemExit
        tunelab.train(tiny_task, out=tmp_path / "x", model=str(tiny_model_dir), **settings)
    assert e.value.key == key and message in str(e.value)
    assert not str(e.value).startswith("--set")  # there is no command line here
    assert not (tmp_path / "x").exists()  # refused before any work
    with pytest.raises(SettingError) as e:
        tunelab.compare(tiny_task, ["lora"], out=tmp_path / "c", **settings)
    assert e.value.key == key and not (tmp_path / "c").exists()


def test_checks_of_settings_and_options_raise_tunelab_errors(tiny_task, tmp_path):
    with pytest.raises(TunelabError, match="init must be one of random"):
        tunelab.train(tiny_task, out=tmp_path / "x", init="magic")
    with pytest.raises(TunelabError, match="--method magic: unknown method"):
        tunelab.train(tiny_task, "magic", out=tmp_path / "x")
    with pytest.raises(TunelabError, match="--limit must be >= 1"):
        tunelab.train(tiny_task, out=tmp_path / "x", limit=0)
    with pytest.raises(TunelabError, match="--methods magic: unknown method"):
        tunelab.compare(tiny_task, ["lora", "magic"], out=tmp_path / "c")
    with pytest.raises(TunelabError, match="unknown task key 'bogus'"):
        tunelab.load_task(tiny_task, bogus=1)
    assert not (tmp_path / "x").exists() and not (tmp_path / "c").exists()


def test_load_task_overrides_replace_keys_of_the_file(tiny_task, tmp_path):
    task = tunelab.load_task(tiny_task, calibrate="content-free", name="other")
    assert task.calibrate == "content-free" and task.name == "other"
    assert tunelab.load_task(tiny_task).calibrate is None
    # a comparison's runs read the file, so a task that differs from it is refused
    with pytest.raises(TunelabError, match="differs from its file"):
        tunelab.compare(task, ["zero-shot"], out=tmp_path / "c")


def test_compare_returns_the_results_it_writes_and_progress_false_prints_nothing(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    out = tmp_path / "cmp"
    found = tunelab.compare(
        tunelab.load_task(tiny_task), ["zero-shot"], out=out, model=str(tiny_model_dir),
        progress=False,
    )  # fmt: skip
    printed = capsys.readouterr()
    assert printed.out == "" and printed.err == ""
    assert found.results == json.loads((out / "results.json").read_text())
    assert found.results_file == out / "results.json" and all(p.is_file() for p in found.reports)
    (record,) = found.results["records"]
    assert record["method"] == "zero-shot" and record["status"] == "ok"
    assert found.results["command"] == (
        f"tunelab compare --task {tiny_task} --methods zero-shot --out {out} "
        f"--model {tiny_model_dir}"
    )
    assert found.table().startswith("method") and "zero-shot" in found.table()


def test_advise_returns_the_ranking_the_command_prints(tiny_model_dir, capsys):
    advice = tunelab.advise(model=str(tiny_model_dir), tasks=3, memory_gb=8)
    assert main(f"advise --model {tiny_model_dir} --tasks 3 --memory-gb 8".split()) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"recommended: {advice.recommended}" in lines
    assert f"runner-up: {advice.runner_up}" in lines
    header = next(i for i, line in enumerate(lines) if line.startswith("method"))
    printed = [line.split()[0] for line in lines[header + 1 :]]
    assert printed == [r["method"] for r in advice.table] and len(printed) == 7
    with pytest.raises(TunelabError, match="--priority must be one of"):
        tunelab.advise(model=str(tiny_model_dir), memory_gb=8, priority="speed")


def test_the_commands_call_the_api(tiny_task, tmp_path, monkeypatch, capsys):
    """argparse -> typed arguments -> tunelab.api: the commands do nothing else."""
    from tunelab import api

    calls = {}

    def record(name):
        def fn(*args, **kwargs):
            calls[name] = (args, kwargs)
            raise TunelabError(f"{name} was called")

        return fn

    for name in ("train", "compare", "advise"):
        monkeypatch.setattr(api, name, record(name))
    out = tmp_path / "x"
    argv = f"train --task {tiny_task} --out {out} --method lora --set r=2 --set steps=3"
    assert main(argv.split()) == 2
    args, kwargs = calls["train"]
    assert args == (str(tiny_task),) and kwargs["method"] == "lora" and kwargs["out"] == out
    assert kwargs["r"] == "2" and kwargs["steps"] == "3"  # read as YAML by the API, as --set
    assert main(f"compare --task {tiny_task} --out {out} --seeds 1,2 --tune 2".split()) == 2
    assert calls["compare"][1]["seeds"] == "1,2" and calls["compare"][1]["tune"] == 2
    assert main("advise --memory-gb 8 --tasks 2".split()) == 2
    assert calls["advise"][1]["memory_gb"] == 8 and calls["advise"][1]["tasks"] == 2
    assert "train was called" in capsys.readouterr().err


def test_import_tunelab_is_light_and_train_stays_callable():
    code = (
        "import sys, tunelab; tunelab.TunelabError; "
        "print('torch' in sys.modules, 'tunelab.api' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    import tunelab.train.config  # binds the name `tunelab.train` to the package

    assert callable(tunelab.train) and callable(tunelab.compare)
    assert tunelab.train.config.TrainConfig().steps == 200  # still the package too
