"""Dependencies a new user can install: bounded ranges, the tested versions pinned in
constraints.txt and used by `make`, and no deprecated transformers API on tunelab's paths."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
from conftest import make_task
from packaging.requirements import Requirement

from tunelab.__main__ import main

ROOT = Path(__file__).resolve().parents[1]
BOUNDED = ("torch", "transformers", "peft")


def _pins() -> dict[str, str]:
    lines = (ROOT / "constraints.txt").read_text().splitlines()
    return dict(line.split("==") for line in lines if line and not line.startswith("#"))


def test_frameworks_have_tested_upper_bounds_and_pins_inside_them():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    reqs = {r.name: r for r in map(Requirement, deps)}
    pins = _pins()
    for name in BOUNDED:
        assert any(s.operator == "<" for s in reqs[name].specifier), f"{name}: no upper bound"
        assert reqs[name].specifier.contains(pins[name]), (name, pins[name])


def test_make_installs_the_tested_versions():
    makefile = (ROOT / "Makefile").read_text()
    installs = re.findall(r"\$\(PIP\) install (?!-q --upgrade pip).*", makefile)
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert "torch==" + _pins()["torch"] in installs[0]  # torch first, the CPU wheel


def test_no_deprecated_cache_argument_on_tunelab_paths(tiny_model_dir, tmp_path, capsys):
    """transformers 5.x renamed the forward's `past_key_values` to `cache` (the old name warns on
    every run and goes in 5.40): training, scoring with the cached head, a prefix's cache and
    generation all pass the new one."""
    (tmp_path / "cls").mkdir()
    (tmp_path / "gen").mkdir()
    cls, gen = make_task(tmp_path / "cls"), make_task(tmp_path / "gen")
    gen.write_text(
        gen.read_text()
        .replace("label_field: label\n", 'target: " {label}"\n')
        .replace("verbalizer:\n  positive: yes\n  negative: no\n", "")
    )
    tiny = ["--model", str(tiny_model_dir), "--set", "steps=2", "--set", "batch_size=4"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for task, method in [(cls, "prompt-tuning"), (cls, "prefix"), (gen, "prefix")]:
            out = tmp_path / f"{task.parent.name}-{method}"
            assert (
                main(["train", "--task", str(task), "--method", method, "--out", str(out), *tiny])
                == 0
            )
    deprecated = [str(w.message) for w in seen if "past_key_values" in str(w.message)]
    assert not deprecated, deprecated[0]
