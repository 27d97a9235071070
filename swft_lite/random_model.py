"""Random-init gpt-oss checkpoints of the real architecture, for tests and GPU benchmarks.

No weights can be downloaded where swft-lite is developed and tested, so every test and benchmark builds its model
here from openai/gpt-oss-20b's config.json: at the real size for the GPU benchmark, or shrunk (fewer layers, smaller
width, fewer experts) for CPU tests. The vocabulary always stays the real 201,088 tokens so the real tokenizer works.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def gpt_oss_config(config_json: str | Path, *, num_layers: int | None = None, hidden_size: int | None = None,
                   num_experts: int | None = None, experts_per_token: int | None = None,
                   num_heads: int | None = None, num_kv_heads: int | None = None, head_dim: int | None = None,
                   initializer_range: float | None = None):
    """A GptOssConfig from the real config.json, with any of the size knobs reduced."""
    from transformers import GptOssConfig

    raw = json.loads(Path(config_json).read_text())
    if num_layers is not None:
        raw["num_hidden_layers"] = num_layers
        raw["layer_types"] = raw["layer_types"][:num_layers] if len(raw["layer_types"]) >= num_layers else [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if hidden_size is not None:
        raw["hidden_size"] = hidden_size
        raw["intermediate_size"] = hidden_size  # gpt-oss's expert width equals its hidden size; keep that trap
    if num_experts is not None:
        raw["num_local_experts"] = num_experts
    if experts_per_token is not None:
        raw["num_experts_per_tok"] = raw["experts_per_token"] = experts_per_token
    if num_heads is not None:
        raw["num_attention_heads"] = num_heads
    if num_kv_heads is not None:
        raw["num_key_value_heads"] = num_kv_heads
    if head_dim is not None:
        raw["head_dim"] = head_dim
    if initializer_range is not None:
        # A narrow model with the real 0.02 init has logits so flat that no adapter can move the loss far.
        raw["initializer_range"] = initializer_range
    raw.pop("transformers_version", None)
    return GptOssConfig(**raw)


def build_random_gpt_oss(config, seed: int = 0, dtype=None):
    """A GptOssForCausalLM with random weights. Attention sinks get random values: llama.cpp's and Unsloth's
    export checks reject sinks that are all zero, and a real model never has them so."""
    import torch
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    # Built directly in the target dtype: the full model in fp32 first would need ~84 GB.
    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        model = GptOssForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 0.5)
            # Experts are initialised with the config's small std; give them the same scale as the other
            # projections so adapters on them move the logits measurably.
            for p in layer.mlp.experts.parameters():
                p.normal_(0.0, config.initializer_range)
    return model.eval()


def save_random_gpt_oss(out_dir: str | Path, model_files: str | Path | None = None, *, seed: int = 0, dtype=None,
                        max_shard_size: str | None = None, **size) -> Path:
    """Write a random gpt-oss (config, safetensors, tokenizer, chat template) to out_dir, like a hub download.
    model_files: a folder with gpt-oss-20b's config.json and tokenizer files; None builds (or reuses) the one
    swft_lite.tokenizer.gpt_oss_files makes from the o200k vocabulary."""
    if model_files is None:
        from .tokenizer import gpt_oss_files

        model_files = gpt_oss_files()
    shared_model_dir = Path(model_files)
    out_dir = Path(out_dir)
    config = gpt_oss_config(shared_model_dir / "config.json", **size)
    model = build_random_gpt_oss(config, seed=seed, dtype=dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kwargs)
    for name in TOKENIZER_FILES:
        src = shared_model_dir / name
        if src.exists():
            shutil.copy(src, out_dir / name)
    return out_dir
