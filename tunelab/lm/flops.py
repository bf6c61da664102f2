"""The floating-point operations a llama-shaped causal LM must do: a forward pass over new
tokens after a cached context, a decode step, a generation, a training step of a method.

Counted the standard way (Kaplan et al. 2020, "Scaling Laws for Neural Language Models";
Chowdhery et al. 2022, PaLM's model FLOPs utilisation): a matrix product of (m, k) by (k, n)
is 2·m·k·n FLOPs, a multiply and an add each. Norms, activations, rotary embeddings, softmax
and the embedding lookup are not matrix products and are not counted (a few percent at most).
With D hidden, F intermediate, H heads, Hkv key/value heads of width Dh and V the vocabulary:

- projections, per token per layer: 2·(D·H·Dh + 2·D·Hkv·Dh + H·Dh·D + 3·D·F)
  (q, k, v, o; gate, up, down). LoRA adds 2·r·(in + out) per adapted projection.
- attention, per token per layer: 4·H·Dh·c, c the keys it attends to (QKᵀ, then AV). With
  causal attention (the default) the i-th of n new tokens after p cached slots attends to
  p + i + 1 keys; `causal=False` counts the full rectangle, as eager attention computes it.
- logits: 2·D·V per position whose logits are needed (V: the vocabulary, or the label words'
  count where only their rows of the LM head are scored).

Cached slots (a task's head: BOS, soft prompt, the template's fixed opening; a prefix) are not
recomputed, so they cost only as keys attended to: the head cache shows as fewer FLOPs for the
same tokens served, and model FLOPs utilisation counts only work that had to be done.

Training (`training_flops`): the backward of Y = X·W costs the forward again for the input
gradient dX = dY·Wᵀ, and again for the weight gradient dW = Xᵀ·dY. dW is counted for trainable
weights only (LoRA's A and B, or every weight in full fine-tuning). dX is counted wherever the
gradient must pass on its way from the loss down to the lowest trainable tensor, frozen or not,
and nowhere below it:

- prompt tuning: the soft prompt is the input, so dX runs through every layer: 2x forward for
  every projection and the LM head rows, no dW;
- LoRA (every layer): dX through every layer except into layer 0's q/k/v inputs, which nothing
  below needs (exact for adapters on q/k/v such as the default all-linear); dW for A and B:
  the frozen base 2x, the adapters 3x;
- freeze (the top `train_top` blocks train, their norms too): 3x in those blocks (the lowest
  one's norm weight needs the gradient into its q/k/v inputs) and no backward at all (1x) in
  the frozen blocks below them, which the gradient never reaches; the frozen LM head 2x;
- full: 3x everything (the embedding's gradient is a scatter, no matrix product).

The attention products have no weights: their backward (dQ and dK, dA and dV) is 2x their
forward wherever a gradient passes through the layer (3x in all). The logits' backward follows
the LM head: dX only (2x) unless the head trains (full fine-tuning: 3x).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from tunelab.errors import TunelabError

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_IN = ("q_proj", "k_proj", "v_proj")  # read a layer's input (after its norm)
METHODS = ("prompt-tuning", "lora", "freeze", "full")


@dataclass(frozen=True)
class Shape:
    """A llama-shaped model's sizes."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    head_dim: int | None = None  # default hidden // heads

    @property
    def dh(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @classmethod
    def of(cls, config) -> Shape:
        """From a transformers config (or a dict of its fields)."""
        get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
        heads = get("num_attention_heads")
        return cls(
            hidden=get("hidden_size"),
            intermediate=get("intermediate_size"),
            layers=get("num_hidden_layers"),
            heads=heads,
            kv_heads=get("num_key_value_heads") or heads,
            vocab=get("vocab_size"),
            head_dim=get("head_dim"),
        )

    def projections(self) -> dict[str, tuple[int, int]]:
        """Each projection of one layer: (in features, out features)."""
        D, F, q, kv = self.hidden, self.intermediate, self.heads * self.dh, self.kv_heads * self.dh
        return {
            "q_proj": (D, q),
            "k_proj": (D, kv),
            "v_proj": (D, kv),
            "o_proj": (q, D),
            "gate_proj": (D, F),
            "up_proj": (D, F),
            "down_proj": (F, D),
        }

    def layer_params(self) -> int:
        """Weights of one layer's projections (biases aside: llama has none)."""
        return sum(i * o for i, o in self.projections().values())


@dataclass
class Flops:
    """A count split by kind: projections (with LoRA's), attention products, logits."""

    projections: float = 0.0
    attention: float = 0.0
    logits: float = 0.0

    @property
    def total(self) -> float:
        return self.projections + self.attention + self.logits

    def __add__(self, other: Flops) -> Flops:
        return Flops(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __mul__(self, k: float) -> Flops:
        return Flops(*(getattr(self, f.name) * k for f in fields(self)))

    __rmul__ = __mul__


@dataclass(frozen=True)
class Lora:
    """LoRA adapters of rank r on these projections of every layer."""

    rank: int
    targets: tuple[str, ...] = PROJECTIONS

    def __post_init__(self):
        bad = [t for t in self.targets if t not in PROJECTIONS]
        if bad or self.rank < 1:
            raise TunelabError(f"LoRA rank {self.rank}, targets {bad or self.targets}: unknown")

    @staticmethod
    def parse(rank: int, targets: str = "all-linear") -> Lora:
        """From LoRA settings as tunelab writes them (`all-linear`, or `q_proj,v_proj`)."""
        names = PROJECTIONS if targets == "all-linear" else tuple(targets.split(","))
        return Lora(rank, names)

    def per_token(self, shape: Shape, only: tuple[str, ...] | None = None) -> int:
        """Forward FLOPs of one layer's adapters per token (of `only` these projections)."""
        proj = shape.projections()
        names = [t for t in self.targets if only is None or t in only]
        return sum(2 * self.rank * sum(proj[t]) for t in names)


def _rows(lengths, context) -> list[tuple[int, int]]:
    ctx = [context] * len(lengths) if isinstance(context, int) else list(context)
    if len(ctx) != len(lengths):
        raise TunelabError(f"{len(lengths)} rows but {len(ctx)} contexts")
    if any(n < 0 for n in lengths) or any(c < 0 for c in ctx):
        raise TunelabError("token counts and contexts must be >= 0")
    return list(zip(lengths, ctx))


def keys_attended(n: int, context: int, causal: bool = True) -> int:
    """Keys that n new tokens after `context` cached slots attend to, summed over the tokens."""
    return n * context + (n * (n + 1) // 2 if causal else n * n)


def forward_flops(
    shape: Shape,
    lengths: list[int],
    context: int | list[int] = 0,
    *,
    logit_rows: int | list[int] | None = None,
    logit_cols: int | None = None,
    lora: Lora | None = None,
    causal: bool = True,
) -> Flops:
    """One forward pass over rows of `lengths` new tokens, each after `context` cached slots
    (one number, or one per row), which are not recomputed. `logit_rows`: positions per row
    whose logits are computed (None: every new token; 1: the last, as classification and
    generation's prefill need); `logit_cols`: the LM head's rows used (None: the vocabulary;
    the label words' count for classification by label words). Padding is not counted."""
    rows = _rows(lengths, context)
    tokens = sum(n for n, _ in rows)
    per_token = 2 * shape.layer_params() + (lora.per_token(shape) if lora else 0)
    keys = sum(keys_attended(n, c, causal) for n, c in rows)
    if logit_rows is None:
        positions = tokens
    elif isinstance(logit_rows, int):
        positions = sum(min(logit_rows, n) for n, _ in rows)
    else:
        positions = sum(min(k, n) for k, (n, _) in zip(logit_rows, rows))
    cols = shape.vocab if logit_cols is None else logit_cols
    return Flops(
        projections=shape.layers * per_token * tokens,
        attention=shape.layers * 4 * shape.heads * shape.dh * keys,
        logits=2 * shape.hidden * cols * positions,
    )


def decode_flops(shape: Shape, contexts: list[int], *, lora: Lora | None = None) -> Flops:
    """One decoding step: one new token per row after its `contexts[r]` slots (head, prompt,
    tokens generated so far), with the vocabulary's logits for it."""
    return forward_flops(shape, [1] * len(contexts), contexts, logit_rows=1, lora=lora)


def generation_flops(
    shape: Shape, prompt: int, new_tokens: int, context: int = 0, *, lora: Lora | None = None
) -> Flops:
    """A greedy generation of `new_tokens` tokens: the prompt's `prompt` tokens after `context`
    cached slots (logits at its last position give the first token), then a decode step for
    every generated token fed back (the last one is never fed back)."""
    total = forward_flops(shape, [prompt], context, logit_rows=1, lora=lora)
    for j in range(1, new_tokens):
        total = total + decode_flops(shape, [context + prompt + j - 1], lora=lora)
    return total


@dataclass(frozen=True)
class _Backward:
    """Which backward products one method computes."""

    dx: list[bool]  # per layer: the gradient passes through it (dX of its projections)
    dw: list[bool]  # per layer: its projections' weights train (dW)
    bottom_input_dx: bool  # dX into the q/k/v inputs of the lowest layer with dX
    head_dw: bool = False  # the LM head trains


def _backward(shape: Shape, method: str, train_top: int | None) -> _Backward:
    L = shape.layers
    every, none = [True] * L, [False] * L
    if method == "prompt-tuning":
        return _Backward(every, none, bottom_input_dx=True)
    if method == "lora":
        return _Backward(every, none, bottom_input_dx=False)
    if method == "full":
        return _Backward(every, every, bottom_input_dx=True, head_dw=True)
    if method == "freeze":
        if train_top is None or not 1 <= train_top <= L:
            raise TunelabError(f"freeze: train_top must be 1..{L}, got {train_top}")
        top = [i >= L - train_top for i in range(L)]
        return _Backward(top, top, bottom_input_dx=True)  # into the lowest block's norm
    raise TunelabError(f"training FLOPs: method {method!r}; expected one of {', '.join(METHODS)}")


def training_flops(
    shape: Shape,
    lengths: list[int],
    method: str,
    *,
    head: int = 0,
    logit_rows: int | list[int] = 1,
    logit_cols: int | None = None,
    lora: Lora | None = None,
    train_top: int | None = None,
    causal: bool = True,
) -> Flops:
    """One training step (forward and backward) over rows of `lengths` tokens that all follow
    one shared head of `head` positions (BOS, soft prompt: tunelab's training runs it once per
    batch, with gradients; 0 when each row carries its own). `logit_rows`/`logit_cols`: the
    logits the loss reads (default one position per row, the whole vocabulary; tunelab's label
    words: `logit_cols` = their count). See the module docstring for what each method's
    backward computes."""
    if method == "lora" and lora is None:
        raise TunelabError("training FLOPs of LoRA need its rank and targets (lora=Lora(...))")
    bw = _backward(shape, method, train_top)
    fwd = forward_flops(
        shape, lengths, head, logit_rows=logit_rows, logit_cols=logit_cols, causal=causal
    )
    if head:  # once per batch
        fwd = fwd + forward_flops(shape, [head], 0, logit_rows=0, causal=causal)
    tokens = head + sum(lengths)
    L = shape.layers
    passes = sum(bw.dx) + sum(bw.dw)  # per layer: dX and dW each cost its forward again
    proj = fwd.projections * (1 + passes / L)
    if not bw.bottom_input_dx and any(bw.dx):
        qkv = sum(i * o for n, (i, o) in shape.projections().items() if n in ATTENTION_IN)
        proj -= 2 * qkv * tokens
    attn = fwd.attention * (1 + 2 * sum(bw.dx) / L)
    if method == "lora":
        # the adapters: forward, dX and dW (A's dX in layer 0 included: r is small)
        proj += 3 * L * lora.per_token(shape) * tokens
    logits = fwd.logits * (3 if bw.head_dw else 2)
    return Flops(proj, attn, logits)
