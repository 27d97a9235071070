"""`swft-lite eval`: score a model's answers on a validation set with the wiki-agent metrics (swft_lite.metrics).

Two ways in:
* `--predictions FILE`: answers generated elsewhere, in the training chat format ({"messages": [...]}). The last
  assistant message of each row is the answer (its content the final channel, its thinking/reasoning_content the
  reasoning); the messages before it are its context (the prompt whose source the citations are checked against).
  No model is needed.
* generation: for each conversation of --data, the model answers the last user turn (the messages before the last
  assistant message, rendered by openai-harmony for completion; greedy unless a temperature is given), the reply is
  parsed by harmony's parser and scored; and the reference answers' eval loss / perplexity is measured teacher-forced
  with the training masks (`--mask`, the same labels `swft-lite train` trains on). `--compare BASE` does the same on
  the base model: both columns side by side.
"""

from __future__ import annotations

from swft_lite.errors import SwftError

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from swft_lite import metrics as M


class EvalError(SwftError, RuntimeError):
    """A mistake in the eval inputs the user can fix. The message is for a person."""


@dataclass
class EvalRow:
    where: str                  # FILE:LINE
    raw: dict                   # the row as read
    context: list[str]          # texts of the messages before the answer
    answer: M.Answer | None     # predictions: the answer in the file
    reference: str | None       # the reference answer (generation mode)


def _read(path: str | Path) -> list[tuple[str, object]]:
    from swft_lite import data as data_mod
    from swft_lite.data import sources as _sources

    p = Path(path)
    if not p.exists():
        raise EvalError(f"{p}: no such file (expected a JSONL file of {{\"messages\": [...]}} rows)")
    try:
        src = data_mod.resolve_source(p)
        records = list(_sources._iter_records(src, progress=False))
    except data_mod.DataError as exc:
        raise EvalError(str(exc)) from None
    unit = "" if src.kind == "jsonl" else "row "
    out = []
    for n, rec in records:
        where = f"{p}:{unit}{n}"
        if isinstance(rec, _sources._Bad):
            raise EvalError(f"{where}: {rec.message}; each line must be one JSON object {{\"messages\": [...]}}")
        out.append((where, rec))
    if not out:
        raise EvalError(f"{p}: no rows")
    return out


def _content_text(c) -> str:
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # [{"type": "text", "text": ...}]
        return "\n".join(str(p.get("text", "")) for p in c if isinstance(p, dict))
    if c is None:
        return ""
    return json.dumps(c, ensure_ascii=False)


def _split(where: str, rec) -> tuple[list[dict], dict, int]:
    if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise EvalError(f"{where}: expected a chat row {{\"messages\": [...]}}, got {got}; write one conversation "
                        "per line, ending with the assistant's answer")
    msgs = rec["messages"]
    for i, m in enumerate(msgs, 1):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise EvalError(f"{where}: message {i} must be an object with a role and content")
    idx = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    if not idx:
        raise EvalError(f"{where}: no assistant message, so no answer to score; the last assistant message of each "
                        "row is the answer (add it, or drop the row)")
    k = idx[-1]
    if not any(m["role"] == "user" for m in msgs[:k]):
        raise EvalError(f"{where}: no user message before the answer (message {k + 1}); the answer is scored "
                        "against the conversation before it")
    return msgs[:k], msgs[k], k


def read_predictions(path: str | Path) -> list[EvalRow]:
    rows = []
    for where, rec in _read(path):
        context, ans, _ = _split(where, rec)
        content = ans.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise EvalError(f"{where}: the answer's content must be a string, got {type(content).__name__}")
        reasoning = ans.get("thinking") or ans.get("reasoning_content")
        final = _content_text(content) if content is not None else None
        rows.append(EvalRow(where, rec, [_content_text(m.get("content")) for m in context],
                            M.Answer(final=final, reasoning=reasoning if isinstance(reasoning, str) else None), None))
    return rows


def read_data(path: str | Path) -> list[EvalRow]:
    rows = []
    for where, rec in _read(path):
        context, ans, _ = _split(where, rec)
        rows.append(EvalRow(where, rec, [_content_text(m.get("content")) for m in context], None,
                            _content_text(ans.get("content"))))
    return rows


# --- generation and loss ----------------------------------------------------------------------------------------------


def _prompt_tokens(row: EvalRow, options) -> list[int]:
    """The row up to its last user turn, rendered by harmony for completion exactly as training renders the
    context (system block, developer instructions, earlier turns' answers)."""
    from openai_harmony import Conversation, Role

    from swft_lite import data as data_mod

    from swft_lite.data import normalize as _normalize, render as _render

    try:
        _, conv = _normalize.normalize_row(row.raw, options, "chat")
    except _normalize.RowError as exc:
        raise EvalError(f"{row.where}: " + "; ".join(exc.problems)) from None
    m = list(conv["m"])
    while m and m[-1][0] == "assistant":  # the last turn: its reasoning and answer (and tool calls) are the reference
        m.pop()
    msgs = _render._harmony_messages({**conv, "m": m}, options)
    enc = data_mod._encoding()
    return list(enc.render_conversation_for_completion(Conversation.from_messages(msgs), Role.ASSISTANT))


def eval_loss(engine, rows: list[EvalRow], options) -> dict:
    """Teacher-forced loss of the reference conversations with the training labels (options.mask)."""
    from swft_lite import data as data_mod

    if not hasattr(engine, "token_logprobs"):
        return {"loss": None, "perplexity": None, "tokens": 0, "note": f"not measured on {engine.name}"}
    total, n = 0.0, 0
    for row in rows:
        try:
            ids, labels = data_mod.render_conversation(row.raw, options, "chat")
        except data_mod.DataError as exc:
            raise EvalError(f"{row.where}: {exc}") from None
        lp = engine.token_logprobs(ids)
        for k, lab in enumerate(labels[1:]):
            if lab != -100:
                total -= float(lp[k])
                n += 1
    loss = total / n if n else None
    return {"loss": loss, "perplexity": math.exp(loss) if loss is not None and loss < 700 else None, "tokens": n}


def generate_answers(engine, rows: list[EvalRow], options, *, max_new_tokens: int, temperature: float, seed: int,
                     log: Callable[[str], None] = lambda s: None) -> tuple[list[M.Answer], dict]:
    answers, n_tok, secs = [], 0, 0.0
    for i, row in enumerate(rows, 1):
        prompt = _prompt_tokens(row, options)
        reply = engine.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        n_tok += len(reply.tokens)
        secs += reply.seconds
        answers.append(M.Answer(final=reply.final, reasoning=reply.reasoning, reasoning_tokens=reply.reasoning_tokens,
                                parse_error=reply.parse_error))
        answers[-1].generated_tokens = len(reply.tokens)  # type: ignore[attr-defined]
        answers[-1].stopped = reply.stopped  # type: ignore[attr-defined]
        log(f"  {i}/{len(rows)}: {len(reply.tokens)} tokens, stopped at {reply.stopped}")
    return answers, {"generated_tokens": n_tok, "generation_s": round(secs, 3),
                     "tokens_per_s": round(n_tok / secs, 2) if secs > 0 else None}


@dataclass
class ModelResult:
    label: str
    engine: str
    summary: dict
    scores: list[dict]
    answers: list[M.Answer]
    extra: dict = field(default_factory=dict)


def score(label: str, engine_desc: str, rows: list[EvalRow], answers: list[M.Answer], checker) -> ModelResult:
    scores = M.score_answers([(a, r.context) for a, r in zip(answers, rows)], checker)
    return ModelResult(label, engine_desc, M.summarize(scores), scores, answers)


def evaluate_model(label: str, ref: str, rows: list[EvalRow], options, checker, *, device: str, max_new_tokens: int,
                   temperature: float, seed: int, base: str | None = None, loss: bool = True, engine: str = "auto",
                   log: Callable[[str], None] = lambda s: None) -> ModelResult:
    from swft_lite.inference import load_engine

    t0 = time.perf_counter()
    model = load_engine(ref, device=device, base=base, engine=engine, log=log)
    log(f"{label}: {model.description}")
    try:
        answers, gen = generate_answers(model, rows, options, max_new_tokens=max_new_tokens,
                                        temperature=temperature, seed=seed, log=log)
        lossd = eval_loss(model, rows, options) if loss else {"loss": None, "perplexity": None, "tokens": 0}
    finally:
        model.close()
    result = score(label, model.description, rows, answers, checker)
    result.summary.update({"eval_loss": lossd["loss"], "perplexity": lossd["perplexity"],
                           "loss_tokens": lossd["tokens"], **gen, "seconds": round(time.perf_counter() - t0, 2)})
    return result


# --- output ---------------------------------------------------------------------------------------------------------


def _pct(v):
    return "–" if v is None else f"{100 * v:.1f} %"


def _num(v, fmt="{:.4f}"):
    return "–" if v is None else fmt.format(v)


TABLE_ROWS = (
    ("rows", lambda s: str(s["rows"])),
    ("eval loss", lambda s: _num(s.get("eval_loss"))),
    ("perplexity", lambda s: _num(s.get("perplexity"), "{:.2f}")),
    ("source_refs", lambda s: f"{_pct(s['source_refs'])} ({s['cited_claims']}/{s['claims']} claims)"),
    ("markdown_valid", lambda s: _pct(s["markdown_valid"])),
    ("mermaid_valid", lambda s: f"{_pct(s['mermaid_valid'])} ({s['mermaid_blocks']} blocks)"),
    ("format_ok", lambda s: _pct(s["format_ok"])),
    ("final present", lambda s: _pct(s["final_present"])),
    ("leaked markup", lambda s: f"{s['leaked_markup_rows']} rows"),
    ("reasoning chars", lambda s: _num(s["reasoning_chars_mean"], "{:.0f}")),
    ("tokens/s", lambda s: _num(s.get("tokens_per_s"), "{:.1f}")),
)


def format_table(results: list[ModelResult], checker_note: str) -> str:
    header = ["metric"] + [r.label for r in results]
    table = [header]
    for name, fn in TABLE_ROWS:
        if name in ("eval loss", "perplexity", "tokens/s") and all(r.summary.get(
                {"eval loss": "eval_loss", "perplexity": "perplexity", "tokens/s": "tokens_per_s"}[name]) is None
                for r in results):
            continue
        table.append([name] + [fn(r.summary) for r in results])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
    lines.append("")
    for r in results:
        lines.append(f"{r.label}: {r.engine}")
    lines.append(f"mermaid checker: {checker_note}")
    return "\n".join(lines)


def write_rows(path: str | Path, rows: list[EvalRow], results: list[ModelResult]) -> None:
    with Path(path).open("w") as fh:
        for r in results:
            for row, a, s in zip(rows, r.answers, r.scores):
                fh.write(json.dumps({"row": row.where, "model": r.label, "final": a.final, "reasoning": a.reasoning,
                                     "scores": s}, ensure_ascii=False) + "\n")
