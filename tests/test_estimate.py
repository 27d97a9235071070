"""The memory estimate: calibration against benchmarks/results.json, the LoRA parameter count against real PEFT,
the shipped profiles against their budgets, planning for cards between profiles, the CLI, and bench.py's plan."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite import estimate as est
from swft_lite.cli import main
from swft_lite.profiles import ProfileError, all_profiles, load_profile, shipped_profile_names

REPO = Path(__file__).resolve().parent.parent
GIB = 1024**3


def test_results_file_schema():
    records = est.load_records()
    assert records, "benchmarks/results.json holds no records"
    keys = {"date", "gpu", "stack", "model", "four_bit", "targets", "rank", "seq", "batch", "tokens_per_step",
            "peak_allocated_gib", "peak_reserved_gib", "tokens_per_second", "step_seconds", "source"}
    for r in records:
        assert keys <= set(r), f"record lacks {keys - set(r)}: {r}"
        assert r["stack"] in est.STACKS + ("raw-unsloth",)  # raw-unsloth: bench.py's wrapper-cost baseline
        if r.get("calibrates") is False:
            assert r.get("why_not"), f"a record left out of the fit must say why: {r}"
        est.ModelShape.from_record(r["model"])  # every record names a complete model shape


@pytest.mark.parametrize("name", shipped_profile_names())
def test_every_shipped_profile_was_measured_within_its_card(name):
    """The promise a profile makes: at its exact settings, on the full gpt-oss-20b shape, scripts/bench.py ran it
    under the card's memory cap and the peak reserved memory stayed within the headroom limit."""
    p = load_profile(name)
    limit = est.headroom_limit(p.vram_budget_gib)
    runs = [r for r in est.bench_runs(p, est.load_records())
            if r["seq"] >= 0.99 * p.max_seq_length  # rows as long as the profile allows
            and r.get("headroom_limit_gib") <= limit]
    assert runs, f"profile {name}: no full-shape bench run at its settings in benchmarks/results.json"
    for r in runs:
        assert r["peak_reserved_gib"] <= limit, (name, r["peak_reserved_gib"], limit)


@pytest.mark.parametrize("row", est.errors(est.load_records()),
                         ids=lambda r: f"{r['stack']}-L{r['layers']}-{'4bit' if r['four_bit'] else 'bf16'}-"
                                       f"{r['targets']}-r{r['rank']}-{r['batch']}x{r['seq']}")
def test_estimate_within_10_percent_of_every_measurement(row):
    # Each stack has its own coefficients (estimate(stack=...)), so the hf records are checked too.
    assert abs(row["error"]) <= 0.10, row


def test_baked_coefficients_are_the_fit_of_the_results_file():
    fitted = est.fit_all(est.load_records())
    assert set(fitted) == set(est.COEFFICIENTS)
    for stack, c in fitted.items():
        assert c == est.COEFFICIENTS[stack], (
            "benchmarks/results.json changed: refit with `python -m swft_lite.estimate --refit` and paste:\n"
            + est.coefficients_source(fitted))


def test_fit_is_deterministic_and_recovers_a_known_model():
    # Synthetic records made by the estimator itself with known coefficients come back out of fit().
    truth = est.Coefficients(logit_bytes=4.0, act_mult=2.0, overhead_gib=0.5, reserved_frac=0.0)
    shape = est.DEFAULT_SHAPE
    records = []
    for four_bit, targets, rank, seq, batch in [(True, "attention+experts", 16, 1024, 1),
                                                (True, "attention+experts", 16, 8192, 1),
                                                (True, "attention", 8, 4096, 2), (False, "attention+experts", 16,
                                                                                 16384, 1)]:
        r = {"stack": "unsloth", "model": shape.to_record(), "four_bit": four_bit, "targets": targets,
             "rank": rank, "seq": seq, "batch": batch, "peak_reserved_gib": None}
        r["peak_allocated_gib"] = est.record_estimate(r, truth).total_gib
        records.append(r)
    c = est.fit(records, "unsloth")
    assert (c.logit_bytes, c.overhead_gib) == (truth.logit_bytes, truth.overhead_gib)
    assert c.max_error < 0.002
    assert est.fit(records, "unsloth") == c


def test_weights_match_the_measured_4bit_loads():
    # shared/gpu/README.md: 11.7 GiB after Unsloth's 4-bit load (experts quantized), 38.1 GiB with plain bnb
    # (nn.Linear only); bf16: 20.9 B params x 2 bytes.
    shape = est.DEFAULT_SHAPE
    assert shape.total_params == 20_914_757_184
    assert abs(est._weights_bytes(shape, True, "unsloth", 2) / GIB - 11.7) < 0.1
    assert abs(est._weights_bytes(shape, True, "hf", 2) / GIB - 38.1) < 0.1
    assert abs(est._weights_bytes(shape, False, "unsloth", 2) / GIB - 38.96) < 0.01
    assert abs(shape.active_params / 1e9 - 3.6) < 0.05


def test_trainable_count_of_the_full_shape_matches_the_measurements():
    shape = est.DEFAULT_SHAPE
    assert shape.trainable_params(16, "attention+experts") == 184_909_824   # measured: 184.9 M
    assert shape.trainable_params(8, "attention") == 3_981_312              # measured: 4.0 M


@pytest.mark.parametrize("targets", ["attention", "attention+experts"])
def test_trainable_formula_matches_a_real_peft_model(targets):
    """A tiny gpt-oss on CPU with the adapters swft-lite attaches (backends.lora_kwargs): PEFT's count must equal
    the formula exactly. Expert width differs from hidden here so a transposed lora_A/lora_B would show."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssConfig, GptOssForCausalLM

    from swft_lite.backends import lora_kwargs

    cfg = GptOssConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=48, num_local_experts=4,
                       num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       vocab_size=256, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                       layer_types=["sliding_attention", "full_attention"])
    torch.manual_seed(0)
    model = GptOssForCausalLM(cfg)
    profile = dataclasses.replace(load_profile("rtx4090"), lora_rank=3, lora_targets=targets)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(profile)))
    counted = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape = est.ModelShape.from_config(cfg.to_dict())
    assert counted == shape.trainable_params(3, targets)
    assert sum(p.numel() for p in model.parameters()) - counted == shape.total_params


def test_load_shape_from_config_file_and_folder(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(est.GPT_OSS_20B_CONFIG))
    assert est.load_shape(tmp_path) == est.DEFAULT_SHAPE
    assert est.load_shape(tmp_path / "config.json") == est.DEFAULT_SHAPE
    with pytest.raises(ProfileError):
        est.load_shape(tmp_path / "missing")
    # the built-in copy is the real config (shipped in swft_lite/assets)
    assert est.load_shape(Path(est.__file__).parent / "assets" / "gpt-oss-20b" / "config.json") == est.DEFAULT_SHAPE


def test_headroom_limits():
    assert [est.headroom_limit(g) for g in (16, 24, 80)] == [14.5, 22.5, 76.0]
    # cards report a little less than their nominal size
    assert est.headroom_limit(15.6) == 14.5 and est.headroom_limit(23.65) == 22.5
    assert est.headroom_limit(79.19) == 76.0
    assert est.headroom_limit(20) == 18.5


@pytest.mark.parametrize("profile", all_profiles(), ids=lambda p: p.name)
def test_every_shipped_profile_fits_its_budget_with_headroom(profile):
    e = est.estimate(profile)
    limit = {16: 14.5, 24: 22.5, 80: 76.0}[int(profile.vram_budget_gib)]
    assert e.limit_gib == limit
    assert e.fits and e.reserved_gib <= limit, e.to_dict()
    assert e.total_gib <= e.reserved_gib


def test_estimate_grows_with_tokens_and_targets():
    p = load_profile("rtx4090")
    small = est.estimate(dataclasses.replace(p, max_seq_length=1024))
    big = est.estimate(dataclasses.replace(p, max_seq_length=16384))
    assert big.total_gib > small.total_gib and not big.fits
    attn = est.estimate(dataclasses.replace(p, lora_targets="attention"))
    assert attn.total_gib < est.estimate(p).total_gib
    plain = est.estimate(dataclasses.replace(p, gradient_checkpointing="false"))
    assert plain.total_gib > est.estimate(p).total_gib
    hf = est.estimate(p, stack="hf")
    assert 30 < hf.weights_gib < 40  # bnb quantizes nn.Linear only: the experts stay bf16


def test_prepare_model_for_kbit_training_would_upcast_the_experts():
    """Why the hf backend does not call PEFT's prepare_model_for_kbit_training: it casts every weight that is not
    Params4bit - gpt-oss's fused experts included - to fp32 (~76 GiB for gpt-oss-20b)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import GptOssConfig, GptOssForCausalLM

    cfg = GptOssConfig(num_hidden_layers=1, hidden_size=32, intermediate_size=32, num_local_experts=2,
                       num_experts_per_tok=1, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       vocab_size=64, pad_token_id=0, eos_token_id=1, layer_types=["full_attention"])
    model = prepare_model_for_kbit_training(GptOssForCausalLM(cfg).to(torch.bfloat16),
                                            use_gradient_checkpointing=False)
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float32


def test_plan_for_a_20_gib_card():
    base = load_profile("rtx4070")
    plan = est.plan_for_card(20)
    assert plan.vram_budget_gib == 20
    assert (plan.max_seq_length > base.max_seq_length or plan.per_device_batch_size > base.per_device_batch_size)
    assert plan.max_seq_length * plan.per_device_batch_size > base.max_seq_length * base.per_device_batch_size
    assert plan.max_seq_length % 1024 == 0
    e = est.estimate(plan, card_gib=20)
    assert e.fits and e.reserved_gib <= 18.5
    assert plan.lora_targets == base.lora_targets and plan.load_in_4bit == base.load_in_4bit
    assert plan.effective_batch_size == base.effective_batch_size


def test_plan_for_shipped_card_sizes_is_at_least_the_profile():
    for card, name, cap in [(15.6, "rtx4070", None), (16, "rtx4070", None), (23.65, "rtx4090", (8, 9)),
                            (79.19, "h100", (9, 0))]:
        base, plan = load_profile(name), est.plan_for_card(card, cap)
        assert plan.max_seq_length * plan.per_device_batch_size >= base.max_seq_length * base.per_device_batch_size
        assert plan.lora_targets == base.lora_targets and plan.load_in_4bit == base.load_in_4bit
        assert est.estimate(plan, card_gib=card).fits
    assert "rtx3090" in est.plan_for_card(24, (8, 6)).source
    assert "rtx4090" in est.plan_for_card(24, (8, 9)).source
    with pytest.raises(ProfileError, match="16 GB"):
        est.plan_for_card(12)


def test_cli_table_for_one_profile():
    result = CliRunner().invoke(main, ["estimate", "--profile", "rtx4090"])
    assert result.exit_code == 0, result.output
    for word in ("weights", "adapters", "optimizer+grads", "activations", "overhead", "total allocated",
                 "reserved", "limit", "verdict: fits", "22.5"):
        assert word in result.output


def test_cli_json_and_overrides():
    result = CliRunner().invoke(main, ["estimate", "--profile", "rtx4070", "--seq", "8192", "--batch", "2",
                                       "--rank", "8", "--json"])
    assert result.exit_code == 1, result.output  # does not fit: exit status 1
    d = json.loads(result.output)
    assert d["verdict"] == "does not fit" and not d["fits"]
    assert d["tokens"] == 16384 and d["settings"]["lora_rank"] == 8
    assert d["trainable"] == est.DEFAULT_SHAPE.trainable_params(8, "attention")
    for k in ("weights_gib", "adapters_gib", "grads_gib", "optimizer_gib", "activations_gib", "overhead_gib",
              "total_gib", "reserved_gib", "limit_gib"):
        assert isinstance(d[k], float)
    # every profile key is an option too
    result = CliRunner().invoke(main, ["estimate", "--profile", "h100", "--load-in-4bit", "--lora-targets",
                                       "attention", "--set", "gradient_accumulation_steps=1", "--json"])
    d = json.loads(result.output)
    assert d["settings"]["load_in_4bit"] is True and d["weights_gib"] < 12


def test_cli_all_profiles_plan_and_model(tmp_path):
    result = CliRunner().invoke(main, ["estimate"])
    assert result.exit_code == 0, result.output
    for p in all_profiles():
        assert p.name in result.output
    result = CliRunner().invoke(main, ["estimate", "--json"])
    assert len(json.loads(result.output)["estimates"]) == len(all_profiles())
    result = CliRunner().invoke(main, ["estimate", "--plan", "20"])
    assert result.exit_code == 0 and "plan-20gib" in result.output
    cfg = dict(est.GPT_OSS_20B_CONFIG, num_hidden_layers=2)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    result = CliRunner().invoke(main, ["estimate", "--profile", "rtx4090", "--model", str(tmp_path), "--json"])
    assert json.loads(result.output)["weights_gib"] < 4
    result = CliRunner().invoke(main, ["estimate", "--model", str(tmp_path / "nope.json")])
    assert result.exit_code == 2 and "no such" in result.output


def test_bench_dry_run_prints_the_plan(tmp_path):
    """scripts/bench.py plans on CPU without torch or a GPU."""
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--dry-run", "--results",
                          str(tmp_path / "r.json"), "h100:load_in_4bit=true"],
                         capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    for word in ("rtx4070", "rtx4090", "h100", "h100:load_in_4bit=true", "memory fraction", "estimate"):
        assert word in out.stdout
    # Every config on both kinds of data: rows of the full length and chats of varying length.
    assert "h100@exact" in out.stdout and "h100@variable" in out.stdout
    assert "--tokens 8192 --variable" in out.stdout
    assert not (tmp_path / "r.json").exists()  # a dry run writes nothing
