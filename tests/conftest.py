"""Shared test fixtures: the o200k vocabulary, gpt-oss-20b's files (tokenizer built from that vocabulary) and tiny
random gpt-oss models. Nothing outside the repository is needed beyond the vocabulary (see swft_lite/tokenizer.py
for where it is looked for); without one, the tests that need it skip and say why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swft_lite import tokenizer as _tok

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# openai-harmony fetches its vocabulary from the internet unless told where a copy lies: point it at one found
# without the network now (TIKTOKEN_ENCODINGS_BASE, ../shared/tiktoken, the cache); o200k_vocab may download one.
try:
    _VOCAB: Path | None = _tok.use_vocab(download=False)
    _VOCAB_PROBLEM = ""
except _tok.VocabularyNotFound as exc:
    _VOCAB, _VOCAB_PROBLEM = None, str(exc)

# A 2-layer gpt-oss, width 64, 4 experts (top 2), the real 201,088-token vocabulary: ~26 M parameters, trains on CPU.
TINY_SIZE = dict(num_layers=2, hidden_size=64, num_experts=4, experts_per_token=2, num_heads=4, num_kv_heads=2,
                 head_dim=16)


@pytest.fixture(scope="session")
def o200k_vocab() -> Path:
    """o200k_base.tiktoken, with TIKTOKEN_ENCODINGS_BASE pointing at its folder; downloaded once when online."""
    global _VOCAB, _VOCAB_PROBLEM
    if _VOCAB is None and _VOCAB_PROBLEM and not _VOCAB_PROBLEM.startswith("!"):
        try:
            _VOCAB = _tok.use_vocab(download=True)
        except _tok.VocabularyNotFound as exc:
            _VOCAB_PROBLEM = f"!{exc}"  # "!": the download was tried (once per session)
    if _VOCAB is None:
        pytest.skip(f"needs the o200k vocabulary: {_VOCAB_PROBLEM.lstrip('!')}")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_VOCAB.parent)
    return _VOCAB


@pytest.fixture(scope="session")
def gpt_oss_files(o200k_vocab) -> Path:
    """gpt-oss-20b's config.json, tokenizer files and chat template (no weights), the tokenizer built from the
    vocabulary and cached under ~/.cache/swft-lite/tokenizer. Read-only by convention."""
    return _tok.gpt_oss_files(o200k_vocab)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt_oss_files) -> Path:
    """A saved tiny random gpt-oss with the gpt-oss tokenizer, like a local hub download. Read-only by convention."""
    from swft_lite.random_model import save_random_gpt_oss

    return save_random_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss"), gpt_oss_files, seed=0, **TINY_SIZE)


@pytest.fixture(scope="session")
def tokenizer(gpt_oss_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt_oss_files)


@pytest.fixture(scope="session")
def shared_model_dir(gpt_oss_files) -> Path:
    """The old name of gpt_oss_files (the files no longer come from ../shared)."""
    return gpt_oss_files
