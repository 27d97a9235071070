"""The probes: what "the same model" is measured on, and the tools that measure it.

Fixed harmony-rendered probe tokens; the tokenizer and causal-LM loaders (cached, MXFP4-aware); a model's logits
on the probes and `compare_logits` (KL, top-1 agreement with near-ties forgiven, logit distances, cosine); the
record of the model as it was trained (`capture_trained_probe` in the training process, `load_trained_probe` and
`compare_with_trained` afterwards). Used by train (the record), merge (the merged model against base + adapter and
the trained model) and gguf_export (llama.cpp against the merged model). Nothing heavy is imported at module level.
"""

from __future__ import annotations

import functools
import gc
import json
import math
import os
from pathlib import Path

from swft_lite.errors import MergeError

# The worst KL_TRIM of the probe positions are left out of the gating mean.
KL_TRIM = 0.02


# --- probe tokens --------------------------------------------------------------------------------------------------
# Fixed harmony-rendered conversations (fixed date, so the tokens never change). They exercise the system, developer,
# user and assistant roles, the analysis/final channels and a tool call. ~100-130 tokens each with gpt-oss's tokenizer.
_SYS = ("<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.\n"
        "Knowledge cutoff: 2024-06\nCurrent date: 2025-08-05\n\nReasoning: {level}\n\n"
        "# Valid channels: analysis, commentary, final. Channel must be included for every message.<|end|>")
PROBE_TEXTS = (
    _SYS.format(level="medium")
    + "<|start|>user<|message|>Explain in two sentences why the sky is blue, and name one thing you see at sunset "
      "because of the same effect.<|end|><|start|>assistant<|channel|>analysis<|message|>Short physics answer: "
      "Rayleigh scattering.<|end|><|start|>assistant<|channel|>final<|message|>Air molecules scatter short blue "
      "wavelengths far more than red ones, so blue light reaches us from every direction.<|end|>",
    _SYS.format(level="low")
    + "<|start|>developer<|message|># Instructions\n\nAnswer in French, briefly.<|end|><|start|>user<|message|>"
      "Combien font 17 fois 23 ? Donne aussi le calcul.<|end|><|start|>assistant<|channel|>final<|message|>"
      "17 × 23 = 17 × 20 + 17 × 3 = 340 + 51 = 391.<|end|><|start|>user<|message|>Et 391 divisé par 17 ?<|end|>"
      "<|start|>assistant",
    _SYS.format(level="high")
    + "<|start|>user<|message|>What's the weather in Tokyo right now?<|end|><|start|>assistant<|channel|>analysis"
      "<|message|>Need to call the weather tool.<|end|><|start|>assistant<|channel|>commentary to=functions."
      "get_weather <|constrain|>json<|message|>{\"city\": \"Tokyo\", \"unit\": \"celsius\"}<|call|>"
      "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>{\"temp\": 21, \"sky\": "
      "\"clear\"}<|end|><|start|>assistant<|channel|>final<|message|>It is 21 °C and clear in Tokyo.<|end|>",
)


def probe_token_ids(tokenizer) -> list[list[int]]:
    """The probe prompts as token ids. `tokenizer` is a tokenizer or a folder that holds one."""
    if isinstance(tokenizer, (str, Path)):
        tok_json = Path(tokenizer) / "tokenizer.json"
        stamp = tok_json.stat().st_mtime_ns if tok_json.exists() else 0
        return [list(p) for p in _probe_ids_cached(str(Path(tokenizer).resolve()), stamp)]
    return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in PROBE_TEXTS]


@functools.lru_cache(maxsize=8)
def _probe_ids_cached(tokenizer_dir: str, _stamp: int) -> tuple:
    tok = load_tokenizer(tokenizer_dir)
    return tuple(tuple(tok(t, add_special_tokens=False)["input_ids"]) for t in PROBE_TEXTS)


def load_tokenizer(model_dir: str | Path):
    """AutoTokenizer for a folder, cached per folder and tokenizer.json version (gpt-oss's takes ~2 s to load)."""
    tok_json = Path(model_dir) / "tokenizer.json"
    stamp = tok_json.stat().st_mtime_ns if tok_json.exists() else 0
    return _load_tokenizer_cached(str(Path(model_dir).resolve()), stamp)


@functools.lru_cache(maxsize=8)
def _load_tokenizer_cached(model_dir: str, _stamp: int):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


# --- models and their logits ---------------------------------------------------------------------------------------


def default_dtype(device: str, dtype):
    import torch

    if dtype is None:
        return torch.float32 if str(device).startswith("cpu") else torch.bfloat16
    if isinstance(dtype, str):
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                "float16": torch.float16, "fp16": torch.float16}[dtype]
    return dtype


def load_causal_lm(model_dir: Path, device: str, dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    if (cfg.get("quantization_config") or {}).get("quant_method") == "mxfp4":
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, device_map=device, **kwargs)
    return model.eval()


def model_logits(model, probes, device) -> list:
    import torch

    out = []
    with torch.no_grad():
        for ids in probes:
            x = torch.tensor([ids], device=device)
            out.append(model(input_ids=x).logits[0].float().cpu())
    return out


def compare_logits(ref: list, other: list, top1_tolerance: float = 0.0) -> dict:
    """Per-position comparison of two models' logits on the same tokens (ref = the model that counts).
    kl_*: KL(softmax(ref) || softmax(other)) in nats; top1_agreement: share of positions with the same argmax;
    top1_agreement_tol: the same, but a different top-1 also counts when ref rates it within `top1_tolerance`
    logits of its own top-1 (a near-tie); max_abs_logit_diff / mean_abs_logit_diff; cos_*: cosine similarity of
    the logit vectors. fp32, row by row."""
    import torch

    kls, coss, agree, agree_tol, maxd, sumd, n = [], [], 0, 0, 0.0, 0.0, 0
    with torch.no_grad():
        for a, b in zip(ref, other):
            a, b = a.float(), b.float()
            la, lb = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
            kls.append((la.exp() * (la - lb)).sum(-1).clamp_min(0))
            del la, lb
            ia, ib = a.argmax(-1), b.argmax(-1)
            agree += int((ia == ib).sum())
            regret = a.gather(-1, ia[:, None]) - a.gather(-1, ib[:, None])
            agree_tol += int((regret <= top1_tolerance).sum())
            d = (a - b).abs_()
            maxd = max(maxd, float(d.max()))
            sumd += float(d.mean(-1).sum())
            del d
            coss.append((a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30))
            n += a.shape[0]
    kl, cos = torch.cat(kls), torch.cat(coss)
    n_trim = math.ceil(KL_TRIM * n)
    kl_sorted = kl.sort().values
    return {"positions": n, "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "kl_mean_trimmed": float(kl_sorted[: n - n_trim].mean()) if n > n_trim else 0.0,
            "kl_p50": float(kl_sorted[n // 2]), "positions_kl_over_0.01": int((kl > 0.01).sum()),
            "top1_agreement": agree / n,
            "top1_agreement_tol": agree_tol / n, "max_abs_logit_diff": maxd, "mean_abs_logit_diff": sumd / n,
            "cos_mean": float(cos.mean()), "cos_min": float(cos.min())}


def empty_cache(device):
    import torch

    gc.collect()
    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- the model as it was trained -------------------------------------------------------------------------------
# base + adapter as PEFT reads the saved files is one reading of the adapter; the model the training process held
# (Unsloth's patched layers included) is the one that counts. `swft-lite train` records that model's top-K
# log-probabilities on the probe tokens before it exits, and the merge is compared with them too: an adapter whose
# files say something else than what was trained (a layout PEFT reads differently, say) fails here even though it
# agrees with PEFT's own reading of it.
TRAINED_PROBE_TOPK = 32


def capture_trained_probe(model, tokenizer, path: str | Path) -> dict:
    """In the training process: the top-K log-probs of `model` (adapters live) at every probe position."""
    import torch
    from safetensors.torch import save_file

    probes = probe_token_ids(tokenizer)
    device = next(p.device for p in model.parameters())
    old_env = os.environ.get("UNSLOTH_RETURN_LOGITS")
    os.environ["UNSLOTH_RETURN_LOGITS"] = "1"  # Unsloth returns no logits during training unless asked
    was_training = model.training
    model.eval()
    tensors = {}
    try:
        with torch.no_grad():
            for i, ids in enumerate(probes):
                logits = model(input_ids=torch.tensor([ids], device=device)).logits[0].float()
                if logits.shape != (len(ids), model.config.get_text_config().vocab_size):
                    raise MergeError(f"the trained model returned logits of shape {tuple(logits.shape)}")
                top = torch.log_softmax(logits, -1).topk(TRAINED_PROBE_TOPK, dim=-1)
                tensors[f"ids_{i}"] = torch.tensor(ids, dtype=torch.int64)
                tensors[f"topk_ids_{i}"] = top.indices.cpu()
                tensors[f"topk_logprobs_{i}"] = top.values.cpu()
    finally:
        if old_env is None:
            os.environ.pop("UNSLOTH_RETURN_LOGITS", None)
        else:
            os.environ["UNSLOTH_RETURN_LOGITS"] = old_env
        model.train(was_training)
    save_file(tensors, str(path))
    return {"path": str(path), "probes": len(probes), "positions": sum(len(p) for p in probes),
            "topk": TRAINED_PROBE_TOPK}


def load_trained_probe(path: str | Path) -> tuple[list[list[int]], list, list]:
    from safetensors.torch import load_file

    t = load_file(str(path))
    n = len([k for k in t if k.startswith("ids_")])
    return ([t[f"ids_{i}"].tolist() for i in range(n)], [t[f"topk_ids_{i}"] for i in range(n)],
            [t[f"topk_logprobs_{i}"] for i in range(n)])


def compare_with_trained(topk_ids: list, topk_logprobs: list, logits: list, top1_tolerance: float) -> dict:
    """The merged model against the trained model's top-K: KL over the trained model's top-K tokens (both
    renormalised there), and top-1 agreement (a different top-1 counts when the merged model rates the trained
    top-1 within `top1_tolerance` of its own)."""
    import torch

    kls, agree, agree_tol, n = [], 0, 0, 0
    for ids, lp, lg in zip(topk_ids, topk_logprobs, logits):
        lg = lg.float()
        ls = torch.log_softmax(lg, -1).gather(-1, ids)
        p = torch.softmax(lp, -1)
        kls.append((p * (torch.log_softmax(lp, -1) - torch.log_softmax(ls, -1))).sum(-1).clamp_min(0))
        own = lg.argmax(-1)
        agree += int((own == ids[:, 0]).sum())
        regret = lg.gather(-1, own[:, None])[:, 0] - lg.gather(-1, ids[:, :1])[:, 0]
        agree_tol += int((regret <= top1_tolerance).sum())
        n += ids.shape[0]
    kl = torch.cat(kls).sort().values
    n_trim = math.ceil(KL_TRIM * n)
    return {"positions": n, "kl_topk_mean": float(kl.mean()),
            "kl_topk_mean_trimmed": float(kl[: n - n_trim].mean()) if n > n_trim else 0.0,
            "top1_agreement": agree / n, "top1_agreement_tol": agree_tol / n}
