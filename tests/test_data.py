"""The data path: formats, sources, harmony rendering (checked against the HF chat template), loss masks token by
token, bad rows with their line numbers through `swft-lite data check`, the length policy, the cache and the eval
split. Real openai-harmony and the real tokenizer (built from the o200k vocabulary, conftest); no network."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite import data as D
from swft_lite.cli import main
from swft_lite.profiles import load_profile

DATE = "2025-06-28"
SYSTEM = "You write architecture docs."

# Every test here renders with openai-harmony, which needs the o200k vocabulary.
pytestmark = pytest.mark.usefixtures("o200k_vocab")


@pytest.fixture(scope="module")
def enc(o200k_vocab):
    return D._encoding()


def spans(enc, ids, labels):
    """The trained text, one string per contiguous run of trained tokens."""
    out, i = [], 0
    while i < len(ids):
        if labels[i] == -100:
            i += 1
            continue
        j = i
        while j < len(ids) and labels[j] != -100:
            j += 1
        out.append(enc.decode(ids[i:j]))
        i = j
    return out


def opts(tmp_path=None, **kw):
    if tmp_path is not None:
        kw.setdefault("cache_dir", str(tmp_path / "cache"))
    return D.DataOptions(**kw)


def chat(user="What is an ADR?", answer="A short record of one decision.", thinking=None, system=None, **extra):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    msgs.append({"role": "assistant", "content": answer, **({"thinking": thinking} if thinking else {})})
    return {"messages": msgs, **extra}


MULTI = {"messages": [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "Q1"},
    {"role": "assistant", "thinking": "T1", "content": "A1"},
    {"role": "user", "content": "Q2"},
    {"role": "assistant", "thinking": "T2", "content": "A2"},
]}

TOOLS = [{"type": "function", "function": {
    "name": "get_adr", "description": "Fetch an ADR by number",
    "parameters": {"type": "object", "properties": {"number": {"type": "integer", "description": "ADR number"}},
                   "required": ["number"]}}}]
TOOL_ROW = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "What did ADR 7 decide?"},
    {"role": "assistant", "thinking": "look it up", "tool_calls": [{"type": "function", "function": {
        "name": "get_adr", "arguments": {"number": 7}}}]},
    {"role": "tool", "content": "{\"title\": \"Use PostgreSQL\"}"},
    {"role": "assistant", "thinking": "got it", "content": "PostgreSQL for orders."},
]}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_check(*args):
    res = CliRunner().invoke(main, ["data", "check", *map(str, args)])
    return res.exit_code, res.output


# --- rendering: parity with the Hugging Face tokenizer + chat template --------------------------------------------


@pytest.fixture(scope="module")
def hf_template(gpt_oss_files):
    text = (gpt_oss_files / "chat_template.jinja").read_text()
    # The template stamps strftime_now("%Y-%m-%d"); pin it to the same fixed date swft-lite renders.
    assert text.count('strftime_now("%Y-%m-%d")') == 1
    return text.replace('strftime_now("%Y-%m-%d")', json.dumps(DATE))


def _hf_ids(tokenizer, template, row, **kw):
    msgs = [dict(m) for m in row["messages"]]
    for m in msgs:  # the template reads the reasoning from `thinking`
        if "reasoning_content" in m:
            m["thinking"] = m.pop("reasoning_content")
    out = tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=True, tools=row.get("tools"),
                                        reasoning_effort=row.get("reasoning_effort", "medium"), **kw)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


PARITY = {
    "single turn, system prompt, reasoning, high": chat(system=SYSTEM, thinking="Nygard's format.",
                                                        reasoning_effort="high"),
    "no system, no reasoning, low": chat(reasoning_effort="low"),
    "multi-turn drops earlier reasoning": MULTI,
    "developer role, reasoning_content": {"messages": [
        {"role": "developer", "content": "Answer in one sentence."}, {"role": "user", "content": "C4?"},
        {"role": "assistant", "reasoning_content": "Four levels.", "content": "Four zoom levels of diagrams."}]},
    "tool call and tool result": TOOL_ROW,
    "unicode": chat(user="Qu'est-ce qu'un ADR ? 日本語", answer="Une décision — notée. ✓", thinking="français"),
}


@pytest.mark.parametrize("name", list(PARITY))
def test_ids_equal_hf_chat_template(name, tokenizer, hf_template, enc):
    row = PARITY[name]
    ids, _ = D.render_conversation(row, D.DataOptions(date=DATE))
    assert ids == _hf_ids(tokenizer, hf_template, row), name


def test_model_identity_and_date_are_rendered(tokenizer, hf_template, enc):
    row = chat()
    ids, _ = D.render_conversation(row, D.DataOptions(model_identity="You are DocBot.", date=DATE))
    assert ids == _hf_ids(tokenizer, hf_template, row, model_identity="You are DocBot.")
    other, _ = D.render_conversation(row, D.DataOptions(date="2030-01-02"))
    assert "Current date: 2030-01-02" in enc.decode(other)


# --- loss masks, token by token ------------------------------------------------------------------------------------


def test_mask_assistant_multi_turn(enc):
    ids, labels = D.render_conversation(MULTI, D.DataOptions(mask="assistant"))
    assert spans(enc, ids, labels) == [
        "A1",  # an earlier answer: its text only (the template rewrote its header and terminator)
        "<|channel|>analysis<|message|>T2<|end|><|start|>assistant<|channel|>final<|message|>A2<|return|>",
    ]
    assert "T1" not in enc.decode(ids)  # earlier reasoning is dropped, as at inference
    assert len(labels) == len(ids)
    assert all(lab in (-100, tok) for lab, tok in zip(labels, ids))


def test_mask_final_multi_turn(enc):
    ids, labels = D.render_conversation(MULTI, D.DataOptions(mask="final"))
    assert spans(enc, ids, labels) == ["A1", "<|start|>assistant<|channel|>final<|message|>A2<|return|>"]


def test_mask_all(enc):
    ids, labels = D.render_conversation(MULTI, D.DataOptions(mask="all"))
    assert labels == ids


def test_mask_without_reasoning(enc):
    ids, labels = D.render_conversation(chat(answer="Short."), D.DataOptions(mask="assistant"))
    # "<|start|>assistant" comes from the prompt at inference; the model writes the rest.
    assert spans(enc, ids, labels) == ["<|channel|>final<|message|>Short.<|return|>"]
    first = next(i for i, x in enumerate(labels) if x != -100)
    assert enc.decode(ids[:first]).endswith("<|end|><|start|>assistant")


def test_mask_tool_calls(enc):
    ids, labels = D.render_conversation(TOOL_ROW, D.DataOptions(mask="assistant"))
    assert spans(enc, ids, labels) == [
        ' to=functions.get_adr<|channel|>commentary json<|message|>{"number": 7}<|call|>',
        "<|channel|>analysis<|message|>got it<|end|><|start|>assistant<|channel|>final<|message|>"
        "PostgreSQL for orders.<|return|>",
    ]
    ids, labels = D.render_conversation(TOOL_ROW, D.DataOptions(mask="final"))
    assert spans(enc, ids, labels) == ["<|start|>assistant<|channel|>final<|message|>PostgreSQL for orders.<|return|>"]


def test_nothing_to_train_is_an_error(enc):
    only_call = {"messages": TOOL_ROW["messages"][:2], "tools": TOOLS}
    ids, labels = D.render_conversation(only_call, D.DataOptions(mask="assistant"))
    assert spans(enc, ids, labels)[-1].endswith("<|call|>")
    with pytest.raises(D.DataError, match="nothing to train"):
        D.render_conversation(only_call, D.DataOptions(mask="final"))


# --- formats -------------------------------------------------------------------------------------------------------


def test_prompt_completion_and_alpaca_render_like_chat(enc):
    o = D.DataOptions()
    ref = D.render_conversation(chat(system=SYSTEM, thinking="T"), o)
    assert D.render_conversation({"prompt": "What is an ADR?", "completion": "A short record of one decision.",
                                  "system": SYSTEM, "thinking": "T"}, o) == ref
    conversational = {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is an ADR?"}],
                      "completion": [{"role": "assistant", "content": "A short record of one decision.",
                                      "thinking": "T"}]}
    assert D.render_conversation(conversational, o) == ref
    alp = D.render_conversation({"instruction": "Summarise.", "input": "Text here.", "output": "Summary."}, o)
    assert alp == D.render_conversation(chat(user="Summarise.\n\nText here.", answer="Summary."), o)
    no_input = D.render_conversation({"instruction": "Summarise.", "input": "", "output": "Summary."}, o)
    assert no_input == D.render_conversation(chat(user="Summarise.", answer="Summary."), o)


@pytest.mark.parametrize("mask", D.MASKS)
def test_text_rows_train_like_the_chat_they_render(enc, mask):
    o = D.DataOptions(mask=mask)
    for row in (MULTI, TOOL_ROW, chat(thinking="T")):
        ids, labels = D.render_conversation(row, o)
        text_row = {"text": enc.decode(ids)}
        assert D.render_conversation(text_row, o) == (ids, labels)


BAD_TEXTS = {
    "hello": "does not start with <|start|>",
    "<|start|>system<|message|>s<|end|><|start|>bogus<|message|>x<|end|>": "Unknown role: bogus",
    "<|start|>system<|message|>s<|end|><|start|>user<|message|>q": "not terminated",
    "<|start|>system<|message|>s<|end|><|start|>user<|message|>q<|end|>junk<|start|>assistant<|channel|>final"
    "<|message|>a<|return|>": "text after its terminator",
    "<|start|>user<|message|>q<|end|><|start|>assistant<|channel|>final<|message|>a<|return|>": "not the system block",
    "<|start|>system<|message|>s<|end|><|start|>user<|message|>q<|end|><|start|>assistant<|channel|>final"
    "<|message|>a<|end|>": "ends with <|end|>",
    "<|start|>system<|message|>s<|end|><|start|>user<|message|>q<|end|><|start|>assistant<|message|>a<|return|>":
        "has no channel",
}


def test_bad_harmony_text_rows(tmp_path, enc):
    path = write_jsonl(tmp_path / "text.jsonl", [{"text": t} for t in BAD_TEXTS])
    code, out = run_check(path)
    assert code == 1
    for lineno, expected in enumerate(BAD_TEXTS.values(), 1):
        assert any(ln.startswith(f"{path}:{lineno}: ") and expected in ln for ln in out.splitlines()), (expected, out)


# --- sources -------------------------------------------------------------------------------------------------------

ROWS = [chat(user=f"Question {i}?", answer=f"Answer {i}. " * (i + 1), thinking="T" if i % 2 else None,
             reasoning_effort=["low", "medium", "high"][i % 3]) for i in range(12)]


def _write_sources(tmp_path):
    import datasets
    import pandas as pd

    out = {"jsonl": write_jsonl(tmp_path / "d.jsonl", ROWS)}
    (tmp_path / "list.json").write_text(json.dumps(ROWS, indent=1))
    (tmp_path / "data.json").write_text(json.dumps({"data": ROWS}, indent=1))
    out["json list"], out["json data"] = tmp_path / "list.json", tmp_path / "data.json"
    pd.DataFrame(ROWS).to_parquet(tmp_path / "d.parquet")
    out["parquet"] = tmp_path / "d.parquet"
    with (tmp_path / "d.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["messages", "reasoning_effort"])
        w.writeheader()
        for r in ROWS:
            w.writerow({"messages": json.dumps(r["messages"]), "reasoning_effort": r["reasoning_effort"]})
    out["csv"] = tmp_path / "d.csv"
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    out["save_to_disk"] = tmp_path / "saved"
    return out


def test_every_source_reads_the_same_rows(tmp_path, enc):
    sources = _write_sources(tmp_path)
    ref = D.check_file(sources["jsonl"], D.DataOptions())
    assert ref.ok and ref.rows == 12 and ref.format == "chat" and ref.rows_with_reasoning == 6
    for name, path in sources.items():
        res = D.check_file(path, D.DataOptions())
        assert res.ok, (name, [str(p) for p in res.problems])
        assert res.lengths == ref.lengths, name
    a = D.prepare_data(str(sources["jsonl"]), None, opts(tmp_path))
    b = D.prepare_data(str(sources["parquet"]), None, opts(tmp_path))
    assert a.train["input_ids"] == b.train["input_ids"] and a.train["labels"] == b.train["labels"]
    assert b.report["files"][str(sources["parquet"])]["format"] == "chat"


def test_row_numbers_for_parquet_and_csv(tmp_path):
    import pandas as pd

    rows = [{"instruction": "a", "output": "b"}, {"instruction": "a", "output": ""},
            {"instruction": "c", "output": "d"}]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    code, out = run_check(tmp_path / "a.parquet")
    assert code == 1 and f"{tmp_path / 'a.parquet'}:row 2: output is empty" in out
    (tmp_path / "a.csv").write_text("prompt,completion\nhi,there\nhi,\n")
    code, out = run_check(tmp_path / "a.csv")
    assert code == 1 and f"{tmp_path / 'a.csv'}:row 2: " in out


# --- `data check` on bad rows --------------------------------------------------------------------------------------

BAD_ROWS = [
    (chat(), None),
    ('{"messages": [{"role": "user", "content": "Hi"}', "invalid JSON"),
    ({"messages": [{"role": "user", "content": "Hi"}, {"role": "bot", "content": "Hello"}]}, "unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": "Only a question"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "   "}, {"role": "assistant", "content": "x"}]}, "content is empty"),
    ({"messages": [{"role": "user", "content": 42}, {"role": "assistant", "content": "x"}]},
     "content must be a string, got int"),
    ({"messages": "hello"}, "messages must be a list"),
    ({"messages": [{"content": "x"}]}, "role must be a string"),
    ({"prompt": "a", "completion": "b"}, "formats can't be mixed"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<|channel|>final"}]},
     "special token"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "q2"}]}, "ends with a user message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "late"},
                   {"role": "assistant", "content": "a"}]}, "may only come before the first user turn"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "tool", "content": "r"},
                   {"role": "assistant", "content": "a"}]}, "without a preceding assistant tool call"),
    (chat(reasoning_effort="max"), "reasoning_effort must be one of"),
    ([1, 2], "must be a JSON object"),
    ({"foo": 1}, "unrecognised row"),
]


def test_data_check_reports_each_bad_row_with_its_line(tmp_path, enc):
    path = tmp_path / "bad.jsonl"
    lines = [r if isinstance(r, str) else json.dumps(r) for r, _ in BAD_ROWS]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line shifts the rest
    code, out = run_check(path)
    assert code == 1
    problem_lines = [ln for ln in out.splitlines() if ln.startswith(f"{path}:")]
    for i, (_, expected) in enumerate(BAD_ROWS):
        lineno = i + 1 if i < 3 else i + 2
        mine = [ln for ln in problem_lines if ln.startswith(f"{path}:{lineno}: ")]
        if expected is None:
            assert not mine, mine
        else:
            assert mine and any(expected in ln for ln in mine), (lineno, expected, out)
    assert f"rows {len(BAD_ROWS)} (1 valid)" in " ".join(out.split())
    assert f"{path}: {len(BAD_ROWS) - 1} problems" in out


def test_data_check_nothing_to_train_under_mask_final(tmp_path, enc):
    path = write_jsonl(tmp_path / "calls.jsonl", [{"messages": TOOL_ROW["messages"][:2], "tools": TOOLS}])
    assert run_check(path)[0] == 0
    code, out = run_check(path, "--mask", "final")
    assert code == 1 and f"{path}:1: nothing to train" in out


def test_data_check_sample_passes(enc):
    code, out = run_check("sample")
    assert code == 0, out
    # rows are measured against the default profile (rtx4090)'s max_seq_length
    assert ": OK" in out and "format          chat" in out
    assert f"over {load_profile('rtx4090').max_seq_length} tokens" in out
    rows = [json.loads(ln) for ln in D.sample_path().read_text().splitlines()]
    assert 30 <= len(rows) <= 40
    assert any(r["messages"][0]["role"] == "system" for r in rows)
    assert sum("thinking" in r["messages"][-1] for r in rows) >= 8
    assert {r.get("reasoning_effort") for r in rows} >= {"low", "medium", "high"}


def test_data_check_json_show_and_profile(tmp_path, enc):
    code, out = run_check("sample", "--json", "--profile", "rtx4070", "--show", "1")
    doc = json.loads(out)
    from swft_lite.profiles import load_profile

    assert code == 0 and doc["ok"] and doc["rows"] == doc["valid_rows"] >= 30
    assert doc["max_seq_length"] == load_profile("rtx4070").max_seq_length
    assert doc["tokens"]["min"] <= doc["tokens"]["median"] <= doc["tokens"]["p95"] <= doc["tokens"]["max"]
    assert 0 < doc["tokens_trained"] < doc["tokens_total"]
    assert doc["samples"][0]["rendered"].startswith("«<|start|>system")
    code, out = run_check("sample", "--show", "2", "--max-seq-length", "300")
    assert code == 0 and out.count("legend: «...»") == 1 and sum(ln.startswith("--- ") for ln in out.splitlines()) == 2
    assert "over 300 tokens" in out and "would be dropped" in out


def test_data_check_unreadable_file_exits_2(tmp_path):
    code, out = run_check(tmp_path / "missing.jsonl")
    assert code == 2 and "no such file" in out


# --- prepare_data: validation first, length policy, cache, eval split --------------------------------------------


def test_prepare_rejects_invalid_rows_before_rendering(tmp_path, enc):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(), {"messages": []}, chat(), {"messages": [{"role": "x"}]}])
    with pytest.raises(D.DataError) as err:
        D.prepare_data(str(path), None, opts(tmp_path))
    msg = str(err.value)
    assert f"{path}:2: messages is empty" in msg and f"{path}:4: message 1: unknown role 'x'" in msg
    assert not [p for p in (tmp_path / "cache").iterdir()]  # nothing rendered, nothing cached


def _len_rows():
    short = chat(user="q", answer="a")
    long_answer = chat(user="q", answer="word " * 400)
    long_prompt = chat(user="word " * 400, answer="a")  # its trained tokens lie beyond any cut
    return [short, long_answer, long_prompt, short]


def test_overlong_drop_and_truncate(tmp_path, enc):
    path = write_jsonl(tmp_path / "t.jsonl", _len_rows())
    dropped = D.prepare_data(str(path), None, opts(tmp_path, max_seq_length=200))
    r = dropped.report
    assert (r["rows"], r["kept"], r["dropped_overlong"], r["truncated"]) == (4, 2, 2, 0)
    assert len(dropped.train) == 2 and max(len(x) for x in dropped.train["input_ids"]) <= 200
    trunc = D.prepare_data(str(path), None, opts(tmp_path, max_seq_length=200, overlong="truncate"))
    r = trunc.report
    assert (r["kept"], r["truncated"], r["dropped_truncated_untrained"], r["dropped_overlong"]) == (3, 1, 1, 0)
    assert sorted(len(x) for x in trunc.train["input_ids"])[-1] == 200
    for ids, labels in zip(trunc.train["input_ids"], trunc.train["labels"]):
        assert len(ids) == len(labels) and any(x != -100 for x in labels)
    assert r["tokens_total"] == sum(len(x) for x in trunc.train["input_ids"])
    assert r["tokens_trained"] == sum(sum(1 for v in x if v != -100) for x in trunc.train["labels"])


def test_prepared_rows_equal_render_conversation(tmp_path, enc):
    path = write_jsonl(tmp_path / "t.jsonl", [MULTI, TOOL_ROW])
    p = D.prepare_data(str(path), None, opts(tmp_path, mask="assistant"))
    for row, ids, labels in zip([MULTI, TOOL_ROW], p.train["input_ids"], p.train["labels"]):
        assert (ids, labels) == D.render_conversation(row, D.DataOptions())
    assert set(p.train.column_names) == {"input_ids", "labels"}


def test_cache_hit_skips_rendering(tmp_path, enc, monkeypatch):
    path = write_jsonl(tmp_path / "t.jsonl", ROWS)
    first = D.prepare_data(str(path), None, opts(tmp_path))
    assert first.report["cache"]["hit"] is False and Path(first.report["cache"]["path"]).is_dir()

    def boom(*a, **k):
        raise AssertionError("rendered again despite the cache")

    import swft_lite.data.prepare as prepare_mod  # where prepare_data looks them up

    monkeypatch.setattr(prepare_mod, "_render_batch", boom)
    monkeypatch.setattr(prepare_mod, "_validate_to_arrow", boom)
    second = D.prepare_data(str(path), None, opts(tmp_path))
    assert second.report["cache"]["hit"] is True
    assert second.report["cache"]["key"] == first.report["cache"]["key"]
    assert second.train["input_ids"] == first.train["input_ids"] and second.train["labels"] == first.train["labels"]
    # The key follows the content and the options that change tokens, not the path or num_proc.
    copy = write_jsonl(tmp_path / "copy.jsonl", ROWS)
    assert D.prepare_data(str(copy), None, opts(tmp_path, num_proc=2)).report["cache"]["hit"] is True
    with pytest.raises(AssertionError, match="rendered again"):
        D.prepare_data(str(path), None, opts(tmp_path, mask="final"))
    write_jsonl(path, ROWS[:-1])
    with pytest.raises(AssertionError, match="rendered again"):
        D.prepare_data(str(path), None, opts(tmp_path))


def test_parallel_render_matches_single_process(tmp_path, enc):
    rows = [chat(user=f"q{i}", answer=f"answer {i} " * (i % 7 + 1), thinking=f"t{i}" if i % 3 else None)
            for i in range(120)]
    path = write_jsonl(tmp_path / "t.jsonl", rows)
    one = D.prepare_data(str(path), None, opts(tmp_path / "a", num_proc=1))
    two = D.prepare_data(str(path), None, opts(tmp_path / "b", num_proc=2))
    assert two.report["render"]["num_proc"] == 2
    assert one.train["input_ids"] == two.train["input_ids"] and one.train["labels"] == two.train["labels"]


def test_eval_split_is_deterministic(tmp_path, enc):
    path = write_jsonl(tmp_path / "t.jsonl", [chat(user=f"q{i}", answer=f"a{i}") for i in range(50)])
    a = D.prepare_data(str(path), None, opts(tmp_path / "a", eval_fraction=0.2, seed=1))
    b = D.prepare_data(str(path), None, opts(tmp_path / "b", eval_fraction=0.2, seed=1))
    c = D.prepare_data(str(path), None, opts(tmp_path / "c", eval_fraction=0.2, seed=2))
    assert len(a.eval) == 10 and len(a.train) == 40
    assert a.eval["input_ids"] == b.eval["input_ids"] and a.train["input_ids"] == b.train["input_ids"]
    assert a.eval["input_ids"] != c.eval["input_ids"]
    assert a.report["eval_source"] == "fraction" and a.report["splits"]["eval"]["rows"] == 10
    with pytest.raises(D.DataError, match="give one of them"):
        D.prepare_data(str(path), str(path), opts(tmp_path, eval_fraction=0.2))


def test_defaults_and_sample(tmp_path, enc, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(D.DataError, match="data/processed/train.jsonl: no such file"):
        D.prepare_data(None, None, opts(tmp_path))
    (tmp_path / "data" / "processed").mkdir(parents=True)
    write_jsonl(tmp_path / "data/processed/train.jsonl", ROWS)
    write_jsonl(tmp_path / "data/processed/validation.jsonl", ROWS[:3])
    p = D.prepare_data(None, None, opts(tmp_path))
    assert len(p.train) == 12 and len(p.eval) == 3 and p.report["eval_source"] == "file"
    assert {f["role"] for f in p.report["files"].values()} == {"train", "eval"}
    s = D.prepare_data("sample", None, opts(tmp_path))
    assert len(s.train) == s.report["rows"] >= 30 and s.eval is None


def test_options_are_validated():
    # (check_packing, tested here before, was dead code and is gone: packing is a profile key, see batching.py)
    with pytest.raises(D.DataError, match="mask must be one of"):
        D.DataOptions(mask="answers").validate()
    with pytest.raises(D.DataError, match="date must be YYYY-MM-DD"):
        D.DataOptions(date="today").validate()
