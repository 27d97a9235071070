"""Shared test fixtures: where ../shared is, the offline harmony vocabulary, and tiny random gpt-oss models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("SWFT_SHARED", REPO.parent / "shared")).resolve()
SHARED_MODEL = SHARED / "models" / "gpt-oss-20b"
TIKTOKEN_DIR = SHARED / "tiktoken"

# openai-harmony fetches its vocabulary from the internet unless told where a copy lies.
if TIKTOKEN_DIR.is_dir():
    os.environ.setdefault("TIKTOKEN_ENCODINGS_BASE", str(TIKTOKEN_DIR))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# A 2-layer gpt-oss, width 64, 4 experts (top 2), the real 201,088-token vocabulary: ~26 M parameters, trains on CPU.
TINY_SIZE = dict(num_layers=2, hidden_size=64, num_experts=4, experts_per_token=2, num_heads=4, num_kv_heads=2,
                 head_dim=16)


def _need_shared():
    if not (SHARED_MODEL / "config.json").exists() or not (TIKTOKEN_DIR / "o200k_base.tiktoken").exists():
        pytest.skip(f"needs the project's shared folder at {SHARED} (models/gpt-oss-20b and tiktoken); "
                    "set SWFT_SHARED to point elsewhere")


@pytest.fixture(scope="session")
def shared_model_dir() -> Path:
    _need_shared()
    return SHARED_MODEL


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shared_model_dir) -> Path:
    """A saved tiny random gpt-oss with the shared tokenizer, like a local hub download. Read-only by convention."""
    from swft_lite.random_model import save_random_gpt_oss

    return save_random_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss"), shared_model_dir, seed=0, **TINY_SIZE)


@pytest.fixture(scope="session")
def tokenizer(shared_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_model_dir)
