"""The FLOP count of tunelab/lm/flops.py against PyTorch's own count of the matrix products a
real forward and backward of the tiny llama run (torch.utils.flop_counter)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from tunelab.errors import TunelabError
from tunelab.lm.flops import (
    Lora,
    Shape,
    decode_flops,
    forward_flops,
    generation_flops,
    training_flops,
)


def counted(fn, ops: tuple[str, ...] | None = None) -> float:
    """Matrix-product FLOPs PyTorch counts while `fn` runs (forward and any backward), of
    these aten ops only where given."""
    with FlopCounterMode(display=False) as fc:
        fn()
    if ops is None:
        return fc.get_total_flops()
    return sum(n for op, n in fc.get_flop_counts()["Global"].items() if str(op) in ops)


@pytest.fixture(scope="module")
def eager():
    """A tiny llama whose attention is plain matmuls (eager), so the counter sees them too."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).eval()


def test_shape_of_a_config(tiny_backbone):
    s = Shape.of(tiny_backbone.model.config)
    assert (s.hidden, s.intermediate, s.layers, s.heads, s.kv_heads, s.dh) == (32, 64, 2, 4, 2, 8)
    # q 32x32, k and v 32x16, o 32x32, gate/up 32x64, down 64x32
    assert s.layer_params() == 1024 + 512 + 512 + 1024 + 3 * 2048
    assert Shape.of({"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                     "num_attention_heads": 9, "num_key_value_heads": 3,
                     "vocab_size": 49152}).dh == 64  # fmt: skip


@torch.no_grad()
def test_forward_equals_the_counted_products(eager):
    shape = Shape.of(eager.config)
    ids = torch.randint(0, 300, (3, 11))
    got = counted(lambda: eager(input_ids=ids))
    # eager attention computes the whole (T, T) score matrix, masked
    want = forward_flops(shape, [11] * 3, causal=False)
    assert got == want.total
    # the default, causal count is what a kernel that skips masked blocks must do
    causal = forward_flops(shape, [11] * 3)
    assert causal.projections == want.projections and causal.attention < want.attention


@torch.no_grad()
def test_a_cached_head_costs_only_as_keys(eager):
    """The rows after a cached head: exactly the head's share fewer FLOPs than the whole."""
    from transformers import DynamicCache

    shape = Shape.of(eager.config)
    head, rest = torch.randint(0, 300, (1, 7)), torch.randint(0, 300, (1, 5))
    from tunelab.lm.scoring import with_cache

    cache = DynamicCache()
    eager(input_ids=head, use_cache=True, **with_cache(eager, cache))
    got = counted(lambda: eager(input_ids=rest, use_cache=True, **with_cache(eager, cache)))
    assert got == forward_flops(shape, [5], 7, causal=False).total
    whole = forward_flops(shape, [12])
    after = forward_flops(shape, [5], 7)
    assert whole.total - after.total == forward_flops(shape, [7]).total  # the head's share
    assert after.total < whole.total


@torch.no_grad()
def test_serving_rows_after_a_task_head(tmp_path, tiny_model_dir):
    """The server's path (tunelab/lm/head_cache.py): rows continuing a prompt-tuned task's
    cached head run only their own tokens' projections."""
    from tunelab import methods
    from tunelab.lm.head_cache import cached_hidden, prefill
    from tunelab.models import load_backbone

    backbone = load_backbone(str(tiny_model_dir))
    cfg = methods.CONFIGS["prompt-tuning"](num_virtual_tokens=4, init="random")
    tuned = methods.get("prompt-tuning").build(backbone, cfg, None, 0).eval()
    head = prefill(tuned, [backbone.tokenizer.bos_token_id])  # BOS + 4 soft-prompt slots
    suffixes = [[10, 11, 12], [20, 21, 22, 23, 24, 25]]
    model = tuned.model
    run = lambda: cached_hidden(model, [head] * 2, [head.slots] * 2, suffixes, 3)  # noqa: E731
    got = counted(run, ops=("aten.mm", "aten.addmm"))  # the projections (SDPA aside)
    shape = Shape.of(model.config)
    want = forward_flops(shape, [3, 6], head.slots, logit_rows=0)
    per_token = 2 * shape.layers * shape.layer_params()
    assert want.projections == 9 * per_token  # the head's 5 slots are not recomputed
    # the 3-token row runs left-padded to 6: 3 tokens' projections the model need not do
    assert got == want.projections + 3 * per_token


def _train_count(model, method: str, tokens: torch.Tensor, head_dw: bool = False) -> float:
    """PyTorch's count of one forward and backward with the loss on the last position's full
    logits, the gradient reaching what requires it."""
    embeds = model.model.embed_tokens(tokens).detach()
    if method == "prompt-tuning":
        embeds.requires_grad_(True)

    def step():
        h = model.model(inputs_embeds=embeds).last_hidden_state
        model.lm_head(h[:, -1]).logsumexp(-1).sum().backward()

    return counted(step)


def _requires_grad(model, pred) -> None:
    for name, p in model.named_parameters():
        p.requires_grad_(pred(name))


def test_training_counts_follow_the_gradient(eager):
    import copy

    from peft import LoraConfig, inject_adapter_in_model

    shape = Shape.of(eager.config)
    tokens = torch.randint(0, 300, (2, 9))
    lengths = [9, 9]
    cases = {}
    m = copy.deepcopy(eager)
    _requires_grad(m, lambda n: False)
    cases["prompt-tuning"] = (_train_count(m, "prompt-tuning", tokens), {})
    _requires_grad(m, lambda n: True)
    cases["full"] = (_train_count(m, "full", tokens), {})
    _requires_grad(m, lambda n: ".layers.2." in n)
    cases["freeze"] = (_train_count(m, "freeze", tokens), {"train_top": 1})
    lm = copy.deepcopy(eager)
    inject_adapter_in_model(LoraConfig(r=2, lora_dropout=0.0, target_modules="all-linear"), lm)
    _requires_grad(lm, lambda n: "lora_" in n)
    cases["lora"] = (_train_count(lm, "lora", tokens), {"lora": Lora(2)})
    for method, (got, extra) in cases.items():
        want = training_flops(shape, lengths, method, causal=False, **extra).total
        # LoRA: layer 0's A matrices need no input gradient, which the count keeps (r is small)
        assert want == pytest.approx(got, rel=0.01 if method == "lora" else 1e-9), method
    # the forward is the same for all; what the backward adds orders the methods
    totals = {k: v[0] for k, v in cases.items()}
    assert totals["freeze"] < totals["prompt-tuning"] < totals["lora"] < totals["full"]


def test_training_with_a_shared_head_runs_it_once(eager):
    shape = Shape.of(eager.config)
    once = training_flops(shape, [6] * 8, "prompt-tuning", head=5)
    per_row = training_flops(shape, [11] * 8, "prompt-tuning")
    head_fwd_bwd = training_flops(shape, [5], "prompt-tuning", logit_rows=0)
    # the rows' own work (attending to the head's keys) is the same either way
    assert per_row.total - once.total == pytest.approx(7 * head_fwd_bwd.total)


def test_decode_and_generation():
    s = Shape(hidden=576, intermediate=1536, layers=30, heads=9, kv_heads=3, vocab=49152)
    step = decode_flops(s, [100])
    per_token = 2 * (30 * s.layer_params() + 576 * 49152)
    assert step.projections + step.logits == per_token
    assert step.attention == 30 * 4 * 576 * 101
    # prompt of 10 after a head of 21, 4 new tokens: the prefill, then 3 tokens fed back
    gen = generation_flops(s, 10, 4, context=21)
    want = forward_flops(s, [10], 21, logit_rows=1)
    for c in (31, 32, 33):
        want = want + decode_flops(s, [c])
    assert gen.total == want.total
    # the default model: ~2 x 135M params' worth of multiply-adds per token, as its size says
    assert 2.0e8 < per_token < 2.8e8


def test_bad_arguments_are_refused():
    s = Shape(hidden=8, intermediate=16, layers=2, heads=2, kv_heads=1, vocab=10)
    with pytest.raises(TunelabError, match="method 'prefix'"):
        training_flops(s, [4], "prefix")
    with pytest.raises(TunelabError, match="train_top"):
        training_flops(s, [4], "freeze", train_top=3)
    with pytest.raises(TunelabError, match="2 rows but 3 contexts"):
        forward_flops(s, [1, 2], [0, 0, 0])
    with pytest.raises(TunelabError, match="lora"):
        training_flops(s, [4], "lora")
