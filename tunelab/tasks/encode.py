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


def prompt_text(task: TaskSpec, record: Record, demos: DemoSelector | None) -> str:
    text = render(task.template, record.fields)
    if demos is None or task.demonstrations.k == 0:
        return text
    parts = [demos.render(d) for d in demos.select(record)]
    return task.demonstrations.separator.join(parts + [text])


def encode(
    task: TaskSpec,
    records: list[Record],
    tokenizer,
    demos: DemoSelector | None = None,
    max_length: int = 512,
) -> list[Example]:
    """Tokenise each row's prompt; over-long prompts keep their end (where the answer goes)."""
    texts = [prompt_text(task, r, demos) for r in records]
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    bos = tokenizer.bos_token_id
    out = []
    for seq, r in zip(ids, records):
        if len(seq) > max_length:
            keep_bos = bos is not None and seq[0] == bos
            seq = ([bos] if keep_bos else []) + seq[len(seq) - max_length + keep_bos :]
        label = None
        if task.label_field and task.label_field in r.fields:
            label = task.labels.index(str(r.fields[task.label_field]))
        out.append(Example(list(seq), label))
    return out
