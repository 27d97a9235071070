"""Every row format becomes harmony messages (or a problem list), and the one loop over a source's rows
(`RowScan`) that both `data check` and `prepare_data` run."""

from __future__ import annotations

import json
from typing import Any

from swft_lite.data.harmony import (_SPECIAL_RE, CALL, END, FIRST_SPECIAL, MESSAGE, RETURN, START, TERMINATORS,
                                    _encoding)
from swft_lite.data.options import EFFORTS, DataOptions
from swft_lite.data.sources import _Bad, _iter_records


ROLES = ("system", "developer", "user", "assistant", "tool")
WARNINGS_KEY = "_warnings"
CHANNELS = ("analysis", "commentary", "final")


# --- row normalisation: every format becomes harmony messages -------------------------------------------------------


class RowError(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def detect_format(row: Any) -> str | None:
    if not isinstance(row, dict):
        return None
    keys = {k for k, v in row.items() if v is not None}
    if "messages" in keys:
        return "chat"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def _describe_keys(row: Any) -> str:
    if not isinstance(row, dict):
        return f"a JSON {type(row).__name__}" if not isinstance(row, (str, int, float)) else \
            f"a JSON {type(row).__name__} ({str(row)[:30]!r})"
    keys = sorted(k for k, v in row.items() if v is not None)
    return "keys " + (", ".join(keys[:10]) or "(none)")


def _text(value: Any, what: str, problems: list[str], *, allow_empty: bool = False) -> str | None:
    """A string field: str, or OpenAI-style [{"type": "text", "text": ...}] parts."""
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                problems.append(f"{what}: only text content parts are supported, got {p.get('type')!r}")
                return None
            parts.append(p["text"])
        value = "".join(parts)
    if not isinstance(value, str):
        problems.append(f"{what} must be a string, got {type(value).__name__}")
        return None
    if not allow_empty and not value.strip():
        problems.append(f"{what} is empty")
        return None
    m = _SPECIAL_RE.search(value)
    if m:
        problems.append(f"{what} contains the harmony special token {m.group(0)!r}; give plain text (reasoning in "
                        "'thinking', the answer in 'content') and let the renderer add the tokens")
        return None
    return value


def _optional_text(row: dict, key: str, what: str, problems: list[str]) -> str | None:
    v = row.get(key)
    if v is None or (isinstance(v, str) and not v.strip()):
        return None
    return _text(v, what, problems)


def _effort(row: dict, options: DataOptions, problems: list[str]) -> str:
    v = row.get("reasoning_effort")
    if v is None or v == "":
        return options.reasoning_effort
    if not isinstance(v, str) or v.lower() not in EFFORTS:
        problems.append(f"reasoning_effort must be one of {', '.join(EFFORTS)}, got {v!r}")
        return options.reasoning_effort
    return v.lower()


def _tools(row: dict, problems: list[str]) -> list | None:
    v = row.get("tools")
    if v is None or v == []:
        return None
    if not isinstance(v, list):
        problems.append(f"tools must be a list of function definitions, got {type(v).__name__}")
        return None
    out = []
    for i, t in enumerate(v, 1):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            problems.append(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{\"name\", \"description\", "
                            "\"parameters\"}}}")
            continue
        params = fn.get("parameters")
        if isinstance(params, str):
            try:
                params = json.loads(params)
            except ValueError:
                problems.append(f"tools[{i}].parameters is a string but not JSON")
                continue
        out.append({"name": fn["name"], "description": fn.get("description") or "", "parameters": params})
    return out or None


def _tool_call(msg: dict, where: str, problems: list[str]) -> tuple[str, str, str] | None:
    calls = msg.get("tool_calls")
    if not isinstance(calls, list) or not calls:
        problems.append(f"{where}: tool_calls must be a non-empty list")
        return None
    if len(calls) > 1:
        problems.append(f"{where}: {len(calls)} tool calls in one message; gpt-oss makes one call per message "
                        "(split them into consecutive assistant messages, each followed by its tool result)")
        return None
    call = calls[0]
    if isinstance(call, dict) and isinstance(call.get("function"), dict):
        call = call["function"]
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        problems.append(f"{where}: a tool call needs a function name: {{\"function\": {{\"name\", \"arguments\"}}}}")
        return None
    args = call.get("arguments", {})
    if not isinstance(args, str):
        args = json.dumps(args, ensure_ascii=False)  # what the template's tojson writes
    ctype = call.get("content_type") or "json"
    return call["name"], args, ctype


def _normalize_chat(messages: Any, row: dict, options: DataOptions) -> dict:
    """A chat row as the harmony messages gpt-oss's chat template renders (see the module docstring)."""
    problems: list[str] = []
    effort = _effort(row, options, problems)
    tools = _tools(row, problems)
    if not isinstance(messages, list):
        raise RowError([f"messages must be a list, got {type(messages).__name__}"] + problems)
    if not messages:
        raise RowError(["messages is empty"] + problems)
    clean: list[dict] = []
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            problems.append(f"message {i} must be an object with role and content, got {type(m).__name__}")
            continue
        m = {k: v for k, v in m.items() if v is not None}
        role = m.get("role")
        if not isinstance(role, str):
            got = type(role).__name__ if role is not None else "nothing"
            problems.append(f"message {i}: role must be a string, got {got}")
            continue
        if role not in ROLES:
            problems.append(f"message {i}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
            continue
        clean.append({**m, "_i": i})
    if problems:
        raise RowError(problems)

    # Leading system/developer messages -> developer instructions.
    dev_parts = []
    k = 0
    while k < len(clean) and clean[k]["role"] in ("system", "developer"):
        t = _text(clean[k].get("content"), f"message {clean[k]['_i']} ({clean[k]['role']}) content", problems)
        if t is not None:
            dev_parts.append(t)
        k += 1
    loop = clean[k:]
    if not loop:
        raise RowError(problems + ["no assistant turn (the conversation has only system/developer messages)"])
    if not any(m["role"] == "assistant" for m in loop):
        raise RowError(problems + ["no assistant turn: nothing to learn from"])

    out: list[list] = []  # [role, name, channel, recipient, content_type, content]
    last_tool = None
    n = len(loop)
    # Turn order: gpt-oss's template renders whatever order it is given, and an answer following an answer is
    # trained with a stray `<|start|>assistant` - so the order is checked here, where the row can be named.
    prev = None  # (kind, message number): user | answer (an assistant final) | other (thinking-only, tool call, tool)
    last_user = max((j for j, m in enumerate(loop) if m["role"] == "user"), default=-1)
    dropped_thinking = []
    for j, m in enumerate(loop):
        i, role = m["_i"], m["role"]
        where = f"message {i} ({role})"
        if j == 0 and role == "assistant":
            problems.append(f"{where}: the conversation starts with an assistant turn; the first turn after "
                            "system/developer messages must be the user's")
        if role == "user":
            if prev is not None and prev[0] == "user":
                problems.append(f"{where}: two user turns in a row (messages {prev[1]} and {i}); merge them into one "
                                "message, or put the assistant's answer between them")
            prev = ("user", i)
        elif role == "assistant":
            if prev is not None and prev[0] == "answer":
                problems.append(f"{where}: two assistant answers in a row (messages {prev[1]} and {i}); merge them "
                                "into one answer, or put the user turn between them")
            final = "tool_calls" not in m and m.get("content") not in (None, "") and not (
                isinstance(m.get("content"), str) and not m["content"].strip())
            prev = ("answer" if final else "other", i)
            if j < last_user and any(m.get(k) not in (None, "") for k in ("thinking", "reasoning_content")):
                dropped_thinking.append(i)
        else:
            prev = ("other", i)
        if role in ("system", "developer"):
            problems.append(f"{where}: a {role} message may only come before the first user turn (gpt-oss's template "
                            "would drop it); fold it into the first system message")
            continue
        for key in ("thinking", "reasoning_content", "tool_calls"):
            if key in m and role != "assistant":
                problems.append(f"{where}: '{key}' is only allowed on assistant messages")
        if role == "user":
            t = _text(m.get("content"), f"{where} content", problems)
            out.append(["user", None, None, None, None, t])
        elif role == "tool":
            if last_tool is None:
                problems.append(f"{where}: a tool result without a preceding assistant tool call")
                continue
            c = m.get("content")
            if isinstance(c, (dict, list)) and not (isinstance(c, list) and all(isinstance(p, dict) and "type" in p
                                                                               for p in c)):
                c = json.dumps(c, ensure_ascii=False)
            t = _text(c, f"{where} content", problems)
            out.append(["tool", "functions." + last_tool, "commentary", "assistant", None, t])
        else:  # assistant
            think = None
            if "thinking" in m and "reasoning_content" in m and m["thinking"] != m["reasoning_content"]:
                problems.append(f"{where}: both 'thinking' and 'reasoning_content'; give the reasoning once")
            for key in ("thinking", "reasoning_content"):
                if key in m and think is None:
                    think = _optional_text(m, key, f"{where} {key}", problems)
            content = m.get("content")
            has_content = content is not None and not (isinstance(content, str) and not content.strip())
            if "tool_calls" in m:
                call = _tool_call(m, where, problems)
                if call is None:
                    continue
                if has_content and think is not None:
                    problems.append(f"{where}: a tool-call message with both content and thinking; put its reasoning "
                                    "in one of them")
                    continue
                reasoning = _text(content, f"{where} content", problems) if has_content else think
                future_final = any(f["role"] == "assistant" and "tool_calls" not in f for f in loop[j + 1:])
                if reasoning is not None and not future_final:
                    out.append(["assistant", None, "analysis", None, None, reasoning])
                name, args, ctype = call
                if not args.strip():
                    args = "{}"
                out.append(["assistant", None, "commentary", "functions." + name, ctype, args])
                last_tool = name
                continue
            if j == n - 1:
                if think is not None:
                    out.append(["assistant", None, "analysis", None, None, think])
                t = _text(content, f"{where} content (the answer)", problems)
                out.append(["assistant", None, "final", None, None, t])
            elif think is not None and not has_content:
                out.append(["assistant", None, "analysis", None, None, think])
            else:
                t = _text(content, f"{where} content", problems)
                out.append(["assistant", None, "final", None, None, t])
            last_tool = None
    last = loop[-1]
    if last["role"] != "assistant":
        problems.append(f"the conversation ends with a {last['role']} message (message {last['_i']}); the last message "
                        "must be the assistant's, whose answer is trained to end with <|return|>")
    if problems:
        raise RowError(problems)
    conv = {"e": effort, "d": "\n\n".join(dev_parts) or None, "t": tools, "m": out}
    _check_trainable([(m[0], m[2]) for m in out], options)
    if dropped_thinking:  # popped by RowScan: a warning, not part of what is rendered
        conv[WARNINGS_KEY] = {"dropped_thinking": dropped_thinking}
    return conv


def _check_trainable(meta: list, options: DataOptions) -> None:
    """Decided from the message structure, before rendering: which messages the mask would train."""
    if options.mask == "all":
        return
    msgs = meta
    if options.mask == "final":
        if not any(m[0] == "assistant" and m[1] == "final" for m in msgs):
            raise RowError(["nothing to train: mask 'final' trains only final-channel answers and this row has none "
                            "(only reasoning / tool calls)"])
    elif not any(m[0] == "assistant" for m in msgs):
        raise RowError(["nothing to train: no assistant message"])


def _normalize_prompt_completion(row: dict, options: DataOptions) -> dict:
    p, c = row.get("prompt"), row.get("completion")
    if isinstance(p, list) or isinstance(c, list):  # TRL's conversational prompt-completion
        if not (isinstance(p, list) and isinstance(c, list)):
            raise RowError(["prompt and completion must both be strings or both be lists of messages"])
        return _normalize_chat(p + c, row, options)
    problems: list[str] = []
    system = _optional_text(row, "system", "system", problems)
    prompt = _text(p, "prompt", problems)
    completion = _text(c, "completion", problems)
    think = _optional_text(row, "thinking", "thinking", problems) or \
        _optional_text(row, "reasoning_content", "reasoning_content", problems)
    if problems:
        raise RowError(problems)
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    msgs.append({"role": "assistant", "content": completion, **({"thinking": think} if think else {})})
    return _normalize_chat(msgs, row, options)


def _normalize_alpaca(row: dict, options: DataOptions) -> dict:
    problems: list[str] = []
    system = _optional_text(row, "system", "system", problems)
    instruction = _text(row.get("instruction"), "instruction", problems)
    inp = row.get("input")
    if inp is not None and inp != "":
        inp = _text(inp, "input", problems, allow_empty=True)
    output = _text(row.get("output"), "output", problems)
    think = _optional_text(row, "thinking", "thinking", problems)
    if problems:
        raise RowError(problems)
    user = instruction if not (inp and inp.strip()) else f"{instruction}\n\n{inp}"
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    msgs.append({"role": "assistant", "content": output, **({"thinking": think} if think else {})})
    return _normalize_chat(msgs, row, options)


def _segments(tokens: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each harmony message: they begin at <|start|>."""
    starts = [i for i, t in enumerate(tokens) if t == START]
    return [(s, e) for s, e in zip(starts, starts[1:] + [len(tokens)])]


def _normalize_text(row: dict, options: DataOptions) -> dict:
    """A {"text"} row already in harmony: check its structure; it is then trained exactly as written."""
    text = row.get("text")
    if not isinstance(text, str):
        raise RowError([f"text must be a string, got {type(text).__name__}"])
    if not text.strip():
        raise RowError(["text is empty"])
    enc = _encoding()
    toks = enc.encode(text, allowed_special="all")
    problems: list[str] = []
    if toks[0] != START:
        raise RowError([f"text does not start with <|start|> (it starts {text[:40]!r}); a harmony text is a sequence "
                        "of <|start|>ROLE...<|message|>...<|end|> messages"])
    segs = _segments(toks)
    for k, (s, e) in enumerate(segs, 1):
        seg = toks[s:e]
        if seg[-1] not in TERMINATORS:
            tail = enc.decode(seg[-8:])
            inner_end = [t for t in seg[:-1] if t in TERMINATORS]
            if inner_end:
                problems.append(f"message {k}: text after its terminator outside any message (…{tail!r}); "
                                "every message must start with <|start|>")
            else:
                problems.append(f"message {k} is not terminated with <|end|>, <|return|> or <|call|> (…{tail!r})")
            continue
        if seg.count(MESSAGE) != 1:
            problems.append(f"message {k} has {seg.count(MESSAGE)} <|message|> tokens (expected exactly one)")
            continue
        body = seg[seg.index(MESSAGE) + 1:-1]
        bad = [t for t in body if t >= FIRST_SPECIAL]
        if bad:
            problems.append(f"message {k}: special token {enc.decode([bad[0]])!r} inside the message text")
        if RETURN in seg[:-1] or CALL in seg[:-1] or END in seg[:-1]:
            problems.append(f"message {k}: a terminator token inside the message")
    if problems:
        raise RowError(problems)
    try:
        from openai_harmony import Role

        msgs = enc.parse_messages_from_completion_tokens(toks, None)
    except Exception as exc:  # noqa: BLE001 - harmony raises HarmonyError with a readable message
        raise RowError([f"not well-formed harmony: {exc}"]) from None
    if len(msgs) != len(segs):
        raise RowError([f"harmony parsed {len(msgs)} messages out of {len(segs)} <|start|> tokens"])
    meta = []
    for k, (msg, (s, e)) in enumerate(zip(msgs, segs), 1):
        role = msg.author.role.value
        channel = msg.channel
        term = toks[e - 1]
        if role == Role.ASSISTANT.value:
            if channel not in CHANNELS:
                problems.append(f"message {k} (assistant) has {'no channel' if not channel else f'channel {channel!r}'}"
                                f"; gpt-oss needs one of {', '.join(CHANNELS)}")
            if term == CALL and not msg.recipient:
                problems.append(f"message {k}: <|call|> on a message without a recipient (to=functions.NAME)")
            if term == RETURN and channel != "final":
                problems.append(f"message {k}: <|return|> ends a {channel or 'channel-less'} message; only the final "
                                "answer ends with <|return|>")
        elif term in (RETURN, CALL):
            problems.append(f"message {k} ({role}) ends with {'<|return|>' if term == RETURN else '<|call|>'}, which "
                            "only ends assistant messages")
        if term == RETURN and e != len(toks):
            problems.append(f"message {k}: <|return|> before the end of the text; it ends the whole sample")
        meta.append([role, channel])
    if meta and meta[0][0] != "system":
        problems.append(f"the first message is {meta[0][0]!r}, not the system block gpt-oss always sees "
                        "(<|start|>system<|message|>...)")
    if not any(m[0] == "assistant" for m in meta):
        problems.append("no assistant message: nothing to learn from")
    elif meta[-1][0] != "assistant":
        problems.append(f"the text ends with a {meta[-1][0]} message; the last message must be the assistant's")
    elif meta[-1][1] == "final" and toks[-1] != RETURN:
        problems.append("the last answer ends with <|end|>; a training text ends with <|return|> (render it with "
                        "render_conversation_for_training), or the model never learns to stop")
    if problems:
        raise RowError(problems)
    _check_trainable(meta, options)
    return {"x": text, "s": meta, "_toks": toks}  # _toks: in-process only, never serialized


_NORMALIZERS = {"chat": lambda row, o: _normalize_chat(row.get("messages"), row, o),
                "prompt_completion": _normalize_prompt_completion,
                "alpaca": _normalize_alpaca,
                "text": _normalize_text}


def normalize_row(row: Any, options: DataOptions, fmt: str | None = None) -> tuple[str, dict]:
    """(format, normalized conversation) or RowError listing what is wrong."""
    if not isinstance(row, dict):
        raise RowError([f"a row must be a JSON object, got {_describe_keys(row)}"])
    detected = detect_format(row)
    if fmt is None:
        fmt = detected
        if fmt is None:
            raise RowError([f"unrecognised row ({_describe_keys(row)}); expected 'messages' (chat), 'prompt' + "
                            "'completion', 'instruction' + 'output' (Alpaca) or 'text' (harmony)"])
    elif detected != fmt:
        need = {"chat": "'messages'", "prompt_completion": "'prompt' and 'completion'",
                "alpaca": "'instruction' and 'output'", "text": "'text'"}[fmt]
        if detected is None:
            raise RowError([f"unrecognised row ({_describe_keys(row)}); {fmt!r} rows need {need}"])
        raise RowError([f"this row is {detected!r}, but {fmt!r} rows need {need}"])
    return fmt, _NORMALIZERS[fmt](row, options)


# --- the row loop ----------------------------------------------------------------------------------------------------


class RowScan:
    """Every row of one source, read, format-checked and normalised: iterate it for (line, format, conversation) of
    each valid row. Each problem goes to `problem(line, message)` instead; an empty source is one too.

    Afterwards: `records` is the number of rows read (unreadable lines included), `problems` how many problems were
    found, `format` the source's format (forced by options.format, else the first valid row's) and `first_line`
    where it was detected. `data check` and `prepare_data` both run this loop; they differ only in what they do
    with a valid row.
    """

    def __init__(self, src, options: DataOptions, problem, *, progress: bool = True):
        self.src, self.options, self._problem, self.progress = src, options, problem, progress
        self.format = options.format
        self.first_line = None
        self.records = 0
        self.problems = 0
        self.dropped_thinking = {"rows": 0, "first_line": None, "first_message": None, "unit": src.unit}

    def problem(self, line, message: str) -> None:
        self.problems += 1
        self._problem(line, message)

    def __iter__(self):
        src, options = self.src, self.options
        for line, rec in _iter_records(src, self.progress):
            if isinstance(rec, _Bad):
                if line is not None:
                    self.records += 1
                self.problem(line, rec.message)
                continue
            self.records += 1
            fmt = self.format
            if fmt is not None and options.format is None:
                detected = detect_format(rec)
                if detected is not None and detected != fmt:
                    self.problem(line, f"this row is {detected!r} but the file started as {fmt!r} "
                                       f"({src.unit} {self.first_line}); formats can't be mixed in one file")
                    continue
            try:
                fmt_row, conv = normalize_row(rec, options, fmt)
            except RowError as exc:
                for p in exc.problems:
                    self.problem(line, p)
                continue
            if self.format is None:
                self.format, self.first_line = fmt_row, line
            warnings = conv.pop(WARNINGS_KEY, None) if isinstance(conv, dict) else None
            if warnings and warnings.get("dropped_thinking"):
                # harmony keeps an assistant's reasoning only after the last user turn (gpt-oss's template drops
                # earlier analysis), so `thinking` on an earlier assistant turn is not trained
                d = self.dropped_thinking
                d["rows"] += 1
                if d["first_line"] is None:
                    d["first_line"], d["first_message"] = line, warnings["dropped_thinking"][0]
            yield line, fmt_row, conv
        if self.records == 0 and self.problems == 0:
            self.problem(None, "no rows (the file is empty)")
