"""`swft-lite merge`: LoRA (attention + expert target_parameters) folded into a tiny gpt-oss, shard by shard, verified.

The tiny model (conftest's TINY_SIZE) is a random gpt-oss whose next-token distributions are almost flat (logit RMS
0.16 over 201,088 tokens), so any change to it moves KL very little. Most tests therefore use a "sharp" copy whose
lm_head is scaled x10 (logit RMS ~1.6, peaked like a trained model's): there the adapter moves the probes by mean
KL ~0.5 and a planted fault shows clearly. One test runs the flat model as built, as `swft-lite train` would.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("o200k_vocab")]  # harmony needs the o200k vocabulary

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


# --- helpers (test_gguf.py imports these) ---------------------------------------------------------------------------


def save_sharp_base(src: Path, dst: Path, *, scale: float = 10.0, max_shard_size: str | None = None) -> Path:
    """The tiny model with lm_head x scale, saved like a hub download (optionally in several shards)."""
    import torch
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(src, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(scale)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(dst, **kwargs)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(src) / name, Path(dst) / name)
    return Path(dst)


def make_adapter(base_dir: Path, adapter_dir: Path, *, std: float = 0.05, seed: int = 1, r: int = 4,
                 attn_std: float | None = None):
    """A PEFT LoRA on q/k/v/o + both expert tensors, lora_B random (a freshly initialised LoRA is a no-op), saved
    with the tokenizer files like `swft-lite train` saves it. std=0 keeps the no-op adapter; attn_std (default: std)
    sets the attention modules' lora_B apart (0: only the experts move)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GptOssForCausalLM

    model = GptOssForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=ATTN, target_parameters=EXPERTS)
    torch.manual_seed(seed)  # lora_A's init draws from the global generator: the same adapter whatever ran before
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                scale = std if attn_std is None or "experts" in name else attn_std
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    peft_model.save_pretrained(adapter_dir)
    for name in TOKENIZER_FILES:
        shutil.copy(Path(base_dir) / name, Path(adapter_dir) / name)
    return peft_model


def make_run(run_dir: Path, base_dir: Path, adapter_src: Path | None = None, **adapter_kw) -> Path:
    """RUN_DIR/adapter + RUN_DIR/run.json, as the training module writes them."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if adapter_src is None:
        make_adapter(base_dir, run_dir / "adapter", **adapter_kw)
    else:
        shutil.copytree(adapter_src, run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({"model": str(base_dir), "status": "finished"}))
    return run_dir


def read_safetensors_dir(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


# MXFP4 reference quantizer (OCP MX: blocks of 32 along the input dimension, one shared power-of-two scale per block,
# E2M1 elements), written independently of transformers so that its dequantizer is tested against something.
FP4_GRID = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def quantize_mxfp4_reference(w):
    """w in transformers' layout (E, in, out) -> (blocks (E, out, in/32, 16) uint8, scales (E, out, in/32) uint8), the
    layout of openai/gpt-oss-20b's `*_blocks` / `*_scales` (two elements per byte, the even one in the low nibble;
    scales are exponents + 127)."""
    import torch

    x = w.transpose(1, 2).float().contiguous()
    e_, o_, i_ = x.shape
    x = x.reshape(e_, o_, i_ // 32, 32)
    amax = x.abs().amax(-1, keepdim=True).clamp_min(2.0**-126)
    exp = torch.floor(torch.log2(amax)) - 2          # largest E2M1 magnitude is 6 = 1.5 * 2**2
    y = (x / torch.exp2(exp)).clamp(-6, 6)
    grid = torch.tensor(FP4_GRID)
    idx = (y.abs()[..., None] - grid).abs().argmin(-1)
    idx = idx + 8 * ((y < 0) & (idx > 0)).long()    # sign bit (no negative zero)
    idx = idx.to(torch.uint8)
    blocks = (idx[..., 0::2] | (idx[..., 1::2] << 4)).contiguous()
    scales = (exp[..., 0] + 127).to(torch.uint8)
    return blocks, scales


def save_mxfp4_base(src: Path, dst: Path) -> tuple[Path, dict]:
    """The model at src rewritten as openai/gpt-oss-20b stores it: experts as MXFP4 blocks/scales, the rest bf16,
    quantization_config mxfp4. Returns (dst, {expert tensor name: (blocks, scales)})."""
    import torch
    from safetensors.torch import save_file

    sd = read_safetensors_dir(src)
    out, packed = {}, {}
    for k, v in sd.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            blocks, scales = quantize_mxfp4_reference(v)
            out[k + "_blocks"], out[k + "_scales"] = blocks, scales
            packed[k] = (blocks, scales)
        else:
            out[k] = v.to(torch.bfloat16)
    dst.mkdir(parents=True)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    cfg["dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (src / name).exists():
            shutil.copy(src / name, dst / name)
    return dst, packed


def peft_merged_state(base_dir: Path, adapter_dir: Path) -> dict:
    """PEFT's own merge_and_unload() in fp32, as bf16: what our shard-by-shard merge must reproduce bit for bit."""
    import torch
    from peft import PeftModel
    from transformers import GptOssForCausalLM

    model = PeftModel.from_pretrained(GptOssForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                      str(adapter_dir))
    merged = model.merge_and_unload()
    return {k: v.to(torch.bfloat16) for k, v in merged.state_dict().items()}


# --- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharp_base(tiny_model_dir, tmp_path_factory) -> Path:
    return save_sharp_base(tiny_model_dir, tmp_path_factory.mktemp("sharp") / "base")


@pytest.fixture(scope="module")
def sharp_base_sharded(tiny_model_dir, tmp_path_factory) -> Path:
    d = save_sharp_base(tiny_model_dir, tmp_path_factory.mktemp("sharp-sharded") / "base", max_shard_size="20MB")
    assert len(list(d.glob("*.safetensors"))) >= 3 and (d / "model.safetensors.index.json").exists()
    return d


@pytest.fixture(scope="module")
def adapter_dir(sharp_base, tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("adapter") / "adapter"
    make_adapter(sharp_base, d)
    return d


@pytest.fixture
def run_dir(tmp_path, sharp_base, adapter_dir) -> Path:
    return make_run(tmp_path / "run", sharp_base, adapter_src=adapter_dir)


@pytest.fixture(scope="module")
def reference_merge(sharp_base, adapter_dir) -> dict:
    return peft_merged_state(sharp_base, adapter_dir)


def _invoke(args):
    from click.testing import CliRunner

    from swft_lite.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=False)
    print(result.output)
    return result


# --- tests --------------------------------------------------------------------------------------------------------


def test_merge_run_dir_verified_and_equal_to_peft(run_dir, reference_merge):
    import torch

    result = _invoke(["merge", str(run_dir), "--json"])
    assert result.exit_code == 0, result.output
    assert "PASSED" in result.output and "adapter vs base" in result.output
    out = run_dir / "merged"
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "model.safetensors", "merge_report.json"):
        assert (out / name).exists(), name
    assert not list(run_dir.glob("*.failed")) and not list(run_dir.glob(".merged.partial-*"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16" and "quantization_config" not in cfg

    report = json.loads((out / "merge_report.json").read_text())
    v = report["verification"]
    assert v["passed"] and v["kl_mean_trimmed"] < 1e-4 and v["top1_agreement_tol"] >= 0.99
    assert v["vs_control"]["kl_mean"] == 0 and v["vs_control"]["max_abs_logit_diff"] == 0  # = PEFT's own merge
    # the adapter really moves the model, so the check above means something
    assert v["adapter_effect"]["kl_mean"] > 0.1 and v["adapter_effect"]["max_abs_logit_diff"] > 0.5
    assert report["lora_tensors_merged"] == 2 * (4 + 2) == report["lora_layers"]

    # bit for bit what PEFT's own merge_and_unload gives (fp32 add, then bf16)
    ours = read_safetensors_dir(out)
    assert set(ours) == set(reference_merge)
    for k, v in reference_merge.items():
        assert ours[k].dtype == torch.bfloat16
        assert torch.equal(ours[k], v), k


def test_merge_sharded_base_bounded_memory(tmp_path, sharp_base_sharded, adapter_dir, reference_merge):
    """A base in several safetensors files (the case where Unsloth's merge guessed the expert layout and wrote a
    wrong model) merges to the same weights, written in bounded shards."""
    import torch

    from swft_lite.merge import merge_adapter

    run = make_run(tmp_path / "run", sharp_base_sharded, adapter_src=adapter_dir)
    report = merge_adapter(run, max_shard_size="20MB")
    out = run / "merged"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) == report["shards"] >= 3 and set(index["weight_map"].values()) == {s.name for s in shards}
    assert report["verification"]["passed"]
    ours = read_safetensors_dir(out)
    for k, v in reference_merge.items():
        assert torch.equal(ours[k], v), k
    # memory: what is held at once is one output shard plus the tensor being processed, never the model
    model_bytes = sum(t.numel() * 2 for t in ours.values())
    assert report["max_buffered_bytes"] <= 20e6 + report["largest_tensor_bytes"]
    assert report["max_buffered_bytes"] < 0.75 * model_bytes
    print(f"peak RSS during the merge {report['peak_rss_gib']:.3f} GiB (start {report['rss_start_gib']:.3f} GiB, "
          f"+{(report['peak_rss_gib'] - report['rss_start_gib']) * 1024:.0f} MiB); model {model_bytes / 2**20:.0f} "
          f"MiB in bf16; largest buffer {report['max_buffered_bytes'] / 2**20:.1f} MiB")


def _drop_one_expert(name, delta):
    if name.startswith("model.layers.0.mlp.experts."):
        delta = delta.clone()
        delta[0] = 0  # expert 0 of layer 0 loses its delta (gate_up and down)
    return delta


def _transpose_down(name, delta):
    # gpt-oss's down_proj is (E, intermediate, hidden) and intermediate == hidden: a transposed delta still fits
    return delta.transpose(-1, -2).contiguous() if name.endswith("mlp.experts.down_proj") else delta


def _missing_layer(name, delta):
    return delta * 0 if name.startswith("model.layers.1.") else delta


def _deinterleaved_gate_up(name, delta):
    # gate/up are interleaved in gate_up_proj's last dim; a concatenated layout is the classic mistake
    if name.endswith("mlp.experts.gate_up_proj"):
        return __import__("torch").cat([delta[..., 0::2], delta[..., 1::2]], dim=-1)
    return delta


@pytest.mark.parametrize("hook", [_drop_one_expert, _missing_layer, _deinterleaved_gate_up],
                         ids=["dropped-expert-delta", "missing-layer", "deinterleaved-gate-up"])
def test_planted_fault_is_caught(run_dir, hook):
    from swft_lite.merge import VerificationError, merge_adapter

    with pytest.raises(VerificationError) as err:
        merge_adapter(run_dir, delta_hook=hook)
    v = err.value.report["verification"]
    print(f"{hook.__name__}: KL mean {v['kl_mean_trimmed']:.3g} (trimmed) max {v['kl_max']:.3g}, "
          f"top-1 {v['top1_agreement']:.3f} ({v['top1_agreement_tol']:.3f} near-ties forgiven), "
          f"max |dlogit| {v['max_abs_logit_diff']:.3g}")
    assert not v["passed"] and v["kl_mean_trimmed"] > 1e-3 and v["top1_agreement_tol"] < 0.98
    assert v["vs_control"]["kl_mean_trimmed"] > 1e-3  # and far from what PEFT's own merge gives
    assert not (run_dir / "merged").exists()
    assert (run_dir / "merged.failed" / "model.safetensors").exists()
    assert "merged.failed" in str(err.value)


def test_transposed_delta_fails_the_command(run_dir, monkeypatch):
    """Through the CLI, with the fault planted in the function that asks PEFT for a delta: exit 1, nothing at OUT."""
    import swft_lite.merge as merge_mod

    real = merge_mod._delta_for

    def faulty(layer, adapter, name, base):
        return _transpose_down(name, real(layer, adapter, name, base))

    monkeypatch.setattr(merge_mod, "_delta_for", faulty)
    result = _invoke(["merge", str(run_dir)])
    assert result.exit_code == 1
    assert "FAILED" in result.output and "merged.failed" in result.output
    assert not (run_dir / "merged").exists() and (run_dir / "merged.failed").is_dir()


def test_existing_out_refused_then_overwritten(run_dir):
    out = run_dir / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _invoke(["merge", str(run_dir)])
    assert result.exit_code == 1 and "already exists" in result.output and "--overwrite" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    result = _invoke(["merge", str(run_dir), "--overwrite", "--no-verify"])
    assert result.exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()


def test_not_enough_disk(run_dir, monkeypatch):
    import swft_lite.merge as merge_mod

    monkeypatch.setattr(merge_mod, "_free_bytes", lambda path: 10 * 2**20)
    result = _invoke(["merge", str(run_dir)])
    assert result.exit_code == 1
    assert "not enough free disk" in result.output and str(run_dir) in result.output and "GB" in result.output
    assert not list(run_dir.glob("*merged*"))


def test_adapter_that_does_not_fit_is_refused(tmp_path, sharp_base, adapter_dir):
    from safetensors.torch import load_file, save_file

    from swft_lite.merge import MergeError, merge_adapter

    bad = tmp_path / "adapter"
    shutil.copytree(adapter_dir, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["target_modules"] = ATTN + ["router"]  # a module PEFT cannot adapt in this model
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match="does not fit"):
        merge_adapter(bad, base=sharp_base, out=tmp_path / "out1", verify=False)

    shutil.rmtree(bad)
    shutil.copytree(adapter_dir, bad)
    weights = load_file(bad / "adapter_model.safetensors")
    save_file({k: v for k, v in weights.items() if "layers.1.self_attn.q_proj" not in k},
              str(bad / "adapter_model.safetensors"))
    with pytest.raises(MergeError, match="2 LoRA weights missing"):
        merge_adapter(bad, base=sharp_base, out=tmp_path / "out2", verify=False)
    assert not (tmp_path / "out1").exists() and not (tmp_path / "out2").exists()


def test_flat_tiny_model_and_noop_adapter(tmp_path, tiny_model_dir):
    """The model exactly as the training tests build it: a correct merge passes; a no-op adapter is reported."""
    from swft_lite.merge import format_verification, merge_adapter

    run = make_run(tmp_path / "run", tiny_model_dir, std=0.05, seed=3)
    v = merge_adapter(run)["verification"]
    assert v["passed"] and not v["adapter_is_noop"]
    assert v["vs_control"]["kl_mean"] == 0  # bit for bit PEFT's own merge stored in bf16

    noop = make_run(tmp_path / "noop", tiny_model_dir, std=0.0)  # lora_B = 0: a freshly initialised LoRA
    v = merge_adapter(noop)["verification"]
    assert v["passed"] and v["adapter_is_noop"] and v["adapter_effect"]["kl_mean"] == 0
    assert "no-op" in format_verification(v)


def test_mxfp4_base_dequantized_and_merged(tmp_path, sharp_base, adapter_dir):
    import torch
    from transformers import GptOssForCausalLM, Mxfp4Config

    from swft_lite.merge import AdapterDeltas, dequantize_mxfp4, merge_adapter

    mx_dir, packed = save_mxfp4_base(sharp_base, tmp_path / "mxfp4-base")
    original = read_safetensors_dir(sharp_base)
    # transformers' own loader dequantizes the same file (on CPU it always does)
    tf_model = GptOssForCausalLM.from_pretrained(mx_dir, dtype=torch.bfloat16,
                                                 quantization_config=Mxfp4Config(dequantize=True))
    tf_state = tf_model.state_dict()
    for name, (blocks, scales) in packed.items():
        ours = dequantize_mxfp4(blocks, scales)
        assert ours.shape == original[name].shape  # (E, in, out): transformers' parameter layout
        assert torch.equal(ours, tf_state[name]), name
        # and it is the original weight up to MXFP4's rounding (at most a third of the block's largest magnitude)
        w = original[name].float()
        amax = w.transpose(1, 2).reshape(w.shape[0], w.shape[2], -1, 32).abs().amax(-1, keepdim=True)
        err = (ours.float() - w).abs().transpose(1, 2).reshape(amax.shape[:-1] + (32,))
        assert bool((err <= amax / 3 + 1e-12).all())
        assert float((ours.float() - w).abs().mean()) < 0.2 * float(w.abs().mean())  # MXFP4: ~10 % on Gaussians
    del tf_model, tf_state

    run = make_run(tmp_path / "run", mx_dir, adapter_src=adapter_dir)
    report = merge_adapter(run)
    assert report["mxfp4_tensors_dequantized"] == 4 and report["verification"]["passed"]
    merged = read_safetensors_dir(run / "merged")
    assert not any(k.endswith(("_blocks", "_scales")) for k in merged)
    deltas = AdapterDeltas(run / "adapter", mx_dir)
    for name, (blocks, scales) in packed.items():
        base = dequantize_mxfp4(blocks, scales, dtype=torch.float32)
        want = (base + deltas.delta(name, base)).to(torch.bfloat16)
        assert torch.equal(merged[name], want), name


def test_unsloth_legacy_expert_layout_is_refused(run_dir):
    """Unsloth marks an adapter whose experts' lora_B is packed its older way (`lora_B_layout`); PEFT ignores that
    key, so merging it with PEFT's deltas would check out against PEFT's reading and still be the wrong model."""
    cfg_path = run_dir / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["lora_B_layout"] = "grouped_by_expert"
    cfg_path.write_text(json.dumps(cfg))
    result = _invoke(["merge", str(run_dir)])
    assert result.exit_code == 1
    assert "lora_B_layout='grouped_by_expert'" in result.output and "rank_major" in result.output
    assert not (run_dir / "merged").exists()

    cfg["lora_B_layout"] = "rank_major"  # PEFT's own packing, what unsloth_zoo 2026.10.9 writes by default
    cfg_path.write_text(json.dumps(cfg))
    assert _invoke(["merge", str(run_dir), "--no-verify"]).exit_code == 0
