"""Which base model an adapter was trained on, by content: written beside the adapter at train time
(adapter/swft_base.json) and compared by `swft-lite merge` before it folds the adapter into `--base`.

A LoRA merged into another model than the one it was trained on is a wrong model that can still pass the merge's
own check (base + adapter vs merged compares two readings of the same wrong base). Names do not tell: the same
weights go by a hub id, a cache snapshot path or a local copy, and openai/gpt-oss-20b (MXFP4 experts) and
unsloth/gpt-oss-20b-BF16 are the same model. So the fingerprint is the architecture (config.json's shape keys) plus
a hash of the first rows of tensors that are 16-bit in every released format (embeddings, final norm, layer 0's
attention, lm_head), cast to bf16 - equal for an fp32, bf16 or MXFP4 copy of one model, different for another model.
Reads a few KB of each tensor through safetensors slices; no model is loaded.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

BASE_FILE = "swft_base.json"
CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
               "num_attention_heads", "num_key_value_heads", "head_dim", "num_local_experts", "num_experts_per_tok")
SAMPLED_TENSORS = ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.0.self_attn.o_proj.weight", "lm_head.weight")
SAMPLE_ROWS = 8


def _weight_map(base_dir: Path) -> dict[str, str]:
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        return dict(json.loads(index.read_text())["weight_map"])
    single = base_dir / "model.safetensors"
    if not single.exists():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), "pt") as f:
        return {k: single.name for k in f.keys()}


def fingerprint(base_dir: str | Path) -> dict:
    """{"config": {shape keys}, "tensors": {name: sha256 of its first rows in bf16}} for a model folder."""
    import torch
    from safetensors import safe_open

    base_dir = Path(base_dir)
    cfg = json.loads((base_dir / "config.json").read_text())
    wmap = _weight_map(base_dir)
    tensors = {}
    for name in SAMPLED_TENSORS:
        if name not in wmap:
            continue
        with safe_open(str(base_dir / wmap[name]), "pt") as f:
            sl = f.get_slice(name)
            rows = sl[:SAMPLE_ROWS] if len(sl.get_shape()) > 0 else sl[:]
        data = rows.to(torch.bfloat16).contiguous().view(torch.int16).numpy().tobytes()
        tensors[name] = hashlib.sha256(data).hexdigest()[:16]
    return {"config": {k: cfg.get(k) for k in CONFIG_KEYS}, "tensors": tensors}


def write_record(adapter_dir: str | Path, model: str, base_dir: str | Path | None) -> dict:
    """adapter/swft_base.json: the base's name and fingerprint (fingerprint None, with why, when unreadable)."""
    record: dict = {"base_model": model, "base_dir": None if base_dir is None else str(base_dir)}
    try:
        record["fingerprint"] = fingerprint(base_dir) if base_dir is not None else None
    except Exception as exc:  # noqa: BLE001 - the adapter is not lost over it; merge says it cannot check
        record["fingerprint"], record["error"] = None, f"{type(exc).__name__}: {exc}"
    path = Path(adapter_dir) / BASE_FILE
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def differences(a: dict, b: dict) -> list[str]:
    """What differs between two fingerprints, named ("config.hidden_size 64 vs 2880", "tensor lm_head.weight")."""
    out = [f"config.{k} {a['config'].get(k)!r} vs {b['config'].get(k)!r}" for k in CONFIG_KEYS
           if a["config"].get(k) != b["config"].get(k)]
    shared = set(a["tensors"]) & set(b["tensors"])
    out += [f"tensor {n}" for n in sorted(shared) if a["tensors"][n] != b["tensors"][n]]
    if not shared:
        out.append("no sampled tensor in common")
    return out
