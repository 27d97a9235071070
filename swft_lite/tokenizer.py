"""gpt-oss's Hugging Face tokenizer, built from the o200k vocabulary instead of downloaded.

No weights or tokenizer can be fetched from the hub where swft-lite is tested, and a fresh clone of the repository
must still run every test. The repository therefore ships only the small files (gpt-oss-20b's config.json and its
harmony chat template, in swft_lite/assets/gpt-oss-20b); the tokenizer is built here from OpenAI's
o200k_base.tiktoken (the base of gpt-oss's o200k_harmony encoding) with transformers' TikTokenConverter: the
o200k split pattern plus the harmony special tokens at 199998-201087. The result is byte-identical to the
tokenizer.json of openai/gpt-oss-20b as rebuilt offline, and its token ids are openai-harmony's.

Where the vocabulary comes from, first found wins:
  1. $TIKTOKEN_ENCODINGS_BASE (the folder openai-harmony itself reads offline), when set;
  2. ../shared/tiktoken beside a source checkout of the repository (the developers' shared folder);
  3. a copy downloaded earlier into the cache (~/.cache/swft-lite/tiktoken);
  4. the download openai-harmony and tiktoken make (openaipublic.blob.core.windows.net), when online.
Every copy is checked against the sha256 tiktoken checks. Building takes a few seconds; the result is cached under
~/.cache/swft-lite/tokenizer/<vocabulary hash>, so later calls cost nothing.
"""

from __future__ import annotations

from swft_lite.errors import SwftError

import base64
import hashlib
import json
import os
import shutil
import tempfile
import urllib.request
from pathlib import Path

VOCAB_FILE = "o200k_base.tiktoken"
VOCAB_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"
VOCAB_URL = "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken"

ASSETS = Path(__file__).resolve().parent / "assets" / "gpt-oss-20b"
REPO = Path(__file__).resolve().parent.parent
SHARED_VOCAB_DIR = REPO.parent / "shared" / "tiktoken"

# o200k's pre-tokenizer split (tiktoken's o200k_base pat_str), as gpt-oss's tokenizer.json writes it.
O200K_PATTERN = "|".join([
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n/]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# o200k_harmony's special tokens; every other id in 199998-201087 is <|reserved_ID|>.
FIRST_SPECIAL, VOCAB_SIZE = 199998, 201088
NAMED_SPECIAL = {
    199998: "<|startoftext|>", 199999: "<|endoftext|>", 200002: "<|return|>", 200003: "<|constrain|>",
    200005: "<|channel|>", 200006: "<|start|>", 200007: "<|end|>", 200008: "<|message|>", 200012: "<|call|>",
    200018: "<|endofprompt|>",
}
BOS, EOS, PAD = "<|startoftext|>", "<|return|>", "<|endoftext|>"
MODEL_MAX_LENGTH = 131072

# Bump when the files written below change, so older cached builds are not reused.
BUILD_VERSION = 1
MODEL_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
               "chat_template.jinja")


class VocabularyNotFound(SwftError, RuntimeError):
    """No o200k vocabulary here, in the shared folder or the cache, and none could be downloaded."""


def special_tokens() -> list[str]:
    """The 1,090 special tokens, in id order from 199998."""
    return [NAMED_SPECIAL.get(i, f"<|reserved_{i}|>") for i in range(FIRST_SPECIAL, VOCAB_SIZE)]


def cache_root() -> Path:
    env = os.environ.get("SWFT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "swft-lite"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _checked(path: Path, where: str) -> Path:
    digest = _sha256(path)
    if digest != VOCAB_SHA256:
        raise VocabularyNotFound(f"{path} ({where}) is not o200k_base: sha256 {digest}, expected {VOCAB_SHA256}")
    return path


def _download(dest: Path, timeout: float) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(VOCAB_URL, timeout=timeout) as r:  # noqa: S310 - a fixed https URL
            data = r.read()
    except Exception as exc:  # noqa: BLE001 - offline is the usual cause
        raise VocabularyNotFound(f"could not download {VOCAB_URL} ({type(exc).__name__}: {exc})") from exc
    if hashlib.sha256(data).hexdigest() != VOCAB_SHA256:
        raise VocabularyNotFound(f"{VOCAB_URL} did not match sha256 {VOCAB_SHA256}")
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, dest)
    return dest


def find_vocab(download: bool = True, timeout: float = 30.0) -> Path:
    """The path of o200k_base.tiktoken (see the module docstring for the order). Raises VocabularyNotFound."""
    env = os.environ.get("TIKTOKEN_ENCODINGS_BASE")
    if env:
        path = Path(env).expanduser() / VOCAB_FILE
        if not path.is_file():
            raise VocabularyNotFound(f"TIKTOKEN_ENCODINGS_BASE={env} holds no {VOCAB_FILE}")
        return _checked(path, "TIKTOKEN_ENCODINGS_BASE")
    shared = SHARED_VOCAB_DIR / VOCAB_FILE
    if (REPO / "pyproject.toml").is_file() and shared.is_file():
        return _checked(shared, "the shared folder")
    cached = cache_root() / "tiktoken" / VOCAB_FILE
    if cached.is_file() and _sha256(cached) == VOCAB_SHA256:
        return cached
    if not download:
        raise VocabularyNotFound(f"no {VOCAB_FILE}: TIKTOKEN_ENCODINGS_BASE is not set, there is no {shared} and no "
                                 f"{cached}")
    try:
        return _download(cached, timeout)
    except VocabularyNotFound as exc:
        raise VocabularyNotFound(f"none found (TIKTOKEN_ENCODINGS_BASE is unset, nothing in {cached.parent}) and "
                                 f"{exc}; offline, set TIKTOKEN_ENCODINGS_BASE to a folder holding {VOCAB_FILE}"
                                 ) from exc


def use_vocab(download: bool = True) -> Path:
    """find_vocab, then point TIKTOKEN_ENCODINGS_BASE at its folder so openai-harmony loads it offline too."""
    path = find_vocab(download=download)
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(path.parent)
    return path


def _read_bpe(path: Path) -> dict[bytes, int]:
    """tiktoken's file format (base64 token, rank per line), read without needing tiktoken installed."""
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def build_tokenizer(vocab: str | Path):
    """A `tokenizers.Tokenizer` equal to gpt-oss's tokenizer.json, from the o200k vocabulary (~3 s)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    class _Converter(TikTokenConverter):
        @staticmethod
        def load_tiktoken_bpe(tiktoken_url: str) -> dict[bytes, int]:
            return _read_bpe(Path(tiktoken_url))

    return _Converter(str(vocab), pattern=O200K_PATTERN, extra_special_tokens=special_tokens()).converted()


def _tokenizer_config(chat_template: str) -> dict:
    entry = dict(lstrip=False, normalized=False, rstrip=False, single_word=False, special=True)
    return {
        "backend": "tokenizers",
        "bos_token": BOS,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS,
        "model_max_length": MODEL_MAX_LENGTH,
        "pad_token": PAD,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": chat_template,
        "added_tokens_decoder": {str(FIRST_SPECIAL + i): {"content": t, **entry}
                                 for i, t in enumerate(special_tokens())},
        "model_input_names": ["input_ids", "attention_mask"],
    }


def write_model_files(out_dir: str | Path, vocab: str | Path) -> Path:
    """config.json, tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_tokenizer(vocab).save(str(out / "tokenizer.json"))
    template = (ASSETS / "chat_template.jinja").read_text()
    shutil.copyfile(ASSETS / "config.json", out / "config.json")
    shutil.copyfile(ASSETS / "chat_template.jinja", out / "chat_template.jinja")
    (out / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(template), indent=2, ensure_ascii=False))
    (out / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}, indent=2))
    return out


def _cache_key(vocab: Path) -> str:
    h = hashlib.sha256()
    h.update(_sha256(vocab).encode())
    for name in ("config.json", "chat_template.jinja"):
        h.update((ASSETS / name).read_bytes())
    h.update(str(BUILD_VERSION).encode())
    return h.hexdigest()[:16]


def gpt_oss_files(vocab: str | Path | None = None, cache_dir: str | Path | None = None,
                  download: bool = True) -> Path:
    """A folder holding gpt-oss-20b's config.json, tokenizer files and chat template (no weights), like a hub
    download without the safetensors. Built once per vocabulary and cached; later calls return the cached folder."""
    vocab = Path(vocab) if vocab is not None else find_vocab(download=download)
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizer"
    final = root / _cache_key(vocab)
    if all((final / name).is_file() for name in MODEL_FILES):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        write_model_files(tmp, vocab)
        try:
            os.replace(tmp, final)  # atomic; another process may have won the race
        except OSError:
            if not all((final / name).is_file() for name in MODEL_FILES):
                shutil.rmtree(final, ignore_errors=True)
                os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
