"""Rendering normalised rows to harmony tokens with loss masks, and the batched render step of prepare_data."""

from __future__ import annotations

import json

from swft_lite.data.harmony import END, MESSAGE, _encoding
from swft_lite.data.normalize import RowError, _segments, normalize_row
from swft_lite.data.options import DataError, DataOptions, Problem


RENDER_VERSION = 2  # bump whenever rendering, masking or the report changes: it is part of the cache key
STATUS_KEPT, STATUS_TRUNCATED, STATUS_DROPPED, STATUS_TRUNC_EMPTY, STATUS_EMPTY = 0, 1, 2, 3, 4


# --- rendering and masks --------------------------------------------------------------------------------------------


def _harmony_messages(conv: dict, options: DataOptions) -> list:
    from openai_harmony import (Author, DeveloperContent, Message, ReasoningEffort, Role, SystemContent,
                                ToolDescription)

    effort = {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}[conv["e"]]
    sc = SystemContent.new().with_reasoning_effort(effort).with_conversation_start_date(options.date)
    if options.model_identity:
        sc = sc.with_model_identity(options.model_identity)
    msgs = [Message.from_role_and_content(Role.SYSTEM, sc)]
    if conv["d"] or conv["t"]:
        dc = DeveloperContent.new()
        if conv["d"]:
            dc = dc.with_instructions(conv["d"])
        if conv["t"]:
            dc = dc.with_function_tools([ToolDescription.new(t["name"], t["description"], parameters=t["parameters"])
                                         for t in conv["t"]])
        msgs.append(Message.from_role_and_content(Role.DEVELOPER, dc))
    for role, name, channel, recipient, ctype, content in conv["m"]:
        m = Message.from_author_and_content(Author.new(Role(role), name), content)
        if channel:
            m = m.with_channel(channel)
        if recipient:
            m = m.with_recipient(recipient)
        if ctype:
            m = m.with_content_type(ctype)
        msgs.append(m)
    return msgs


def _render_tokens(conv: dict, options: DataOptions) -> tuple[list[int], list[list]]:
    """Token ids and, per harmony message, [role, channel]."""
    enc = _encoding()
    if "x" in conv:
        toks = conv.get("_toks") or enc.encode(conv["x"], allowed_special="all")
        return toks, conv["s"]
    from openai_harmony import Conversation, RenderConversationConfig

    msgs = _harmony_messages(conv, options)
    toks = enc.render_conversation_for_training(Conversation.from_messages(msgs),
                                                RenderConversationConfig(auto_drop_analysis=False))
    meta = [["system", None]] + ([["developer", None]] if len(msgs) > len(conv["m"]) + 1 else [])
    meta += [[m[0], m[2]] for m in conv["m"]]
    return toks, meta


def _labels(toks: list[int], meta: list[list], mask: str) -> list[int]:
    if mask == "all":
        return list(toks)
    labels = [-100] * len(toks)
    segs = _segments(toks)
    if len(segs) != len(meta):
        raise AssertionError(f"rendered {len(segs)} messages for {len(meta)}")
    prev_assistant = False
    for (s, e), (role, channel) in zip(segs, meta):
        is_assistant = role == "assistant"
        if is_assistant and (mask == "assistant" or channel == "final"):
            if channel == "final" and toks[e - 1] == END:
                # An earlier turn's answer as the template rewrites history: train its text only.
                a = s + toks[s:e].index(MESSAGE) + 1
                b = e - 1
            else:
                # Everything the model writes: after the prompt's "<|start|>assistant", or all of it when the model
                # continues its own turn (analysis -> final, analysis -> tool call).
                a = s if prev_assistant else s + 2
                b = e
            labels[a:b] = toks[a:b]
        prev_assistant = is_assistant
    return labels


def render_conversation(row: dict, options: DataOptions | None = None, fmt: str | None = None
                        ) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one row in any supported format, untruncated; DataError if the row is invalid."""
    options = options or DataOptions()
    try:
        _, conv = normalize_row(row, options, fmt or options.format)
    except RowError as exc:
        raise DataError("invalid row", [Problem("row", None, p) for p in exc.problems]) from None
    toks, meta = _render_tokens(conv, options)
    return list(toks), _labels(toks, meta, options.mask)


def _apply_length(ids: list[int], labels: list[int], options: DataOptions) -> tuple[list[int], list[int], int]:
    n = len(ids)
    if n <= options.max_seq_length:
        return ids, labels, STATUS_KEPT
    if options.overlong == "drop":
        return [], [], STATUS_DROPPED
    ids, labels = ids[:options.max_seq_length], labels[:options.max_seq_length]
    if all(x == -100 for x in labels):
        return [], [], STATUS_TRUNC_EMPTY
    return ids, labels, STATUS_TRUNCATED


def _render_batch(batch: dict, options: dict) -> dict:
    """datasets.map function: normalized rows -> input_ids, labels and bookkeeping (module level: it pickles)."""
    opts = DataOptions(**options)
    out: dict[str, list] = {"input_ids": [], "labels": [], "n_tokens": [], "n_kept": [], "n_trained": [],
                            "status": [], "src": [], "line": []}
    for conv_json, src, line in zip(batch["conv"], batch["src"], batch["line"]):
        toks, meta = _render_tokens(json.loads(conv_json), opts)
        labels = _labels(toks, meta, opts.mask)
        n_trained = sum(1 for x in labels if x != -100)
        if n_trained == 0:
            ids, labels, status = [], [], STATUS_EMPTY
        else:
            ids, labels, status = _apply_length(toks, labels, opts)
        out["input_ids"].append(ids)
        out["labels"].append(labels)
        out["n_tokens"].append(len(toks))
        out["n_kept"].append(len(ids))
        out["n_trained"].append(sum(1 for x in labels if x != -100))
        out["status"].append(status)
        out["src"].append(src)
        out["line"].append(line)
    return out
