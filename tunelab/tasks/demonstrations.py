"""Context demonstrations: k solved examples per class (k in all for generation) placed before
the input.

Selection is random (seeded per input, and per epoch for training rows), by similarity to the
input (TF-IDF cosine; LM-BFF, Gao et al. 2021, use SBERT embeddings for the same purpose), or,
for text-to-SQL, random among rows of the input's own database (topped up from others when it
has fewer than k).
"""

from __future__ import annotations

import math
import random
import re
import zlib
from collections import Counter, defaultdict

import numpy as np

from tunelab.tasks.readers import Record
from tunelab.tasks.spec import TaskSpec
from tunelab.tasks.template import render

_WORD = re.compile(r"\w+")


def _terms(text: str) -> Counter:
    return Counter(_WORD.findall(text.lower()))


class DemoSelector:
    """Chooses the demonstrations for each input from a pool of labelled rows."""

    def __init__(self, task: TaskSpec, pool: list[Record]):
        self.task, self.cfg = task, task.demonstrations
        self.pool = pool
        self.texts = [self._text(r) for r in pool]
        self.by_label: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(pool):
            # generation: one group, so k in all
            self.by_label[str(r.fields[task.label_field]) if task.label_field else ""].append(i)
        if self.cfg.select == "similar":
            self._index()

    def _text(self, r: Record) -> str:
        if self.task.is_generation:  # the input fields alone: for SQL, not the schema
            return " ".join(str(r.fields.get(f, "")) for f in self.task.input_fields)
        return render(self.task.template, r.fields)

    def _index(self) -> None:
        docs = [_terms(t) for t in self.texts]
        df = Counter(t for d in docs for t in d)
        n = len(docs)
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1 for t, c in df.items()}
        postings: dict[str, list[tuple[int, float]]] = defaultdict(list)
        for i, d in enumerate(docs):
            w = {t: c * self.idf[t] for t, c in d.items()}
            norm = math.sqrt(sum(v * v for v in w.values())) or 1.0
            for t, v in w.items():
                postings[t].append((i, v / norm))
        self.postings = {
            t: (np.array([i for i, _ in p]), np.array([v for _, v in p], dtype=np.float32))
            for t, p in postings.items()
        }

    def _similarity(self, text: str) -> np.ndarray:
        scores = np.zeros(len(self.pool), dtype=np.float32)
        q = {t: c * self.idf[t] for t, c in _terms(text).items() if t in self.idf}
        norm = math.sqrt(sum(v * v for v in q.values())) or 1.0
        for t, v in q.items():
            rows, weights = self.postings[t]
            scores[rows] += weights * (v / norm)
        return scores

    def select(self, query: Record, epoch: int = 0) -> list[Record]:
        """k rows per class, ordered class by class; never the query itself nor a row that
        reads the same (its answer would be given away). `epoch` > 0 draws random selections
        afresh (a training row's demonstrations in that epoch); inference draws epoch 0's."""
        k = self.cfg.k
        if k == 0:
            return []
        own, text = (query.source, query.line), self._text(query)
        if self.cfg.select == "similar":
            scores = self._similarity(text)
        else:
            # crc32 < 2**32: each epoch has its own seeds
            rng = random.Random(
                self.cfg.seed * 1_000_003 + zlib.crc32(text.encode()) + epoch * 2**32
            )
        chosen: list[Record] = []
        for label in self.task.labels or [""]:
            cands = [
                i
                for i in self.by_label.get(label, [])
                if (self.pool[i].source, self.pool[i].line) != own and self.texts[i] != text
            ]
            if self.cfg.select == "same-database":
                db = self.task.sql.db_field
                same = [i for i in cands if self.pool[i].fields.get(db) == query.fields.get(db)]
                others = [i for i in cands if self.pool[i].fields.get(db) != query.fields.get(db)]
                picked = rng.sample(same, min(k, len(same)))
                picked = rng.sample(others, min(k - len(picked), len(others))) + picked
            elif self.cfg.select == "similar":
                # least similar first, so the most similar sits next to the input
                picked = sorted(cands, key=lambda i: (scores[i], -i))[-k:]
            else:
                picked = rng.sample(cands, min(k, len(cands)))
            chosen += [self.pool[i] for i in picked]
        return chosen

    def render(self, demo: Record) -> str:
        if self.task.is_generation:
            template = self.cfg.template or self.task.template
            return render(template, demo.fields) + render(self.task.target, demo.fields)
        word = self.task.verbalizer[str(demo.fields[self.task.label_field])][0]
        return self._text(demo) + self.task.answer_prefix + word
