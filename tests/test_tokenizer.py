"""swft_lite.tokenizer: gpt-oss's HF tokenizer built from the o200k vocabulary gives openai-harmony's token ids,
knows the harmony special tokens, is cached per vocabulary, and the vocabulary is looked for where it should be."""

from __future__ import annotations

import json

import pytest

from swft_lite import tokenizer as T

MIXED = ("Hello, world! It's 2025-06-28 and we're testing   spaces\n\n\ttabs, CamelCase, snake_case, URLs like "
         "https://example.com/a?b=1, numbers 1234567 3.14159, emoji 🙂🚀, accents café naïve, 日本語のテキスト, "
         "русский текст, العربية, code `def f(x): return x**2` and symbols <>&|~^ '' \"\" ...")


@pytest.fixture(scope="module")
def hf(gpt_oss_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt_oss_files)


@pytest.fixture(scope="module")
def harmony(o200k_vocab):
    from openai_harmony import HarmonyEncodingName, load_harmony_encoding

    return load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)


def test_files_are_complete(gpt_oss_files):
    for name in T.MODEL_FILES:
        assert (gpt_oss_files / name).is_file(), name
    cfg = json.loads((gpt_oss_files / "config.json").read_text())
    assert cfg["vocab_size"] == T.VOCAB_SIZE and cfg["model_type"] == "gpt_oss"
    tc = json.loads((gpt_oss_files / "tokenizer_config.json").read_text())
    assert tc["chat_template"] == (gpt_oss_files / "chat_template.jinja").read_text()


def test_ids_equal_harmony_on_mixed_text(hf, harmony):
    assert hf.encode(MIXED, add_special_tokens=False) == harmony.encode(MIXED)
    assert hf.decode(harmony.encode(MIXED)) == MIXED


def test_special_tokens(hf, harmony):
    assert len(hf) == T.VOCAB_SIZE
    for tid, text in T.NAMED_SPECIAL.items():
        assert hf.convert_tokens_to_ids(text) == tid, text
    # every special id has harmony's name, except 200018: openai/gpt-oss-20b's tokenizer calls it <|endofprompt|>
    # (as this one does), harmony <|reserved_200018|>
    names = hf.convert_ids_to_tokens(list(range(T.FIRST_SPECIAL, T.VOCAB_SIZE)))
    differ = [i for i, name in zip(range(T.FIRST_SPECIAL, T.VOCAB_SIZE), names) if harmony.decode([i]) != name]
    assert differ == [200018]
    for tid, text in T.NAMED_SPECIAL.items():
        if tid != 200018:
            assert harmony.encode(text, allowed_special="all") == [tid], text
    assert hf.convert_ids_to_tokens(200001) == "<|reserved_200001|>"
    assert hf.convert_ids_to_tokens(T.VOCAB_SIZE - 1) == f"<|reserved_{T.VOCAB_SIZE - 1}|>"
    assert (hf.bos_token, hf.eos_token, hf.pad_token) == (T.BOS, T.EOS, T.PAD)
    text = f"<|start|>user<|message|>{MIXED}<|end|><|start|>assistant<|channel|>final<|message|>ok<|return|>"
    assert hf.encode(text, add_special_tokens=False) == harmony.encode(text, allowed_special="all")


def test_ids_equal_harmony_renderer_on_a_conversation(hf, harmony, gpt_oss_files):
    from openai_harmony import (Conversation, DeveloperContent, Message, ReasoningEffort, Role, SystemContent)

    system = SystemContent.new().with_reasoning_effort(ReasoningEffort.LOW).with_conversation_start_date("2025-06-28")
    convo = Conversation.from_messages([
        Message.from_role_and_content(Role.SYSTEM, system),
        Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions("Answer briefly.")),
        Message.from_role_and_content(Role.USER, MIXED),
        Message.from_role_and_content(Role.ASSISTANT, "Let me think: 2+2=4.").with_channel("analysis"),
        Message.from_role_and_content(Role.ASSISTANT, "Four. 🙂 Ça va?").with_channel("final"),
    ])
    ids = harmony.render_conversation_for_training(convo)
    text = harmony.decode(ids)
    assert hf.encode(text, add_special_tokens=False) == ids
    # and the chat template shipped beside it renders that same text
    msgs = [{"role": "developer", "content": "Answer briefly."}, {"role": "user", "content": MIXED},
            {"role": "assistant", "thinking": "Let me think: 2+2=4.", "content": "Four. 🙂 Ça va?"}]
    rendered = hf.apply_chat_template(msgs, tokenize=False, reasoning_effort="low")
    assert "<|start|>user<|message|>" + MIXED + "<|end|>" in rendered
    assert rendered.rstrip().endswith("<|channel|>final<|message|>Four. 🙂 Ça va?<|return|>")


# sha256 of the content (sort_keys JSON of everything but version/truncation/padding) of the reference
# tokenizer.json in the developers' shared folder (models/gpt-oss-20b), whose ids were checked against harmony on
# 1.4 M tokens. Content, not bytes, so a tokenizers release that writes its JSON differently does not matter.
REFERENCE_CONTENT_SHA256 = "316aa8a758555710c9e0a84534e1ddc5220298abd0f1e0b34a3f0ef467ce6957"


def test_build_equals_the_reference_tokenizer(gpt_oss_files):
    import hashlib

    data = json.loads((gpt_oss_files / "tokenizer.json").read_text())
    keys = ("added_tokens", "normalizer", "pre_tokenizer", "post_processor", "decoder", "model")
    content = json.dumps({k: data[k] for k in keys}, sort_keys=True).encode()
    assert hashlib.sha256(content).hexdigest() == REFERENCE_CONTENT_SHA256


def test_ids_equal_harmony_on_random_token_text(hf, harmony):
    """Text decoded from random ordinary token ids (any script, any bytes that decode), re-encoded both ways."""
    import random

    g = random.Random(0)
    for _ in range(40):
        text = harmony.decode([g.randrange(T.FIRST_SPECIAL) for _ in range(500)])  # bad UTF-8 becomes U+FFFD
        assert hf.encode(text, add_special_tokens=False) == harmony.encode(text)


def test_cache_is_reused(o200k_vocab, gpt_oss_files, tmp_path, monkeypatch):
    # the fixture's folder is the cached one: asking again builds nothing
    monkeypatch.setattr(T, "write_model_files", lambda *a, **k: pytest.fail("rebuilt a cached tokenizer"))
    assert T.gpt_oss_files(o200k_vocab) == gpt_oss_files
    # a fresh cache builds once, then reuses
    monkeypatch.undo()
    calls = []
    real = T.write_model_files
    monkeypatch.setattr(T, "write_model_files", lambda out, vocab: calls.append(out) or real(out, vocab))
    first = T.gpt_oss_files(o200k_vocab, cache_dir=tmp_path)
    second = T.gpt_oss_files(o200k_vocab, cache_dir=tmp_path)
    assert first == second and len(calls) == 1 and first.parent == tmp_path
    assert (first / "tokenizer.json").read_bytes() == (gpt_oss_files / "tokenizer.json").read_bytes()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no build folder left behind


def test_vocab_lookup_order(o200k_vocab, tmp_path, monkeypatch):
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(o200k_vocab.parent))
    assert T.find_vocab(download=False) == o200k_vocab
    # set but empty: an error that names the variable, never a silent fallback
    monkeypatch.setenv("TIKTOKEN_ENCODINGS_BASE", str(tmp_path))
    with pytest.raises(T.VocabularyNotFound, match="TIKTOKEN_ENCODINGS_BASE"):
        T.find_vocab(download=False)
    # a wrong file is refused by its hash
    (tmp_path / T.VOCAB_FILE).write_bytes(b"AA== 0\n")
    with pytest.raises(T.VocabularyNotFound, match="sha256"):
        T.find_vocab(download=False)
    # unset, no shared folder: the cache, else the download
    monkeypatch.delenv("TIKTOKEN_ENCODINGS_BASE")
    monkeypatch.setattr(T, "SHARED_VOCAB_DIR", tmp_path / "no-shared")
    monkeypatch.setenv("SWFT_CACHE", str(tmp_path / "cache"))
    with pytest.raises(T.VocabularyNotFound, match="TIKTOKEN_ENCODINGS_BASE"):
        T.find_vocab(download=False)
    cached = tmp_path / "cache" / "tiktoken" / T.VOCAB_FILE

    def fake_download(dest, timeout):
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(o200k_vocab.read_bytes())
        return dest

    monkeypatch.setattr(T, "_download", fake_download)
    assert T.find_vocab() == cached
    monkeypatch.setattr(T, "_download", lambda dest, timeout: pytest.fail("downloaded twice"))
    assert T.find_vocab(download=False) == cached
    # offline with nothing anywhere: the message says what to do
    cached.unlink()

    def offline(dest, timeout):
        raise T.VocabularyNotFound("could not download (URLError: offline)")

    monkeypatch.setattr(T, "_download", offline)
    with pytest.raises(T.VocabularyNotFound, match="set TIKTOKEN_ENCODINGS_BASE"):
        T.find_vocab()
