"""Load gpt-oss and attach LoRA adapters: the one seam between swft-lite and Unsloth.

Two backends take the same resolved `Profile` and return a PEFT model ready for TRL's SFTTrainer:

- `unsloth`: `FastLanguageModel.from_pretrained` + `FastLanguageModel.get_peft_model`. Unsloth patches transformers,
  TRL and PEFT when it is imported, so it must be imported before them, and only in the process that trains. This
  module is the only place in swft-lite that imports it.
- `hf`: plain transformers + PEFT (+ bitsandbytes for 4 bits), the standard recipe. It is how CI trains tiny models
  on CPU and the side-by-side baseline for speed.

Both put LoRA on the same weights: attention q/k/v/o as modules, and - for `attention+experts` - every expert of
every MoE layer through PEFT `target_parameters` on the fused `mlp.experts.gate_up_proj` / `mlp.experts.down_proj`.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from swft_lite.distributed import local_rank, world_size
from swft_lite.errors import BackendError
from swft_lite.profiles import Profile

ATTENTION_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def unsloth_importable() -> bool:
    import importlib.util

    return importlib.util.find_spec("unsloth") is not None


def choose_backend(requested: str) -> str:
    """'auto' means unsloth on a CUDA GPU with unsloth installed, else hf."""
    has_unsloth = unsloth_importable()
    if requested == "auto":
        if cuda_available() and has_unsloth:
            return "unsloth"
        why = ("no CUDA GPU is visible" if not cuda_available() else
               "Unsloth is not installed (pip install 'swft-lite[unsloth]')")
        print(f"backend: auto -> hf (transformers + PEFT): {why}; the unsloth backend needs both a CUDA GPU and "
              "Unsloth", file=sys.stderr)
        return "hf"
    if requested == "unsloth":
        if not cuda_available():
            raise BackendError("the unsloth backend needs a CUDA GPU and none is visible here; "
                               "use --backend hf to train on CPU (slow: for tiny test models only)")
        if not has_unsloth:
            raise BackendError("the unsloth backend needs Unsloth: pip install 'swft-lite[unsloth]'")
    return requested


def training_dtype():
    """bf16 on GPUs that have it; fp32 on CPU and on GPUs without bf16 (fp16 LoRA on gpt-oss overflows)."""
    import torch

    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return torch.float32


@dataclass
class AdapterReport:
    """What got adapters, so a run can prove its targets were trained (not silently skipped)."""

    modules: list[str] = field(default_factory=list)      # e.g. model.layers.0.self_attn.q_proj
    parameters: list[str] = field(default_factory=list)   # e.g. model.layers.0.mlp.experts.gate_up_proj
    trainable: int = 0
    total: int = 0

    def to_dict(self) -> dict:
        return {"modules": len(self.modules), "parameters": len(self.parameters),
                "trainable": self.trainable, "total": self.total,
                "module_names": self.modules, "parameter_names": self.parameters}


def lora_kwargs(profile: Profile) -> dict:
    targets = {"target_modules": list(ATTENTION_MODULES)}
    targets["target_parameters"] = list(EXPERT_PARAMETERS) if profile.lora_targets == "attention+experts" else []
    return {"r": profile.lora_rank, "lora_alpha": profile.lora_alpha, "lora_dropout": profile.lora_dropout,
            "bias": "none", **targets}


def inspect_adapters(model, profile: Profile) -> AdapterReport:
    """List the adapted modules and parameters and fail when a requested target matched nothing."""
    report = AdapterReport()
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A"):
            continue
        # PEFT's ParamWrapper (target_parameters) carries `parameter_name`; plain LoRA layers do not.
        param_name = getattr(module, "parameter_name", None)
        clean = name.replace("base_model.model.", "", 1)
        if param_name:
            # ParamWrappers nest when two parameters of one module are targeted; name the parameter, not the wrapper.
            base = clean.split(".base_layer")[0]
            report.parameters.append(f"{base}.{param_name}")
        else:
            report.modules.append(clean)
    report.parameters = sorted(set(report.parameters))
    for p in model.parameters():
        report.total += p.numel()
        if p.requires_grad:
            report.trainable += p.numel()

    n_layers = model.config.get_text_config().num_hidden_layers
    missing = []
    for target in ATTENTION_MODULES:
        if sum(m.endswith("." + target) for m in report.modules) != n_layers:
            missing.append(f"attention '{target}' ({sum(m.endswith('.' + target) for m in report.modules)} "
                           f"of {n_layers} layers)")
    if profile.lora_targets == "attention+experts":
        for target in EXPERT_PARAMETERS:
            found = sum(p.endswith(target) for p in report.parameters)
            if found != n_layers:
                missing.append(f"experts '{target}' ({found} of {n_layers} layers)")
    if missing:
        raise BackendError("LoRA did not reach every requested target: " + "; ".join(missing) +
                           ". Training would silently skip them - refusing to start.")
    if report.trainable == 0:
        raise BackendError("no trainable parameters after attaching LoRA")
    return report


def load_hf(model_path: str, profile: Profile, *, gradient_checkpointing: bool, token: str | None = None):
    """transformers + PEFT (+ bitsandbytes when 4-bit is asked for)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = training_dtype()
    kwargs: dict = {"dtype": dtype, "token": token}
    if profile.load_in_4bit:
        if not torch.cuda.is_available():
            raise BackendError("load_in_4bit needs a CUDA GPU (bitsandbytes); on CPU pass --no-load-in-4bit")
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
            bnb_4bit_use_double_quant=True)
        kwargs["device_map"] = {"": local_rank()}  # each DDP process its own GPU
    elif torch.cuda.is_available():
        kwargs["device_map"] = {"": local_rank()}  # each DDP process its own GPU
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(model_path, token=token)
    # Not peft.prepare_model_for_kbit_training: it casts every weight bitsandbytes left unquantized to fp32, and on
    # gpt-oss that is the fused experts, embeddings and lm_head - ~76 GiB, more than any single card.
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora_kwargs(profile)))
    return model, tokenizer


def import_unsloth():
    """Import Unsloth before anything imports transformers, TRL or PEFT: it patches them at import time, and warns
    (and skips optimisations) when it comes second. Called first thing by a training run that uses it."""
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401

    return unsloth


def load_unsloth_for_inference(model_dir: str, adapter_dir: str | None, *, device: str, max_seq_length: int):
    """Unsloth's FastLanguageModel in inference mode (`for_inference`: its fast generation path) for `chat` and
    `eval`: the weights as saved (bf16, no 4-bit), plus a LoRA adapter through PEFT when given."""
    os.environ.setdefault("UNSLOTH_RETURN_LOGITS", "1")  # eval's loss reads the logits Unsloth otherwise skips
    import_unsloth()
    from unsloth import FastLanguageModel

    model, _ = FastLanguageModel.from_pretrained(model_name=model_dir, max_seq_length=max_seq_length,
                                                 load_in_4bit=False, dtype=training_dtype(), full_finetuning=False,
                                                 use_exact_model_name=True, device_map={"": device})
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    FastLanguageModel.for_inference(model)
    return model


def unsloth_gradient_checkpointing(profile: Profile):
    """The profile's gradient_checkpointing as get_peft_model's use_gradient_checkpointing takes it."""
    return {"unsloth": "unsloth", "true": True, "false": False}[profile.gradient_checkpointing]


def load_unsloth(model_path: str, profile: Profile, *, token: str | None = None):
    """Unsloth's FastLanguageModel: 4-bit or bf16 weights, LoRA with Unsloth's gradient checkpointing."""
    import_unsloth()
    from unsloth import FastLanguageModel

    dtype = training_dtype()
    # Packed sequences are max_seq_length long too (batching.packed_sequences); Unsloth sizes its kernels by it.
    longest = profile.max_seq_length
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path,
        max_seq_length=longest,
        load_in_4bit=profile.load_in_4bit,
        dtype=dtype,
        full_finetuning=False,
        token=token,
        # Load what was named: Unsloth otherwise maps gpt-oss names to its pre-quantized repos (see
        # train.BF16_EQUIVALENT for why that layout does not merge back).
        use_exact_model_name=True,
        # Under torchrun each process loads onto its own GPU (LOCAL_RANK); one process keeps Unsloth's default.
        **({"device_map": {"": local_rank()}} if world_size() > 1 else {}),
    )
    model = FastLanguageModel.get_peft_model(
        model,
        use_gradient_checkpointing=unsloth_gradient_checkpointing(profile),
        random_state=3407,
        max_seq_length=longest,
        **lora_kwargs(profile),
    )
    model.config.use_cache = False  # training: no KV cache (as load_hf)
    return model, tokenizer


def load_for_training(backend: str, model_path: str, profile: Profile):
    """(model, tokenizer, adapter report) for a resolved backend name."""
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if backend == "unsloth":
        model, tokenizer = load_unsloth(model_path, profile, token=token)
    else:
        model, tokenizer = load_hf(model_path, profile, token=token,
                                   gradient_checkpointing=profile.gradient_checkpointing != "false")
        if profile.packing:
            enable_packed_attention(model)
    if backend == "unsloth" and profile.packing:
        enable_packed_attention_unsloth(model)
    return model, tokenizer, inspect_adapters(model, profile)


def _gpt_oss_decoder(model):
    """The GptOssModel inside a causal-LM model, a PEFT wrapper or not."""
    for module in model.modules():
        if type(module).__name__ == "GptOssModel":
            return module
    raise BackendError(f"packing needs a gpt-oss model; {type(model).__name__} holds no GptOssModel")


def enable_packed_attention(model) -> None:
    """Make attention keep packed rows apart on the hf backend.

    transformers 5.17 builds a per-row ("packed sequence") mask from position ids that restart, but gpt-oss's
    GptOssModel.forward does not hand its position ids to the mask builders, so packed rows would attend to each
    other. This hook builds gpt-oss's own two masks (full causal, and the 128-token sliding window) with the position
    ids given, through the same masking_utils functions; the sinks are a per-head logit outside the mask and stay
    per row. Only when position ids are given without an attention mask or a cache (a packed training batch)."""
    from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

    decoder = _gpt_oss_decoder(model)
    if getattr(decoder, "_swft_packed_attention", False):
        return

    def hook(module, args, kwargs):
        positions = kwargs.get("position_ids")
        if positions is None or kwargs.get("attention_mask") is not None or kwargs.get("past_key_values") is not None:
            return None
        source = kwargs.get("inputs_embeds")
        if source is None:
            source = kwargs.get("input_ids", args[0] if args else None)
        # The mask builders read only the shape, dtype and device of the embeddings.
        like = module.embed_tokens.weight.new_empty((source.shape[0], source.shape[1], 1))
        mask_kwargs = {"config": module.config, "inputs_embeds": like, "attention_mask": None,
                       "past_key_values": None, "position_ids": positions}
        kwargs["attention_mask"] = {"full_attention": create_causal_mask(**mask_kwargs),
                                    "sliding_attention": create_sliding_window_causal_mask(**mask_kwargs)}
        return args, kwargs

    decoder.register_forward_pre_hook(hook, with_kwargs=True)
    decoder._swft_packed_attention = True


class _PackedRows:
    """The row index of every position of the packed batch in the model now and its block masks, shared by every
    layer. Set by a hook before each forward and kept until the next one: gradient checkpointing replays the layers
    during backward.

    The row indices ((sequences, tokens): rows are numbered within each sequence) live in one device buffer, overwritten in place while the sequence length stays the same (packed
    passes are filled to the token budget), and the mask functions that read it are made once per buffer: the
    compiled block-mask builder and flex attention then see the same function every pass and do not recompile."""

    def __init__(self):
        self.active = False
        self.doc = None
        self.masks: dict = {}
        self._mask_mods: dict = {}

    def set(self, doc) -> None:
        if self.doc is not None and self.doc.shape == doc.shape and self.doc.device == doc.device:
            self.doc.copy_(doc)
        else:
            self.doc, self._mask_mods = doc, {}
        self.masks, self.active = {}, True

    def clear(self) -> None:
        self.masks, self.active = {}, False

    def mask_mod(self, window: int | None):
        if window not in self._mask_mods:
            doc = self.doc

            def same_row_causal(b, h, q, kv):
                keep = (q >= kv) & (doc[b, q] == doc[b, kv])
                if window:
                    keep = keep & (q - kv < window)  # as transformers and Unsloth: the query and 127 keys before it
                return keep

            self._mask_mods[window] = same_row_causal
        return self._mask_mods[window]

    def block_mask(self, window: int | None, n: int, device):
        from torch.nn.attention.flex_attention import create_block_mask

        if window not in self.masks:
            batch = self.doc.shape[0] if self.doc.shape[0] > 1 else None  # one sequence: broadcast, as measured
            self.masks[window] = create_block_mask(self.mask_mod(window), batch, None, n, n, device=device,
                                                   _compile=device.type == "cuda")
        return self.masks[window]


def enable_packed_attention_unsloth(model) -> int:
    """Make Unsloth's gpt-oss training attention keep packed rows apart.

    Under Unsloth 2026.10.9 a gpt-oss layer in training calls unsloth_zoo's flex_attention_with_sink(self, q, k, v):
    the model's mask is dropped and a causal (or 128-token sliding-window) BlockMask is built from the shapes alone,
    so packed rows see each other - why Unsloth switches packing off for gpt-oss. Here each attention module's
    forward is wrapped (enable_packed_flex_attention, per instance; no Unsloth file changes) with Unsloth's own
    compiled flex attention and kernel options. scripts/packing_check.py measures it on the GPU."""
    try:
        from unsloth_zoo.flex_attention.utils import (FLEX_LSE_KWARGS, PREFILL_KERNEL_OPTIONS, flex_attention,
                                                      flex_output_and_lse)
    except ImportError as exc:  # pragma: no cover - GPU stack only
        raise BackendError(f"packing under Unsloth needs unsloth_zoo's flex attention ({exc}); "
                           "set packing = false") from exc
    return enable_packed_flex_attention(model, FlexKernel(flex_attention, FLEX_LSE_KWARGS, flex_output_and_lse,
                                                          PREFILL_KERNEL_OPTIONS))


@dataclass(frozen=True)
class FlexKernel:
    """A flex attention callable and how to ask it for the log-sum-exp: Unsloth's compiled one on the GPU, torch's
    own (`torch_flex_kernel`) anywhere else."""

    attention: object
    lse_kwargs: dict
    output_and_lse: object  # the call's result -> (output, lse)
    kernel_options: dict | None = None


def torch_flex_kernel() -> FlexKernel:
    """torch's flex attention, uncompiled (runs on the CPU: the tests' proof of the packed attention's mask)."""
    from torch.nn.attention import flex_attention as fa

    if hasattr(fa, "AuxRequest"):
        return FlexKernel(fa.flex_attention, {"return_aux": fa.AuxRequest(lse=True)}, lambda r: (r[0], r[1].lse))
    return FlexKernel(fa.flex_attention, {"return_lse": True}, lambda r: r)  # pragma: no cover - older torch


def enable_packed_flex_attention(model, kernel: FlexKernel) -> int:
    """Wrap each gpt-oss attention module's forward: in training, for a packed batch (position ids that restart,
    noted by a hook on the decoder), flex attention with a mask that also requires the same row (causality and the
    sliding window as gpt-oss has them), and the sinks added as Unsloth adds them (out * sigmoid(lse - sink), per
    query, so per row). Anything else goes to the module's own forward."""
    import types

    import torch
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

    decoder = _gpt_oss_decoder(model)
    if getattr(decoder, "_swft_packed_attention", False):
        return 0
    rows = _PackedRows()

    def note_rows(module, args, kwargs):
        positions = kwargs.get("position_ids")
        rows.clear()
        if positions is not None and kwargs.get("past_key_values") is None and module.training:
            starts = positions == 0  # (sequences, tokens): a row starts wherever its positions restart
            if bool((starts.sum(dim=1) > 1).any()):
                rows.set(torch.cumsum(starts.to(torch.int32), 1))

    decoder.register_forward_pre_hook(note_rows, with_kwargs=True)
    decoder._swft_packed_attention = True
    extra = {"kernel_options": kernel.kernel_options} if kernel.kernel_options is not None else {}

    def packed_forward(self, hidden_states, position_embeddings, attention_mask=None, past_key_values=None,
                       **kwargs):
        # rows.active only for a training forward that came in without a cache: a cache the decoder made itself
        # (use_cache left on) is empty and unused, and must not send a packed batch to the leaking path.
        if not (self.training and rows.active):
            return self._swft_unpacked_forward(hidden_states, position_embeddings, attention_mask,
                                               past_key_values, **kwargs)
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
        v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
        q, k = apply_rotary_pos_emb(q, k, *position_embeddings)
        if k.dtype != q.dtype:
            k, v = k.to(q.dtype), v.to(q.dtype)
        out, lse = kernel.output_and_lse(kernel.attention(
            q, k, v, block_mask=rows.block_mask(self.sliding_window, q.shape[2], q.device),
            enable_gqa=self.num_key_value_groups != 1, scale=self.scaling, **extra, **kernel.lse_kwargs))
        out = out * torch.sigmoid(lse - self.sinks.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
        out = out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.o_proj(out), None

    patched = 0
    for module in model.modules():
        if type(module).__name__ == "GptOssAttention":
            module._swft_unpacked_forward = module.forward
            module.forward = types.MethodType(packed_forward, module)
            patched += 1
    if not patched:
        raise BackendError("packing: no GptOssAttention module found to patch; set packing = false")
    return patched
