"""Every method on a tiny llama: the intended parameters change and no others; the artifact
reloads to identical scores; PEFT-format parts load in PEFT; resume matches a whole run."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import make_task

from tunelab import methods
from tunelab.artifact import load_artifact, save_artifact
from tunelab.errors import TunelabError
from tunelab.lm.predict import predict_logprobs, shared_head
from tunelab.models import load_backbone
from tunelab.tasks import load_task
from tunelab.tasks.prepared import PreparedTask
from tunelab.train.config import TrainConfig
from tunelab.train.loop import train

# method, config overrides, which backbone tensors must change (regex; None: none may)
MATRIX = [
    ("prompt-tuning", {}, None),
    ("prompt-tuning", {"reparameterize": "residual", "bottleneck": 8}, None),
    ("prefix", {}, None),
    ("prefix", {"projection": True, "projection_hidden": 16}, None),
    ("lora", {}, r"lora_[AB]"),
    ("full", {"lr": 1e-3}, r".*"),
    ("freeze", {"train_top": 1}, r"layers\.1\."),
    ("freeze", {"modules": r"self_attn|norm"}, r"self_attn|norm"),
    ("head", {}, None),
    ("head", {"train_backbone": True, "backbone_lr": 1e-3}, r".*"),
    ("hybrid", {}, r"lora_[AB]"),
]
IDS = [f"{m}-{'-'.join(map(str, c.values())) or 'default'}" for m, c, _ in MATRIX]


def _setup(model_dir, task_path, method, overrides, seed=0):
    backbone = load_backbone(str(model_dir))
    prep = PreparedTask.load(load_task(task_path), backbone.tokenizer)
    cfg = methods.CONFIGS[method](**overrides)
    tuned = methods.get(method).build(backbone, cfg, prep.verbalizer, seed)
    return backbone, prep, cfg, tuned


def _cfg(**kw):
    return TrainConfig(
        **{**dict(steps=6, batch_size=4, eval_every=3, save_every=2, warmup=1), **kw}
    )


@pytest.mark.parametrize("method, overrides, changes", MATRIX, ids=IDS)
def test_only_the_intended_parameters_change_and_the_artifact_reloads(
    tiny_model_dir, tiny_task, tmp_path, method, overrides, changes
):
    backbone, prep, cfg, tuned = _setup(tiny_model_dir, tiny_task, method, overrides)
    before = {n: p.detach().clone() for n, p in tuned.named_parameters()}
    train(
        tuned,
        prep.examples("train"),
        [],
        prep.verbalizer,
        _cfg(),
        overrides.get("lr", cfg.lr),
        tmp_path,
        backbone.tokenizer.pad_token_id,
    )
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed, "nothing trained"
    for name in changed:
        is_backbone = name.startswith("model.")
        assert not is_backbone or (changes and re.search(changes, name)), f"{name} changed"
    if changes and changes != r".*":
        # every parameter the method means to train did train
        meant = {n for n in before if n.startswith("model.") and re.search(changes, n)}
        assert meant <= changed, sorted(meant - changed)[:3]
    if method in ("prompt-tuning", "hybrid"):
        assert "prompt.embedding" in changed
    if overrides.get("reparameterize") == "residual":  # the MLP trains; the artifact is folded
        assert {"prompt.reparam.up.weight", "prompt.reparam.norm.weight"} <= changed
    if method == "prefix":
        assert "prefix.embedding" in changed
    if method == "head":
        assert {"head.weight", "head.bias"} <= changed

    pad = backbone.tokenizer.pad_token_id
    scores = predict_logprobs(tuned, prep.examples("test"), prep.verbalizer, pad)
    save_artifact(tmp_path / "art", method, cfg, tuned, prep.task, backbone)
    fresh = load_backbone(str(tiny_model_dir))
    reloaded, _, meta, _ = load_artifact(tmp_path / "art", fresh)
    assert meta["method"] == method
    assert not any(p.requires_grad for p in reloaded.parameters())
    torch.testing.assert_close(
        predict_logprobs(reloaded, prep.examples("test"), prep.verbalizer, pad),
        scores,
        atol=1e-6,
        rtol=1e-6,
    )


RESIDUAL = {"reparameterize": "residual", "bottleneck": 8}


@pytest.mark.parametrize(
    "method, overrides",
    [
        ("lora", {}),
        ("prompt-tuning", {}),
        ("prompt-tuning", RESIDUAL),  # the checkpoint keeps the prompt's MLP
        ("prefix", {}),
        ("head", {}),
        ("hybrid", {}),
    ],
)
def test_resume_after_a_crash_matches_a_whole_run(
    tiny_model_dir, tiny_task, tmp_path, monkeypatch, method, overrides
):
    import tunelab.train.loop as loop

    def run(out, tuned, prep, backbone, cfg, resume=False):
        return train(
            tuned,
            prep.examples("train"),
            prep.examples("validation"),
            prep.verbalizer,
            _cfg(),
            cfg.lr,
            out,
            backbone.tokenizer.pad_token_id,
            resume=resume,
        )

    backbone, prep, cfg, whole = _setup(tiny_model_dir, tiny_task, method, overrides)
    run(tmp_path / "whole", whole, prep, backbone, cfg)
    expected = {k: v.clone() for k, v in whole.trainable_state().items()}

    real = loop.lr_factor
    monkeypatch.setattr(
        loop,
        "lr_factor",
        lambda c, step: (_ for _ in ()).throw(KeyboardInterrupt) if step == 5 else real(c, step),
    )
    backbone, prep, cfg, crashed = _setup(tiny_model_dir, tiny_task, method, overrides)
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "crashed", crashed, prep, backbone, cfg)
    monkeypatch.setattr(loop, "lr_factor", real)
    backbone, prep, cfg, resumed = _setup(tiny_model_dir, tiny_task, method, overrides)
    run(tmp_path / "crashed", resumed, prep, backbone, cfg, resume=True)
    got = resumed.trainable_state()
    assert got.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], atol=0, rtol=0)


def test_lora_artifact_loads_in_peft_with_the_same_scores(tiny_model_dir, tiny_task, tmp_path):
    from peft import PeftModel

    backbone, prep, cfg, tuned = _setup(tiny_model_dir, tiny_task, "lora", {})
    with torch.no_grad():  # LoRA's B starts at zero: move it so the adapter matters
        for n, p in tuned.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.1)
    save_artifact(tmp_path / "art", "lora", cfg, tuned, prep.task, backbone)
    tuned.eval()
    ids = torch.tensor([prep.examples("test")[0].ids])
    with torch.no_grad():
        ours = tuned.model(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(
            load_backbone(str(tiny_model_dir)).model, str(tmp_path / "art")
        )
        theirs = peft_model(input_ids=ids).logits
        plain = load_backbone(str(tiny_model_dir)).model(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(plain, ours, atol=1e-3)


def test_hybrid_on_a_frozen_lora_core(tiny_model_dir, tiny_task, tmp_path):
    backbone, prep, cfg, tuned = _setup(tiny_model_dir, tiny_task, "lora", {})
    train(
        tuned,
        prep.examples("train"),
        [],
        prep.verbalizer,
        _cfg(),
        1e-2,
        tmp_path / "core",
        backbone.tokenizer.pad_token_id,
    )
    save_artifact(tmp_path / "core", "lora", cfg, tuned, prep.task, backbone)
    core = {n: p.detach().clone() for n, p in tuned.named_parameters() if "lora_" in n}

    backbone, prep, cfg, hybrid = _setup(
        tiny_model_dir, tiny_task, "hybrid", {"core": str(tmp_path / "core")}
    )
    loaded = {n: p.detach() for n, p in hybrid.named_parameters() if "lora_" in n}
    assert loaded.keys() == core.keys() and all(torch.equal(loaded[n], core[n]) for n in core)
    assert [n for n, p in hybrid.named_parameters() if p.requires_grad] == ["prompt.embedding"]
    train(
        hybrid,
        prep.examples("train"),
        [],
        prep.verbalizer,
        _cfg(),
        1e-2,
        tmp_path / "h",
        backbone.tokenizer.pad_token_id,
    )
    after = {n: p.detach() for n, p in hybrid.named_parameters() if "lora_" in n}
    assert all(torch.equal(after[n], core[n]) for n in core)
    save_artifact(tmp_path / "h", "hybrid", cfg, hybrid, prep.task, backbone)
    assert (tmp_path / "h" / "prompt" / "adapter_model.safetensors").is_file()
    reloaded, *_ = load_artifact(tmp_path / "h", load_backbone(str(tiny_model_dir)))
    pad = backbone.tokenizer.pad_token_id
    torch.testing.assert_close(
        predict_logprobs(reloaded, prep.examples("test"), prep.verbalizer, pad),
        predict_logprobs(hybrid, prep.examples("test"), prep.verbalizer, pad),
        atol=1e-6,
        rtol=0,
    )


def test_hybrid_prompt_takes_reparameterize_and_saves_it_folded(
    tiny_model_dir, tiny_task, tmp_path
):
    backbone, prep, cfg, hybrid = _setup(tiny_model_dir, tiny_task, "hybrid", RESIDUAL)
    mlp = {n for n, p in hybrid.named_parameters() if p.requires_grad and ".reparam." in n}
    assert "prompt.reparam.down.weight" in mlp
    # the MLP trains at the prompt's rate, not the LoRA core's
    rates = {id(p): g["lr"] for g in hybrid.param_groups(cfg.lr, 0.0) for p in g["params"]}
    assert rates[id(hybrid.prompt.reparam.up.weight)] == cfg.prompt_lr != cfg.lr
    pad = backbone.tokenizer.pad_token_id
    train(hybrid, prep.examples("train"), [], prep.verbalizer, _cfg(), cfg.lr, tmp_path, pad)
    prompt = hybrid.prompt
    assert not torch.allclose(prompt.vectors(), prompt.embedding, atol=1e-4)  # the MLP moved P'
    save_artifact(tmp_path / "h", "hybrid", cfg, hybrid, prep.task, backbone)
    reloaded, *_ = load_artifact(tmp_path / "h", load_backbone(str(tiny_model_dir)))
    assert reloaded.prompt.reparam is None
    torch.testing.assert_close(
        predict_logprobs(reloaded, prep.examples("test"), prep.verbalizer, pad),
        predict_logprobs(hybrid, prep.examples("test"), prep.verbalizer, pad),
        atol=1e-6,
        rtol=0,
    )


def test_bad_method_settings_are_named():
    with pytest.raises(TunelabError, match="r must be >= 1, got 0"):
        methods.CONFIGS["lora"](r=0)
    with pytest.raises(TunelabError, match=r"modules='\(': not a regular expression"):
        methods.CONFIGS["freeze"](modules="(")
    with pytest.raises(TunelabError, match="core=/nope: not a LoRA artifact"):
        methods.CONFIGS["hybrid"](core="/nope")
    for method in ("prompt-tuning", "hybrid"):
        with pytest.raises(TunelabError, match="reparameterize must be one of none, residual"):
            methods.CONFIGS[method](reparameterize="mlp")
        with pytest.raises(TunelabError, match="bottleneck must be >= 1, got 0"):
            methods.CONFIGS[method](reparameterize="residual", bottleneck=0)


def test_freeze_names_what_it_cannot_match(tiny_model_dir, tiny_task):
    with pytest.raises(TunelabError, match="matches no parameter .*names look like: model"):
        _setup(tiny_model_dir, tiny_task, "freeze", {"modules": "no_such_module"})
    with pytest.raises(TunelabError, match="train_top=9, but the model has 2 blocks"):
        _setup(tiny_model_dir, tiny_task, "freeze", {"train_top": 9})


@pytest.mark.parametrize("method", ["prefix", "hybrid", "head"])
def test_scores_do_not_depend_on_padding(tiny_model_dir, tiny_task, method):
    backbone, prep, cfg, tuned = _setup(tiny_model_dir, tiny_task, method, {})
    with torch.no_grad():  # move the freshly initialised parts away from their neutral start
        for p in tuned.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    pad = backbone.tokenizer.pad_token_id
    examples = prep.examples("test")[:5]
    examples = [type(e)(e.ids + e.ids[1 : 1 + i], e.label) for i, e in enumerate(examples)]
    alone = torch.cat([predict_logprobs(tuned, [e], prep.verbalizer, pad) for e in examples])
    for side in ("left", "right"):
        batched = predict_logprobs(tuned, examples, prep.verbalizer, pad, padding_side=side)
        torch.testing.assert_close(batched, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method, overrides, changes", MATRIX, ids=IDS)
def test_evaluation_reusing_the_shared_head_scores_as_the_plain_path(
    tiny_model_dir, tmp_path, method, overrides, changes
):
    backbone, prep, cfg, tuned = _setup(
        tiny_model_dir, _film_review_task(tmp_path), method, overrides
    )
    assert not prep.verbalizer.single_token
    with torch.no_grad():  # move the freshly initialised parts away from their neutral start
        for name, p in tuned.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
            if re.search(r"[qk]_proj\.weight$", name):
                p.mul_(20)  # sharp attention, so that a position off by one shows in the scores
    pad = backbone.tokenizer.pad_token_id
    examples = prep.examples("test")
    assert shared_head(tuned, examples).slots > 4  # BOS, "Film review:" (and any soft prompt)
    for bf16, tol in ((False, 1e-5), (True, 3e-2)):
        plain = predict_logprobs(
            tuned, examples, prep.verbalizer, pad, 5, bf16=bf16, reuse_head=False
        )
        for side in ("left", "right"):
            cached = predict_logprobs(tuned, examples, prep.verbalizer, pad, 5, side, bf16)
            torch.testing.assert_close(cached, plain, atol=tol, rtol=tol)
    assert not torch.allclose(plain[0], plain[1])  # the rows really differ


def _film_review_task(tmp_path):
    # fixed template text and a two-token label word: the head holds text, every row is split
    path = make_task(tmp_path, pos="[yes, magnificent]", neg="horrendous")
    path.write_text(path.read_text().replace('"{text} It was"', '"Film review: {text} It was"'))
    return path


@pytest.mark.parametrize(
    "method, overrides",
    [("prompt-tuning", {}), ("lora", {"dropout": 0.0}), ("head", {}), ("prefix", {})],
)
def test_training_that_runs_the_shared_head_once_per_batch_matches_the_plain_path(
    tiny_model_dir, tmp_path, method, overrides
):
    from tunelab.train.loop import shared_head_ids

    path = _film_review_task(tmp_path)
    trained = []
    for reuse in (True, False):
        backbone, prep, cfg, tuned = _setup(tiny_model_dir, path, method, overrides)
        train_ex = prep.examples("train")
        train_cfg = _cfg(reuse_head=reuse, batch_size=5, grad_accum=2, eval_every=100)
        head = shared_head_ids(tuned, train_ex, prep.verbalizer, train_cfg)
        assert (head is not None) == reuse  # BOS and "Film review:" are shared by every row
        pad = backbone.tokenizer.pad_token_id
        train(tuned, train_ex, [], prep.verbalizer, train_cfg, 3e-2, tmp_path / str(reuse), pad)
        trained.append(tuned.trainable_state())
    assert trained[0].keys() == trained[1].keys()
    for name in trained[0]:
        torch.testing.assert_close(trained[0][name], trained[1][name], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("projection", [False, True])
def test_prefix_artifact_loads_in_peft_with_the_same_scores(
    tiny_model_dir, tiny_task, tmp_path, projection
):
    from peft import PeftModel

    overrides = {"projection": projection, "projection_hidden": 16}
    backbone, prep, cfg, tuned = _setup(tiny_model_dir, tiny_task, "prefix", overrides)
    with torch.no_grad():
        tuned.prefix.embedding.add_(0.1 * torch.randn_like(tuned.prefix.embedding))
    save_artifact(tmp_path / "art", "prefix", cfg, tuned, prep.task, backbone)
    pad = backbone.tokenizer.pad_token_id
    examples = prep.examples("test")[:4]
    ours = predict_logprobs(tuned, examples, prep.verbalizer, pad)
    peft_model = PeftModel.from_pretrained(
        load_backbone(str(tiny_model_dir)).model, str(tmp_path / "art")
    )
    ids = torch.tensor([w[0] for w in prep.verbalizer.words])
    with torch.no_grad():
        theirs = torch.stack(
            [
                torch.log_softmax(
                    peft_model(input_ids=torch.tensor([e.ids])).logits[0, -1, ids], -1
                )
                for e in examples
            ]
        )
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)
    # the encoder is kept beside PEFT's tensor, so training can go on from the artifact
    reloaded, *_ = load_artifact(tmp_path / "art", load_backbone(str(tiny_model_dir)))
    assert (reloaded.prefix.mlp is not None) == projection


@pytest.mark.parametrize("method", ["prompt-tuning", "lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_model_dir, tiny_task, method):
    import torch.nn.functional as F

    from tunelab.lm.scoring import label_logprobs, make_batch
    from tunelab.pipeline import enable_gradient_checkpointing

    def grads(checkpointing: bool):
        backbone, prep, cfg, tuned = _setup(
            tiny_model_dir, tiny_task, method, {"dropout": 0.0} if method == "lora" else {}
        )
        if checkpointing:
            enable_gradient_checkpointing(tuned, method)
            assert any(getattr(m, "gradient_checkpointing", False) for m in tuned.model.modules())
        tuned.train()
        batch = make_batch(
            tuned,
            prep.examples("train")[:6],
            prep.verbalizer,
            backbone.tokenizer.pad_token_id,
            "left",
            torch.device("cpu"),
        )
        F.nll_loss(label_logprobs(tuned, batch, prep.verbalizer), batch["labels"]).backward()
        return {n: p.grad.clone() for n, p in tuned.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


def test_gradient_checkpointing_is_refused_where_no_gradient_crosses_the_model(
    tiny_model_dir, tiny_task
):
    from tunelab.pipeline import enable_gradient_checkpointing

    *_, tuned = _setup(tiny_model_dir, tiny_task, "head", {})
    with pytest.raises(TunelabError, match="frozen backbone sends no gradient through it"):
        enable_gradient_checkpointing(tuned, "head")


def test_bf16_autocast_trains_and_agrees_with_float32(tiny_model_dir, tiny_task, tmp_path, capsys):
    from tunelab.device import native_bf16

    backbone, prep, cfg, tuned = _setup(tiny_model_dir, tiny_task, "lora", {})
    pad = backbone.tokenizer.pad_token_id
    examples = prep.examples("test")
    fp32 = predict_logprobs(tuned, examples, prep.verbalizer, pad)
    bf16 = predict_logprobs(tuned, examples, prep.verbalizer, pad, bf16=True)
    torch.testing.assert_close(bf16, fp32, atol=0.05, rtol=0.05)  # bfloat16 has 8 bits of mantissa
    res = train(
        tuned,
        prep.examples("train"),
        prep.examples("validation"),
        prep.verbalizer,
        _cfg(bf16=True),
        1e-2,
        tmp_path,
        pad,
    )
    assert res.step == 6 and all(torch.isfinite(v).all() for v in tuned.trainable_state().values())
    # emulated bfloat16 is slower than float32: a CPU without it in hardware gets a warning
    warned = "bf16=true on a CPU without avx512_bf16 or AMX" in capsys.readouterr().err
    assert warned == (not native_bf16(torch.device("cpu")))
    # the frozen backbone is stored in bfloat16; what trains keeps its float32 master copy
    assert {p.dtype for p in tuned.parameters() if not p.requires_grad} == {torch.bfloat16}
    assert {v.dtype for v in tuned.trainable_state().values()} == {torch.float32}
    after = predict_logprobs(tuned, examples, prep.verbalizer, pad, bf16=True)
    assert torch.isfinite(after).all() and not torch.allclose(after, bf16)


def test_lean_swiglu_keeps_a_third_less_and_gives_the_same_gradients(tiny_model_dir):
    from tunelab.lm.lean import lean_swiglu

    grads, saved = [], []
    for lean in (False, True):
        model = load_backbone(str(tiny_model_dir)).model
        for name, p in model.named_parameters():  # a frozen backbone, as in prompt tuning
            p.requires_grad_("embed_tokens" in name)
        if lean:
            assert lean_swiglu(model) == 2  # both blocks of the tiny llama
        ids = torch.tensor([[1, 5, 9, 13, 17, 21], [1, 8, 6, 7, 40, 41]])
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        kept: dict[int, int] = {}

        def pack(t, params=params, kept=kept, width=model.config.intermediate_size):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.size(-1) == width:
                kept[ptr] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model(input_ids=ids).logits.logsumexp(-1).sum()
        loss.backward()
        grads.append(model.get_input_embeddings().weight.grad)
        saved.append(sum(kept.values()))  # (tokens, intermediate) tensors kept for backward
    assert saved[1] * 3 == saved[0] * 2  # gate(x) and up(x), no longer silu(gate(x)) too
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)
