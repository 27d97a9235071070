"""Evaluation during `swft-lite train` on CPU (tiny random gpt-oss, hf backend, the real CLI): eval loss and the
--eval-generate metrics at each evaluation in run.json and TensorBoard, early stopping on a generated-answer metric,
and the option mistakes as one Error line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("o200k_vocab")]

SOURCE = "File: src/app.py\n```python\nimport server\n\ndef main():\n    server.run()\n```"
ROWS = [
    {"messages": [{"role": "user", "content": "What does the gateway do?"},
                  {"role": "assistant", "content": "It routes requests to services."}]},
    {"messages": [{"role": "user", "content": "Where are sessions stored?"},
                  {"role": "assistant", "content": "In the Redis cache."}]},
]
VAL = [
    {"messages": [{"role": "user", "content": "Document the entry point.\n\n" + SOURCE},
                  {"role": "assistant", "content": "- `main()` runs the server (src/app.py:4)."}]},
    {"messages": [{"role": "user", "content": "Which queue handles billing?"},
                  {"role": "assistant", "content": "The billing-events queue."}]},
    {"messages": [{"role": "user", "content": "How are deploys rolled out?"},
                  {"role": "assistant", "content": "Canary first."}]},
]
CPU_FLAGS = ["--profile", "rtx4070", "--backend", "hf", "--no-load-in-4bit", "--lora-targets", "attention",
             "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-3",
             "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-seq-length", "256", "--no-merge"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", ROWS), write_jsonl(tmp_path / "val.jsonl", VAL)


def test_eval_loss_and_generated_answer_metrics_reach_run_json_and_tensorboard(tmp_path, tiny_model_dir, data):
    train, val = data
    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", train, "--eval-data", val,
                      "--output-root", tmp_path, "--run-name", "gen", "--max-steps", 2, "--eval-steps", 1,
                      "--save-steps", 2, "--eval-generate", 2, "--eval-max-new-tokens", 6])
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "gen"
    record = json.loads((run_dir / "run.json").read_text())
    history = record["eval_metrics"]
    assert [e["step"] for e in history] == [1, 2]
    for e in history:
        assert e["loss"] > 0 and e["perplexity"] == pytest.approx(2.718281828 ** e["loss"], rel=1e-6)
        # a random model writes no harmony final channel: the format checks fail, every answer is counted
        assert e["format_ok"] == 0.0 and e["final_present"] == 0.0 and e["markdown_valid"] == 0.0
        assert 0 < e["generated_tokens"] <= 2 * 6
        # no final answer -> no claims: source_refs is undefined and left out, its counts are logged
        assert "source_refs" not in e and e["claims"] == 0
    assert [e["eval_loss"] for e in record["eval_losses"]] == [e["loss"] for e in history]
    assert record["eval_generate"]["rows"] == 2 and record["eval_generate"]["max_new_tokens"] == 6
    assert record["early_stopping"]["stopped"] is False and record["early_stopping"]["enabled"] is False
    assert record["best_eval_loss"] == min(e["loss"] for e in history)

    answers = [json.loads(line) for line in (run_dir / "eval_generations" / "step-2.jsonl").read_text().splitlines()]
    assert [a["row"] for a in answers] == [f"{val}:1", f"{val}:2"]
    assert answers[0]["scores"]["format"]["problems"][0] == "no final channel"

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    for tag in ("eval/loss", "eval/perplexity", "eval/format_ok", "eval/markdown_valid", "eval/final_present",
                "eval/generated_tokens"):
        events = acc.Scalars(tag)
        assert [ev.step for ev in events] == [1, 2], tag
    assert [ev.value for ev in acc.Scalars("eval/format_ok")] == [0.0, 0.0]
    assert [ev.value for ev in acc.Scalars("eval/loss")] == pytest.approx([e["loss"] for e in history])


@pytest.mark.parametrize("metric", ["format_ok", "source_refs"])
def test_early_stopping_on_a_generated_answer_metric_stops_the_run_and_says_why(tmp_path, tiny_model_dir, data,
                                                                                  metric):
    # format_ok stays 0 on a random model, and source_refs is undefined (no claims), which counts as 0: with
    # patience 1 the second evaluation stops the run (of 8 steps).
    train, val = data
    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", train, "--eval-data", val,
                      "--output-root", tmp_path, "--run-name", "stop", "--max-steps", 8, "--eval-steps", 1,
                      "--save-steps", 1, "--eval-generate", 1, "--eval-max-new-tokens", 3,
                      "--early-stopping-metric", metric, "--early-stopping-patience", 1])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "stop" / "run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 2
    stop = record["early_stopping"]
    assert stop["stopped"] is True and stop["at_step"] == 2 and stop["metric"] == metric
    assert stop["best"] == 0.0 and stop["best_step"] == 1 and stop["patience"] == 1
    assert f"{metric} did not improve on its best, 0 at step 1, for 1 evaluation(s)" in stop["reason"]
    assert "higher is better" in stop["reason"]
    assert record["best_metric"]["metric"] == metric and record["best_metric"]["step"] == 1
    assert record["best_checkpoint"].endswith("checkpoint-1")
    assert f"early stopping: {metric} did not improve" in result.output
    if metric == "source_refs":  # counted as 0 for the decision, never logged as a measured 0
        assert stop["undefined_at_steps"] == [1, 2]
        assert all("source_refs" not in e for e in record["eval_metrics"])
    else:
        assert "undefined_at_steps" not in stop


def _one_error_line(result) -> str:
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def test_an_unknown_metric_name_lists_the_valid_ones(tmp_path, data):
    train, val = data
    line = _one_error_line(run_cli(["train", *CPU_FLAGS, "--data", train, "--eval-data", val, "--output-root",
                                    tmp_path, "--early-stopping-metric", "bleu", "--early-stopping-patience", 2]))
    assert "bleu" in line
    for name in ("eval_loss", "source_refs", "markdown_valid", "mermaid_valid", "format_ok", "final_present"):
        assert name in line


@pytest.mark.parametrize("extra,message", [
    (["--early-stopping-metric", "source_refs"], "--early-stopping-metric source_refs is measured on generated "
                                                 "answers: add --eval-generate N"),
    (["--eval-generate", 2, "--eval-fraction", 0.5], "--eval-generate needs an eval file (--eval-data VAL.jsonl)"),
    (["--early-stopping-patience", 2], "--early-stopping-patience needs eval data"),
    (["--eval-data", "VAL", "--early-stopping-patience", 2, "--eval-steps", 30, "--save-steps", 100],
     "--early-stopping-patience needs --save-steps (100) to be a multiple of --eval-steps (30)"),
])
def test_eval_option_mistakes_stop_before_the_model_loads(tmp_path, data, extra, message):
    train, val = data
    extra = [val if a == "VAL" else a for a in extra]
    # --model names a folder that does not exist as a model: reaching the model load would be another error
    model = tmp_path / "not-loaded"
    model.mkdir()
    (model / "config.json").write_text("{}")
    line = _one_error_line(run_cli(["train", *CPU_FLAGS, "--model", model, "--data", train, "--output-root",
                                    tmp_path / "runs", *extra]))
    assert message in line, line
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("adapter"))


def test_eval_generate_rows_must_be_conversations(tmp_path, data):
    train, _ = data
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "Q?", "completion": "A."}])
    model = tmp_path / "not-loaded"
    model.mkdir()
    (model / "config.json").write_text("{}")
    line = _one_error_line(run_cli(["train", *CPU_FLAGS, "--model", model, "--data", train, "--eval-data", val,
                                    "--output-root", tmp_path / "runs", "--eval-generate", 1]))
    assert line.startswith(f"Error: --eval-generate: {val}:1: expected a chat row"), line
