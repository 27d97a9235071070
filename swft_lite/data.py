"""Training data: read it, check every row, render it to gpt-oss harmony tokens with loss masks, cache the result.

Sources: JSONL, JSON (a list of rows or {"data": [...]}), Parquet, CSV and folders written by
`datasets.save_to_disk`. Row formats, detected per file (or forced with `format=`):

    chat               {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": ...,
                         "thinking" | "reasoning_content": ..., "tool_calls": [...]}, ...],
                        "reasoning_effort": "low"|"medium"|"high", "tools": [...]}      (the last two optional)
    prompt_completion  {"prompt": str, "completion": str, "system"?, "thinking"?, "reasoning_effort"?}
                        (or TRL's conversational form: prompt and completion are lists of messages)
    alpaca             {"instruction": str, "input"?: str, "output": str, "system"?, "reasoning_effort"?}
    text               {"text": "<|start|>system<|message|>...<|return|>"}  already in harmony; checked, then
                        trained exactly as written

Rendering (chat, prompt_completion, alpaca) follows gpt-oss's own chat template
(shared/models/gpt-oss-20b/chat_template.jinja) message for message, and the token ids come from openai-harmony's
renderer (`render_conversation_for_training`), so they are the ids the HF tokenizer + template produce (tested):

  * a system block with the model identity, knowledge cutoff (harmony's default), a FIXED current date
    (DataOptions.date, default 2025-06-28 - never today's date, so a rerun renders the same tokens) and the reasoning
    effort (the row's, else DataOptions.reasoning_effort);
  * the row's leading system and/or developer messages become the developer message's "# Instructions" (gpt-oss's
    convention; several are joined with a blank line). A system/developer message after the first user turn is an
    error, since the template would silently drop it;
  * the assistant's reasoning (`thinking` or `reasoning_content`) is the analysis channel, the answer the final
    channel. Multi-turn: like the template (and gpt-oss at inference), earlier turns keep only their final answer,
    ended by <|end|>; their reasoning is dropped. The last assistant turn keeps its reasoning and ends with
    <|return|>. Tool calls render as `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>
    ARGS<|call|>`, tool results as `<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>`.

Loss masks (labels are -100 where a token is not trained); decided per harmony message:

  * mask="assistant" (default): every assistant message. For a message the model writes itself at inference, all
    of it after the `<|start|>assistant` that the prompt supplies is trained: the channel header
    (`<|channel|>analysis<|message|>`, ` to=functions.x<|channel|>commentary json<|message|>`), the text and the
    terminator (<|end|> after analysis, <|call|> after a tool call, <|return|> after the answer). When an assistant
    message directly follows another one (analysis -> final) the model also writes that `<|start|>assistant`, so
    it is trained too. Earlier turns' answers (final channel, ended by <|end|>) are history as the template rewrites
    it: their text is trained, but not their header or their <|end|> (the model really wrote its analysis first and
    ended with <|return|>; teaching "final right after <|start|>assistant" or "<|end|> after an answer" would
    teach it what it never does).
  * mask="final": the same, for final-channel messages only (no reasoning, no tool calls). Training on the answers
    alone teaches a reasoning model to answer without the reasoning that led there - hence not the default.
  * mask="all": every token, system and user text included.

A row in which nothing would be trained is an error, never a silent all -100 row. Rows longer than
max_seq_length are dropped (default) or truncated; both are counted, and a truncated row that keeps no trained
token is dropped and counted.

Every row is validated (streaming, bounded memory) before any rendering; problems are reported as
`FILE:LINE: what is wrong` (`FILE:row N: ...` for JSON arrays, Parquet, CSV and save_to_disk folders, 1-based).
Rendering runs in `datasets.map(num_proc=...)` and the result is cached under a hash of the files' contents, the
options that change tokens and the swft-lite / openai-harmony versions, so a second run starts at once.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swft_lite import __version__
from swft_lite.errors import SwftError

__all__ = [
    "DataError", "DataOptions", "PreparedData", "CheckResult", "Problem", "prepare_data", "check_file",
    "render_conversation", "check_packing", "format_check", "format_rendered", "resolve_source", "sample_path",
    "MASKS", "OVERLONG", "EFFORTS", "FORMATS", "MASK_HELP", "DEFAULT_TRAIN", "DEFAULT_DATE",
]

DEFAULT_TRAIN = "data/processed/train.jsonl"
DEFAULT_EVAL_NAME = "validation.jsonl"
DEFAULT_DATE = "2025-06-28"
SAMPLE = "sample"
MASKS = ("assistant", "final", "all")
OVERLONG = ("drop", "truncate")
EFFORTS = ("low", "medium", "high")
FORMATS = ("chat", "prompt_completion", "alpaca", "text")
ROLES = ("system", "developer", "user", "assistant", "tool")
CHANNELS = ("analysis", "commentary", "final")
RENDER_VERSION = 1  # bump whenever rendering or masking changes: it is part of the cache key
MAX_SHOWN = 20  # problems listed in a DataError message
MAX_KEPT_PROBLEMS = 1000  # problems kept in memory by check_file (the count goes on)

MASK_HELP = ("Which tokens are trained. 'assistant' (default): every assistant message - the reasoning "
             "(analysis channel), tool calls and the answer (final channel), with the channel headers and the "
             "<|end|>/<|call|>/<|return|> terminators the model must learn to emit. 'final': only the answers; "
             "training on answers alone teaches a reasoning model to answer without the reasoning that led there. "
             "'all': every token, system and user text included.")

# Harmony's special tokens (o200k_harmony); checked against the encoding when it loads.
START, END, MESSAGE, CHANNEL, CONSTRAIN, RETURN, CALL = 200006, 200007, 200008, 200005, 200003, 200002, 200012
ASSISTANT_TOKEN = 173781  # "assistant"
TERMINATORS = (END, RETURN, CALL)
FIRST_SPECIAL = 199998
SPECIAL_STRINGS = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>",
                   "<|endoftext|>", "<|startoftext|>")
_SPECIAL_RE = re.compile("|".join(re.escape(s) for s in SPECIAL_STRINGS))

STATUS_KEPT, STATUS_TRUNCATED, STATUS_DROPPED, STATUS_TRUNC_EMPTY, STATUS_EMPTY = 0, 1, 2, 3, 4


# --- errors, options, results ----------------------------------------------------------------------------------------


@dataclass
class Problem:
    source: str
    line: int | None  # 1-based line (JSONL) or row number (other sources); None for the whole file
    message: str
    unit: str = "line"  # "line" or "row"

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.source}: {self.message}"
        where = str(self.line) if self.unit == "line" else f"row {self.line}"
        return f"{self.source}:{where}: {self.message}"


class DataError(SwftError, ValueError):
    """The data can't be used; the message lists the problems as `FILE:LINE: what is wrong`."""

    def __init__(self, message: str, problems: list[Problem] | None = None, total: int | None = None):
        self.problems = list(problems or [])
        self.total = total if total is not None else len(self.problems)
        if self.problems:
            lines = [str(p) for p in self.problems[:MAX_SHOWN]]
            more = self.total - len(lines)
            if more > 0:
                lines.append(f"... and {more} more")
            message = message + "\n" + "\n".join("  " + ln for ln in lines)
        super().__init__(message)


@dataclass
class DataOptions:
    max_seq_length: int = 2048
    mask: str = "assistant"           # "assistant" (analysis+final of every assistant turn) | "final" | "all"
    overlong: str = "drop"            # "drop" | "truncate"
    reasoning_effort: str = "medium"  # default when a row has none: low|medium|high
    date: str = DEFAULT_DATE          # fixed "Current date" in the system block; never today's date
    model_identity: str | None = None  # None: harmony's default identity
    eval_fraction: float = 0.0        # split off train with a fixed seed when there is no eval file
    seed: int = 3407
    num_proc: int | None = None       # datasets.map processes; None: all CPUs for big inputs, 1 for small ones
    cache_dir: str | None = None      # default $SWFT_LITE_CACHE or ~/.cache/swft-lite/data
    format: str | None = None         # force chat|prompt_completion|alpaca|text; None = detect per file

    def validate(self) -> None:
        errors = []
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 16:
            errors.append(f"max_seq_length must be an integer >= 16, got {self.max_seq_length!r}")
        for name, allowed in (("mask", MASKS), ("overlong", OVERLONG), ("reasoning_effort", EFFORTS)):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.format is not None and self.format not in FORMATS:
            errors.append(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not isinstance(self.date, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            errors.append(f"date must be YYYY-MM-DD, got {self.date!r}")
        if not (0.0 <= float(self.eval_fraction) < 1.0):
            errors.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.num_proc is not None and self.num_proc < 1:
            errors.append(f"num_proc must be >= 1, got {self.num_proc!r}")
        if errors:
            raise DataError("invalid data options: " + "; ".join(errors))

    def render_key(self) -> dict:
        """The options that change the rendered tokens (part of the cache key)."""
        return {k: getattr(self, k) for k in ("max_seq_length", "mask", "overlong", "reasoning_effort", "date",
                                              "model_identity", "eval_fraction", "seed", "format")}


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids (list[int]), labels (list[int], -100 = not trained)
    eval: Any   # datasets.Dataset | None
    report: dict


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


# --- sources --------------------------------------------------------------------------------------------------------


def sample_path() -> Path:
    return Path(__file__).resolve().parent / "sample_data" / "architecture_docs.jsonl"


@dataclass
class Source:
    path: Path
    display: str
    kind: str  # jsonl | json | parquet | csv | arrow

    @property
    def unit(self) -> str:
        return "line" if self.kind == "jsonl" else "row"


def resolve_source(spec: str | os.PathLike) -> Source:
    """A data argument ("sample", a file or a save_to_disk folder) as a readable source; DataError if it isn't."""
    text = str(spec)
    if text == SAMPLE:
        p = sample_path()
        return Source(p, str(p), "jsonl")
    p = Path(text).expanduser()
    if not p.exists():
        raise DataError(f"{text}: no such file or folder")
    if p.is_dir():
        if any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return Source(p, text, "arrow")
        raise DataError(f"{text}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json, "
                        "state.json or dataset_dict.json)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return Source(p, text, "jsonl")
    if suffix == ".json":
        return Source(p, text, "jsonl" if _json_file_is_lines(p) else "json")
    if suffix in (".parquet", ".pq"):
        return Source(p, text, "parquet")
    if suffix == ".csv":
        return Source(p, text, "csv")
    raise DataError(f"{text}: unsupported file type '{suffix or '(none)'}'; use .jsonl, .json, .parquet, .csv or a "
                    "datasets.save_to_disk folder")


def _json_file_is_lines(p: Path) -> bool:
    """A .json file holding one object per line (JSONL under another name) rather than one JSON document."""
    with p.open("rb") as fh:
        first = next((raw for raw in fh if raw.strip()), b"")
    try:
        obj = json.loads(first)
    except ValueError:
        return False  # a pretty-printed document, or not JSON at all (reported when read)
    return isinstance(obj, dict) and not isinstance(obj.get("data"), list)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


class _Bad:
    """A record that could not be read (invalid JSON etc.)."""

    def __init__(self, message: str):
        self.message = message


def _progress(total: int | None, desc: str, unit: str):
    from tqdm.auto import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                file=sys.stderr, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


def _iter_records(src: Source, progress: bool = True) -> Iterator[tuple[int | None, Any]]:
    """(line or row number, record or _Bad) for every record of a source, streaming where the format allows."""
    if src.kind == "jsonl":
        size = src.path.stat().st_size
        with _progress(size if progress else 0, f"reading {src.path.name}", "B") as bar, src.path.open("rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                try:
                    yield lineno, json.loads(raw.rstrip(b"\r\n"))
                except UnicodeDecodeError as exc:
                    yield lineno, _Bad(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                except ValueError as exc:
                    msg = getattr(exc, "msg", str(exc))
                    col = getattr(exc, "colno", None)
                    yield lineno, _Bad(f"invalid JSON: {msg}" + (f" (column {col})" if col else ""))
        return
    if src.kind == "json":
        try:
            with src.path.open("rb") as fh:
                doc = json.load(fh)
        except UnicodeDecodeError as exc:
            yield None, _Bad(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            return
        except ValueError as exc:
            yield None, _Bad(f"invalid JSON at line {getattr(exc, 'lineno', '?')} column "
                             f"{getattr(exc, 'colno', '?')}: {getattr(exc, 'msg', exc)}")
            return
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            keys = f" with keys {sorted(doc)[:8]}" if isinstance(doc, dict) else ""
            yield None, _Bad('a .json file must hold a list of rows or {"data": [rows]}; '
                             f"got {type(doc).__name__}{keys}")
            return
        yield from enumerate(doc, 1)
        return
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(src.path)
        except Exception as exc:  # noqa: BLE001
            yield None, _Bad(f"not a readable Parquet file: {exc}")
            return
        row = 0
        with _progress(pf.metadata.num_rows if progress else 0, f"reading {src.path.name}", "rows") as bar:
            for batch in pf.iter_batches(batch_size=1024):
                for rec in batch.to_pylist():
                    row += 1
                    yield row, rec
                bar.update(batch.num_rows)
        return
    if src.kind == "csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with src.path.open("r", encoding="utf-8", newline="") as fh:
            try:
                reader = csv.DictReader(fh)
                for row, rec in enumerate(reader, 1):
                    if None in rec:
                        yield row, _Bad(f"{len(rec[None])} more field(s) than the header has columns")
                        continue
                    yield row, _csv_record(rec)
            except UnicodeDecodeError as exc:
                yield None, _Bad(f"not valid UTF-8 ({exc.reason})")
            except csv.Error as exc:
                yield None, _Bad(f"CSV error: {exc}")
        return
    if src.kind == "arrow":
        ds = _load_arrow(src)
        row = 0
        with _progress(len(ds) if progress else 0, f"reading {src.path.name}", "rows") as bar:
            for batch in ds.iter(batch_size=1024):
                keys = list(batch)
                n = len(batch[keys[0]]) if keys else 0
                for i in range(n):
                    row += 1
                    yield row, {k: batch[k][i] for k in keys}
                bar.update(n)
        return
    raise AssertionError(src.kind)


def _load_arrow(src: Source):
    import datasets

    try:
        ds = datasets.load_from_disk(str(src.path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{src.display}: could not load with datasets.load_from_disk: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"{src.display}: a DatasetDict with splits {sorted(ds)} and no 'train' split; save the split "
                        "you mean with save_to_disk on its own")
    return ds


_CSV_JSON_COLUMNS = ("messages", "tools", "prompt", "completion")


def _csv_record(rec: dict) -> Any:
    """CSV cells are strings: JSON-encoded columns (messages, tools, conversational prompt/completion) are parsed."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if v is None or v == "":
            continue
        if k in _CSV_JSON_COLUMNS and v.lstrip()[:1] in ("[", "{"):
            try:
                parsed = json.loads(v)
            except ValueError as exc:
                if k in ("messages", "tools"):
                    return _Bad(f"column '{k}' is not valid JSON: {getattr(exc, 'msg', exc)}")
                parsed = v
            # prompt/completion cells are text unless they hold a list of messages (TRL's conversational form)
            if k in ("messages", "tools") or (isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m
                                                                               for m in parsed)):
                v = parsed
        out[k] = v
    return out


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
    for j, m in enumerate(loop):
        i, role = m["_i"], m["role"]
        where = f"message {i} ({role})"
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


def check_packing(backend: str, packing: bool) -> bool:
    """Whether rows may be packed; DataError where the backend can't (Unsloth turns packing off for gpt-oss)."""
    if packing and backend == "unsloth":
        raise DataError("packing is not supported for gpt-oss by the unsloth backend (Unsloth switches packing off "
                        "for gpt-oss: its attention kernels do not isolate packed rows). Train without --packing, or "
                        "use --backend hf, where TRL packs rows")
    return bool(packing)


# --- check_file: the streaming check behind `swft-lite data check` --------------------------------------------------


@dataclass
class CheckResult:
    path: str
    format: str | None
    rows: int = 0
    valid_rows: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first MAX_KEPT_PROBLEMS
    problem_count: int = 0
    lengths: list[int] = field(default_factory=list)  # rendered tokens per valid row
    tokens_total: int = 0
    tokens_trained: int = 0
    rows_with_reasoning: int = 0
    over_length: int = 0
    would_truncate: int = 0
    would_drop: int = 0
    options: DataOptions = field(default_factory=DataOptions)
    samples: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (line, ids, labels)
    unit: str = "line"
    seconds: float = 0.0
    length_source: str | None = None  # where max_seq_length came from, e.g. "profile rtx4090"

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def length_stats(self) -> dict:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
        return {"min": s[0], "median": int(statistics.median(s)), "p95": p95,
                "max": s[-1], "mean": round(sum(s) / len(s), 1)}

    def to_dict(self) -> dict:
        o = self.options
        d = {
            "path": self.path, "ok": self.ok, "format": self.format, "rows": self.rows, "valid_rows": self.valid_rows,
            "problem_count": self.problem_count, "problems": [str(p) for p in self.problems],
            "max_seq_length": o.max_seq_length, "max_seq_length_from": self.length_source,
            "mask": o.mask, "overlong": o.overlong,
            "reasoning_effort": o.reasoning_effort, "date": o.date,
            "tokens": self.length_stats(), "histogram": _histogram_bins(self.lengths),
            "tokens_total": self.tokens_total, "tokens_trained": self.tokens_trained,
            "trained_fraction": round(self.tokens_trained / self.tokens_total, 4) if self.tokens_total else 0.0,
            "rows_with_reasoning": self.rows_with_reasoning,
            "over_length": self.over_length, "would_truncate": self.would_truncate, "would_drop": self.would_drop,
            "seconds": round(self.seconds, 3),
        }
        if self.samples:
            d["samples"] = [{"line": ln, "input_ids": ids, "labels": lab, "rendered": format_rendered(ids, lab)}
                            for ln, ids, lab in self.samples]
        return d


def check_file(path: str | os.PathLike, options: DataOptions | None = None, *, show: int = 0,
               progress: bool = True, length_source: str | None = None) -> CheckResult:
    """Read every row of one source, report each problem with its line, and measure what training would see.

    Memory stays bounded: rows are streamed (JSONL line by line), only token counts are kept per row, and at most
    MAX_KEPT_PROBLEMS problems are kept (all are counted). A source that can't be opened raises DataError.
    """
    options = options or DataOptions()
    options.validate()
    t0 = time.perf_counter()
    src = resolve_source(path)
    res = CheckResult(path=src.display, format=options.format, options=options, unit=src.unit,
                      length_source=length_source)
    first_line = None

    def problem(line, msg):
        res.problem_count += 1
        if len(res.problems) < MAX_KEPT_PROBLEMS:
            res.problems.append(Problem(src.display, line, msg, src.unit))

    for line, rec in _iter_records(src, progress):
        if isinstance(rec, _Bad):
            if line is not None:
                res.rows += 1
            problem(line, rec.message)
            continue
        res.rows += 1
        fmt = res.format
        if fmt is not None and options.format is None:
            detected = detect_format(rec)
            if detected is not None and detected != fmt:
                problem(line, f"this row is {detected!r} but the file started as {fmt!r} "
                              f"({src.unit} {first_line}); formats can't be mixed in one file")
                continue
        try:
            fmt_row, conv = normalize_row(rec, options, fmt if options.format is None else options.format)
        except RowError as exc:
            for p in exc.problems:
                problem(line, p)
            continue
        if res.format is None:
            res.format, first_line = fmt_row, line
        toks, meta = _render_tokens(conv, options)
        labels = _labels(toks, meta, options.mask)
        trained = sum(1 for x in labels if x != -100)
        if trained == 0:  # the structural check should have caught it; never let an all -100 row through
            problem(line, "nothing to train: every token would be masked")
            continue
        res.valid_rows += 1
        res.lengths.append(len(toks))
        res.tokens_total += len(toks)
        res.tokens_trained += trained
        if any(m[0] == "assistant" and m[1] == "analysis" for m in meta):
            res.rows_with_reasoning += 1
        if len(toks) > options.max_seq_length:
            res.over_length += 1
            if options.overlong == "truncate" and any(x != -100 for x in labels[:options.max_seq_length]):
                res.would_truncate += 1
            else:
                res.would_drop += 1
        if len(res.samples) < show:
            res.samples.append((line, list(toks), labels))
    if res.rows == 0 and res.problem_count == 0:
        problem(None, "no rows (the file is empty)")
    res.seconds = time.perf_counter() - t0
    return res


# --- human-readable output ------------------------------------------------------------------------------------------


def _histogram_bins(lengths: list[int], bins: int = 10) -> list[dict]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if lo == hi:
        return [{"from": lo, "to": hi, "rows": len(lengths)}]
    width = max(1, math.ceil((hi - lo + 1) / bins))
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - lo) // width)] += 1
    return [{"from": lo + i * width, "to": min(hi, lo + (i + 1) * width - 1), "rows": c} for i, c in enumerate(counts)]


def format_rendered(ids: list[int], labels: list[int], color: bool = False) -> str:
    """The decoded row with every untrained span wrapped in «...» (and dimmed when color is on)."""
    enc = _encoding()
    parts = []
    i = 0
    while i < len(ids):
        trained = labels[i] != -100
        j = i
        while j < len(ids) and (labels[j] != -100) == trained:
            j += 1
        text = enc.decode(ids[i:j])
        if trained:
            parts.append(_style(text, bold=True) if color else text)
        else:
            parts.append(_style("«" + text + "»", dim=True) if color else "«" + text + "»")
        i = j
    return "".join(parts)


def _style(text: str, **kw) -> str:
    import click

    return click.style(text, **kw)


def format_check(res: CheckResult, color: bool = False) -> str:
    """The report `swft-lite data check` prints: problems one per line, then a summary."""
    o = res.options
    out = io.StringIO()
    w = out.write
    for p in res.problems:
        w(str(p) + "\n")
    if res.problem_count > len(res.problems):
        w(f"... and {res.problem_count - len(res.problems)} more problems\n")
    if res.problems:
        w("\n")
    for ln, ids, labels in res.samples:
        w(f"--- {res.path}:{ln if res.unit == 'line' else f'row {ln}'} ({len(ids)} tokens, "
          f"{sum(1 for x in labels if x != -100)} trained) ---\n")
        w(format_rendered(ids, labels, color) + "\n")
    if res.samples:
        w("legend: «...» = context, not trained (label -100); everything else is trained "
          f"(mask {o.mask!r})\n\n")
    verdict = "OK" if res.ok else f"{res.problem_count} problem{'s' if res.problem_count != 1 else ''}"
    w(f"{res.path}: {verdict}\n")
    w(f"  rows            {res.rows} ({res.valid_rows} valid)\n")
    w(f"  format          {res.format or 'unknown'}\n")
    stats = res.length_stats()
    if stats:
        w(f"  tokens per row  min {stats['min']} / median {stats['median']} / p95 {stats['p95']} / max {stats['max']}"
          f"  (harmony, reasoning effort {o.reasoning_effort} unless a row sets it)\n")
        bins = _histogram_bins(res.lengths)
        top = max(b["rows"] for b in bins)
        wd = len(str(bins[-1]["to"]))
        for b in bins:
            bar = "#" * (math.ceil(30 * b["rows"] / top) if b["rows"] else 0)
            over = "  > max_seq_length" if b["from"] > o.max_seq_length else ""
            w(f"    {b['from']:>{wd}}-{b['to']:<{wd}} |{bar:<30} {b['rows']}{over}\n")
    policy = {"drop": "dropped", "truncate": "truncated"}[o.overlong]
    src = f", {res.length_source}" if res.length_source else ""
    w(f"  over {o.max_seq_length} tokens  {res.over_length} row(s), would be {policy} (--overlong {o.overlong}{src})")
    if o.overlong == "truncate" and res.would_drop:
        w(f"; {res.would_drop} would lose every trained token and be dropped")
    w("\n")
    if res.tokens_total:
        pct = 100 * res.tokens_trained / res.tokens_total
        w(f"  trained tokens  {res.tokens_trained} of {res.tokens_total} ({pct:.1f}%,"
          f" mask {o.mask!r})\n")
        w(f"  with reasoning  {res.rows_with_reasoning} of {res.valid_rows} rows have an analysis (thinking) message\n")
    return out.getvalue()


# --- prepare_data: validate everything, render in parallel, cache -----------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("SWFT_LITE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/swft-lite/data").expanduser()


def _features():
    import datasets

    seq = datasets.List if hasattr(datasets, "List") else datasets.Sequence
    return datasets.Features({
        "input_ids": seq(datasets.Value("int32")), "labels": seq(datasets.Value("int32")),
        "n_tokens": datasets.Value("int32"), "n_kept": datasets.Value("int32"), "n_trained": datasets.Value("int32"),
        "status": datasets.Value("int8"),
        "src": datasets.Value("int8"), "line": datasets.Value("int64")})


def _validate_to_arrow(sources: list[Source], options: DataOptions, arrow_path: Path) -> tuple[list[dict], int]:
    """Pass 1: validate every row of every source (streaming); write the normalized rows to an Arrow stream.

    Returns per-source info and the number of rows. Raises DataError listing the problems if any row is invalid.
    """
    import pyarrow as pa

    schema = pa.schema([("conv", pa.string()), ("src", pa.int8()), ("line", pa.int64())])
    problems: list[Problem] = []
    count = 0
    infos = []
    n_rows = 0
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buf: dict[str, list] = {"conv": [], "src": [], "line": []}

        def flush():
            if buf["conv"]:
                writer.write_batch(pa.record_batch([pa.array(buf[k], type=schema.field(k).type) for k in buf],
                                                   schema=schema))
                for v in buf.values():
                    v.clear()

        for si, src in enumerate(sources):
            fmt = options.format
            first = None
            rows = 0

            def problem(line, msg, src=src):
                nonlocal count
                count += 1
                if len(problems) < MAX_SHOWN:
                    problems.append(Problem(src.display, line, msg, src.unit))

            for line, rec in _iter_records(src):
                if isinstance(rec, _Bad):
                    problem(line, rec.message)
                    continue
                rows += 1
                if fmt is not None and options.format is None:
                    detected = detect_format(rec)
                    if detected is not None and detected != fmt:
                        problem(line, f"this row is {detected!r} but the file started as {fmt!r} ({src.unit} {first}); "
                                      "formats can't be mixed in one file")
                        continue
                try:
                    fmt_row, conv = normalize_row(rec, options, fmt)
                except RowError as exc:
                    for p in exc.problems:
                        problem(line, p)
                    continue
                if fmt is None:
                    fmt, first = fmt_row, line
                conv.pop("_toks", None)
                buf["conv"].append(json.dumps(conv, ensure_ascii=False, separators=(",", ":")))
                buf["src"].append(si)
                buf["line"].append(line if line is not None else 0)
                n_rows += 1
                if len(buf["conv"]) >= 1000:
                    flush()
            if rows == 0 and not any(p.source == src.display for p in problems):
                problem(None, "no rows (the file is empty)")
            infos.append({"rows": rows, "format": fmt})
        flush()
    if count:
        raise DataError(f"{count} problem{'s' if count != 1 else ''} in the data; nothing was rendered. Run "
                        "`swft-lite data check FILE` for the full list and a summary:", problems, count)
    return infos, n_rows


def _split_stats(status, n_kept, n_trained, sel) -> dict:
    """Counts for one split; tokens are those of the kept rows after truncation."""
    st = status[sel]
    return {"rows": int(sel.sum()), "kept": int(((st == STATUS_KEPT) | (st == STATUS_TRUNCATED)).sum()),
            "dropped_overlong": int((st == STATUS_DROPPED).sum()),
            "truncated": int((st == STATUS_TRUNCATED).sum()),
            "dropped_truncated_untrained": int((st == STATUS_TRUNC_EMPTY).sum()),
            "tokens_total": int(n_kept[sel].sum()),
            "tokens_trained": int(n_trained[sel].sum())}


def prepare_data(train: str | None, eval: str | None, options: DataOptions | None = None) -> PreparedData:  # noqa: A002
    """Validate, render and mask the training (and eval) data; cached by content hash.

    train None: data/processed/train.jsonl, with validation.jsonl beside it as eval data when it exists (and no
    eval_fraction is asked for). train "sample": the sample set shipped inside the package. Every row of every file
    is validated (streaming) before anything is rendered; any invalid row raises DataError listing them.
    """
    import datasets
    import numpy as np

    options = options or DataOptions()
    options.validate()
    t0 = time.perf_counter()
    if train is None:
        train = DEFAULT_TRAIN
        beside = Path(DEFAULT_TRAIN).parent / DEFAULT_EVAL_NAME
        if eval is None and options.eval_fraction == 0 and beside.exists():
            eval = str(beside)
        if not Path(train).exists():
            raise DataError(f"{train}: no such file. Pass --data FILE (JSONL, JSON, Parquet, CSV or a save_to_disk "
                            "folder), or --data sample for the shipped sample set")
    if eval is not None and options.eval_fraction > 0:
        raise DataError(f"both an eval file ({eval}) and eval_fraction={options.eval_fraction}; give one of them")
    sources = [resolve_source(train)] + ([resolve_source(eval)] if eval is not None else [])
    hashes = [_sha256(s.path) for s in sources]

    key_doc = {"files": hashes, "options": options.render_key(), "swft_lite": __version__,
               "harmony": _harmony_version(), "render_version": RENDER_VERSION}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    cache_root = Path(options.cache_dir).expanduser() if options.cache_dir else default_cache_dir()
    entry = cache_root / key

    def files_report(infos):
        return {s.display: {"sha256": h, "rows": i["rows"], "format": i["format"], "role": r}
                for s, h, i, r in zip(sources, hashes, infos, ("train", "eval"))}

    if (entry / "report.json").exists():
        try:
            report = json.loads((entry / "report.json").read_text())
            tr = datasets.load_from_disk(str(entry / "train"))
            ev = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").exists() else None
            report["files"] = files_report(report["file_infos"])
            report["cache"] = {"hit": True, "path": str(entry), "key": key}
            report["seconds"] = round(time.perf_counter() - t0, 3)
            return PreparedData(tr, ev, report)
        except Exception:  # noqa: BLE001 - a broken entry is rebuilt
            shutil.rmtree(entry, ignore_errors=True)

    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        infos, n_rows = _validate_to_arrow(sources, options, work / "rows.arrow")
        t_valid = time.perf_counter() - t0
        rows = datasets.Dataset.from_file(str(work / "rows.arrow"))
        num_proc = options.num_proc
        if num_proc is None:
            num_proc = max(1, min(os.cpu_count() or 1, 8)) if n_rows >= 2000 else 1
        num_proc = max(1, min(num_proc, n_rows // 50 or 1))
        rendered = rows.map(_render_batch, batched=True, batch_size=200, num_proc=num_proc if num_proc > 1 else None,
                            fn_kwargs={"options": dataclasses.asdict(options)}, remove_columns=rows.column_names,
                            features=_features(), cache_file_name=str(work / "rendered.arrow"),
                            desc="rendering (harmony)")
        t_render = time.perf_counter() - t0 - t_valid
        col = {c: np.asarray(rendered.data.column(c).to_numpy()) for c in ("status", "src", "n_kept", "n_trained")}
        status, src = col["status"], col["src"]
        if (status == STATUS_EMPTY).any():
            lines = rendered.data.column("line").to_numpy()[status == STATUS_EMPTY]
            raise DataError("rows with nothing to train after rendering (a bug: the checks should have caught them)",
                            [Problem(sources[0].display, int(ln), "nothing to train") for ln in lines[:MAX_SHOWN]],
                            int(len(lines)))
        if eval is not None:
            is_eval = src == 1
            eval_source = "file"
        elif options.eval_fraction > 0:
            n_eval = max(1, round(n_rows * options.eval_fraction))
            if n_eval >= n_rows:
                raise DataError(f"eval_fraction={options.eval_fraction} of {n_rows} rows leaves no training rows")
            is_eval = np.zeros(n_rows, dtype=bool)
            is_eval[random.Random(options.seed).sample(range(n_rows), n_eval)] = True
            eval_source = "fraction"
        else:
            is_eval = np.zeros(n_rows, dtype=bool)
            eval_source = None
        keep = (status == STATUS_KEPT) | (status == STATUS_TRUNCATED)
        splits = {"train": _split_stats(status, col["n_kept"], col["n_trained"], ~is_eval)}
        if eval_source:
            splits["eval"] = _split_stats(status, col["n_kept"], col["n_trained"], is_eval)
        if splits["train"]["kept"] == 0:
            raise DataError(f"no training rows left: all {splits['train']['rows']} are longer than max_seq_length "
                            f"{options.max_seq_length} tokens ({options.overlong}); raise max_seq_length or use "
                            "overlong='truncate'")
        if eval_source and splits["eval"]["kept"] == 0:
            raise DataError(f"no eval rows left: all {splits['eval']['rows']} are longer than max_seq_length "
                            f"{options.max_seq_length} tokens")

        staging = work / "entry"
        staging.mkdir()
        cols = ["input_ids", "labels"]
        rendered.select(np.nonzero(keep & ~is_eval)[0]).select_columns(cols).save_to_disk(str(staging / "train"))
        if eval_source:
            rendered.select(np.nonzero(keep & is_eval)[0]).select_columns(cols).save_to_disk(str(staging / "eval"))
        totals = {k: sum(s[k] for s in splits.values()) for k in splits["train"]}
        report = {
            **totals,
            "splits": splits,
            "eval_source": eval_source,
            "file_infos": infos,
            "options": dataclasses.asdict(options),
            "render": {"renderer": "openai-harmony render_conversation_for_training", "harmony": _harmony_version(),
                       "swft_lite": __version__, "render_version": RENDER_VERSION, "num_proc": num_proc},
            "timing": {"validate_s": round(t_valid, 3), "render_s": round(t_render, 3)},
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        try:
            os.replace(staging, entry)  # atomic: a concurrent run may have won the race; then use its entry
        except OSError:
            if not (entry / "report.json").exists():
                raise
        del rendered, rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tr = datasets.load_from_disk(str(entry / "train"))
    ev = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").exists() else None
    report = json.loads((entry / "report.json").read_text())
    report["files"] = files_report(infos)
    report["cache"] = {"hit": False, "path": str(entry), "key": key}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return PreparedData(tr, ev, report)
