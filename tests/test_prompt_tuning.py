"""Prompt tuning on a tiny llama: placement, padding, scoring, frozen backbone, resume."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import make_task

from tunelab.errors import TunelabError
from tunelab.lm.predict import predict_logprobs
from tunelab.lm.scoring import label_logprobs
from tunelab.methods import prompt_tuning as pt
from tunelab.methods.base import TunedLM
from tunelab.tasks import load_task
from tunelab.tasks.batch import collate
from tunelab.tasks.prepared import PreparedTask
from tunelab.train.config import TrainConfig
from tunelab.train.loop import train


def _prepared(task_path, backbone):
    return PreparedTask.load(load_task(task_path), backbone.tokenizer)


def _tuned(backbone, prep, insert="after_bos", init="random", n=4):
    cfg = pt.PromptTuningConfig(num_virtual_tokens=n, init=init, insert=insert)
    return pt.build(backbone, cfg, prep.verbalizer, seed=1)


def test_soft_prompt_goes_right_after_bos_under_left_padding():
    prompt = pt.SoftPrompt(torch.arange(2.0)[:, None].expand(2, 3) + 100)  # rows 100, 101
    ids = torch.tensor([[0, 0, 7, 5, 6], [7, 1, 2, 3, 4]])  # left-padded; 7 is BOS
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    embeds = ids[..., None].float().expand(2, 5, 3)
    out, new_mask = prompt.insert(embeds, mask, ids, bos_id=7)
    assert out[:, :, 0].tolist() == [[0, 0, 7, 100, 101, 5, 6], [7, 100, 101, 1, 2, 3, 4]]
    assert new_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1], [1] * 7]
    start = pt.SoftPrompt(prompt.embedding.detach(), insert="start")
    out, _ = start.insert(embeds, mask, ids, bos_id=7)
    assert out[0, :, 0].tolist() == [0, 0, 100, 101, 7, 5, 6]


@pytest.mark.parametrize("insert", ["after_bos", "start"])
def test_scores_do_not_depend_on_padding_or_batch(tiny_backbone, tiny_task, insert):
    prep = _prepared(tiny_task, tiny_backbone)
    tuned = _tuned(tiny_backbone, prep, insert)
    examples = prep.examples("test")[:6]
    # make lengths differ so padding really happens
    examples = [
        dataclasses.replace(e, ids=e.ids + e.ids[1 : 1 + i]) for i, e in enumerate(examples)
    ]
    pad = tiny_backbone.tokenizer.pad_token_id
    one_by_one = torch.cat([predict_logprobs(tuned, [e], prep.verbalizer, pad) for e in examples])
    for side in ("left", "right"):
        batched = predict_logprobs(tuned, examples, prep.verbalizer, pad, padding_side=side)
        torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=1e-5)


def test_multi_token_words_score_by_summed_token_logprobs(tiny_backbone, tmp_path):
    # "magnificent" and "horrendous" are not in the tokenizer corpus: several tokens each
    prep = _prepared(make_task(tmp_path, pos="[yes, magnificent]", neg="horrendous"), tiny_backbone)
    assert not prep.verbalizer.single_token
    tuned = _tuned(tiny_backbone, prep)
    examples = prep.examples("test")[:3]
    batch = collate(examples, prep.verbalizer, tiny_backbone.tokenizer.pad_token_id)
    got = label_logprobs(tuned, batch, prep.verbalizer)

    # brute force: full logits over the whole sequence, one example and one word at a time
    model = tiny_backbone.model
    expected = []
    for ex in examples:
        word_scores = []
        for word in prep.verbalizer.words:
            ids = torch.tensor([ex.ids + word])
            embeds, mask = tuned.embed(ids, torch.ones_like(ids))
            logp = F.log_softmax(model(inputs_embeds=embeds, attention_mask=mask).logits[0], -1)
            n = len(word)
            word_scores.append(sum(logp[-n - 1 + j, word[j]] for j in range(n)))
        s = torch.stack(word_scores)
        labels = torch.stack([s[:2].logsumexp(0), s[2]])  # positive has two words
        expected.append(F.log_softmax(labels, 0))
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-4, rtol=1e-4)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=8, batch_size=4, eval_every=4, save_every=2, warmup=2, lr=0.1)
    return TrainConfig(**{**base, **kw})


def test_only_the_soft_prompt_trains_and_the_loss_falls(tiny_backbone, tiny_task, tmp_path):
    # a random 2-layer model cannot learn the sentiment rule, but a prompt can learn the prior:
    # with every training row positive, the loss must fall
    from conftest import sentences, write_jsonl

    write_jsonl(
        tiny_task.parent / "train.jsonl", [dict(r, label="positive") for r in sentences(48, seed=1)]
    )
    prep = _prepared(tiny_task, tiny_backbone)
    tuned = _tuned(tiny_backbone, prep)
    before = {k: v.clone() for k, v in tiny_backbone.model.state_dict().items()}
    prompt_before = tuned.prompt.embedding.detach().clone()
    pad = tiny_backbone.tokenizer.pad_token_id
    train_ex = prep.examples("train")
    gold = torch.tensor([e.label for e in train_ex])
    loss0 = F.nll_loss(predict_logprobs(tuned, train_ex, prep.verbalizer, pad), gold)
    # no validation split: the final weights are the last step's, not the best checkpoint's
    train(tuned, train_ex, [], prep.verbalizer, _cfg(steps=40), 0.3, tmp_path, pad)
    loss1 = F.nll_loss(predict_logprobs(tuned, train_ex, prep.verbalizer, pad), gold)
    assert [n for n, p in tuned.named_parameters() if p.requires_grad] == ["prompt.embedding"]
    for k, v in tiny_backbone.model.state_dict().items():
        assert torch.equal(v, before[k]), f"backbone weight {k} changed"
    assert not torch.equal(tuned.prompt.embedding.detach(), prompt_before)
    assert loss1 < loss0 - 0.05, (loss0, loss1)


def test_resume_after_a_crash_reaches_the_same_weights(
    tiny_backbone, tiny_task, tmp_path, monkeypatch
):
    import tunelab.train.loop as loop

    prep = _prepared(tiny_task, tiny_backbone)
    pad = tiny_backbone.tokenizer.pad_token_id
    args = (prep.examples("train"), prep.examples("validation"), prep.verbalizer)
    cfg = _cfg(grad_accum=2)

    whole = _tuned(tiny_backbone, prep)
    train(whole, *args, cfg, 0.1, tmp_path / "whole", pad)

    real_factor = loop.lr_factor

    def crash_at_step_5(c, step):
        if step == 5:
            raise KeyboardInterrupt("simulated crash")
        return real_factor(c, step)

    crashed = _tuned(tiny_backbone, prep)
    monkeypatch.setattr(loop, "lr_factor", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        train(crashed, *args, cfg, 0.1, tmp_path / "crashed", pad)
    monkeypatch.setattr(loop, "lr_factor", real_factor)
    resumed = _tuned(tiny_backbone, prep)  # a fresh process would start from scratch weights
    res = train(resumed, *args, cfg, 0.1, tmp_path / "crashed", pad, resume=True)
    assert res.step == 8 and res.best_step is not None
    assert (tmp_path / "crashed" / "checkpoints" / "best.safetensors").is_file()
    torch.testing.assert_close(resumed.prompt.embedding, whole.prompt.embedding, atol=0, rtol=0)


def test_a_nan_loss_stops_with_a_message_and_keeps_the_last_checkpoint(
    tiny_backbone, tiny_task, tmp_path, monkeypatch
):
    prep = _prepared(tiny_task, tiny_backbone)
    calls = {"n": 0}

    def nan_on_third_step(real):
        def scores(*args):
            calls["n"] += 1
            out = real(*args)
            return out * float("nan") if calls["n"] == 3 else out

        return scores

    # the training step's scores (of whole rows, or of rows after the shared head)
    monkeypatch.setattr(TunedLM, "forward", nan_on_third_step(TunedLM.forward))
    with pytest.raises(TunelabError, match="loss became nan at step 3.*last.safetensors"):
        train(
            _tuned(tiny_backbone, prep),
            prep.examples("train"),
            [],
            prep.verbalizer,
            _cfg(),
            0.1,
            tmp_path,
            tiny_backbone.tokenizer.pad_token_id,
        )
    assert (tmp_path / "checkpoints" / "last.safetensors").is_file()


def test_inits_start_from_the_named_embeddings(tiny_backbone, tiny_task):
    prep = _prepared(tiny_task, tiny_backbone)
    table = tiny_backbone.model.get_input_embeddings().weight
    labels = _tuned(tiny_backbone, prep, init="labels", n=4).prompt.embedding
    first_tokens = [w[0] for w in prep.verbalizer.words]
    torch.testing.assert_close(labels[:2], table[first_tokens])
    with pytest.raises(TunelabError, match="init=text needs init_text"):
        pt.PromptTuningConfig(init="text")
    with pytest.raises(TunelabError, match="insert must be one of"):
        pt.PromptTuningConfig(insert="middle")
    assert isinstance(TunedLM(tiny_backbone.model).embed, object)


RESIDUAL = pt.PromptTuningConfig(num_virtual_tokens=4, reparameterize="residual", bottleneck=8)


def _residual(backbone, prep, seed=1):
    return pt.build(backbone, RESIDUAL, prep.verbalizer, seed=seed)


def test_residual_prompt_starts_as_the_plain_one_then_moves_differently(
    tiny_model_dir, tiny_task, tmp_path
):
    from tunelab.models import load_backbone

    runs = {}
    for kind in ("none", "residual"):
        backbone = load_backbone(str(tiny_model_dir))
        prep = _prepared(tiny_task, backbone)
        cfg = pt.PromptTuningConfig(
            num_virtual_tokens=4, init="labels", reparameterize=kind, bottleneck=8
        )
        tuned = pt.build(backbone, cfg, prep.verbalizer, seed=1)
        start = tuned.prompt.vectors().detach().clone()
        pad = backbone.tokenizer.pad_token_id
        scores0 = predict_logprobs(tuned, prep.examples("test"), prep.verbalizer, pad)
        train(tuned, prep.examples("train"), [], prep.verbalizer, _cfg(), 0.1, tmp_path / kind, pad)
        names = [n for n, p in tuned.named_parameters() if p.requires_grad]
        runs[kind] = (start, scores0, tuned.prompt.vectors().detach(), names, tuned)
    # step 0: the model sees exactly the plain prompt's start (the MLP adds 0), so scores agree
    assert torch.equal(runs["residual"][0], runs["none"][0])
    assert torch.equal(runs["residual"][1], runs["none"][1])
    # the MLP trains with the prompt, and the vectors the model sees move another way
    assert runs["none"][3] == ["prompt.embedding"]
    assert set(runs["residual"][3]) == {
        "prompt.embedding",
        *(f"prompt.reparam.{m}.{w}" for m in ("down", "up", "norm") for w in ("weight", "bias")),
    }
    mlp = runs["residual"][4].prompt.reparam
    assert mlp.norm.weight.abs().max() > 0  # the gain left 0, so W1 and W2 are in play
    moved_plain = runs["none"][2] - runs["none"][0]
    moved_residual = runs["residual"][2] - runs["residual"][0]
    assert moved_residual.abs().max() > 1e-3
    assert not torch.allclose(moved_residual, moved_plain, atol=1e-3, rtol=0)


@pytest.mark.parametrize("bf16", [False, True])
def test_folded_residual_artifact_scores_exactly_what_the_trained_model_scored(
    tiny_model_dir, tiny_task, tmp_path, bf16
):
    from safetensors.torch import load_file

    from tunelab.artifact import load_artifact, save_artifact
    from tunelab.models import load_backbone

    backbone = load_backbone(str(tiny_model_dir))
    prep = _prepared(tiny_task, backbone)
    tuned = _residual(backbone, prep)
    pad = backbone.tokenizer.pad_token_id
    args = (prep.examples("train"), prep.examples("validation"), prep.verbalizer)
    train(tuned, *args, _cfg(bf16=bf16), 0.1, tmp_path, pad)  # the best checkpoint, restored
    test = prep.examples("test")
    trained = predict_logprobs(tuned, test, prep.verbalizer, pad, bf16=bf16)
    seen = tuned.prompt.vectors().detach().float()
    assert not torch.allclose(seen, tuned.prompt.embedding.detach(), atol=1e-4)  # P' != P

    save_artifact(tmp_path / "art", "prompt-tuning", RESIDUAL, tuned, prep.task, backbone)
    # the artifact is plain prompt tuning's: the same files, n x D vectors, nothing of the MLP
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "tunelab.json",
    ]
    stored = load_file(str(tmp_path / "art" / "adapter_model.safetensors"))
    assert list(stored) == ["prompt_embeddings"] and stored["prompt_embeddings"].shape == (4, 32)
    assert torch.equal(stored["prompt_embeddings"], seen)

    fresh = load_backbone(str(tiny_model_dir))
    if bf16:  # as training left the frozen weights (train() casts them to bfloat16)
        for p in fresh.model.parameters():
            p.data = p.data.to(torch.bfloat16)
    reloaded, _, meta, _ = load_artifact(tmp_path / "art", fresh)
    assert meta["method_config"]["reparameterize"] == "residual"
    assert reloaded.prompt.reparam is None
    assert [n for n, _ in reloaded.named_parameters() if n.startswith("prompt.")] == [
        "prompt.embedding"
    ]
    folded = predict_logprobs(reloaded, test, prep.verbalizer, pad, bf16=bf16)
    torch.testing.assert_close(folded, trained, atol=1e-6, rtol=0)
    assert torch.equal(folded.argmax(-1), trained.argmax(-1))


def test_residual_prompt_trains_through_the_cli_and_resumes(
    tiny_model_dir, tiny_task, tmp_path, capsys
):
    import json

    from tunelab.__main__ import main

    out = tmp_path / "run"
    argv = ["train", "--task", str(tiny_task), "--model", str(tiny_model_dir), "--out", str(out)]
    argv += ["--set", "steps=4", "--set", "batch_size=4", "--set", "eval_every=2"]
    argv += ["--set", "reparameterize=residual", "--set", "bottleneck=8"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # 20 x 32 prompt; W1 32x8 + 8, W2 8x32 + 32, LayerNorm 2 x 32
    assert "prompt-tuning: 1,256 trainable of" in printed
    assert "the artifact keeps 640 (the prompt's MLP is folded into its vectors)" in printed
    meta = json.loads((out / "tunelab.json").read_text())
    assert meta["method_config"]["reparameterize"] == "residual"
    assert meta["metrics"]["trainable_parameters"] == 1256
    # the checkpoint holds the MLP, so the run continues where it was
    assert main([*argv, "--resume", "--set", "steps=6"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert json.loads((out / "tunelab.json").read_text())["metrics"]["steps"] == 6
