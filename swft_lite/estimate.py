"""Predict the peak GPU memory of a training run from the model config and a profile, before a GPU is touched.

    swft-lite estimate --profile rtx4090            breakdown table and a fits / does not fit verdict
    swft-lite estimate --profile h100 --seq 16384   any profile key can be overridden
    python -m swft_lite.estimate --refit            refit the coefficients from benchmarks/results.json

The formula is physical where the physics is known and fitted where it is not. Every byte count below is computed
from the model config; three coefficients per stack (`Coefficients`) are fitted to measured runs, stored with their
inputs in benchmarks/results.json. `fit(records)` recomputes them from that file and a test checks that the constants
baked in here (`COEFFICIENTS`) are what the file gives, so a new measurement cannot silently disagree with the model.

What is live on the GPU at the peak of a LoRA step (P = trainable LoRA parameters, T = tokens per forward pass =
per_device_batch_size x max_seq_length, the worst case where every row is full length):

    weights      base weights: NF4 (0.5 byte + 8-bit absmax per 64 + fp32 absmax per 256 blocks) for the tensors
                 bitsandbytes quantizes, bf16 (2 bytes) for the rest. Under Unsloth the fused MoE experts ARE
                 quantized (transformers 5 + Unsloth, loading a bf16 checkpoint with load_in_4bit); with plain
                 transformers + PEFT + bnb only nn.Linear is (attention q/k/v/o), the experts stay bf16.
                 Embeddings, lm_head, norms, router, attention sinks and biases are bf16 on both stacks.
    adapters     P x 4 bytes: PEFT (and Unsloth) keep LoRA weights in fp32 on a bf16 model.
    grads        P x 4 bytes (fp32, like the adapters) - live in the backward pass and the optimizer step, and from
                 the second micro-batch on when gradient accumulation > 1.
    optimizer    adamw_8bit / paged_adamw_8bit: two uint8 states + fp32 absmax per 256 = 2.03 bytes per P;
                 adamw_torch(_fused): two fp32 states = 8 bytes per P.
                 (Measured: attention+experts r16 (184.9 M) vs attention r8 (4.0 M) differ by 1.8-1.9 GiB at equal
                 tokens = ~10.7 bytes per extra parameter: fp32 weights + fp32 grads + 8-bit Adam, plus expert-LoRA
                 activations. bf16 adapters would have given ~6.)
    activations  the larger of two moments of the step (the estimate is their max):
                 - loss head: the logits of the T tokens, `logit_bytes` per (token x vocab) element (fitted: bf16
                   logits = 2, an fp32 upcast = 4 more; chunked/fused losses keep less), with grads absent unless
                   accumulating;
                 - a layer's backward: one layer recomputed (gradient checkpointing), `act_mult` x its saved bf16
                   activations per token (fitted), plus, for 4-bit Unsloth, one projection of one layer's 32 experts
                   dequantized to bf16 at once (Unsloth's grouped QLoRA path: E x hidden x 2*inter x 2 bytes,
                   0.99 GiB for gpt-oss-20b), with all grads live.
                 Checkpointed layer inputs are offloaded to CPU RAM by Unsloth's 'unsloth' mode (reported as host
                 memory); with 'true' they stay on the GPU (layers x T x hidden x 2 bytes); with 'false' every
                 layer's activations do.
    overhead     `overhead_gib` (fitted): cuBLAS/Triton workspaces, RoPE caches, allocator rounding.
    reserved     allocated + `reserved_frac` x the transient part (fitted as the largest reserved-minus-allocated
                 gap measured, relative to that transient): what the caching allocator holds, what a card must have.

Budgets are checked on reserved memory against the profile's card minus headroom for the CUDA context and a desktop:
max(1.5 GiB, 5 %) - 16 GiB -> 14.5, 24 -> 22.5, 80 -> 76.

Each stack has its own coefficients (`estimate(..., stack="unsloth" | "hf")`): their loss heads and expert kernels
differ, so the hf records are not forced onto Unsloth's numbers (both stacks are held to +-10 % by the tests). From
the first records (shared/gpu/README.md, H100, 1-2.6k tokens per pass): unsloth 5.5 bytes per logit (about bf16
logits + one fp32 copy: its loss head is not chunked much at these lengths), 1.5 x one layer's activations, 0.1 GiB;
worst record 6.9 % off (estimates high for attention-only, low for the 2-layer batch-2 run - those two pull
against each other). hf: 0 bytes per logit (TRL's chunked loss never makes the head the peak) and 6 x one layer's
activations (the eager MoE path keeps much more than the saved bf16 tensors), 0.4 GiB, and a large reserved gap
(fragmentation: 2-4 GiB measured). Rows of 4k-16k tokens had not been measured when this was written: the per-token
term is pinned mostly by the 2-layer run, and if Unsloth chunks its loss at long rows the estimate is on the high
(safe) side; scripts/bench.py measures them and `--refit` folds them in.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from swft_lite.profiles import Profile, ProfileError

GIB = 1024**3

# openai/gpt-oss-20b's config.json (the numbers the estimate and the benchmark need), so nothing outside the package
# is read for the default shape.
GPT_OSS_20B_CONFIG: dict[str, Any] = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0, "original_max_position_embeddings": 4096,
                     "rope_type": "yarn", "truncate": False},
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "use_cache": True,
    "vocab_size": 201088,
}

# NF4 with double quantization (bitsandbytes, blocksize 64): 4 bits per weight, one 8-bit absmax per 64 weights,
# one fp32 absmax per 256 of those blocks.
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)
BF16 = 2
FP32 = 4
OPTIMIZER_STATE_BYTES = {"adamw_8bit": 2 + 2 * 4 / 256, "paged_adamw_8bit": 2 + 2 * 4 / 256,
                         "adamw_torch": 8.0, "adamw_torch_fused": 8.0}
STACKS = ("unsloth", "hf")

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results.json"


# --- model shape ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelShape:
    layers: int
    hidden: int
    intermediate: int
    experts: int
    experts_per_token: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tie_word_embeddings: bool = False
    attention_bias: bool = True
    max_position: int = 131072

    @classmethod
    def from_config(cls, cfg: dict) -> "ModelShape":
        cfg = cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg
        try:
            return cls(
                layers=int(cfg["num_hidden_layers"]), hidden=int(cfg["hidden_size"]),
                intermediate=int(cfg["intermediate_size"]), experts=int(cfg["num_local_experts"]),
                experts_per_token=int(cfg.get("num_experts_per_tok", cfg.get("experts_per_token"))),
                heads=int(cfg["num_attention_heads"]), kv_heads=int(cfg["num_key_value_heads"]),
                head_dim=int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]),
                vocab=int(cfg["vocab_size"]), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                attention_bias=bool(cfg.get("attention_bias", True)),
                max_position=int(cfg.get("max_position_embeddings", 131072)))
        except (KeyError, TypeError, ValueError) as exc:
            raise ProfileError(f"model config: not a gpt-oss (MoE) config, missing or bad key {exc}") from None

    @classmethod
    def from_record(cls, m: dict) -> "ModelShape":
        return cls(**{f.name: m[f.name] for f in dataclasses.fields(cls) if f.name in m})

    def to_record(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    # Parameter counts, per layer unless named otherwise.
    @property
    def attention_linear_params(self) -> int:      # q, k, v, o weights (nn.Linear: bnb quantizes these)
        h = self.hidden
        return h * self.q_dim + 2 * h * self.kv_dim + self.q_dim * h

    @property
    def gate_up_params(self) -> int:               # fused experts, (E, hidden, 2 * inter)
        return self.experts * self.hidden * 2 * self.intermediate

    @property
    def down_params(self) -> int:                  # fused experts, (E, inter, hidden)
        return self.experts * self.intermediate * self.hidden

    @property
    def expert_params(self) -> int:
        return self.gate_up_params + self.down_params

    @property
    def small_layer_params(self) -> int:           # biases, sinks, router, norms: always bf16
        h, E = self.hidden, self.experts
        attn_bias = (self.q_dim + 2 * self.kv_dim + h) if self.attention_bias else 0
        return (attn_bias + self.heads + E * h + E + E * 2 * self.intermediate + E * h + 2 * h)

    @property
    def embedding_params(self) -> int:             # embed_tokens + lm_head (unless tied) + final norm
        return self.vocab * self.hidden * (1 if self.tie_word_embeddings else 2) + self.hidden

    @property
    def total_params(self) -> int:
        return (self.layers * (self.attention_linear_params + self.expert_params + self.small_layer_params)
                + self.embedding_params)

    @property
    def active_params(self) -> int:
        """Parameters one token multiplies through: attention, top-k experts, lm_head (3.6 B for gpt-oss-20b)."""
        k = self.experts_per_token
        per_expert = self.hidden * 2 * self.intermediate + self.intermediate * self.hidden
        return self.layers * (self.attention_linear_params + k * per_expert) + self.vocab * self.hidden

    def trainable_params(self, rank: int, targets: str) -> int:
        """LoRA parameters as PEFT 0.21 makes them (checked against a real PEFT model in the tests):
        attention modules: r x (in + out) each; experts through target_parameters (ParamWrapper), one adapter per
        expert stacked: gate_up lora_A (E*r, hidden) + lora_B (2*inter, E*r), down lora_A (E*r, inter) + lora_B
        (hidden, E*r)."""
        h, r = self.hidden, rank
        attention = r * ((h + self.q_dim) + (h + self.kv_dim) * 2 + (self.q_dim + h))
        experts = 0
        if targets == "attention+experts":
            E, i = self.experts, self.intermediate
            experts = E * r * (h + 2 * i) + E * r * (i + h)
        return self.layers * (attention + experts)

    @property
    def layer_activation_elems(self) -> int:
        """bf16 elements per token one decoder layer saves for its backward: input, norm, q/k/v, attention output,
        o_proj output, norm, router logits, and for each of the top-k experts its input, gate_up output, GLU output
        and down output."""
        h, i, k = self.hidden, self.intermediate, self.experts_per_token
        return 6 * h + 2 * self.q_dim + 2 * self.kv_dim + self.experts + k * (2 * h + 3 * i)

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, {self.experts} experts top-{self.experts_per_token}, "
                f"vocab {self.vocab}, {self.total_params / 1e9:.1f} B params")


DEFAULT_SHAPE = ModelShape.from_config(GPT_OSS_20B_CONFIG)


def load_shape(model: str | Path | None) -> ModelShape:
    """None: gpt-oss-20b. A config.json path or a model folder holding one."""
    if model is None:
        return DEFAULT_SHAPE
    p = Path(model).expanduser()
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ProfileError(f"--model {model}: no such config.json or model folder (hub ids are not looked up here; "
                           "pass the folder or its config.json)")
    try:
        cfg = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ProfileError(f"--model {p}: not readable JSON: {exc}") from None
    return ModelShape.from_config(cfg)


# --- coefficients --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Coefficients:
    logit_bytes: float       # bytes per (token x vocab) logit element live at the loss head
    act_mult: float          # x one layer's saved bf16 activations per token, live in a layer's backward
    overhead_gib: float      # fixed: workspaces, caches, allocator rounding
    reserved_frac: float     # reserved - allocated, as a fraction of the transient (activation) part
    records: int = 0         # how many measurements the fit used
    max_error: float = 0.0   # the largest |estimate / measured - 1| among them


# Fitted by `fit(load_records())` on benchmarks/results.json (tests/test_estimate.py checks they still are).
# Refit: python -m swft_lite.estimate --refit   (prints this block).
COEFFICIENTS: dict[str, Coefficients] = {
    "unsloth": Coefficients(logit_bytes=1.5, act_mult=1.0, overhead_gib=0.1, reserved_frac=0.9, records=13,
                            max_error=0.0474),
    "hf": Coefficients(logit_bytes=9.25, act_mult=1.0, overhead_gib=0.15, reserved_frac=0.9, records=3,
                            max_error=0.0228),
}

# The grid `fit` searches (bounds keep the terms physical: at least one layer's activations are live; at most bf16
# logits, their fp32 copy and its fp32 gradient, 10 bytes a logit, plus slack - the hf stack fits 9.25).
_GRID_LOGIT_BYTES = [i * 0.25 for i in range(0, 49)]        # 0 .. 12
_GRID_ACT_MULT = [1.0 + i * 0.25 for i in range(0, 21)]       # 1 .. 6
_GRID_OVERHEAD = [round(0.1 + i * 0.05, 2) for i in range(0, 39)]  # 0.1 .. 2.0 GiB


# --- the estimate --------------------------------------------------------------------------------------------------


def nominal_card_gib(total_gib: float) -> float:
    """The card size the headroom table is written for. Cards report a little less than their nominal size, and
    how much less depends on who asks (a 16 GB card: 15.6-16.0 GiB, an RTX 4090 23.6-24.0, an H100 80GB 79.2-79.6):
    a reading within max(0.5 GiB, 1.5 %) below a whole number of GiB counts as that number."""
    up = math.ceil(total_gib - 1e-9)
    return float(up) if up - total_gib <= max(0.5, 0.015 * total_gib) else float(total_gib)


def headroom_limit(card_gib: float) -> float:
    """Reserved memory a run may use on a card of `card_gib` (nominal, see `nominal_card_gib`): leave
    max(1.5 GiB, 5 %) for the CUDA context, other processes and fragmentation. 16 -> 14.5, 24 -> 22.5, 80 -> 76."""
    card_gib = nominal_card_gib(card_gib)
    return round(card_gib - max(1.5, 0.05 * card_gib), 2)


@dataclass
class Estimate:
    profile: str
    stack: str
    model: str
    tokens: int                  # per forward pass (batch x seq)
    trainable: int
    weights_gib: float
    adapters_gib: float
    grads_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    total_gib: float             # peak allocated
    reserved_gib: float          # peak reserved (what the card must hold)
    budget_gib: float            # the card
    limit_gib: float             # the card minus headroom
    fits: bool
    peak_phase: str              # "loss head" or "layer backward"
    host_offload_gib: float      # CPU RAM for Unsloth's offloaded checkpoints
    notes: list[str] = field(default_factory=list)
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def spare_gib(self) -> float:
        return round(self.limit_gib - self.reserved_gib, 2)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["spare_gib"] = self.spare_gib
        d["verdict"] = "fits" if self.fits else "does not fit"
        return d


@dataclass
class _Terms:
    """The byte counts of one configuration, before the fitted coefficients are applied."""

    weights: float
    trainable: int
    state: float                 # optimizer state bytes
    grads: float
    accumulating: bool
    logit_elems: float           # tokens x vocab
    act_elems: float             # tokens x one layer's activation elements
    workspace: float             # 4-bit expert dequant buffer
    resident: float              # checkpoints / activations kept on the GPU for every layer
    host: float                  # checkpoints offloaded to CPU
    dtype_scale: float           # 1 for bf16 activations, 2 for fp32 (GPUs without bf16)


def _weights_bytes(shape: ModelShape, four_bit: bool, stack: str, dtype_bytes: int) -> float:
    dense = shape.layers * shape.small_layer_params + shape.embedding_params
    if not four_bit:
        return (dense + shape.layers * (shape.attention_linear_params + shape.expert_params)) * dtype_bytes
    if stack == "unsloth":  # attention and the fused experts in NF4
        quant = shape.layers * (shape.attention_linear_params + shape.expert_params)
        return quant * NF4_BYTES_PER_PARAM + dense * dtype_bytes
    # plain transformers + bnb: nn.Linear only (attention); experts are nn.Parameters and stay 16-bit. (swft-lite's
    # hf backend does not call PEFT's prepare_model_for_kbit_training, which would cast all of those to fp32.)
    quant = shape.layers * shape.attention_linear_params
    rest = (dense + shape.layers * shape.expert_params) * dtype_bytes
    return quant * NF4_BYTES_PER_PARAM + rest


def _terms(profile: Profile, shape: ModelShape, stack: str, tokens: int, dtype_bytes: int = BF16) -> _Terms:
    if stack not in STACKS:
        raise ProfileError(f"stack must be one of {', '.join(STACKS)}, got {stack!r}")
    if profile.optimizer not in OPTIMIZER_STATE_BYTES:
        raise ProfileError(f"optimizer {profile.optimizer!r}: no memory figure for it")
    P = shape.trainable_params(profile.lora_rank, profile.lora_targets)
    workspace = 0.0
    if profile.load_in_4bit:
        if stack == "unsloth":   # one projection of one layer's experts dequantized to 16 bits at a time
            workspace = max(shape.gate_up_params, shape.down_params) * dtype_bytes
        else:                    # bnb dequantizes one nn.Linear weight at a time
            workspace = max(shape.hidden * shape.q_dim, shape.hidden * shape.kv_dim) * dtype_bytes
    scale = dtype_bytes / BF16
    gc = profile.gradient_checkpointing
    ckpt = shape.layers * tokens * shape.hidden * BF16 * scale
    if gc == "unsloth" and stack == "unsloth":
        resident, host = 0.0, ckpt
    elif gc == "false":
        resident, host = shape.layers * tokens * shape.layer_activation_elems * BF16 * scale, 0.0
    else:  # plain recomputation (the hf stack always uses it when checkpointing is on): layer inputs stay on GPU
        resident, host = ckpt, 0.0
    return _Terms(
        weights=_weights_bytes(shape, profile.load_in_4bit, stack, dtype_bytes), trainable=P,
        state=P * OPTIMIZER_STATE_BYTES[profile.optimizer], grads=P * FP32,
        accumulating=profile.gradient_accumulation_steps > 1, logit_elems=float(tokens) * shape.vocab,
        act_elems=float(tokens) * shape.layer_activation_elems, workspace=workspace, resident=resident, host=host,
        dtype_scale=scale)


def _peak(t: _Terms, c: Coefficients) -> tuple[float, str, float, float]:
    """(allocated bytes, phase, transient bytes, grads bytes live) at the larger of the two moments."""
    fixed = t.weights + t.trainable * FP32 + t.state + t.resident + c.overhead_gib * GIB
    head_transient = t.logit_elems * c.logit_bytes * t.dtype_scale
    head_grads = t.grads if t.accumulating else 0.0
    layer_transient = t.workspace + t.act_elems * BF16 * c.act_mult * t.dtype_scale
    head = fixed + head_grads + head_transient
    layer = fixed + t.grads + layer_transient
    if head >= layer:
        return head, "loss head", head_transient, head_grads
    return layer, "layer backward", layer_transient, t.grads


def estimate(profile: Profile, shape: ModelShape | None = None, *, stack: str = "unsloth",
             card_gib: float | None = None, capability: tuple[int, int] | None = None,
             coefficients: Coefficients | None = None, tokens: int | None = None) -> Estimate:
    """Peak GPU memory of training `profile` on `shape` (default gpt-oss-20b), against `card_gib` (default: the
    profile's vram_budget_gib) minus headroom. `capability` below (8, 0) means no bf16: activations in fp32.
    `tokens` overrides the profile's tokens per pass (measured runs whose rows are shorter than the cap)."""
    shape = shape or DEFAULT_SHAPE
    c = coefficients or COEFFICIENTS[stack]
    dtype_bytes = FP32 if (capability is not None and tuple(capability) < (8, 0)) else BF16
    T = tokens if tokens is not None else profile.tokens_per_pass
    t = _terms(profile, shape, stack, T, dtype_bytes)
    alloc, phase, transient, grads = _peak(t, c)
    reserved = alloc + c.reserved_frac * transient
    card = float(card_gib if card_gib is not None else profile.vram_budget_gib)
    limit = headroom_limit(card)
    g = lambda b: round(b / GIB, 2)  # noqa: E731
    notes = []
    if phase == "loss head":
        notes.append(f"peak at the loss head: logits of {T} tokens x {shape.vocab} vocab at "
                     f"{c.logit_bytes * t.dtype_scale:g} bytes each ({g(transient)} GiB)")
    else:
        ws = f" + {g(t.workspace)} GiB 4-bit expert dequant buffer" if t.workspace > 0.05 * GIB else ""
        notes.append(f"peak in a layer's backward: one recomputed layer's activations for {T} tokens "
                     f"({g(transient - t.workspace)} GiB){ws}")
    if t.resident:
        how = ("plain recomputation on the hf stack" if stack == "hf" and profile.gradient_checkpointing != "false"
               else f"gradient_checkpointing={profile.gradient_checkpointing}")
        notes.append(f"{g(t.resident)} GiB of checkpointed activations stay on the GPU ({how})")
    if t.host:
        notes.append(f"{g(t.host)} GiB of CPU RAM for Unsloth's offloaded checkpoints")
    if dtype_bytes == FP32:
        notes.append("no bf16 on this GPU (compute capability < 8.0): activations and 16-bit weights counted in "
                     "fp32 - an untested extrapolation")
    if stack == "hf" and profile.load_in_4bit:
        notes.append("hf stack: bitsandbytes quantizes nn.Linear only, the MoE experts stay 16-bit")
    dense_kind = "fp32" if dtype_bytes == FP32 else "bf16"
    weights_note = f"NF4 + {dense_kind}" if profile.load_in_4bit else ("fp32" if dtype_bytes == FP32 else "bf16")
    return Estimate(
        profile=profile.name, stack=stack, model=shape.describe(), tokens=T, trainable=t.trainable,
        weights_gib=g(t.weights), adapters_gib=g(t.trainable * FP32), grads_gib=g(grads),
        optimizer_gib=g(t.state), activations_gib=g(transient + t.resident), overhead_gib=round(c.overhead_gib, 2),
        total_gib=g(alloc), reserved_gib=g(reserved), budget_gib=card, limit_gib=limit,
        fits=reserved <= limit * GIB, peak_phase=phase, host_offload_gib=g(t.host), notes=notes,
        parts={"weights_kind": weights_note, "workspace_gib": g(t.workspace), "resident_gib": g(t.resident),
               "logit_bytes": c.logit_bytes, "act_mult": c.act_mult, "reserved_frac": c.reserved_frac})


# --- calibration records -------------------------------------------------------------------------------------------


def load_records(path: str | Path | None = None) -> list[dict]:
    """The measurement records of benchmarks/results.json (a list under "records")."""
    p = Path(path) if path is not None else RESULTS_PATH
    data = json.loads(p.read_text())
    return list(data["records"] if isinstance(data, dict) else data)


def usable(record: dict) -> bool:
    """A record that calibrates: one of the estimator's stacks (not the raw-Unsloth baseline runs of
    scripts/bench.py), run to completion, with a peak allocated figure, and not marked `"calibrates": false`
    (with its reason in "why_not")."""
    return (record.get("stack") in STACKS and record.get("status", "ok") == "ok" and record.get("calibrates", True)
            and record.get("peak_allocated_gib") is not None)


def bench_runs(profile: Profile, records: list[dict]) -> list[dict]:
    """The scripts/bench.py runs of swft-lite's Unsloth path on the full gpt-oss-20b shape at `profile`'s exact
    settings (gradient accumulation aside: bench caps it, see its --max-accum) that ran to the end, oldest first."""
    return [r for r in records
            if r.get("source") == "scripts/bench.py" and r["stack"] == "unsloth" and r.get("status") == "ok"
            and r.get("data_kind", "exact") == "exact"
            and r["model"] == DEFAULT_SHAPE.to_record() and r["four_bit"] == profile.load_in_4bit
            and r["targets"] == profile.lora_targets and r["rank"] == profile.lora_rank
            and r["batch"] == profile.per_device_batch_size and r.get("max_seq_length") == profile.max_seq_length
            and r.get("gradient_checkpointing") == profile.gradient_checkpointing]


def record_profile(r: dict) -> Profile:
    """The settings of a measurement as a Profile (tokens per row = the real `seq` of the record)."""
    return Profile(name=r.get("profile") or "measured", max_seq_length=int(r["seq"]),
                   per_device_batch_size=int(r["batch"]), gradient_accumulation_steps=int(r.get("grad_accum", 1)),
                   load_in_4bit=bool(r["four_bit"]), lora_rank=int(r["rank"]), lora_targets=r["targets"],
                   gradient_checkpointing=str(r.get("gradient_checkpointing", "unsloth")),
                   optimizer=r.get("optimizer", "adamw_8bit"))


def record_estimate(r: dict, coefficients: Coefficients | None = None) -> Estimate:
    return estimate(record_profile(r), ModelShape.from_record(r["model"]), stack=r["stack"],
                    coefficients=coefficients, tokens=int(r["batch"]) * int(r["seq"]), card_gib=80.0)


def fit(records: Iterable[dict], stack: str = "unsloth") -> Coefficients:
    """The coefficients that minimise the largest relative error of peak allocated memory over a stack's usable
    records (grid search inside physical bounds; ties broken by the smaller squared error, then the grid order,
    so the result is deterministic). reserved_frac: the largest measured reserved-minus-allocated gap relative to
    the estimated transient, rounded up to 0.1."""
    rows = [r for r in records if r.get("stack") == stack and usable(r)]
    if not rows:
        raise ValueError(f"no usable measurements for stack {stack!r}")
    prepared = []
    for r in rows:
        shape = ModelShape.from_record(r["model"])
        t = _terms(record_profile(r), shape, stack, int(r["batch"]) * int(r["seq"]))
        prepared.append((t, float(r["peak_allocated_gib"]) * GIB))
    best = None
    for b in _GRID_LOGIT_BYTES:
        for a in _GRID_ACT_MULT:
            for o in _GRID_OVERHEAD:
                c = Coefficients(b, a, o, 0.0)
                errs = [_peak(t, c)[0] / m - 1 for t, m in prepared]
                key = (round(max(abs(e) for e in errs), 4), round(sum(e * e for e in errs), 6))
                if best is None or key < best[0]:
                    best = (key, c)
    (max_err, _), c = best
    frac = 0.0
    for r, (t, m) in zip(rows, prepared):
        if r.get("peak_reserved_gib") is None:
            continue
        _, _, transient, _ = _peak(t, c)
        gap = float(r["peak_reserved_gib"]) * GIB - m
        if transient > 0 and gap > 0:
            frac = max(frac, gap / transient)
    frac = math.ceil(frac * 10 - 1e-9) / 10
    return Coefficients(c.logit_bytes, c.act_mult, c.overhead_gib, frac, records=len(rows), max_error=max_err)


def fit_all(records: list[dict]) -> dict[str, Coefficients]:
    out = {}
    for stack in STACKS:
        try:
            out[stack] = fit(records, stack)
        except ValueError:
            pass
    return out


def errors(records: list[dict], coefficients: dict[str, Coefficients] | None = None) -> list[dict]:
    """Estimate vs measured for every usable record."""
    out = []
    for r in records:
        if not usable(r):
            continue
        c = (coefficients or COEFFICIENTS).get(r["stack"])
        e = record_estimate(r, c)
        m = float(r["peak_allocated_gib"])
        out.append({"stack": r["stack"], "layers": r["model"]["layers"], "four_bit": r["four_bit"],
                    "targets": r["targets"], "rank": r["rank"], "seq": r["seq"], "batch": r["batch"],
                    "measured_gib": m, "estimated_gib": e.total_gib, "error": round(e.total_gib / m - 1, 4),
                    "measured_reserved_gib": r.get("peak_reserved_gib"), "estimated_reserved_gib": e.reserved_gib,
                    "phase": e.peak_phase, "source": r.get("source")})
    return out


def coefficients_source(coefficients: dict[str, Coefficients]) -> str:
    lines = ["COEFFICIENTS: dict[str, Coefficients] = {"]
    for stack, c in coefficients.items():
        lines.append(f'    "{stack}": Coefficients(logit_bytes={c.logit_bytes!r}, act_mult={c.act_mult!r}, '
                     f"overhead_gib={c.overhead_gib!r}, reserved_frac={c.reserved_frac!r}, records={c.records},")
        lines.append(f"                            max_error={c.max_error!r}),")
    lines.append("}")
    return "\n".join(lines)


# --- planning for a card between profiles --------------------------------------------------------------------------

# Sequence lengths a plan may pick: multiples of 1024 up to 16k, then powers of two (and 1.5x) up to 128k.
SEQ_CHOICES = [1024 * i for i in range(1, 17)] + [24576, 32768, 49152, 65536, 98304, 131072]
BATCH_CHOICES = [1, 2, 4, 8, 16]


def _base_profile(card_gib: float, capability: tuple[int, int] | None) -> Profile:
    """The shipped profile a card of `card_gib` starts from: `swft-lite detect`'s rule (swft_lite.profiles)."""
    from swft_lite.profiles import all_profiles, profile_for_card

    base = profile_for_card(all_profiles(), card_gib, capability, estimator=estimate)
    if base is None:
        raise ProfileError(f"no shipped profile fits a {card_gib:g} GiB card: gpt-oss-20b needs about 13-15 GiB "
                           "of GPU memory even at 4 bits (the smallest profile is for 16 GB cards)")
    return base


def plan_for_card(total_gib: float, capability: tuple[int, int] | None = None, *, stack: str = "unsloth",
                  shape: ModelShape | None = None, max_seq: int | None = None) -> Profile:
    """A profile tailored to a card of `total_gib` (as torch or nvidia-smi reports it) between the shipped ones.

    Starts from the largest shipped profile whose budget the card has (total >= 0.9 x budget, the rule of
    `swft-lite detect`; same-budget profiles are told apart by `capability`), then raises max_seq_length
    (multiples of 1024, then powers of two, up to `max_seq` or the model's context) and after that the per-device
    batch (keeping the effective batch by lowering gradient accumulation) as far as the estimated reserved memory
    stays within the card's headroom limit (`headroom_limit(total_gib)`). When the starting profile does not fit,
    its max_seq_length is lowered instead; ProfileError when nothing fits.

    For `swft-lite detect`: `plan_for_card(gpu.total_gib, gpu.compute_capability)` with the first visible GPU's
    GpuInfo (total as torch/NVML/nvidia-smi report it; compute capability a (major, minor) tuple or None).
    """
    shape = shape or DEFAULT_SHAPE
    base = _base_profile(total_gib, capability)
    limit = headroom_limit(total_gib)
    effective = base.effective_batch_size
    cap = min(max_seq or shape.max_position, shape.max_position)

    def variant(seq: int, batch: int) -> Profile:
        return dataclasses.replace(base, max_seq_length=seq, per_device_batch_size=batch,
                                   gradient_accumulation_steps=max(1, effective // batch))

    def ok(p: Profile) -> bool:
        return estimate(p, shape, stack=stack, card_gib=total_gib, capability=capability).fits

    seq, batch = base.max_seq_length, base.per_device_batch_size
    if not ok(variant(seq, batch)):
        lower = [s for s in reversed(SEQ_CHOICES) if s < seq and s >= 512]
        for s in lower + [512]:
            if ok(variant(s, batch)):
                seq = s
                break
        else:
            e = estimate(variant(512, batch), shape, stack=stack, card_gib=total_gib, capability=capability)
            raise ProfileError(f"nothing fits a {total_gib:g} GiB card: even {base.name} at 512 tokens needs "
                               f"~{e.reserved_gib:.1f} GiB reserved of the {limit:g} GiB limit")
    else:
        for s in SEQ_CHOICES:
            if seq < s <= cap and ok(variant(s, batch)):
                seq = s
        for b in BATCH_CHOICES:
            if b > batch and b <= effective and ok(variant(seq, b)):
                batch = b
    planned = variant(seq, batch)
    e = estimate(planned, shape, stack=stack, card_gib=total_gib, capability=capability)
    cc = "" if capability is None else f", compute capability {capability[0]}.{capability[1]}"
    return dataclasses.replace(
        planned, name=f"plan-{total_gib:g}gib", vram_budget_gib=float(total_gib),
        description=(f"planned for a {total_gib:g} GiB card{cc}: {base.name} with {seq}-token rows x {batch}"),
        source=(f"swft_lite.estimate.plan_for_card from profile {base.name}: estimated {e.reserved_gib:.1f} GiB "
                f"reserved of the {limit:g} GiB limit ({stack} stack)"))


# --- text output ---------------------------------------------------------------------------------------------------


def _m(n: int) -> str:
    return f"{n / 1e6:.1f} M"


def format_estimate(e: Estimate, profile: Profile) -> str:
    targets = profile.lora_targets
    weights = "4-bit NF4 (+ bf16 embeddings, norms, router)" if profile.load_in_4bit else "bf16"
    opt_state = e.optimizer_gib
    rows = [
        ("weights", e.weights_gib, f"base model, {weights}"),
        ("adapters", e.adapters_gib, f"{_m(e.trainable)} LoRA parameters (r{profile.lora_rank}, {targets}), fp32"),
        ("optimizer+grads", round(opt_state + e.grads_gib, 2),
         f"{profile.optimizer} state {opt_state:.2f} + fp32 grads {e.grads_gib:.2f}"
         + ("" if e.grads_gib else " (none live at the loss head)")),
        ("activations", e.activations_gib, e.notes[0]),
        ("overhead", e.overhead_gib, "CUDA/cuBLAS/Triton workspaces, caches (fitted)"),
        ("total allocated", e.total_gib, "peak torch.cuda.max_memory_allocated"),
        ("reserved", e.reserved_gib, "peak held by the caching allocator (what the card must have)"),
        ("limit", e.limit_gib, f"{e.budget_gib:g} GiB card - headroom max(1.5 GiB, 5 %)"),
    ]
    lines = [f"estimate: profile {e.profile}, {e.stack} stack, model: {e.model}",
             f"settings: {profile.per_device_batch_size} x {profile.max_seq_length} tokens per pass "
             f"({e.tokens} tokens), accumulation {profile.gradient_accumulation_steps}, "
             f"gradient checkpointing {profile.gradient_checkpointing}",
             ""]
    w = max(len(r[0]) for r in rows)
    lines.append(f"  {'part'.ljust(w)}  {'GiB':>7}  what")
    for name, gib, what in rows:
        lines.append(f"  {name.ljust(w)}  {gib:7.2f}  {what}")
    lines.append("")
    for n in e.notes[1:]:
        lines.append(f"note: {n}")
    verdict = "fits" if e.fits else "does not fit"
    lines.append(f"verdict: {verdict} ({abs(e.spare_gib):.2f} GiB {'under' if e.fits else 'over'} the "
                 f"{e.limit_gib:g} GiB limit for a {e.budget_gib:g} GiB card)")
    return "\n".join(lines)


def _main(argv: list[str]) -> int:
    if argv[:1] == ["--refit"]:
        path = argv[1] if len(argv) > 1 else None
        records = load_records(path)
        coeffs = fit_all(records)
        print(coefficients_source(coeffs))
        for row in errors(records, coeffs):
            print(f"  {row['stack']:8} L{row['layers']:<3} {'4bit' if row['four_bit'] else 'bf16'} "
                  f"{row['targets']:18} r{row['rank']:<3} {row['batch']}x{row['seq']:<6} "
                  f"measured {row['measured_gib']:6.2f}  estimated {row['estimated_gib']:6.2f}  "
                  f"{100 * row['error']:+5.1f} %")
        return 0
    print("usage: python -m swft_lite.estimate --refit [benchmarks/results.json]", file=sys.stderr)
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(_main(sys.argv[1:]))


# --- time --------------------------------------------------------------------------------------------------------
# A forward+backward pass under Unsloth costs a fixed part whatever it holds plus a part per token it computes
# (padding included). Fitted per training setting on the full gpt-oss-20b shape (scripts/bench.py runs of exact-length
# and variable-length rows; benchmarks/RESULTS.md), on the lent H200: an H100 has the same bf16 rate and less memory
# bandwidth, so expect it somewhat slower. Key: (4-bit, gradient_checkpointing, lora_targets, lora_rank).
@dataclass(frozen=True)
class PassTime:
    fixed_seconds: float
    seconds_per_token: float
    source: str

    def seconds(self, passes: int, tokens: int) -> float:
        return passes * self.fixed_seconds + tokens * self.seconds_per_token


PASS_TIMES: dict[tuple, PassTime] = {
    (True, "false", "attention+experts", 16): PassTime(
        0.27, 2.7e-5, "h100 settings, H200, full shape: 1 x 8192 rows and variable-length chats (2026-12-01)"),
}


def pass_time(profile: Profile) -> PassTime | None:
    """The measured step-time model for `profile`'s settings, None where none was measured."""
    return PASS_TIMES.get((profile.load_in_4bit, profile.gradient_checkpointing, profile.lora_targets,
                           profile.lora_rank))
