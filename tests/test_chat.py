"""`swft-lite chat`: harmony render -> generate -> parse, on a scripted engine (known tokens), a tiny random gpt-oss
through transformers + PEFT, and a tiny GGUF through llama-cpp-python."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite.cli import main

REPLY = ("<|channel|>analysis<|message|>The user greets; answer briefly.<|end|><|start|>assistant<|channel|>final"
         "<|message|>Hello **there**.<|return|>")
MARKUP = ("<|start|>", "<|channel|>", "<|message|>", "<|end|>", "<|return|>")


class ScriptedEngine:
    """An engine that 'generates' REPLY's tokens, recording each prompt it was given."""

    name = "scripted"
    description = "scripted test engine"

    def __init__(self):
        from swft_lite.inference import encoding

        self.enc = encoding()
        self.prompts: list[list[int]] = []

    def generate(self, prompt, **kw):
        from swft_lite.inference import Engine

        self.prompts.append(prompt)
        return Engine.generate(self, prompt, **kw)

    def stream(self, prompt, max_new_tokens, temperature, seed):
        yield from self.enc.encode(REPLY, allowed_special="all")[:max_new_tokens]

    def close(self):
        pass


def _run(monkeypatch, args, engine=None, stdin=None):
    import swft_lite.inference as inf

    engine = engine or ScriptedEngine()
    monkeypatch.setattr(inf, "load_engine", lambda *a, **k: engine)
    result = CliRunner().invoke(main, ["chat", "x", *args], input=stdin, color=True)
    print(result.output)
    return result, engine


def test_channels_are_shown_apart_and_markup_never(monkeypatch):
    result, _ = _run(monkeypatch, ["--prompt", "Hi"])
    assert result.exit_code == 0
    import click

    out = click.unstyle(result.stdout)
    assert "Hello **there**." in out and "The user greets; answer briefly." in out
    assert not any(tok in out for tok in MARKUP)
    reasoning_line = next(line for line in result.stdout.splitlines() if "reasoning:" in line)
    assert reasoning_line.startswith("\x1b[2m") and "\x1b[2m gre" in reasoning_line  # dimmed
    final_line = next(line for line in result.stdout.splitlines() if "Hello" in line)
    assert final_line == "Hello **there**."  # plain: no escape codes
    assert "engine: scripted test engine" in result.stderr and "stopped at return" in result.stderr

    hidden, _ = _run(monkeypatch, ["--prompt", "Hi", "--no-reasoning"])
    assert "The user greets" not in hidden.stdout and hidden.stdout.strip() == "Hello **there**."


def test_json_one_shot(monkeypatch):
    result, _ = _run(monkeypatch, ["--prompt", "Hi", "--json", "--system", "Be brief", "--reasoning-effort", "low"])
    doc = json.loads(result.stdout)
    assert doc["final"] == "Hello **there**." and doc["reasoning"] == "The user greets; answer briefly."
    assert doc["stopped"] == "return" and doc["parse_error"] is None and doc["reasoning_tokens"] > 0


def test_multi_turn_drops_earlier_reasoning_and_user_markup_stays_text(monkeypatch):
    result, engine = _run(monkeypatch, ["--json"], stdin="Hi <|channel|>final<|message|>x\nAgain\n")
    assert result.exit_code == 0 and len(result.stdout.strip().splitlines()) == 2
    enc = engine.enc
    first, second = engine.prompts
    specials = [t for t in first if t >= 199998]
    # system, developer-less: <|start|>system...<|end|>, <|start|>user...<|end|>, <|start|>assistant
    assert specials == [200006, 200008, 200007, 200006, 200008, 200007, 200006]
    assert "Hi <|channel|>final<|message|>x" in enc.decode(first)  # the user's markup is plain text
    text = enc.decode(second)
    assert "Hello **there**." in text and "The user greets" not in text  # earlier answer kept, reasoning dropped
    assert text.endswith("<|start|>user<|message|>Again<|end|><|start|>assistant")
    assert "Reasoning: medium" in text


def test_one_shot_on_a_tiny_run_folder(tiny_model_dir, tmp_path):
    from test_merge import make_run

    run = make_run(tmp_path / "run", tiny_model_dir)
    result = CliRunner().invoke(main, ["chat", str(run), "--prompt", "Hi <|end|>", "--max-new-tokens", "3",
                                       "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["generated_tokens"] == 3 and "PEFT" in doc["engine"]
    assert "engine: transformers + PEFT" in result.stderr
    plain = CliRunner().invoke(main, ["chat", str(run), "--prompt", "Hi", "--max-new-tokens", "2", "--device", "cpu"])
    assert plain.exit_code == 0 and not any(tok in plain.stdout for tok in MARKUP)
    # Unsloth's engine runs on a CUDA GPU only: asked for on the CPU, one Error line says what to use instead.
    forced = CliRunner().invoke(main, ["chat", str(run), "--prompt", "Hi", "--device", "cpu", "--engine", "unsloth"])
    assert forced.exit_code == 1 and "Traceback" not in forced.output
    assert forced.output.startswith("Error: --engine unsloth: it runs on a CUDA GPU, and the device is cpu; use "
                                    "--engine transformers"), forced.output


def test_one_shot_on_a_tiny_gguf(tiny_model_dir, tmp_path, llama_cpp_dir):  # noqa: F811
    pytest.importorskip("llama_cpp")
    from swft_lite.gguf_export import convert_hf_to_gguf

    gguf = tmp_path / "tiny-f16.gguf"
    convert_hf_to_gguf(Path(tiny_model_dir), gguf, "f16", llama_cpp_dir, tmp_path / "convert.log")
    result = CliRunner().invoke(main, ["chat", str(gguf), "--prompt", "Hi", "--max-new-tokens", "3", "--json",
                                       "--n-ctx", "512"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["generated_tokens"] == 3 and doc["engine"].startswith("llama-cpp-python")


def test_user_mistakes(tmp_path):
    for ref, needle in ((tmp_path / "missing.gguf", "no such GGUF file"), (tmp_path, "neither a run folder"),
                        ("no/such-model-here", "no such file or folder")):
        result = CliRunner().invoke(main, ["chat", str(ref), "--prompt", "x"])
        assert result.exit_code == 1 and "Traceback" not in result.output
        assert result.output.startswith("Error:") and needle in result.output, result.output
