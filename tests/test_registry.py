"""The method registry is the one source of what tunelab knows about a method: every CLI lists
exactly its records, each record's facts hold for the model its method builds, and `advise`,
the search and the adapter store read the records rather than their own copies."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import sys

import pytest
from conftest import make_task

from tunelab import methods
from tunelab.compare import advise, runs, search
from tunelab.methods.base import backbone_alone
from tunelab.models import load_backbone
from tunelab.serve import store
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask

SHAPE = advise.Shape(134_515_008, 576, 1536, 30, 9, 49152, 192)  # SmolLM2-135M


def _choices(add_arguments, flag: str) -> list[str]:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (action,) = [a for a in parser._actions if flag in a.option_strings]
    return list(action.choices) if action.choices else action.default.split(",")


def test_every_command_lists_exactly_the_registered_methods():
    from tunelab.compare.cli import add_compare_arguments as compare_arguments
    from tunelab.compare.tune import add_arguments as tune_arguments
    from tunelab.train.cli import add_arguments as train_arguments

    registered = list(methods.METHODS)
    assert registered == [m.name for m in methods.METHODS.values()]
    assert _choices(train_arguments, "--method") == registered
    assert _choices(tune_arguments, "--method") == registered
    # compare runs the baselines, then every method, by default
    assert _choices(compare_arguments, "--methods") == [*runs.BASELINES, *registered]
    assert not set(runs.BASELINES) & set(registered)  # baselines train nothing: no record
    # advise ranks every method (the cheapest to train first when memory fits none)
    table = advise.recommend(SHAPE, 1, 1e-6, "cost")["table"]
    assert sorted(r["method"] for r in table) == sorted(registered)


def test_every_record_has_the_one_signature_and_a_typed_config():
    for m in methods.METHODS.values():
        assert dataclasses.is_dataclass(m.config) and m.config()  # defaults are valid
        build = inspect.signature(m.build).parameters
        assert list(build) == ["backbone", "cfg", "verbalizer", "seed"], m.name
        assert list(inspect.signature(m.save_files).parameters) == [
            "tuned", "cfg", "out", "base_path"
        ], m.name  # fmt: skip
        restore = inspect.signature(m.restore).parameters
        assert list(restore) == ["backbone", "cfg", "out", "adapter_name"], m.name
        assert restore["adapter_name"].default == "default", m.name
        for key in m.search_knobs:  # a knob the search has, on a key the config has
            assert key in search.EXTRA_KNOBS and key in _fields(m.config), (m.name, key)
        for key, low, high in m.search_lr:
            assert key in _fields(m.config) and 0 < low < m.config().__dict__[key] < high


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


@pytest.mark.parametrize(
    "name, settings",
    [(name, {}) for name in methods.METHODS] + [("head", {"train_backbone": True})],
)
def test_the_record_says_what_the_built_model_is(tiny_model_dir, tmp_path, name, settings):
    record = methods.get(name)
    backbone = load_backbone(str(tiny_model_dir))
    prep = PreparedTask.load(load_task(make_task(tmp_path)), backbone.tokenizer)
    tuned = record.build(backbone, record.config(**settings), prep.verbalizer, 0)
    weights = {n: p for n, p in tuned.model.named_parameters() if "lora_" not in n}
    # sharing the backbone: none of its own weights trains
    assert record.shares_backbone(settings) == (not any(p.requires_grad for p in weights.values()))
    if not settings:  # a fact of the default config
        assert record.every_weight == all(p.requires_grad for p in tuned.parameters())
    peft = sys.modules.get("peft.tuners.tuners_utils")
    has_adapters = bool(peft) and any(isinstance(m, peft.BaseTunerLayer) for m in tuned.modules())
    assert record.routes_rows == has_adapters
    with backbone_alone(tuned) as bare:
        assert record.adds_parts == (bare is not None)
    if name == "prompt-tuning":  # where advise's estimate is exact
        shape = advise.Shape.from_config(backbone.model.config)
        assert record.default_size(shape) == tuned.prompt.embedding.numel()


def test_the_store_asks_the_record_whether_a_task_shares_the_backbone():
    for name, record in methods.METHODS.items():
        for cfg in ({}, {"train_backbone": True}):
            meta = {"method": name, "method_config": cfg}
            assert store.shares_backbone(meta) == record.shares_backbone(cfg)
    trained_head = {"method": "head", "method_config": {"train_backbone": True}}
    assert store.shares_backbone(trained_head) is False
    assert store.shares_backbone({"method": "nope"}) is False
    assert store.shares_backbone({"method": ["lora"]}) is False  # a hand-edited file


def _replace(monkeypatch, name: str, **changes) -> None:
    record = dataclasses.replace(methods.METHODS[name], **changes)
    monkeypatch.setitem(methods.METHODS, name, record)


def test_advise_takes_its_figures_from_the_records(monkeypatch):
    before = {m: advise.training_memory(SHAPE, m, 8, 64) for m in methods.METHODS}
    for name, record in methods.METHODS.items():
        assert advise.trainable_parameters(SHAPE, name) == record.default_size(SHAPE)
    pt = methods.METHODS["prompt-tuning"]
    # a longer default prompt: twice the parameters, 20 more tokens of activations per batch
    longer = functools.partial(pt.config, num_virtual_tokens=40)
    _replace(monkeypatch, "prompt-tuning", config=longer)
    assert advise.trainable_parameters(SHAPE, "prompt-tuning") == 2 * 20 * SHAPE.hidden
    after = advise.training_memory(SHAPE, "prompt-tuning", 8, 64)
    assert after["gradients"] == 2 * before["prompt-tuning"]["gradients"]
    assert after["activations"] > before["prompt-tuning"]["activations"]
    # freeze: a deeper default trains and backpropagates through more blocks
    deeper = functools.partial(methods.METHODS["freeze"].config, train_top=4)
    _replace(monkeypatch, "freeze", config=deeper)
    freeze = advise.training_memory(SHAPE, "freeze", 8, 64)
    assert freeze["gradients"] == 2 * before["freeze"]["gradients"]
    assert freeze["activations"] == 2 * before["freeze"]["activations"]
    # serving: a method that trains every weight costs a whole model per task
    shared = advise.serving_memory(SHAPE, "lora", 3)
    _replace(monkeypatch, "lora", every_weight=True)
    assert advise.serving_memory(SHAPE, "lora", 3) == 3 * 4 * SHAPE.parameters != shared


def test_the_search_space_comes_from_the_records(monkeypatch):
    for name, record in methods.METHODS.items():
        knobs = search.space(name, ["r", "init"])
        rates = [(k.name, k.low, k.high) for k in knobs if k.log]
        assert rates == list(record.search_lr)
        assert [k.name for k in knobs if not k.log] == [
            k for k in ("r", "init") if k in record.search_knobs
        ]
    _replace(monkeypatch, "prefix", search_lr=(("lr", 1e-4, 1.0),), search_knobs=("r",))
    knobs = search.space("prefix", ["r"])
    assert [(k.name, k.low, k.high) for k in knobs] == [("lr", 1e-4, 1.0), ("r", 0.0, 0.0)]
