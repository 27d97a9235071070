"""openai-harmony's gpt-oss encoding (loaded lazily, once per process) and the special tokens it uses."""

from __future__ import annotations

import os
import re
from typing import Any

from swft_lite.data.options import DataError


# Harmony's special tokens (o200k_harmony); checked against the encoding when it loads.
START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = 200006, 200007, 200008, 200005, 200003, 200002, 200012
ASSISTANT_TOKEN = 173781  # "assistant"
TERMINATORS = (END, RETURN, CALL)
FIRST_SPECIAL = 199998
SPECIAL_STRINGS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
                   "<|endoftext|>", "<|startoftext|>")
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_STRINGS))


# --- harmony (loaded lazily, once per process: the encoding does not pickle for datasets.map) ------------------------

_ENC: dict[int, Any] = {}


def _encoding():
    pid = os.getpid()
    enc = _ENC.get(pid)
    if enc is None:
        try:
            from openai_harmony import HarmonyEncodingName, load_harmony_encoding

            enc = load_harmony_encoding(HarmonyEncodingName.HARMONY_GPT_OSS)
        except Exception as exc:  # noqa: BLE001 - the vocabulary download is the usual cause
            raise DataError(
                f"could not load openai-harmony's gpt-oss encoding ({type(exc).__name__}: {exc}). Offline, point "
                "TIKTOKEN_ENCODINGS_BASE at a folder holding o200k_base.tiktoken") from exc
        special = {"<|start|>": START, "<|end|>": END, "<|message|>": MESSAGE, "<|channel|>": CHANNEL,
                   "<|constrain|>": CONSTRAIN, "<|return|>": RETURN, "<|call|>": CALL}
        for text, tid in special.items():
            assert enc.encode(text, allowed_special="all") == [tid], text
        assert enc.encode("assistant") == [ASSISTANT_TOKEN]
        _ENC.clear()
        _ENC[pid] = enc
    return enc


def _harmony_version() -> str:
    from importlib.metadata import version

    try:
        return version("openai-harmony")
    except Exception:  # noqa: BLE001
        return "unknown"
