"""Token-budget batches and packing: what they hold, that a step's gradient does not depend on how rows are spread
over micro-batches, and that packed rows never see each other (a leaking mask is caught)."""

from __future__ import annotations

import copy
import random

import pytest

from swft_lite.batching import (EpochBatchSampler, PackedCollator, PaddedCollator, budget_batches, packed_batches,
                                plan_batches)


def lognormal_lengths(n=600, seed=0, median=2300, sigma=0.7, cap=8000):
    rng = random.Random(seed)
    return [min(cap, max(64, int(rng.lognormvariate(0, sigma) * median))) for _ in range(n)]


@pytest.mark.parametrize("budget", [8192, 16384])
def test_budget_batches_fit_the_budget_and_cover_every_row_once(budget):
    lengths = lognormal_lengths()
    batches = budget_batches(lengths, budget, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= budget for b in batches)
    _, plan = plan_batches(lengths, "budget", token_budget=budget, seed=3)
    _, fixed = plan_batches(lengths, "fixed", batch_size=1, seed=3)
    # Rows grouped by length: little padding, and far fewer passes than one row each.
    assert plan.padding_fraction < 0.05
    assert plan.micro_batches < 0.5 * fixed.micro_batches
    assert plan.fill_fraction > 0.8


def test_packed_batches_fill_sequences_nearly_full():
    lengths = lognormal_lengths()
    batches = packed_batches(lengths, 8192, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 8192 for b in batches)
    _, plan = plan_batches(lengths, "packed", token_budget=8192, seed=3)
    assert plan.fill_fraction > 0.95  # best-fit decreasing leaves little room unused
    # Each pass is filled up to the budget: what best-fit leaves unused is the padding.
    assert plan.padded_tokens == plan.micro_batches * 8192
    assert plan.padding_fraction == pytest.approx(1 - plan.fill_fraction)


def test_two_packed_sequences_a_pass_fill_both_and_split_where_they_were_packed():
    """rtx4090's packed passes: two sequences of 8,192 tokens each (the shape of its unpacked 2 x 8,192 passes)."""
    from swft_lite.batching import packed_sequences, plan_batches_for
    from swft_lite.profiles import load_profile

    profile = load_profile("rtx4090", {"token_budget": 16384, "packing": True})
    assert packed_sequences(profile) == (2, 8192)
    lengths = lognormal_lengths()
    batches, plan = plan_batches_for(profile, lengths, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert plan.padded_tokens == plan.micro_batches * 16384 and plan.fill_fraction > 0.95
    assert (plan.sequences_per_pass, plan.sequence_length, plan.token_budget) == (2, 8192, 16384)
    collate = PackedCollator(pad_to=8192, sequences=2)
    for b in batches:
        rows = [{"input_ids": [7] * lengths[i], "labels": [7] * lengths[i]} for i in b]
        out = collate(rows)
        assert out["input_ids"].shape == (2, 8192)
        starts = (out["position_ids"] == 0).sum().item()  # every row starts once, plus one padding row a sequence
        assert len(b) <= starts <= len(b) + 2
        assert int((out["labels"] != -100).sum()) == sum(lengths[i] - 1 for i in b)


def test_a_row_longer_than_the_budget_is_refused():
    with pytest.raises(ValueError, match="9000 tokens, more than the token budget 8192"):
        budget_batches([100, 9000], 8192, seed=0)
    with pytest.raises(ValueError, match="9000 tokens, more than the token budget 8192"):
        packed_batches([100, 9000], 8192, seed=0)


def test_epoch_order_is_shuffled_by_seed_and_epoch_only():
    batches = budget_batches(lognormal_lengths(200), 8192, seed=1)
    a, b = EpochBatchSampler(batches, seed=1), EpochBatchSampler(batches, seed=1)
    first = list(a)
    assert first == list(b)  # same seed, same epoch: same order
    a.set_epoch(1)
    second = list(a)
    assert second != first and sorted(map(tuple, second)) == sorted(map(tuple, first))
    assert list(EpochBatchSampler(batches, seed=2)) != first


def test_collators_pad_and_pack():
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8, 9], "labels": [8, 9]}]
    padded = PaddedCollator(pad_token_id=0)(rows)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["labels"].tolist() == [[-100, 6, 7], [8, 9, -100]]
    assert padded["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    packed = PackedCollator()(rows)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    # A row's first token is never a target (it would be predicted from the previous row's last token).
    assert packed["labels"].tolist() == [[-100, 6, 7, -100, 9]]
    assert "attention_mask" not in packed
    # Filled to the budget: one more row of padding, never a target, with positions of its own.
    filled = PackedCollator(pad_to=8, pad_token_id=0)(rows)
    assert filled["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0]]
    assert filled["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    assert filled["labels"].tolist() == [[-100, 6, 7, -100, 9, -100, -100, -100]]
    # Two sequences a pass: split where the next row no longer fits; a missing sequence is all padding.
    two = PackedCollator(pad_to=4, pad_token_id=0, sequences=2)(rows)
    assert two["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert two["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]
    assert two["labels"].tolist() == [[-100, 6, 7, -100], [-100, 9, -100, -100]]
    assert PackedCollator(pad_to=8, sequences=2)(rows)["input_ids"].tolist() == [[5, 6, 7, 8, 9, 0, 0, 0], [0] * 8]
    with pytest.raises(ValueError, match="need 3 sequences of 3 tokens, more than 2"):
        PackedCollator(pad_to=3, sequences=2)(rows + rows[:1])


# --- on a tiny gpt-oss (fp32, CPU) ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_window_model(gpt_oss_files):
    """A 2-layer gpt-oss whose sliding window (16 tokens) is shorter than the rows, so windowed layers matter."""
    from conftest import TINY_SIZE
    from swft_lite.random_model import build_random_gpt_oss, gpt_oss_config

    config = gpt_oss_config(gpt_oss_files / "config.json", initializer_range=0.1, **TINY_SIZE)
    config.sliding_window = 16
    return build_random_gpt_oss(config, seed=5)


def random_rows(lengths, seed=0, vocab=2000):
    g = random.Random(seed)
    rows = []
    for n in lengths:
        ids = [g.randrange(vocab) for _ in range(n)]
        labels = [t if g.random() < 0.6 else -100 for t in ids]
        labels[0] = -100
        rows.append({"input_ids": ids, "labels": labels})
    return rows


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_packed_rows_compute_what_they_compute_alone(tiny_window_model, attn):
    from swft_lite.batching import packed_isolation_error

    from swft_lite.backends import enable_packed_attention

    model = copy.deepcopy(tiny_window_model)
    model.config._attn_implementation = attn
    rows = random_rows([40, 23, 57, 9], seed=1)
    # transformers alone does not keep gpt-oss's packed rows apart: the check sees the leak.
    leak = packed_isolation_error(model, rows)
    assert leak > 1e-2, f"a leaking mask went unnoticed (max |dlogit| {leak:.2e})"
    enable_packed_attention(model)
    err = packed_isolation_error(model, rows)
    assert err <= 1e-3, f"packed rows differ from the rows alone by {err:.2e} ({attn})"
    # Positions that run on across rows hide the boundaries: a leak again, and caught again.
    leak = packed_isolation_error(model, rows, restart_positions=False)
    assert leak > 1e-2, f"a leaking mask went unnoticed (max |dlogit| {leak:.2e})"


def two_sequence_isolation_error(model, rows, length):
    """Max |logit difference| between every row alone and the same rows packed into a pass of two sequences."""
    import torch

    batch = PackedCollator(pad_to=length, sequences=2)(rows)
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        worst, seq, start = 0.0, 0, 0
        for r in rows:
            n = len(r["input_ids"])
            if start + n > length:
                seq, start = seq + 1, 0
            alone = model(input_ids=torch.tensor([r["input_ids"]]), use_cache=False).logits[0]
            worst = max(worst, float((together[seq, start:start + n] - alone).abs().max()))
            start += n
    assert seq == 1, "the rows did not reach the second sequence"
    return worst


@pytest.mark.parametrize("attn", ["eager", "sdpa", "flex"])
def test_two_packed_sequences_a_pass_keep_their_rows_apart(tiny_window_model, attn):
    """A pass of two packed sequences (rtx4090's shape): every row of both computes what it computes alone, on the
    hf backend's masks and on the flex-attention wrapper packing installs under Unsloth."""
    from swft_lite.backends import enable_packed_attention, enable_packed_flex_attention, torch_flex_kernel

    model = copy.deepcopy(tiny_window_model)
    model.config._attn_implementation = "eager" if attn == "flex" else attn
    rows = random_rows([40, 23, 30, 57, 9], seed=3)  # sequences of 96: [40, 23, 30] and [57, 9] + padding
    if attn == "flex":
        enable_packed_flex_attention(model, torch_flex_kernel())
        model.train()
    else:
        enable_packed_attention(model)
    assert two_sequence_isolation_error(model, rows, 96) <= (1e-4 if attn == "flex" else 1e-3)


def test_the_packed_attention_unsloth_runs_keeps_rows_apart(tiny_window_model):
    """The attention forward that packing installs under Unsloth (backends.enable_packed_flex_attention: the
    same-row block mask, the sliding window, the sinks from the log-sum-exp), run here with torch's own flex
    attention instead of Unsloth's compiled one: in training, packed rows give the logits of the rows alone, the
    tokens before a row change nothing in it, and positions that hide the row boundaries are caught."""
    import torch

    from swft_lite.backends import enable_packed_flex_attention, torch_flex_kernel
    from swft_lite.batching import PackedCollator, packed_isolation_error

    model = copy.deepcopy(tiny_window_model)
    model.config._attn_implementation = "eager"
    assert enable_packed_flex_attention(model, torch_flex_kernel()) == model.config.num_hidden_layers
    model.train()  # the wrapper acts in training only (no dropout in gpt-oss)
    rows = random_rows([40, 23, 57, 9], seed=1)
    err = packed_isolation_error(model, rows)
    assert err <= 1e-4, f"packed rows differ from the rows alone by {err:.2e}"
    # Other tokens before the last row: its logits do not move.
    other = random_rows([40], seed=9)[0]
    with torch.no_grad():
        a, b = (model(**{k: v for k, v in PackedCollator()([first, rows[2]]).items() if k != "labels"}).logits[0, 40:]
                for first in (rows[0], other))
    assert float((a - b).abs().max()) <= 1e-5
    leak = packed_isolation_error(model, rows, restart_positions=False)
    assert leak > 1e-2, f"a leaking mask went unnoticed (max |dlogit| {leak:.2e})"


def test_a_packed_run_evaluates_rows_padded_not_packed(tiny_window_model):
    """Out of training the attention Unsloth runs knows no rows (here: the same wrapper, in eval mode), so a packed
    eval batch would let rows see each other and the eval loss would be wrong. The collator train() builds for a
    packed run packs training batches only; evaluation gets padded ones, which give each row its own logits."""
    import torch

    from swft_lite.backends import enable_packed_flex_attention, torch_flex_kernel
    from swft_lite.train import TokenCounter

    model = copy.deepcopy(tiny_window_model)
    model.config._attn_implementation = "eager"
    enable_packed_flex_attention(model, torch_flex_kernel())
    model.eval()
    rows = random_rows([40, 23, 57], seed=1)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([r["input_ids"]])).logits[0] for r in rows]
        packed = model(**{k: v for k, v in PackedCollator(pad_to=160)(rows).items() if k != "labels"}).logits[0]
    assert float((packed[40:63] - alone[1]).abs().max()) > 1e-2  # why: packed in eval mode, the rows leak

    counter = TokenCounter(PackedCollator(pad_to=160), lambda: model.training, PaddedCollator(pad_token_id=0))
    batch = counter(rows)
    assert counter.tokens == 0 and batch["input_ids"].shape == (3, 57)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        assert float((logits[i, :n] - alone[i]).abs().max()) <= 1e-4
    model.train()
    assert counter(rows)["input_ids"].shape == (1, 160) and counter.tokens == 120


def _trainer(model, tokenizer, rows, batches, collator, tmp_path, accumulation):
    import datasets
    from trl import SFTConfig, SFTTrainer

    from swft_lite.batching import with_batch_sampler

    args = SFTConfig(output_dir=str(tmp_path / "ckpt"), per_device_train_batch_size=1,
                     gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-3, report_to=[],
                     use_cpu=True, bf16=False, packing=False, max_length=4096, disable_tqdm=True,
                     router_aux_loss_coef=0.0, dataloader_num_workers=0)
    trainer = with_batch_sampler(SFTTrainer)(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                                             processing_class=tokenizer)
    trainer.swft_batch_sampler = EpochBatchSampler(batches, seed=0)
    trainer.data_collator = collator
    return trainer


def _trainer_step_grads(trainer, n_batches):
    """The gradient the Trainer accumulates over one optimizer step (its own loss scaling, num_items_in_batch)."""
    model = trainer.model
    model.train()
    model.zero_grad()
    samples, n_items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), n_batches, trainer.args.device)
    assert len(samples) == n_batches
    for inputs in samples:
        trainer.training_step(model, inputs, n_items)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _one_row_at_a_time_grads(model, rows):
    """Reference: the mean over every trained token of the step, each row run alone."""
    import torch
    import torch.nn.functional as F

    model.train()
    model.zero_grad()
    total = sum(sum(1 for t in r["labels"][1:] if t != -100) for r in rows)
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        labels = torch.tensor([r["labels"]])
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[0, :-1].float(), labels[0, 1:], ignore_index=-100, reduction="sum") / total
        loss.backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _relative_difference(a, b):
    import torch

    num = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in b))
    den = torch.sqrt(sum((b[k] ** 2).sum() for k in b))
    return float(num / den)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["budget", "packed", "packed2"])
def test_a_step_has_the_gradient_of_its_rows_one_at_a_time(tiny_model_dir, tokenizer, tmp_path, mode):
    """However rows are spread over micro-batches (3 rows in one pass, 1 in the next, padded, or packed and filled
    to the budget), the step's gradient equals that of the same rows one at a time, normalised per trained token
    (fp32, relative <= 1e-4)."""
    from swft_lite.backends import load_for_training
    from swft_lite.batching import collator_for_profile, plan_batches_for
    from swft_lite.profiles import Profile

    # packed2: two packed sequences of 128 tokens a pass
    profile = Profile(lora_targets="attention+experts", load_in_4bit=False, gradient_checkpointing="false",
                      lora_rank=4, lora_alpha=8, token_budget=256 if mode == "packed2" else 128,
                      max_seq_length=128, packing=mode != "budget")
    model, _, _ = load_for_training("hf", str(tiny_model_dir), profile)
    with __import__("torch").no_grad():  # LoRA B starts at zero: give it values so every adapter has a gradient path
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    rows = random_rows([30, 31, 29, 70, 12], seed=2)
    if mode == "packed2":
        rows = random_rows([30, 31, 29, 70, 12, 60, 90, 25, 40], seed=2)
    lengths = [len(r["input_ids"]) for r in rows]
    batches, _ = plan_batches_for(profile, lengths, seed=0)
    assert len(batches) >= 2 and max(len(b) for b in batches) >= 2  # several rows in a pass, several passes
    trainer = _trainer(model, tokenizer, rows, batches, collator_for_profile(profile, tokenizer.pad_token_id),
                       tmp_path, accumulation=len(batches))
    got = _trainer_step_grads(trainer, len(batches))
    want = _one_row_at_a_time_grads(trainer.model, rows)
    assert set(got) == set(want) and any("experts" in k for k in want)
    assert _relative_difference(got, want) <= 1e-4


# --- through `swft-lite train` --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("o200k_vocab")  # the plan renders the data with openai-harmony
def test_dry_run_prints_the_plan_and_loads_nothing(tmp_path):
    import sys

    from click.testing import CliRunner

    from swft_lite.cli import main

    result = CliRunner().invoke(main, ["train", "--profile", "h100", "--data", "sample", "--dry-run",
                                       "--token-budget", "4096", "--max-seq-length", "4096", "--no-packing",
                                       "--output-root", str(tmp_path / "runs")])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "plan: 40 rows, 12,730 tokens an epoch" in out
    assert "token budget 4,096, length-bucketed" in out and "padding" in out
    assert "optimizer steps" in out and "GiB reserved (estimate, unsloth stack)" in out
    assert "time       ~" in out  # the h100 settings have a measured pass time
    assert not (tmp_path / "runs").exists()  # no run folder
    assert "unsloth" not in sys.modules and "done:" not in out


def test_the_plan_says_how_full_the_passes_are_and_how_to_fill_them(tmp_path):
    """h100 packs by default; a profile that does not (rtx4090: 2 rows of up to 8,192 tokens a pass) is told, on
    short chats, how empty its passes are and which flags fill them - and the advised flags do."""
    from click.testing import CliRunner

    from swft_lite.cli import main

    def plan(*args):
        result = CliRunner().invoke(main, ["train", "--data", "sample", "--dry-run",
                                           "--output-root", str(tmp_path / "runs"), *args])
        assert result.exit_code == 0, result.output
        return result.output

    out = plan("--profile", "h100")
    assert "packed into sequences of up to 8,192 tokens" in out and "tip" not in out
    out = plan("--profile", "rtx4090")
    assert "2 row(s) per pass (token_budget off)" in out
    tip = next(line for line in out.splitlines() if line.strip().startswith("tip"))
    assert "% of each pass" in tip and "--packing --token-budget 8192 --per-device-batch-size 1" in tip
    out = plan("--profile", "rtx4090", "--packing", "--token-budget", "8192", "--per-device-batch-size", "1")
    assert "packed into sequences of up to 8,192 tokens" in out and "tip" not in out


def test_rows_longer_than_a_pass_are_named_before_the_model_loads(tmp_path):
    import json

    from click.testing import CliRunner

    from swft_lite.cli import main

    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}] * 3
    rows.insert(1, {"messages": [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]})
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["train", "--profile", "h100", "--data", str(data), "--dry-run", "--output-root", str(tmp_path / "runs"),
            "--max-seq-length", "256"]
    result = CliRunner().invoke(main, args + ["--token-budget", "256"])
    assert result.exit_code == 0, result.output
    assert f"data: 1 row(s) longer than 256 tokens: {data}:2: " in result.output
    assert "tokens dropped (--overlong drop)" in result.output
    # A budget a kept row would not fit is refused, naming both numbers.
    result = CliRunner().invoke(main, args + ["--token-budget", "200"])
    assert result.exit_code == 2, result.output
    assert result.output.startswith("Error: ") and "'token_budget' (200" in result.output
    assert "max_seq_length (256" in result.output and "Traceback" not in result.output


def _varied_rows(n=24, seed=0):
    g = random.Random(seed)
    words = "gateway cache queue shard replica index lease quorum ledger span trace bucket".split()
    rows = []
    for _ in range(n):
        k = g.choice([3, 8, 20, 45])
        rows.append({"messages": [{"role": "user", "content": " ".join(g.choice(words) for _ in range(k))},
                                  {"role": "assistant", "content": " ".join(g.choice(words) for _ in range(2 * k))}]})
    return rows


@pytest.mark.slow
def test_resume_continues_with_the_batches_an_uninterrupted_run_takes(tmp_path, tiny_model_dir):
    """A token-budget run stopped at step 4 and resumed trains steps 5-10 on exactly the batches (and so with exactly
    the losses) of the same run never stopped - across an epoch boundary, where the batch order is reshuffled."""
    import json
    import shutil

    from click.testing import CliRunner

    from swft_lite.cli import main

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in _varied_rows()))
    root = tmp_path / "runs"
    flags = ["train", "--profile", "rtx4070", "--backend", "hf", "--no-load-in-4bit", "--lora-targets", "attention",
             "--max-seq-length", "256", "--token-budget", "512", "--gradient-accumulation-steps", "1",
             "--learning-rate", "1e-3", "--warmup-ratio", "0", "--lr-scheduler", "constant", "--no-merge",
             "--model", str(tiny_model_dir), "--data", str(data), "--output-root", str(root), "--max-steps", "10"]
    whole = CliRunner().invoke(main, [*flags, "--run-name", "whole", "--save-steps", "4"], catch_exceptions=False)
    assert whole.exit_code == 0, whole.output
    record = json.loads((root / "whole" / "run.json").read_text())
    assert record["plan"]["batching"]["mode"] == "budget"
    per_epoch = record["plan"]["steps_per_epoch"]
    assert 4 < per_epoch < 10, per_epoch  # the resumed part crosses into the second epoch
    want = {e["step"]: e["loss"] for e in record["losses"]}

    # The same run, as if killed after the step-4 checkpoint: later checkpoints and history gone.
    shutil.copytree(root / "whole", root / "stopped")
    for ckpt in (root / "stopped" / "checkpoints").glob("checkpoint-*"):
        if ckpt.name != "checkpoint-4":
            shutil.rmtree(ckpt)
    stopped = json.loads((root / "stopped" / "run.json").read_text())
    stopped["losses"] = [e for e in stopped["losses"] if e["step"] <= 4]
    (root / "stopped" / "run.json").write_text(json.dumps(stopped))

    resumed = CliRunner().invoke(main, [*flags, "--run-name", "stopped", "--save-steps", "4", "--resume"],
                                 catch_exceptions=False)
    assert resumed.exit_code == 0, resumed.output
    assert "checkpoint-4" in resumed.output
    got = {e["step"]: e["loss"] for e in json.loads((root / "stopped" / "run.json").read_text())["losses"]}
    assert sorted(got) == list(range(1, 11))
    for step in range(5, 11):
        assert got[step] == pytest.approx(want[step], rel=1e-4, abs=1e-5), (step, got[step], want[step])
