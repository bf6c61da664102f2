"""Score label words at the answer position, computing logits only where they are needed."""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from tunelab.tasks.batch import collate
from tunelab.tasks.encode import Example
from tunelab.tasks.verbalizer import Verbalizer


def make_batch(
    tuned,
    examples: list[Example],
    verbalizer: Verbalizer,
    pad_id: int,
    padding_side: str,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Padded tensors for `label_logprobs`: one row per example for a head or single-token
    label words, else one row per (example, label word)."""
    expand = verbalizer is not None and tuned.head is None and not verbalizer.single_token
    batch = collate(examples, verbalizer, pad_id, padding_side, expand)
    return {k: v.to(device) for k, v in batch.items()}


@functools.cache
def _cache_arg(forward_owner: type) -> str:
    """The keyword a model's forward takes its key/value cache by: `cache` in transformers 5.x
    (`past_key_values` still works there but warns on every run and goes in 5.40), else
    `past_key_values`."""
    params = inspect.signature(forward_owner.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def with_cache(model, cache) -> dict:
    """`{name: cache}` to pass a key/value cache (a transformers `Cache`) to `model`'s forward."""
    return {_cache_arg(type(model)): cache}


def cache_of(out):
    """The key/value cache a forward returned (`out.cache`; `past_key_values` before 5.x)."""
    return out.cache if "cache" in out else out.past_key_values


def cache_from(keys, values):
    """A DynamicCache holding per-layer keys and values, (B, H, P, Dh) each (any iterable over
    the layers: a list, or a (L, B, H, P, Dh) tensor)."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer, (k, v) in enumerate(zip(keys, values)):
        cache.update(k, v, layer)
    return cache


def expanded_cache(keys, values, batch_size: int):
    """A DynamicCache holding the same keys and values, (layers, H, P, Dh) each, before every
    row of a batch: expanded over the batch (a view, no copy)."""
    return cache_from(
        (k.expand(batch_size, -1, -1, -1) for k in keys[:, None]),  # (1, H, P, Dh) → (B, ...)
        (v.expand(batch_size, -1, -1, -1) for v in values[:, None]),
    )


def after_prefix(tuned, mask: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype):
    """(mask, positions, cache) for input rows that follow `tuned`'s key/value prefix (prefix
    tuning): the tokens attend to its n cached slots and their positions start after them, as
    PEFT's prefix tuning places them. Without a prefix: unchanged, and no cache (None)."""
    if tuned.prefix is None:
        return mask, positions, None
    n = tuned.prefix.n
    widened = torch.cat([mask.new_ones(mask.size(0), n), mask], 1)
    return widened, positions + n, tuned.prefix.cache(mask.size(0), dtype)


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) mask → (B,) index of each row's last real token, for left or right padding."""
    return mask.size(1) - 1 - mask.flip(1).argmax(1)


def hidden_states(tuned, input_ids, attention_mask):
    """Final hidden states (B, T', D) and mask (B, T') without the LM head over every position."""
    embeds, mask = tuned.embed(input_ids, attention_mask)
    # positions count real tokens only, so left padding does not shift the rotary positions
    position_ids = (mask.cumsum(1) - 1).clamp(min=0)
    mask_in, position_ids, cache = after_prefix(tuned, mask, position_ids, embeds.dtype)
    extra = {} if cache is None else with_cache(tuned.model.base_model, cache)
    out = tuned.model.base_model(
        inputs_embeds=embeds, attention_mask=mask_in, position_ids=position_ids, **extra
    )
    return out.last_hidden_state, mask


def _label_logsumexp(word_scores: torch.Tensor, verbalizer: Verbalizer) -> torch.Tensor:
    """(B, W) word scores → (B, C) label scores: log of the summed probability of its words."""
    owner = torch.tensor(verbalizer.owner, device=word_scores.device)
    member = owner[None, :] == torch.arange(len(verbalizer.labels), device=owner.device)[:, None]
    masked = word_scores[:, None, :].masked_fill(~member[None], float("-inf"))  # (B, C, W)
    return masked.logsumexp(-1)


def target_logprobs(tuned, batch: dict) -> torch.Tensor:
    """(R, L) log-probability of each target token (0 past a row's target), full-vocabulary
    logits computed only at the L positions that predict the target."""
    h, mask = hidden_states(tuned, batch["input_ids"], batch["attention_mask"])
    return _target_logprobs(tuned, h, last_positions(mask), batch)


def _target_logprobs(tuned, h, last, batch) -> torch.Tensor:
    targets, valid = batch["target_ids"], batch["target_mask"].bool()  # (R, L)
    lens = valid.sum(1)  # (R,)
    offs = torch.arange(targets.size(1), device=h.device)[None, :]  # (1, L)
    # the row's last len(target) positions predict the target; slots past a shorter target are
    # clamped into range and masked out below
    pos = (last[:, None] - lens[:, None] + 1 + offs).clamp(0, h.size(1) - 1)  # (R, L)
    h_t = h.gather(1, pos[..., None].expand(-1, -1, h.size(-1)))  # (R, L, D)
    logp = F.log_softmax(tuned.model.get_output_embeddings()(h_t).float(), -1)  # (R, L, V)
    return logp.gather(-1, targets[..., None]).squeeze(-1).masked_fill(~valid, 0.0)


def label_logprobs(tuned, batch: dict, verbalizer: Verbalizer) -> torch.Tensor:
    """(B, C) log-probabilities of each label, normalised over the labels."""
    h, mask = hidden_states(tuned, batch["input_ids"], batch["attention_mask"])
    return label_logprobs_at(tuned, h, last_positions(mask), batch, verbalizer)


def label_logprobs_at(tuned, h, last, batch: dict, verbalizer: Verbalizer) -> torch.Tensor:
    """(B, C) label log-probabilities from final hidden states h (R, T, D) whose answer
    position in row r is last[r] (R,): shared by `label_logprobs` and the server's mixed-task
    batches, which compute h their own way."""
    if tuned.head is not None:  # a classification layer on the answer position's hidden state
        h_last = h[torch.arange(h.size(0)), last]  # (B, D)
        return F.log_softmax(tuned.head(h_last.to(tuned.head.weight.dtype)).float(), -1)
    if "target_ids" in batch:
        # rows are (example, word) pairs: a word's score is its tokens' summed log-probability
        word_scores = (
            _target_logprobs(tuned, h, last, batch).sum(-1).view(-1, len(verbalizer.words))
        )
    else:
        head = tuned.model.get_output_embeddings()
        h_last = h[torch.arange(h.size(0)), last]  # (B, D)
        ids = torch.tensor([w[0] for w in verbalizer.words], device=h.device)
        # only the label words' rows of the LM head: (B, D) @ (D, W)
        word_scores = h_last @ head.weight[ids].T.to(h_last.dtype)
        if getattr(head, "bias", None) is not None:
            word_scores = word_scores + head.bias[ids]
    return F.log_softmax(_label_logsumexp(word_scores.float(), verbalizer), -1)
