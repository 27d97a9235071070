"""`swft-lite train` end to end on CPU: a tiny random gpt-oss, the gpt-oss tokenizer, the hf backend, the real CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite.cli import main

# Training renders its data with openai-harmony, which needs the o200k vocabulary.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("o200k_vocab")]

# Four short conversations a tiny model can memorise in a few dozen steps.
ROWS = [
    {"messages": [{"role": "user", "content": "What does the gateway do?"},
                  {"role": "assistant", "content": "It routes requests to services."}]},
    {"messages": [{"role": "user", "content": "Where are sessions stored?"},
                  {"role": "assistant", "thinking": "Sessions live in the cache.",
                   "content": "In the Redis cache."}]},
    {"messages": [{"role": "system", "content": "Answer in one line."},
                  {"role": "user", "content": "Which queue handles billing?"},
                  {"role": "assistant", "content": "The billing-events queue."}]},
    {"messages": [{"role": "user", "content": "How are deploys rolled out?"},
                  {"role": "assistant", "content": "Canary first, then region by region."}]},
]

# Fast settings for a CPU: attention + expert LoRA so the expert path is exercised, no 4-bit (needs a GPU).
CPU_FLAGS = ["--profile", "rtx4070", "--backend", "hf", "--no-load-in-4bit", "--lora-targets", "attention+experts",
             "--per-device-batch-size", "4", "--gradient-accumulation-steps", "1", "--learning-rate", "1e-2",
             "--warmup-ratio", "0", "--lr-scheduler", "constant", "--max-seq-length", "256", "--no-merge"]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(args, **kw):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, **kw)
    return result


@pytest.fixture(scope="module")
def learnable_model_dir(tmp_path_factory, gpt_oss_files):
    """The tiny model with a wider init (0.1): at width 64 the real 0.02 caps every logit near zero, so the loss
    of any adapter is stuck near ln(201088) = 12.2 and "the loss falls" would be a test of nothing."""
    from conftest import TINY_SIZE
    from swft_lite.random_model import save_random_gpt_oss

    return save_random_gpt_oss(tmp_path_factory.mktemp("learnable"), gpt_oss_files, seed=1,
                               initializer_range=0.1, **TINY_SIZE)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, learnable_model_dir):
    """One 12-step run shared by the tests that only read what it wrote."""
    root = tmp_path_factory.mktemp("runs")
    data = write_jsonl(root / "train.jsonl", ROWS)
    result = run_cli(["train", *CPU_FLAGS, "--model", learnable_model_dir, "--data", data, "--output-root", root,
                      "--run-name", "memorise", "--max-steps", 12, "--save-steps", 6])
    assert result.exit_code == 0, result.output
    return root, data, root / "memorise", result.output


def test_run_folder_holds_adapter_checkpoint_tensorboard_and_run_json(trained_run):
    root, data, run_dir, output = trained_run
    adapter_cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 16 and adapter_cfg["lora_alpha"] == 32
    assert sorted(adapter_cfg["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").stat().st_size > 0
    assert (run_dir / "adapter" / "tokenizer.json").exists()
    assert (run_dir / "checkpoints" / "checkpoint-12" / "adapter_model.safetensors").exists()
    assert (run_dir / "checkpoints" / "checkpoint-6" / "optimizer.pt").exists()

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent)).Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "train/tokens_per_second"} <= tags

    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 12
    assert record["backend"] == "hf" and record["profile"]["name"] == "rtx4070"
    assert record["profile"]["lora_targets"] == "attention+experts"
    assert record["data"]["files"][str(data)]["sha256"]
    assert record["packages"]["transformers"] and record["packages"]["trl"].startswith("1.14")
    # every layer's attention and experts got adapters (2 layers x 4 attention modules, 2 x 2 expert tensors)
    assert record["adapters"]["modules"] == 8 and record["adapters"]["parameters"] == 4
    assert record["tokens_per_second_median"] > 0
    assert "LoRA: 8 attention modules, 4 expert parameter tensors" in output


def test_loss_falls_on_a_set_it_can_memorise(trained_run):
    record = json.loads((trained_run[2] / "run.json").read_text())
    losses = [entry["loss"] for entry in record["losses"]]
    assert len(losses) == 12
    assert losses[-1] < 0.6 * losses[0], losses


def test_existing_run_folder_is_refused_and_left_alone(trained_run, learnable_model_dir):
    root, data, run_dir, _ = trained_run
    before = (run_dir / "run.json").read_bytes()
    result = run_cli(["train", *CPU_FLAGS, "--model", learnable_model_dir, "--data", data, "--output-root", root,
                      "--run-name", "memorise", "--max-steps", 2])
    assert result.exit_code == 1
    assert "already exists" in result.output and "--resume" in result.output
    assert (run_dir / "run.json").read_bytes() == before
    assert (run_dir / "checkpoints" / "checkpoint-12").exists()


def test_resume_continues_from_the_saved_step(trained_run, learnable_model_dir, tmp_path):
    root, data, run_dir, _ = trained_run
    # A copy, so the other tests keep reading the 12-step run.
    import shutil

    copy_root = tmp_path / "runs"
    shutil.copytree(run_dir, copy_root / "memorise")
    result = run_cli(["train", *CPU_FLAGS, "--model", learnable_model_dir, "--data", data, "--output-root", copy_root,
                      "--run-name", "memorise", "--max-steps", 14, "--save-steps", 6, "--resume"])
    assert result.exit_code == 0, result.output
    assert "continuing from" in result.output and "checkpoint-12" in result.output
    record = json.loads((copy_root / "memorise" / "run.json").read_text())
    assert record["global_step"] == 14
    steps = [e["step"] for e in record["losses"]]
    assert steps == list(range(1, 15))  # the history before the stop is kept, and only steps 13-14 were trained


def test_resume_refuses_changed_settings(trained_run, learnable_model_dir):
    root, data, run_dir, _ = trained_run
    flags = [f if f != "1e-2" else "5e-3" for f in CPU_FLAGS]
    result = run_cli(["train", *flags, "--model", learnable_model_dir, "--data", data, "--output-root", root,
                      "--run-name", "memorise", "--max-steps", 14, "--resume"])
    assert result.exit_code == 1
    assert "profile.learning_rate: 0.01 -> 0.005" in result.output


def test_bad_row_stops_before_any_model_is_loaded(tmp_path, tiny_model_dir):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n" + '{"messages": [{"role": "user", "content": "hi"}]}\n')
    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", data, "--output-root",
                      tmp_path / "runs", "--run-name", "bad"])
    assert result.exit_code == 1
    assert f"{data}:2:" in result.output
    assert "model: loading" not in result.output


def test_missing_model_folder_is_a_clear_error(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = run_cli(["train", *CPU_FLAGS, "--model", tmp_path / "nope", "--data", data,
                      "--output-root", tmp_path / "runs"])
    assert result.exit_code == 1
    assert "no such folder" in result.output


def test_unsloth_backend_refuses_without_a_gpu(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = run_cli(["train", "--profile", "rtx4070", "--backend", "unsloth", "--model", tiny_model_dir,
                      "--data", data, "--output-root", tmp_path / "runs"])
    assert result.exit_code == 1
    assert "needs a CUDA GPU" in result.output


def test_ctrl_c_saves_a_checkpoint_and_resume_picks_it_up(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "swft_lite.cli", "train", *CPU_FLAGS, "--model", str(tiny_model_dir),
           "--data", str(data), "--output-root", str(root), "--run-name", "stopped", "--max-steps", "500",
           "--save-steps", "1000"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    out = b""
    deadline = time.time() + 240
    os.set_blocking(proc.stdout.fileno(), False)
    while time.time() < deadline and b"loss=" not in out:  # a step has finished: stop now
        chunk = proc.stdout.read() or b""
        out += chunk
        time.sleep(0.2)
    assert b"loss=" in out, out.decode(errors="replace")
    proc.send_signal(signal.SIGINT)
    os.set_blocking(proc.stdout.fileno(), True)
    rest, _ = proc.communicate(timeout=120)
    out += rest
    text = out.decode(errors="replace")
    assert proc.returncode == 130, text  # interrupted, not done (issue 13: it exited 0 with a green `done:`)
    assert "saving a checkpoint" in text and "interrupted at step" in text and "done:" not in text
    record = json.loads((root / "stopped" / "run.json").read_text())
    assert record["status"] == "interrupted"
    step = record["global_step"]
    assert 1 <= step < 500
    assert (root / "stopped" / "checkpoints" / f"checkpoint-{step}").exists()

    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", data, "--output-root", root,
                      "--run-name", "stopped", "--max-steps", step + 1, "--save-steps", 1000, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"checkpoint-{step}" in result.output
    assert json.loads((root / "stopped" / "run.json").read_text())["global_step"] == step + 1


def test_oom_names_the_profile_values_to_lower(monkeypatch, tmp_path, tiny_model_dir):
    import torch
    from trl import SFTTrainer

    # A GPU running out of memory cannot happen on this CPU machine: raise torch's own error at that boundary.
    def out_of_memory(self, *a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(SFTTrainer, "train", out_of_memory)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", data,
                      "--output-root", tmp_path / "runs", "--run-name", "oom"])
    assert result.exit_code == 1
    assert "ran out of memory" in result.output and "--max-seq-length 128" in result.output
    assert "--lora-targets attention" in result.output
    assert json.loads((tmp_path / "runs" / "oom" / "run.json").read_text())["status"] == "out_of_memory"


def test_a_target_that_matched_nothing_stops_the_run(tiny_model_dir):
    from swft_lite.backends import BackendError, load_for_training
    from swft_lite.profiles import load_profile

    # Build attention-only adapters, then check them against a profile that asked for the experts too:
    # the situation of the Unsloth release that logged expert LoRA while skipping it.
    attention_only = load_profile("rtx4070", {"load_in_4bit": False, "lora_targets": "attention"})
    model, _, report = load_for_training("hf", str(tiny_model_dir), attention_only)
    assert report.parameters == [] and len(report.modules) == 8
    from swft_lite.backends import inspect_adapters

    with pytest.raises(BackendError, match="experts 'mlp.experts.gate_up_proj' \\(0 of 2 layers\\)"):
        inspect_adapters(model, load_profile("rtx4070", {"load_in_4bit": False,
                                                         "lora_targets": "attention+experts"}))


def test_the_hub_default_trains_from_the_bf16_weights():
    """openai/gpt-oss-20b (MXFP4 experts) is trained from Unsloth's bf16 copy of the same weights; other hub ids and
    local folders are taken as given."""
    from swft_lite.train import TrainError, resolve_model

    said = []
    assert resolve_model("openai/gpt-oss-20b", said.append) == "unsloth/gpt-oss-20b-BF16"
    assert "MXFP4" in said[0] and "unsloth/gpt-oss-20b-BF16" in said[0]
    assert resolve_model("someone/gpt-oss-20b-finetune", said.append) == "someone/gpt-oss-20b-finetune"
    with pytest.raises(TrainError, match="no such folder"):
        resolve_model("./not-here", said.append)
