"""A task made ready for one tokenizer: splits read, verbalizer tokenised, prompts encoded once."""

from __future__ import annotations

from dataclasses import dataclass, field

from tunelab.errors import TunelabError
from tunelab.tasks.data import Filtered, filter_summary, load_splits
from tunelab.tasks.demonstrations import DemoSelector
from tunelab.tasks.encode import Epochs, Example, encode
from tunelab.tasks.readers import Record
from tunelab.tasks.spec import TaskSpec
from tunelab.tasks.verbalizer import Verbalizer


@dataclass
class PreparedTask:
    task: TaskSpec
    tokenizer: object
    splits: dict[str, list[Record]]
    verbalizer: Verbalizer | None  # None for a generation task
    demos: DemoSelector | None
    max_length: int = 512
    filtered: dict[str, Filtered] = field(default_factory=dict)  # what `filter:` kept
    _encoded: dict[str, list[Example]] = field(default_factory=dict, repr=False)

    @classmethod
    def load(
        cls,
        task: TaskSpec,
        tokenizer,
        max_length: int = 512,
        splits: dict[str, list[Record]] | None = None,
        demo_pool: list[Record] | None = None,
        only: set[str] | None = None,
    ) -> PreparedTask:
        """`only`: read just these splits (and train), see `load_splits`."""
        verbalizer = None if task.is_generation else Verbalizer.build(task, tokenizer)
        filtered: dict[str, Filtered] = {}
        splits = load_splits(task, only, filtered) if splits is None else splits
        pool = demo_pool if demo_pool is not None else splits.get("train", [])
        if task.sql is not None:  # rows get `schema`, their database's schema as text
            from tunelab.tasks.sql import attach_schemas

            for rows in [*splits.values(), pool]:
                attach_schemas(task, rows)
        demos = DemoSelector(task, pool) if task.demonstrations.k > 0 and pool else None
        return cls(task, tokenizer, splits, verbalizer, demos, max_length, filtered)

    def filter_summary(self) -> list[str]:
        """`train: 18,132 of 38,158 rows kept by filter`, one line per split file filtered."""
        return filter_summary(self.filtered)

    def split(self, name: str) -> list[Record]:
        if name not in self.splits:
            raise TunelabError(
                f"{self.task.source}: no split {name!r} (splits: {', '.join(self.splits)})"
            )
        return self.splits[name]

    def examples(self, name: str) -> list[Example]:
        """Token ids of a split's prompts, encoded once and kept."""
        if name not in self._encoded:
            self._encoded[name] = encode(
                self.task, self.split(name), self.tokenizer, self.demos, self.max_length
            )
        return self._encoded[name]

    def training_examples(self, epochs: int = 1, demonstrations: bool | None = None) -> Epochs:
        """The training rows as training reads them. With demonstrations (default:
        `demonstrations.train`), each row carries k per class drawn from the other training
        rows, afresh for each of `epochs` epochs (LM-BFF); epoch 0 draws what inference would.
        Without, the bare prompts, also when inference adds demonstrations."""
        if demonstrations is None:
            demonstrations = self.task.demonstrations.train
        if self.demos is None:
            return Epochs([self.examples("train")])
        rows = self.split("train")
        if not demonstrations:
            return Epochs([encode(self.task, rows, self.tokenizer, None, self.max_length)])
        # `similar` picks the same rows every time: one encoding serves every epoch
        n = 1 if self.task.demonstrations.select == "similar" else max(1, epochs)
        later = [
            encode(self.task, rows, self.tokenizer, self.demos, self.max_length, epoch=e)
            for e in range(1, n)
        ]
        return Epochs([self.examples("train"), *later])

    def limit(self, name: str, n: int | None) -> None:
        """Keep only the first n rows of a split (before it is encoded)."""
        if n is not None:
            if n < 1:
                raise TunelabError(f"--limit must be >= 1, got {n}")
            self.splits[name] = self.split(name)[:n]
            self._encoded.pop(name, None)

    def eval_split(self, preferred: str | None = None) -> str:
        """The split to report on: the one asked for, else test, else validation."""
        if preferred:
            return preferred
        for name in ("test", self.task.validation.split):
            if name in self.splits:
                return name
        raise TunelabError(f"{self.task.source}: no test or validation split to evaluate on")
