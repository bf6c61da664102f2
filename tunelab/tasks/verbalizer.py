"""Verbalizers: each label's words, as token ids the model scores at the answer position."""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.errors import TunelabError
from tunelab.tasks.spec import TaskSpec


@dataclass
class Verbalizer:
    """Label words as token sequences.

    `words[i]` is the token ids of the i-th label word and `owner[i]` the index of its label.
    A word of several tokens is scored by the sum of its tokens' log-probabilities; a label
    with several words by the log of their summed probabilities.
    """

    labels: list[str]
    words: list[list[int]]
    owner: list[int]

    @property
    def single_token(self) -> bool:
        return all(len(w) == 1 for w in self.words)

    @classmethod
    def build(cls, task: TaskSpec, tokenizer) -> Verbalizer:
        words, owner = [], []
        for i, (label, label_words) in enumerate(task.verbalizer.items()):
            for w in label_words:
                ids = tokenizer(task.answer_prefix + w, add_special_tokens=False)["input_ids"]
                if not ids:
                    raise TunelabError(
                        f"{task.where('verbalizer.' + label)}: label word {w!r} of label {label!r} "
                        "tokenizes to nothing"
                    )
                words.append(list(ids))
                owner.append(i)
        return cls(task.labels, words, owner)
