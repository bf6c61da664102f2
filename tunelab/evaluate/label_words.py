"""Automatic label words: LM-BFF's search over the model's vocabulary (Gao et al. 2021, §5.1).

The frozen model runs once over the training rows; its next-token distribution at the answer
position (where the verbalizer scores the first token of `answer_prefix + word`) gives every
vocabulary word's log-probability per row. For each class, the words most likely on that
class's rows (LM-BFF's top k) are narrowed to the N that favour the class most over the other
classes (so that words every class predicts, " the" or " a", drop out); then the assignment of
one distinct word per class with the best training accuracy is chosen: every combination where
N^C is small, else an exhaustive search over each class's first few followed by coordinate
ascent over all N (each class's word changed in turn while it helps).

Prompts are built without demonstrations: those would show the task's current label words and
the search would learn to copy them.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tunelab.errors import TunelabError
from tunelab.lm.head_cache import after_head, head_hidden
from tunelab.lm.predict import predict_logprobs, shared_head
from tunelab.lm.scoring import hidden_states, label_logprobs_at, last_positions
from tunelab.tasks.batch import collate
from tunelab.tasks.encode import Example
from tunelab.tasks.prepared import PreparedTask
from tunelab.tasks.spec import TaskSpec

MAX_ASSIGNMENTS = 4096  # combinations scored exhaustively; beyond, coordinate ascent


@dataclass
class Candidate:
    word: str
    token: int
    logp: float  # mean log-probability on the class's training rows
    margin: float  # logp minus its mean over the other classes (each class's rows averaged)


@dataclass
class LabelWords:
    """A search's outcome: the proposed word per label, the candidates it chose among, and
    training accuracy of the proposal and of the task's own verbalizer."""

    words: dict[str, str]
    candidates: dict[str, list[Candidate]]
    accuracy: float
    task_accuracy: float
    split: str
    rows: int
    vocabulary: int  # words the search could propose (single tokens made of letters)
    assignments: int  # combinations whose accuracy was measured

    def task(self, task: TaskSpec) -> TaskSpec:
        """`task` with the proposal as its verbalizer."""
        return with_words(task, self.words)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def with_words(task: TaskSpec, words: dict[str, str]) -> TaskSpec:
    return dataclasses.replace(task, verbalizer={label: [w] for label, w in words.items()})


def vocabulary_words(tokenizer, answer_prefix: str) -> dict[int, str]:
    """Token id -> word for the tokens that are a whole label word: the token reads
    `answer_prefix + word` with a word made of letters, and that text tokenizes back to this one
    token (so the verbalizer scores exactly it)."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids])
    found = {
        i: t[len(answer_prefix) :]
        for i, t in zip(ids, texts)
        if t.startswith(answer_prefix) and t[len(answer_prefix) :].isalpha()
    }
    if not found:
        return {}
    back = tokenizer([answer_prefix + w for w in found.values()], add_special_tokens=False)
    return {i: w for (i, w), b in zip(found.items(), back["input_ids"]) if list(b) == [i]}


@torch.no_grad()
def answer_states(tuned, examples: list[Example], verbalizer, pad_id: int, batch_size: int = 32):
    """(N, D) final hidden state at each prompt's answer position (its last token), float32 on
    the model's device, in the order of `examples`: one forward per row, batched, the shared
    head run once."""
    device = next(tuned.parameters()).device
    was_training = tuned.training
    tuned.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
    head = shared_head(tuned, examples)
    out = None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        part = [examples[i] for i in idx]
        if head is not None:
            part = after_head(part, len(head.token_ids))
        batch = collate(part, verbalizer, pad_id, "left", expand=False)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if head is not None:
            h = head_hidden(tuned, head, ids, mask)
        else:
            h, mask = hidden_states(tuned, ids, mask)
        h_last = h[torch.arange(h.size(0)), last_positions(mask)].float()  # (B, D)
        if out is None:
            out = h_last.new_empty(len(examples), h_last.size(1))
        out[torch.tensor(idx, device=device)] = h_last
    tuned.train(was_training)
    return out


def _vocab_logprobs(tuned, h: torch.Tensor, chunk: int = 64):
    """(rows, V) next-token log-probabilities from answer states h (N, D), a chunk of rows at a
    time (a full (N, V) matrix need not fit in memory)."""
    head = tuned.model.get_output_embeddings()
    weight = head.weight.detach().float()  # (V, D)
    bias = getattr(head, "bias", None)
    for start in range(0, h.size(0), chunk):
        logits = h[start : start + chunk] @ weight.T  # (B, V)
        if bias is not None:
            logits = logits + bias.detach().float()
        yield start, F.log_softmax(logits, -1)


def _class_means(tuned, h, gold: torch.Tensor, n_labels: int) -> torch.Tensor:
    """(C, V) mean log-probability of every token over each class's rows."""
    sums = None
    for start, logp in _vocab_logprobs(tuned, h):
        if sums is None:
            sums = logp.new_zeros(n_labels, logp.size(1))
        sums.index_add_(0, gold[start : start + logp.size(0)].to(logp.device), logp)
    counts = torch.bincount(gold, minlength=n_labels).clamp(min=1)
    return sums.cpu() / counts[:, None]


def _token_logprobs(tuned, h, tokens: list[int]) -> torch.Tensor:
    """(N, M) log-probabilities of these tokens on every row."""
    cols = torch.tensor(tokens, device=h.device)
    return torch.cat([logp[:, cols].cpu() for _, logp in _vocab_logprobs(tuned, h)])


def _score(S: torch.Tensor, gold: torch.Tensor, combos: torch.Tensor):
    """Accuracy (K,) and mean gold log-probability (K,) of each assignment: combos (K, C)
    index columns of S (N, M), the rows' log-probabilities of the candidate tokens."""
    s = S[:, combos]  # (N, K, C)
    acc = (s.argmax(-1) == gold[:, None]).float().mean(0)
    fit = s.log_softmax(-1).gather(-1, gold[:, None, None].expand(-1, s.size(1), 1))
    return acc, fit.squeeze(-1).mean(0)


def _best(S, gold, combos: torch.Tensor) -> tuple[list[int], float, float] | None:
    """The assignment of distinct words with the best accuracy (ties: the better fit)."""
    distinct = torch.tensor([len(set(c)) == len(c) for c in combos.tolist()])
    if not distinct.any():
        return None
    combos = combos[distinct]
    acc, fit = _score(S, gold, combos)
    top = acc == acc.max()
    i = int(torch.where(top, fit, torch.tensor(float("-inf"))).argmax())
    return combos[i].tolist(), float(acc[i]), float(fit[i])


def choose(S: torch.Tensor, gold: torch.Tensor, columns: list[list[int]]):
    """(one column of S per class, accuracy, assignments scored): the best assignment of
    distinct words, class c choosing among `columns[c]` (best first)."""
    C = len(columns)
    m = 1
    while m < max(map(len, columns)) and (m + 1) ** C <= MAX_ASSIGNMENTS:
        m += 1
    combos = torch.tensor(list(itertools.product(*(cols[:m] for cols in columns))))
    scored = len(combos)
    found = _best(S, gold, combos)
    if found is None:  # every short combination repeats a word: take them greedily
        pick: list[int] = []
        for cols in columns:
            free = [c for c in cols if c not in pick]
            if not free:
                raise TunelabError("too few candidate words to give every label its own")
            pick.append(free[0])
        found = _best(S, gold, torch.tensor([pick]))
    pick, acc, fit = found
    if m < max(map(len, columns)):  # coordinate ascent over every class's candidates
        improved = True
        while improved:
            improved = False
            for c, cols in enumerate(columns):
                trials = torch.tensor([pick[:c] + [x] + pick[c + 1 :] for x in cols])
                scored += len(trials)
                new, a, f = _best(S, gold, trials)
                if (a, f) > (acc, fit):
                    pick, acc, fit, improved = new, a, f, True
    return pick, acc, scored


def search(
    tuned,
    prep: PreparedTask,
    split: str = "train",
    top: int = 100,
    candidates: int = 10,
    batch_size: int = 32,
) -> LabelWords:
    """Propose one label word per class from the model's vocabulary (see the module's doc).

    `top`: each class's candidates come from its `top` most likely words (LM-BFF's k);
    `candidates`: of those, the N that most favour the class enter the assignment search."""
    task = prep.task
    if task.is_generation:
        raise TunelabError(
            f"{task.source}: {task.name} is a generation task (`target:`); label words are for "
            "classification tasks"
        )
    if top < 1 or candidates < 1:
        raise TunelabError(f"top and candidates must be >= 1, got {top} and {candidates}")
    labels, tokenizer = prep.verbalizer.labels, prep.tokenizer
    vocab = vocabulary_words(tokenizer, task.answer_prefix)
    if len(vocab) < len(labels):
        raise TunelabError(
            f"{task.where('answer_prefix')}: only {len(vocab)} vocabulary tokens read "
            f"answer_prefix {task.answer_prefix!r} + a word; too few for {len(labels)} labels"
        )
    bare = dataclasses.replace(task, demonstrations=dataclasses.replace(task.demonstrations, k=0))
    prepared = PreparedTask(bare, tokenizer, prep.splits, prep.verbalizer, None, prep.max_length)
    examples = prepared.examples(split)
    gold = torch.tensor([ex.label for ex in examples])
    missing = [lab for c, lab in enumerate(labels) if not (gold == c).any()]
    if missing:
        raise TunelabError(
            f"{task.source}: label {missing[0]!r} has no row among the {len(examples)} {split} "
            "rows searched; every label needs some"
        )
    h = answer_states(tuned, examples, prep.verbalizer, tokenizer.pad_token_id, batch_size)

    means = _class_means(tuned, h, gold, len(labels))  # (C, V)
    tokens = torch.tensor(list(vocab))
    L = means[:, tokens]  # (C, W) over the words that can be proposed
    C = len(labels)
    others = (L.sum(0, keepdim=True) - L) / max(C - 1, 1)
    margin = L - others if C > 1 else L
    per_class: list[list[Candidate]] = []
    for c in range(C):
        pool = L[c].topk(min(top, L.size(1))).indices
        best = pool[margin[c, pool].argsort(descending=True)][:candidates]
        per_class.append(
            [
                Candidate(
                    vocab[int(tokens[j])], int(tokens[j]), float(L[c, j]), float(margin[c, j])
                )
                for j in best
            ]
        )
    unique = sorted({cand.token for cands in per_class for cand in cands})
    column = {t: i for i, t in enumerate(unique)}
    S = _token_logprobs(tuned, h, unique)  # (N, M)
    pick, acc, scored = choose(S, gold, [[column[x.token] for x in cands] for cands in per_class])
    words = {label: vocab[unique[col]] for label, col in zip(labels, pick)}
    return LabelWords(
        words=words,
        candidates=dict(zip(labels, per_class)),
        accuracy=acc,
        task_accuracy=task_accuracy(tuned, prepared, split, h, gold, batch_size),
        split=split,
        rows=len(examples),
        vocabulary=len(vocab),
        assignments=scored,
    )


def task_accuracy(tuned, prep: PreparedTask, split: str, h, gold, batch_size: int) -> float:
    """Training accuracy of the task's own verbalizer, scored as evaluation scores it: from the
    answer states when its words are single tokens, else by a forward per word."""
    verbalizer = prep.verbalizer
    if verbalizer.single_token:
        last = torch.zeros(h.size(0), dtype=torch.long, device=h.device)
        logp = label_logprobs_at(tuned, h[:, None], last, {}, verbalizer).cpu()
    else:
        logp = predict_logprobs(
            tuned, prep.examples(split), verbalizer, prep.tokenizer.pad_token_id, batch_size
        )
    return float((logp.argmax(-1) == gold).float().mean())
