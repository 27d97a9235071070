"""`swft-lite eval`: --predictions scoring without a model, errors as one line, and generation + loss on a tiny
random gpt-oss (the text is noise; the plumbing - harmony render, generate, parse, score - is real)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite.cli import main

PROMPT = "Document the entry point.\n\nFile: src/app.py\n```python\nimport server\n\ndef main():\n    server.run()\n```"
ANSWER = ("# Entry point\n\n- `main()` runs the server (src/app.py:4).\n- It imports the server (src/app.py:1).\n"
          "- It also reads a config (src/config.py:3).\n\n```mermaid\nflowchart TD\n  main --> server\n```\n")
LEAKY = "<|channel|>final<|message|>Hello.\n\n```python\nunclosed"


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def invoke(args):
    result = CliRunner().invoke(main, args)
    print(result.output)
    return result


def test_predictions_are_scored_without_a_model(tmp_path):
    preds = write_jsonl(tmp_path / "preds.jsonl", [
        {"messages": [{"role": "system", "content": "Cite source."}, {"role": "user", "content": PROMPT},
                      {"role": "assistant", "content": ANSWER, "thinking": "three bullets"}]},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": LEAKY}]},
    ])
    rows_out = tmp_path / "rows.jsonl"
    result = invoke(["eval", "--predictions", str(preds), "--json", "--rows-out", str(rows_out),
                     "--mermaid-checker", "subset"])
    assert result.exit_code == 0
    doc = json.loads(result.output)
    s = doc["models"]["predictions"]
    assert doc["mermaid_checker"] == "subset"
    assert (s["rows"], s["claims"], s["cited_claims"]) == (2, 4, 2)
    assert s["markdown_valid"] == 0.5 and s["mermaid_valid"] == 1.0 and s["format_ok"] == 0.5
    assert s["leaked_markup_rows"] == 1
    rows = [json.loads(line) for line in rows_out.read_text().splitlines()]
    assert [r["row"] for r in rows] == [f"{preds}:1", f"{preds}:2"]
    assert rows[0]["scores"]["source_refs"]["invalid_citations"] == ["src/config.py is not shown in the prompt"]
    assert rows[1]["scores"]["markdown"]["problems"] == ["line 3: code fence ```python is never closed"]

    table = invoke(["eval", "--predictions", str(preds), "--mermaid-checker", "subset"])
    assert table.exit_code == 0
    assert "source_refs" in table.output and "50.0 % (2/4 claims)" in table.output
    assert "mermaid checker: swft-lite's subset check" in table.output


@pytest.mark.parametrize("content,message", [
    ('{"messages": [{"role": "user", "content": "x"}]}\n', ":1: no assistant message"),
    ('{"prompt": "x"}\n', ":1: expected a chat row"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}\n{"messages": [\n',
     ":2: invalid JSON"),
])
def test_bad_rows_end_in_one_error_line(tmp_path, content, message):
    f = tmp_path / "preds.jsonl"
    f.write_text(content)
    result = invoke(["eval", "--predictions", str(f)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {f}") and message in lines[0]


def test_missing_files_and_arguments(tmp_path):
    result = invoke(["eval", "--predictions", str(tmp_path / "nope.jsonl")])
    assert result.exit_code == 1 and "no such file" in result.output
    result = invoke(["eval", str(tmp_path)])
    assert result.exit_code == 1 and "give RUN and --data" in result.output


@pytest.fixture(scope="module")
def tiny_run(tiny_model_dir, tmp_path_factory) -> Path:
    from test_merge import make_run

    return make_run(tmp_path_factory.mktemp("eval-run") / "run", tiny_model_dir)


def test_generate_and_compare_on_a_tiny_model(tiny_run, tmp_path):
    data = write_jsonl(tmp_path / "val.jsonl", [
        {"messages": [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello.", "thinking": "greet"}]},
    ])
    rows_out = tmp_path / "rows.jsonl"
    result = CliRunner().invoke(main, ["eval", str(tiny_run), "--data", str(data), "--compare", "--device", "cpu",
                                       "--max-new-tokens", "3", "--json", "--rows-out", str(rows_out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    ft, base = doc["models"]["fine-tuned"], doc["models"]["base"]
    assert "PEFT" in ft["engine"] and "adapter" in ft["engine"] and "PEFT" not in base["engine"]
    for s in (ft, base):
        assert s["rows"] == 2 and s["generated_tokens"] == 6 and s["loss_tokens"] > 0
        assert s["eval_loss"] > 0 and s["perplexity"] > 1
    assert ft["eval_loss"] != base["eval_loss"]  # the adapter changes the model
    assert len(rows_out.read_text().splitlines()) == 4

    table = CliRunner().invoke(main, ["eval", str(tiny_run), "--data", str(data), "--compare", "--device", "cpu",
                                      "--max-new-tokens", "2", "--limit", "1"])
    assert table.exit_code == 0, table.output
    header = table.stdout.splitlines()[0].split()
    assert header == ["metric", "fine-tuned", "base"] and "eval loss" in table.stdout


def test_eval_loss_uses_the_training_labels(tiny_model_dir):
    from swft_lite import evaluate as ev
    from swft_lite.data import DataOptions, render_conversation
    from swft_lite.inference import load_engine

    row = {"messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": "A.", "thinking": "t"}]}
    er = ev.EvalRow("x:1", row, ["Q?"], None, "A.")
    engine = load_engine(tiny_model_dir, device="cpu")
    for mask in ("assistant", "final"):
        _, labels = render_conversation(row, DataOptions(mask=mask))
        assert ev.eval_loss(engine, [er], DataOptions(mask=mask))["tokens"] == sum(x != -100 for x in labels[1:])
