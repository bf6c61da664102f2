"""Rows → prompt text → token ids, once per split (the model never sees raw text)."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.tasks.demonstrations import DemoSelector
from tunelab.tasks.readers import Record
from tunelab.tasks.spec import TaskSpec
from tunelab.tasks.template import render


@dataclass
class Example:
    ids: list[int]  # the prompt; the answer follows its last token
    label: int | None  # index into the verbalizer's labels
    target: list[int] | None = None  # generation: the tokens to produce, ending in EOS


@dataclass
class Epochs:
    """The training rows as each epoch reads them: one encoding per epoch when demonstrations
    are drawn afresh each epoch (`demonstrations.train`), else one for every epoch. The rows
    and their order are the same in each; only their prompts differ."""

    encodings: list[list[Example]]

    def of(self, epoch: int) -> list[Example]:
        return self.encodings[epoch % len(self.encodings)]

    def every_row(self) -> list[Example]:
        """Every encoding of every row (what all of them start with is the shared head)."""
        return [ex for rows in self.encodings for ex in rows]

    def mean_tokens(self) -> float:
        """Tokens per training row (prompt and target), over all epochs."""
        rows = self.every_row()
        return sum(len(ex.ids) + len(ex.target or ()) for ex in rows) / max(1, len(rows))


def prompt_text(
    task: TaskSpec, record: Record, demos: DemoSelector | None, drop: int = 0, epoch: int = 0
) -> str:
    """The prompt; `drop` leaves out that many demonstrations, the farthest from the input."""
    text = render(task.template, record.fields)
    if demos is None or task.demonstrations.k == 0:
        return text
    parts = [demos.render(d) for d in demos.select(record, epoch)][drop:]
    return task.demonstrations.separator.join(parts + [text])


def _fit_demonstrations(task, record, demos, tokenizer, seq, room: int, epoch: int) -> list[int]:
    """Drop demonstrations, farthest first, until the prompt fits in `room` tokens (a cut
    demonstration would teach a wrong answer; a cut input loses the question)."""
    n = len(demos.select(record, epoch))
    drop = 0
    while len(seq) > room and drop < n:
        drop += 1
        seq = tokenizer(prompt_text(task, record, demos, drop, epoch), add_special_tokens=True)[
            "input_ids"
        ]
    return seq


def encode(
    task: TaskSpec,
    records: list[Record],
    tokenizer,
    demos: DemoSelector | None = None,
    max_length: int = 512,
    epoch: int = 0,
) -> list[Example]:
    """Tokenise each row's prompt (and target), with demonstrations as `demos` draws them for
    `epoch`. An over-long prompt first loses whole demonstrations, farthest first; if the input
    alone is still too long, it keeps its end, where the answer goes, so that prompt and target
    fit in `max_length` tokens."""
    texts = [prompt_text(task, r, demos, epoch=epoch) for r in records]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    targets: list[list[int] | None] = [None] * len(records)
    if task.is_generation:
        have = [i for i, r in enumerate(records) if all(f in r.fields for f in task.target_fields)]
        rendered = [render(task.target, records[i].fields) for i in have]
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for i, t in zip(
            have, tokenizer(rendered, add_special_tokens=False)["input_ids"] if have else []
        ):
            targets[i] = (list(t) + eos)[: max_length - 1]
    bos = tokenizer.bos_token_id
    out = []
    for seq, r, target in zip(ids, records, targets):
        room = max_length - (len(target) if target else 0)
        if len(seq) > room and demos is not None:
            seq = _fit_demonstrations(task, r, demos, tokenizer, seq, room, epoch)
        if len(seq) > room:
            keep_bos = bos is not None and seq[0] == bos
            seq = ([bos] if keep_bos else []) + seq[len(seq) - room + keep_bos :]
        label = None
        if task.label_field and task.label_field in r.fields:
            label = task.labels.index(str(r.fields[task.label_field]))
        out.append(Example(list(seq), label, target))
    return out
