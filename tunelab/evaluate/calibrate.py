"""Contextual calibration (Zhao et al., ICML 2021, "Calibrate Before Use").

A prompted model leans toward some labels whatever the input: the label words' prior, the
template, the demonstrations. The lean is measured on content-free inputs ("N/A", "", "[MASK]"
put in every input field, rendered through the task's own template and demonstrations): their
label probabilities, averaged and renormalised over the labels, are p_cf. Each row is then
scored by log p(y|x) - log p_cf(y), renormalised over the labels (the paper's W = diag(p_cf)^-1,
b = 0): a label the model favours on every input loses exactly that favour.

`measure` computes p_cf (one forward pass per content-free input), `apply` corrects scores, and
`resolve` decides, for eval, predict and serve alike, which p_cf applies: the one an artifact
stored when it was trained (measured on its final weights), else one measured now."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from tunelab.errors import TunelabError
from tunelab.tasks.encode import Example, encode
from tunelab.tasks.readers import Record

METHOD = "content-free"


@dataclass
class Calibration:
    labels: list[str]
    p_cf: list[float]  # per label, summing to 1
    inputs: list[str]  # the content-free strings it was measured on
    demonstrations: int  # the prompts' demonstrations per class (k) when it was measured

    def to_dict(self) -> dict:
        """As kept in an artifact's tunelab.json (and eval's metrics)."""
        return {
            "method": METHOD,
            "inputs": list(self.inputs),
            "demonstrations": self.demonstrations,
            "p_cf": dict(zip(self.labels, self.p_cf)),
        }

    @classmethod
    def from_dict(cls, d, source: str) -> Calibration:
        """From tunelab.json's `calibration`; a hand-edited one that cannot work is refused."""
        p = d.get("p_cf") if isinstance(d, dict) else None
        ok = (
            isinstance(p, dict)
            and p
            and all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in p.values())
            and isinstance(d.get("inputs"), list)
            and isinstance(d.get("demonstrations"), int)
        )
        if not ok:
            raise TunelabError(
                f"{source}: calibration: expected {{method, inputs, demonstrations, p_cf: "
                f"{{label: probability > 0}}}}, got {d!r:.200}"
            )
        return cls(list(p), [float(v) for v in p.values()], d["inputs"], d["demonstrations"])

    def fits(self, task) -> bool:
        """Whether it was measured on the prompts this task builds now."""
        return (
            self.labels == task.labels
            and self.inputs == task.content_free
            and self.demonstrations == task.demonstrations.k
        )

    def describe(self) -> str:
        probs = ", ".join(f"{lab} {p:.3f}" for lab, p in zip(self.labels, self.p_cf))
        return f"content-free label bias ({', '.join(map(repr, self.inputs))}): {probs}"


def refuse_generation(task) -> None:
    """Calibration corrects label probabilities: a generation task has none."""
    if task.is_generation:
        raise TunelabError(
            f"--calibrate: task {task.name!r} is a generation task; calibration corrects "
            "label probabilities (classification tasks only)"
        )


def is_on(flag: bool | None, task) -> bool:
    """--calibrate / --no-calibrate where given, else the task's `calibrate:`."""
    return flag if flag is not None else task.calibrate is not None


def content_free_examples(prep) -> list[Example]:
    """The task's content-free inputs, each in every input field, encoded as a real row is
    (template, demonstrations drawn from the same pool, length limit)."""
    task = prep.task
    records = [
        Record({f: text for f in task.input_fields}, "content-free", i)
        for i, text in enumerate(task.content_free, start=1)
    ]
    return encode(task, records, prep.tokenizer, prep.demos, prep.max_length)


@torch.no_grad()
def measure(
    tuned, prep, batch_size: int = 32, padding_side: str = "left", bf16: bool = False
) -> Calibration:
    """p_cf of `tuned` on the task's content-free inputs (one forward pass each)."""
    from tunelab.lm.predict import predict_logprobs

    task = prep.task
    logp = predict_logprobs(
        tuned,
        content_free_examples(prep),
        prep.verbalizer,
        prep.tokenizer.pad_token_id,
        batch_size,
        padding_side,
        bf16,
    ).double()  # (I, C), each row normalised over the labels
    # the mean probability over the inputs, in log space (a strongly biased model's smallest
    # probabilities underflow float32), renormalised
    log_p = torch.log_softmax(logp.logsumexp(0), -1)
    return Calibration(
        labels=list(prep.verbalizer.labels),
        p_cf=log_p.exp().tolist(),
        inputs=list(task.content_free),
        demonstrations=task.demonstrations.k,
    )


def apply(logp: torch.Tensor, cal: Calibration) -> torch.Tensor:
    """(N, C) label log-probabilities, corrected: log_softmax(log p(y|x) - log p_cf(y))."""
    log_pcf = torch.tensor(cal.p_cf, dtype=torch.float64).clamp_min(1e-300).log()
    return torch.log_softmax(logp.double() - log_pcf, -1).to(logp.dtype)


def resolve(tuned, prep, meta: dict, on: bool, source: str = "tunelab.json", **evaluate):
    """The calibration to apply (None when off): the artifact's own (`meta["calibration"]`)
    where it was measured on the prompts the task builds now, else measured now.
    `evaluate`: batch_size, padding_side, bf16."""
    if not on:
        return None
    task = prep.task
    refuse_generation(task)
    stored = (meta or {}).get("calibration")
    if stored is not None:
        cal = Calibration.from_dict(stored, source)
        if cal.fits(task):
            return cal
    return measure(tuned, prep, **evaluate)
