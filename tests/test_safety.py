"""Issue 13: nothing lost, nothing wrong, nothing raw. Crashes and resume, one fit rule, an `Error:` line for every
mistake a user can fix. Real runs of a tiny random gpt-oss on CPU (`--backend hf`), real files, real signals."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_train import CPU_FLAGS, ROWS, run_cli, write_jsonl

REPO = Path(__file__).resolve().parent.parent


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error:")]


# --- detect and estimate: one rule ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,total,cc", [("Tesla T4", 14.74, (7, 5)), ("Tesla V100-SXM2-16GB", 15.77, (7, 0))])
def test_fp16_only_16gb_cards_get_no_profile_with_the_estimate_numbers(name, total, cc):
    from swft_lite.hardware import GpuInfo, recommend_profile
    from swft_lite.profiles import all_profiles

    profile, reason = recommend_profile([GpuInfo(0, name, total, compute_capability=cc)], all_profiles())
    assert profile is None, reason  # issue 13: detect said rtx4070 while estimate said it does not fit
    assert "18.99 GiB reserved" in reason and "no bf16" in reason and "Train on a card with bf16" in reason


@pytest.mark.parametrize("total,cc", [(11.72, (8, 9)), (14.74, (7, 5)), (15.59, (8, 9)), (15.77, (7, 0)),
                                      (22.17, (8, 9)), (22.18, (8, 6)), (23.65, (8, 9)), (23.99, (8, 6)),
                                      (31.74, (7, 0)), (39.39, (8, 0)), (79.15, (8, 0)), (139.8, (9, 0))])
def test_detect_recommends_only_what_estimate_says_fits(total, cc):
    from swft_lite.estimate import estimate
    from swft_lite.hardware import GpuInfo, recommend_profile
    from swft_lite.profiles import all_profiles

    profile, reason = recommend_profile([GpuInfo(0, "card", total, compute_capability=cc)], all_profiles())
    if profile is not None:
        assert estimate(profile, card_gib=total, capability=cc).fits, reason


# --- runs that crash, fill the disk, get Ctrl-C ----------------------------------------------------------------------



@pytest.fixture(scope="module")
def four_steps(tmp_path_factory, tiny_model_dir):
    """A 4-step run saving at steps 2 and 4 (read-only: tests copy it)."""
    root = tmp_path_factory.mktemp("safety-runs")
    data = write_jsonl(root / "train.jsonl", ROWS)
    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", data, "--output-root", root,
                      "--run-name", "base", "--max-steps", 4, "--save-steps", 2])
    assert result.exit_code == 0, result.output
    return root, data, root / "base"


def copy_run(four_steps, tmp_path) -> tuple[Path, Path]:
    root, data, run = four_steps
    shutil.copytree(run, tmp_path / "runs" / "base")
    return tmp_path / "runs", data


def resume(tiny_model_dir, root, data, steps, *extra):
    return run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", data, "--output-root", root,
                    "--run-name", "base", "--max-steps", steps, "--save-steps", 2, "--resume", *extra])


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_a_finished_run_says_completed_and_its_checkpoints_are_marked_complete(four_steps):
    from swft_lite.checkpoints import MARKER, is_complete

    run = four_steps[2]
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    for n in (2, 4):
        assert (run / "checkpoints" / f"checkpoint-{n}" / MARKER).exists()
        assert is_complete(run / "checkpoints" / f"checkpoint-{n}")


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
@pytest.mark.parametrize("damage", ["no_trainer_state", "truncated_adapter"])
def test_resume_skips_a_half_written_checkpoint_and_keeps_it_renamed(four_steps, tmp_path, tiny_model_dir, damage):
    root, data = copy_run(four_steps, tmp_path)
    ckpt = root / "base" / "checkpoints" / "checkpoint-4"
    if damage == "no_trainer_state":  # a kill before the Trainer wrote its last file
        (ckpt / "trainer_state.json").unlink()
    else:  # a full disk cut the adapter file short
        f = ckpt / "adapter_model.safetensors"
        f.write_bytes(f.read_bytes()[:100])
    result = resume(tiny_model_dir, root, data, 6)
    assert result.exit_code == 0, result.output  # issue 13: FileNotFoundError: ...checkpoint-4/trainer_state.json
    assert "checkpoint-4 is incomplete" in result.output and "kept as incomplete-checkpoint-4" in result.output
    assert "continuing from" in result.output and "checkpoint-2 (the newest complete checkpoint)" in result.output
    assert (root / "base" / "checkpoints" / "incomplete-checkpoint-4").is_dir()  # kept, never deleted
    record = json.loads((root / "base" / "run.json").read_text())
    assert record["status"] == "completed" and record["global_step"] == 6


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_resume_accepts_the_same_data_by_another_path(four_steps, tmp_path, tiny_model_dir):
    root, data = copy_run(four_steps, tmp_path)
    moved = tmp_path / "elsewhere" / "same.jsonl"
    moved.parent.mkdir()
    shutil.copy(data, moved)
    result = resume(tiny_model_dir, root, moved, 6)
    assert result.exit_code == 0, result.output  # issue 13: data./abs/train.jsonl: '(absent)' -> 'd817...'
    changed = write_jsonl(tmp_path / "changed.jsonl", ROWS[:3])
    result = resume(tiny_model_dir, root, changed, 8)
    assert result.exit_code == 1 and "data.sha256" in result.output  # other content is still refused


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_kill_9_then_resume_keeps_the_whole_loss_history(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    root = tmp_path / "runs"
    cmd = [sys.executable, "-m", "swft_lite.cli", "train", *map(str, CPU_FLAGS), "--model", str(tiny_model_dir),
           "--data", str(data), "--output-root", str(root), "--run-name", "killed", "--max-steps", "500",
           "--save-steps", "3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    marker = root / "killed" / "checkpoints" / "checkpoint-3" / "swft_complete.json"
    deadline = time.time() + 300
    while time.time() < deadline and not marker.exists() and proc.poll() is None:
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert marker.exists()
    record = json.loads((root / "killed" / "run.json").read_text())
    assert record["status"] == "running" and not record.get("losses")  # what a kill leaves: no history in run.json
    import socket

    from swft_lite.checkpoints import complete_checkpoints
    from swft_lite.run_folder import RunFolder

    # ... but it names the process, which is gone: read for a user, it is a run that stopped
    reason = f"the process (pid {proc.pid} on {socket.gethostname()}) stopped without a word (killed?)"
    assert record["owner"]["pid"] == proc.pid
    assert RunFolder(root / "killed").read_record().liveness().message == reason

    last = complete_checkpoints(root / "killed" / "checkpoints")[-1]
    step = int(last.name.split("-")[1])
    result = run_cli(["train", *CPU_FLAGS, "--model", tiny_model_dir, "--data", data, "--output-root", root,
                      "--run-name", "killed", "--max-steps", step + 2, "--save-steps", 3, "--resume"])
    assert result.exit_code == 0, result.output
    assert f"resume: killed said running, but {reason}; run.json now says interrupted" in result.output
    record = json.loads((root / "killed" / "run.json").read_text())
    assert record["interruptions"][0]["reason"] == reason and "reason" not in record
    # issue 13: only the resumed steps were kept
    assert [e["step"] for e in record["losses"]] == list(range(1, step + 3))
    assert record["status"] == "completed"


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_full_disk_while_saving_is_one_error_line_and_resume_recovers(four_steps, tmp_path, tiny_model_dir):
    root, data = copy_run(four_steps, tmp_path)
    # A real ENOSPC from the kernel: a file the run writes into adapter/ after training is /dev/full, where every
    # write fails with errno 28. (safetensors writes a new file and renames it over a link, so it is the tokenizer's.)
    adapter_file = root / "base" / "adapter" / "tokenizer_config.json"
    adapter_file.unlink()
    adapter_file.symlink_to("/dev/full")
    result = resume(tiny_model_dir, root, data, 6)
    assert result.exit_code == 1
    errors = error_lines(result.output)
    assert len(errors) == 1 and "no space left on the device while writing" in errors[0], result.output
    assert "--resume --run-name base" in errors[0] and "Traceback" not in result.output
    record = json.loads((root / "base" / "run.json").read_text())
    assert record["status"] == "failed" and "28" in record["reason"]  # issue 13: stayed "running"
    assert [e["step"] for e in record["losses"]] == list(range(1, 7))

    adapter_file.unlink()  # space freed
    result = resume(tiny_model_dir, root, data, 6)
    assert result.exit_code == 0, result.output
    assert "checkpoint-6 (the newest complete" in result.output
    assert json.loads((root / "base" / "run.json").read_text())["status"] == "completed"


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_no_hub_access_is_one_error_line_and_leaves_no_run_folder(tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    root = tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for _ in range(2):  # issue 13: one more `running` folder per try
        proc = subprocess.run([sys.executable, "-m", "swft_lite.cli", "train", *map(str, CPU_FLAGS), "--model",
                               "someone/not-downloaded", "--data", str(data), "--output-root", str(root)],
                              capture_output=True, text=True, env=env, timeout=300)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out
        errors = error_lines(out)
        assert len(errors) == 1 and "someone/not-downloaded" in errors[0] and "hf download" in errors[0], out
        assert "Traceback" not in out
    assert not root.exists() or not any(root.iterdir())


def test_double_ctrl_c_without_a_checkpoint_does_not_claim_one(tmp_path):
    from swft_lite.checkpoints import RunGuard, TrainInterrupted
    from swft_lite.run_folder import RunFolder, RunRecord

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    record = RunRecord(status="running")
    with pytest.raises(TrainInterrupted, match="no checkpoint was saved") as caught:
        with RunGuard(run, record, "m", resumed=False, now=lambda: "t") as guard:
            guard.training_started()
            raise KeyboardInterrupt
    assert caught.value.exit_code == 130
    assert run.read_record()["status"] == "interrupted"


def test_a_failure_after_training_started_leaves_status_failed_with_the_reason(tmp_path):
    from swft_lite.checkpoints import RunGuard
    from swft_lite.run_folder import RunFolder, RunRecord

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    with pytest.raises(ValueError):  # a bug keeps its traceback; the record still ends
        with RunGuard(run, RunRecord(status="running"), "m", resumed=False, now=lambda: "t") as guard:
            guard.training_started()
            raise ValueError("boom")
    record = run.read_record()
    assert record["status"] == "failed" and record["reason"] == "ValueError: boom"


# --- merge: the base the adapter was trained on, and a damaged adapter -------------------------------------------------


@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, gpt_oss_files):
    """Another tiny gpt-oss of the same shape (other random weights): the wrong base."""
    from conftest import TINY_SIZE
    from swft_lite.random_model import save_random_gpt_oss

    return save_random_gpt_oss(tmp_path_factory.mktemp("other-gpt-oss"), gpt_oss_files, seed=7, **TINY_SIZE)


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_merge_refuses_a_base_the_adapter_was_not_trained_on(four_steps, tmp_path, tiny_model_dir, other_model_dir):
    adapter = tmp_path / "my-adapter"  # outside its run folder: no run.json to catch it
    shutil.copytree(four_steps[2] / "adapter", adapter)
    record = json.loads((adapter / "swft_base.json").read_text())
    assert record["base_model"] == str(tiny_model_dir) and record["fingerprint"]["tensors"]
    result = run_cli(["merge", adapter, "--base", other_model_dir, "--no-verify", "--out", tmp_path / "m1"])
    assert result.exit_code == 1  # issue 13: merged and PASSED
    errors = error_lines(result.output)
    assert len(errors) == 1 and "is not the model the adapter" in errors[0] and "--force-base" in errors[0]
    assert "tensor model.embed_tokens.weight" in errors[0] and not (tmp_path / "m1").exists()

    result = run_cli(["merge", adapter, "--base", other_model_dir, "--no-verify", "--out", tmp_path / "m2",
                      "--force-base"])
    assert result.exit_code == 0 and "warning: --force-base" in result.output
    # the right base by another path (a copy) is accepted: the check is by content, not by name
    copy = tmp_path / "copy-of-base"
    shutil.copytree(tiny_model_dir, copy)
    result = run_cli(["merge", adapter, "--base", copy, "--no-verify", "--out", tmp_path / "m3"])
    assert result.exit_code == 0, result.output


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_merge_of_a_plain_peft_adapter_compares_with_the_base_it_names(tmp_path, tiny_model_dir, other_model_dir):
    from test_merge import make_adapter

    adapter = tmp_path / "peft-adapter"  # no swft_base.json: base_model_name_or_path names tiny_model_dir
    make_adapter(tiny_model_dir, adapter)
    result = run_cli(["merge", adapter, "--base", other_model_dir, "--no-verify", "--out", tmp_path / "m"])
    assert result.exit_code == 1 and "is not the model the adapter" in result.output


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_truncated_adapter_file_is_one_error_line_naming_it(four_steps, tmp_path, tiny_model_dir):
    adapter = tmp_path / "adapter"
    shutil.copytree(four_steps[2] / "adapter", adapter)
    weights = adapter / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    result = run_cli(["merge", adapter, "--base", tiny_model_dir, "--no-verify", "--out", tmp_path / "m"])
    assert result.exit_code == 1
    errors = error_lines(result.output)
    assert len(errors) == 1 and str(weights) in errors[0] and "truncated or damaged" in errors[0], result.output


# --- data: turn order, dropped reasoning, overlong rows, the length data check measures against --------------------


def check(args):
    return run_cli(["data", "check", *map(str, args)])


BAD_ORDER = [
    {"messages": [{"role": "assistant", "content": "first"}, {"role": "user", "content": "q"},
                  {"role": "assistant", "content": "a"}]},
    {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a1"},
                  {"role": "assistant", "content": "a2"}]},
    {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                  {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
]


@pytest.mark.usefixtures("o200k_vocab")
def test_turn_order_errors_are_named_by_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "order.jsonl", ROWS[:1] + BAD_ORDER)
    result = check([data])
    assert result.exit_code == 1  # issue 13: passed data check and trained
    assert f"{data}:2: message 1 (assistant): the conversation starts with an assistant turn" in result.output
    assert f"{data}:3: message 3 (assistant): two assistant answers in a row (messages 2 and 3)" in result.output
    assert f"{data}:4: message 3 (user): two user turns in a row (messages 2 and 3)" in result.output
    # train reads rows through the same check: it stops before a model is loaded
    from swft_lite.data import DataError, DataOptions, prepare_data

    with pytest.raises(DataError) as caught:
        prepare_data(str(data), None, DataOptions(max_seq_length=256, cache_dir=str(tmp_path / "cache")))
    assert f"{data}:3:" in str(caught.value)


@pytest.mark.usefixtures("o200k_vocab")
def test_reasoning_then_answer_and_tool_calls_stay_valid(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "thinking": "hmm"},
                          {"role": "assistant", "content": "a"}]}]
    assert check([write_jsonl(tmp_path / "ok.jsonl", rows)]).exit_code == 0


@pytest.mark.usefixtures("o200k_vocab")
def test_thinking_before_the_last_user_turn_is_said_to_be_dropped(tmp_path):
    multi = {"messages": [{"role": "user", "content": "q1"},
                          {"role": "assistant", "thinking": "early reasoning", "content": "a1"},
                          {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    data = write_jsonl(tmp_path / "multi.jsonl", [ROWS[0], multi, multi])
    result = check([data])
    assert result.exit_code == 0
    assert ("warning: 2 row(s) have `thinking` on an assistant turn before the last user turn" in result.output
            and f"(first: {data}:2: message 2)" in result.output)
    from swft_lite.data import DataOptions, format_dropped_thinking, prepare_data

    for _ in range(2):  # fresh, then from the cache: said both times (train echoes this line)
        rep = prepare_data(str(data), None, DataOptions(max_seq_length=256, cache_dir=str(tmp_path / "c"))).report
        info = rep["files"][str(data)]["dropped_thinking"]
        assert format_dropped_thinking(str(data), info).startswith("warning: 2 row(s)")


@pytest.mark.usefixtures("o200k_vocab")
def test_overlong_rows_are_located_and_not_counted_as_trained(tmp_path):
    long_row = {"messages": [{"role": "user", "content": "word " * 400},
                             {"role": "assistant", "content": "short"}]}
    data = write_jsonl(tmp_path / "long.jsonl", [ROWS[0], long_row, ROWS[1]])
    result = run_cli(["data", "check", str(data), "--max-seq-length", "256", "--json"])
    doc = json.loads(result.output)
    assert doc["over_length"] == 1 and doc["overlong_rows"][0]["line"] == 2
    short = json.loads(run_cli(["data", "check", str(write_jsonl(tmp_path / "s.jsonl", [ROWS[0], ROWS[1]])),
                                "--max-seq-length", "256", "--json"]).output)
    assert doc["tokens_trained"] == short["tokens_trained"]  # issue 13: the dropped row's tokens counted as trained
    text = check([data, "--max-seq-length", 256]).output
    assert f"at {data}:2: " in text and "tokens" in text


def test_data_check_measures_against_the_profile_train_would_use(monkeypatch, tmp_path, o200k_vocab):
    from swft_lite import hardware

    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    # A GPU's identity is the one thing mocked: this machine has none. detect's rule picks rtx4070 for an L4.
    monkeypatch.setattr(hardware, "recommended_profile_name", lambda env=None: ("rtx4070", "NVIDIA L4 has 22.17 GiB"))
    doc = json.loads(check([data, "--json"]).output)
    assert doc["max_seq_length"] == 2048 and doc["max_seq_length_from"].startswith("profile rtx4070")


def test_length_histogram_has_no_empty_bins_past_the_longest_row():
    from swft_lite.data.check import _histogram_bins

    for lengths in ([70, 71, 72, 73, 74], [10, 500], list(range(100, 137))):
        bins = _histogram_bins(lengths)
        assert all(b["from"] <= b["to"] for b in bins), bins  # issue 13: `75-74 | 0`
        assert bins[-1]["to"] == max(lengths) and sum(b["rows"] for b in bins) == len(lengths)


# --- smaller -------------------------------------------------------------------------------------------------------


@pytest.mark.usefixtures("o200k_vocab")
def test_a_json_array_saved_as_jsonl_is_one_sentence(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text(json.dumps(ROWS, indent=2))
    result = check([data])
    assert result.exit_code == 1
    assert "this is a JSON array" in result.output and "rename it rows.json" in result.output
    assert "invalid JSON" not in result.output


def test_a_corrupt_parquet_exits_2(tmp_path):
    data = tmp_path / "rows.parquet"
    data.write_bytes(b"PAR1" + b"\0" * 64)
    result = check([data])
    assert result.exit_code == 2 and "not a readable Parquet file" in result.output


def test_profile_inherit_names_the_file_and_all_errors_come_at_once(tmp_path):
    from swft_lite.errors import ProfileError
    from swft_lite.profiles import load_profile

    p = tmp_path / "mine.toml"
    p.write_text('inherit = "nope"\n')
    with pytest.raises(ProfileError, match=f"{p}: key 'inherit' = 'nope': unknown profile 'nope'"):
        load_profile(str(p))
    p.write_text('inherit = "rtx4090"\nlora_rnak = 8\nlearning_rate = "fast"\nmax_seq_length = -1\n')
    with pytest.raises(ProfileError) as caught:
        load_profile(str(p))
    msg = str(caught.value)
    assert msg.startswith("3 problems:") and "lora_rnak" in msg and "learning_rate" in msg and "max_seq_length" in msg


def test_backend_auto_says_why_it_falls_back_to_hf(capsys):
    from swft_lite.backends import choose_backend

    assert choose_backend("auto") == "hf"  # this machine has no CUDA GPU
    err = capsys.readouterr().err
    assert "backend: auto -> hf" in err and "no CUDA GPU is visible" in err


def test_detect_says_every_4bit_profile_needs_bitsandbytes():
    from swft_lite.hardware import package_verdict

    note = package_verdict("bitsandbytes", None).note
    assert "every shipped profile" in note and "only for the unsloth backend" not in note


# --- merge: memory for the verification, decided before the merge is written --------------------------------------

GPT_OSS_BF16 = 41_800_000_000  # estimate_output_bytes of gpt-oss-20b: ~41.8 GB in bf16
GB = 1e9


@pytest.mark.parametrize("ram,vram,device,dtype,expected", [
    (128 * GB, None, "auto", None, ("cpu", "float32")),       # the exact check fits in RAM
    (64 * GB, None, "auto", None, ("cpu", "bfloat16")),       # fp32 (~100 GB) does not: bf16 (~50 GB) does
    (16 * GB, 80 * GB, "auto", None, ("cuda", "bfloat16")),   # an 80 GB GPU takes it
    (128 * GB, 24 * GB, "auto", None, ("cpu", "float32")),    # a 24 GB GPU does not
    (64 * GB, None, "cpu", None, ("cpu", "bfloat16")),        # --device cpu: fp32 if it fits, else bf16
])
def test_verification_device_and_precision_fit_the_free_memory(ram, vram, device, dtype, expected):
    from swft_lite.merge import plan_verification

    dev, dt, why = plan_verification(GPT_OSS_BF16, ram_free=ram, vram_free=vram, device=device, dtype=dtype)
    assert (dev, dt) == expected
    assert f"verification on {dev} in {dt}" in why and "GB free" in why


@pytest.mark.parametrize("ram,vram,device,dtype", [(32 * GB, None, "auto", None), (64 * GB, None, "cpu", "float32"),
                                                   (128 * GB, 24 * GB, "cuda", None)])
def test_verification_that_fits_nowhere_is_refused_with_the_numbers(ram, vram, device, dtype):
    from swft_lite.errors import MergeError
    from swft_lite.merge import plan_verification

    with pytest.raises(MergeError) as caught:
        plan_verification(GPT_OSS_BF16, ram_free=ram, vram_free=vram, device=device, dtype=dtype)
    msg = str(caught.value)  # issue 13: fp32 on the CPU by default, ~84 GB of RAM, nothing checked first
    assert msg.startswith("not enough memory to verify the merge (41.8 GB in bf16)")
    assert f"{ram / GB:.1f} GB free" in msg or f"{vram / GB:.1f} GB free" in msg
    assert "--no-verify" in msg


# --- licences: what the installed Unsloth files say at their top --------------------------------------------------

# Header texts as they stand in unsloth / unsloth_zoo (first lines of the files named).
APACHE_UNSLOTH = '''# Copyright 2023-present Daniel Han-Chen & the Unsloth team. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
'''  # unsloth/__init__.py
AGPL_SPDX_UNSLOTH = '''# SPDX-License-Identifier: GNU Affero General Public License v3.0
# Copyright 2023-present the Unsloth team. All rights reserved.
'''  # unsloth/kernels/moe/grouped_gemm/interface.py
AGPL_ZOO = '''# Unsloth Zoo - Utilities for Unsloth
# Copyright 2023-present Daniel Han-Chen, Michael Han-Chen & the Unsloth team. All rights reserved.
#
# This program is free software: you can redistribute it and/or modify
# it under the terms of the GNU Affero General Public License as published
# by the Free Software Foundation, either version 3 of the License, or
# (at your option) any later version.
'''  # unsloth_zoo/temporary_patches/gpt_oss_grouped_qlora.py
LGPL_ZOO = '''# Unsloth Zoo - Utilities for Unsloth
# Copyright 2023-present Daniel Han-Chen, Michael Han-Chen & the Unsloth team. All rights reserved.
#
# This program is free software: you can redistribute it and/or modify
# it under the terms of the GNU Lesser General Public License as published by
# the Free Software Foundation, either version 3 of the License, or
# (at your option) any later version.
#
# This program is distributed in the hope that it will be useful,
# but WITHOUT ANY WARRANTY; without even the implied warranty of
# MERCHANTABILITY or FITNESS FOR A PARTICULAR PURPOSE.  See the
# GNU General Public License for more details.
'''  # unsloth_zoo/__init__.py


def make_package(root: Path, name: str, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        p = root / name / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text + "\nx = 1\n")
    return root / name


def test_licence_scanner_reads_each_files_header(tmp_path):
    from swft_lite.licences import header_licence, scan_folder

    assert header_licence(LGPL_ZOO) == "LGPL-3.0"  # says "GNU General Public License" too: not GPL
    assert header_licence(AGPL_ZOO) == "AGPL-3.0" and header_licence(AGPL_SPDX_UNSLOTH) == "AGPL-3.0"
    assert header_licence(APACHE_UNSLOTH) == "Apache-2.0" and header_licence("import os\n") == "none"
    # an LGPL file with an AGPL section inside, as unsloth_zoo/temporary_patches/gpt_oss.py has
    lgpl_with_section = LGPL_ZOO + "\ndef forward(x):\n    # This Unsloth Zoo code section is licensed under AGPL3\n"
    pkg = make_package(tmp_path, "unsloth_zoo", {
        "__init__.py": LGPL_ZOO, "temporary_patches/gpt_oss_grouped_qlora.py": AGPL_ZOO,
        "temporary_patches/gpt_oss.py": lgpl_with_section, "utils.py": LGPL_ZOO, "plain.py": ""})
    res = scan_folder(pkg, "unsloth_zoo")
    assert res.files == 5 and res.by_licence == {"LGPL-3.0": 3, "AGPL-3.0": 1, "none": 1}
    assert res.examples["AGPL-3.0"] == ["temporary_patches/gpt_oss_grouped_qlora.py"]
    assert res.agpl_sections == ["temporary_patches/gpt_oss.py"] and res.agpl_files == 2
    assert "AGPL-3.0 code in 2 of them: 1 by header" in res.summary()


def test_detect_reports_installed_unsloth_licences(tmp_path, monkeypatch):
    from swft_lite import hardware
    from swft_lite.licences import scan_unsloth

    # this machine has no Unsloth: detect says so
    assert [p.summary() for p in scan_unsloth()] == ["unsloth: not installed (nothing of it would run)",
                                                     "unsloth_zoo: not installed (nothing of it would run)"]
    make_package(tmp_path, "unsloth", {"__init__.py": APACHE_UNSLOTH,
                                       "kernels/moe/grouped_gemm/interface.py": AGPL_SPDX_UNSLOTH})
    monkeypatch.syspath_prepend(str(tmp_path))  # an installed unsloth/ folder (found, never imported)
    found = scan_unsloth()[0]
    assert found.installed and found.by_licence == {"Apache-2.0": 1, "AGPL-3.0": 1}
    text = "\n".join(hardware.format_licences([found]))
    assert "2 Python files by header: " in text and "AGPL-3.0 1" in text and "kernels/moe/grouped_gemm" in text
    assert "must meet AGPL-3.0's terms" in text
    import sys

    assert "unsloth" not in sys.modules


def test_a_disk_too_full_for_run_json_too_still_ends_in_one_error_line(tmp_path):
    """Measured on a full tmpfs: after the checkpoint's ENOSPC, writing run.json failed too and its traceback hid
    the first. Here run.json's temporary file is /dev/full, where every write fails with errno 28."""
    import errno

    from swft_lite.checkpoints import RunGuard
    from swft_lite.errors import TrainError
    from swft_lite.run_folder import RunFolder, RunRecord

    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_record(RunRecord(status="running"))
    (run.path / "run.json.tmp").symlink_to("/dev/full")
    with pytest.raises(TrainError) as caught:
        with RunGuard(run, RunRecord(status="running"), "m", resumed=False, now=lambda: "t") as guard:
            guard.training_started()
            raise OSError(errno.ENOSPC, "No space left on device", str(run.path / "checkpoints" / "checkpoint-4"))
    msg = str(caught.value)
    assert msg.startswith(f"no space left on the device while writing {run.path / 'checkpoints' / 'checkpoint-4'}")
    assert "run.json could not be updated either" in msg and "--resume" in msg
    assert run.read_record()["status"] == "running"  # the old record is intact (written atomically)


# --- a hub download checked against the free disk first -------------------------------------------------------------

HUGE = 10**15  # 1,000,000 GB: more than any disk here has free, so the refusal needs no fake disk


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The hub's answer to model_info(files_metadata=True) - the one HTTP call replaced, with a real ModelInfo - and
    a Hugging Face cache of our own (HF_HUB_CACHE, read by huggingface_hub at import, so its constant too)."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import ModelInfo

    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # conftest switches the hub off; here the one call is answered
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    class Hub:
        files: dict[str, int] = {}
        sha = "a" * 40
        calls: list = []
        error: Exception | None = None

    def model_info(self, repo_id, *, revision=None, files_metadata=False, **kw):
        Hub.calls.append((repo_id, revision, files_metadata))
        if Hub.error is not None:
            raise Hub.error
        return ModelInfo(id=repo_id, sha=Hub.sha,
                         siblings=[{"rfilename": n, "size": s} for n, s in Hub.files.items()])

    monkeypatch.setattr(HfApi, "model_info", model_info)
    Hub.cache, Hub.calls = cache, []
    return Hub


def put_in_cache(cache: Path, repo_id: str, sha: str, name: str, content: bytes = b"{}") -> None:
    """A file as huggingface_hub stores it: blobs/<hash>, snapshots/<commit>/<name> linked to it, refs/main."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(content)
    link = repo / "snapshots" / sha / name
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(sha)


def test_train_refuses_a_download_the_disk_cannot_take_and_leaves_no_run_folder(tmp_path, hub):
    hub.files = {"config.json": 1_000, "model-00001-of-00002.safetensors": 6 * HUGE // 10,
                 "model-00002-of-00002.safetensors": 4 * HUGE // 10, "original/model.safetensors": HUGE,
                 "README.md": HUGE}  # original/ and README.md are not what from_pretrained fetches
    root = tmp_path / "runs"
    result = run_cli(["train", *CPU_FLAGS, "--model", "someone/huge-model", "--data", tmp_path / "train.jsonl",
                      "--output-root", root])
    assert result.exit_code == 2, result.output
    errors = error_lines(result.output)
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("Error: --model someone/huge-model: not enough disk space to download it: 3 file(s) "
                                "not in the Hugging Face cache need 1000000.0 GB")
    assert f"{hub.cache} has " in errors[0] and " GB free" in errors[0]
    assert "HF_HUB_CACHE" in errors[0] and "--model PATH" in errors[0]
    assert hub.calls == [("someone/huge-model", None, True)]
    assert not root.exists() or not any(root.iterdir())


def test_merge_base_by_hub_id_is_checked_the_same_way(tmp_path, hub):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    hub.files = {"config.json": 1_000, "model.safetensors": HUGE, "original/model.safetensors": HUGE}
    result = run_cli(["merge", adapter, "--base", "someone/huge-model", "--out", tmp_path / "m"])
    assert result.exit_code == 2, result.output
    errors = error_lines(result.output)
    # merge fetches the repo's root only, as from_pretrained reads it: original/ is neither fetched nor counted
    assert len(errors) == 1 and errors[0].startswith("Error: --base someone/huge-model: not enough disk space to "
                                                     "download it: 2 file(s) not in the Hugging Face cache need "
                                                     "1000000.0 GB"), result.output
    assert not (tmp_path / "m").exists()
    # the files counted are the ones snapshot_download fetches with merge's patterns (huggingface_hub's own filter)
    from huggingface_hub.utils import filter_repo_objects

    from swft_lite.merge import MODEL_PATTERNS, SUBFOLDERS

    fetched = list(filter_repo_objects(hub.files, allow_patterns=list(MODEL_PATTERNS), ignore_patterns=SUBFOLDERS))
    assert fetched == ["config.json", "model.safetensors"]


def test_files_already_in_the_cache_are_not_counted(hub):
    from swft_lite.errors import DiskSpaceError
    from swft_lite.hub import check_download_space

    hub.files = {"config.json": 2, "model-00001-of-00002.safetensors": HUGE,
                 "model-00002-of-00002.safetensors": 3 * HUGE}
    put_in_cache(hub.cache, "someone/model", hub.sha, "config.json")
    put_in_cache(hub.cache, "someone/model", hub.sha, "model-00001-of-00002.safetensors", b"shard one")
    with pytest.raises(DiskSpaceError, match=r"1 file\(s\) not in the Hugging Face cache need 3000000.0 GB"):
        check_download_space("someone/model", "--model")
    put_in_cache(hub.cache, "someone/model", hub.sha, "model-00002-of-00002.safetensors", b"shard two")
    plan = check_download_space("someone/model", "--model")
    assert plan.files == {} and plan.need == 0 and len(plan.cached) == 3


def test_no_answer_from_the_hub_leaves_the_loaders_own_error(hub, monkeypatch):
    from huggingface_hub import constants

    from swft_lite.hub import check_download_space

    hub.files = {"model.safetensors": HUGE}
    hub.error = ConnectionError("no route to host")  # unreachable: not a second failure, the loader's stays
    assert check_download_space("someone/model", "--model") is None
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # offline: the hub is not even asked
    hub.error, hub.calls = None, []
    assert check_download_space("someone/model", "--model") is None and hub.calls == []
    assert check_download_space(str(hub.cache.parent), "--model") is None  # a folder: nothing to download


# --- a run killed with kill -9 does not read "running" for ever ------------------------------------------------------


def running_record(pid: int | None = None, **owner) -> "RunRecord":
    from swft_lite.run_folder import RunRecord, process_identity

    return RunRecord(status="running", owner={**process_identity(pid), **owner}, model="m")


def test_a_running_record_whose_process_was_killed_reads_interrupted_on_resume(tmp_path):
    import socket

    from swft_lite.checkpoints import settle_before_resume
    from swft_lite.errors import TrainError
    from swft_lite.run_folder import RunFolder

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        run = RunFolder(tmp_path / "run")
        run.path.mkdir()
        run.write_record(running_record(proc.pid))
        assert run.read_record().liveness().state == "alive"
        with pytest.raises(TrainError, match=f"is still being trained: it is still running \\(pid {proc.pid} on "):
            settle_before_resume(run, run.read_record(), lambda: "t", echo=lambda s: None)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    said = []
    record = run.read_record()
    reason = f"the process (pid {proc.pid} on {socket.gethostname()}) stopped without a word (killed?)"
    assert record.liveness().state == "gone" and record.liveness().message == reason
    settle_before_resume(run, record, lambda: "t", echo=said.append)
    on_disk = run.read_record()
    assert on_disk["status"] == "interrupted" and on_disk["reason"] == reason
    assert on_disk["interruptions"] == [{"found": "t", "reason": reason}]
    assert said == [f"resume: run said running, but {reason}; run.json now says interrupted"]


def test_a_reused_pid_or_another_host_is_told_apart(tmp_path):
    from swft_lite.checkpoints import settle_before_resume
    from swft_lite.run_folder import RunFolder, process_start_ticks

    me = os.getpid()
    assert process_start_ticks(me) is not None  # /proc is there on this machine
    # this pid is alive, but it is not the process that started the run: that one started at another time
    reused = running_record(me, process_start_ticks=process_start_ticks(me) - 1)
    assert reused.liveness().state == "gone"
    elsewhere = running_record(me, host="other-node")
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_record(elsewhere)
    said = []
    settle_before_resume(run, run.read_record(), lambda: "t", echo=said.append)
    assert run.read_record()["status"] == "running"  # left as it is
    assert "on other-node" in said[0] and "cannot be told from here" in said[0]


def test_merge_and_save_gguf_of_a_killed_run_say_it_did_not_finish(tmp_path):
    from swft_lite.run_folder import RunFolder

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # a process that ran and ended: its pid is free
    run = RunFolder(tmp_path / "killed")
    run.path.mkdir()
    run.write_record(running_record(proc.pid))
    for cmd in (["merge", run.path], ["save-gguf", run.path]):
        result = run_cli(cmd)
        assert result.exit_code == 1, result.output
        errors = error_lines(result.output)
        assert len(errors) == 1, result.output
        assert "the run did not finish (run.json still says running, but the process (pid " in errors[0]
        assert "stopped without a word (killed?))" in errors[0] and "--resume --run-name killed" in errors[0]
