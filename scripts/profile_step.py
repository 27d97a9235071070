"""Where one micro-batch's time goes: torch.profiler over training passes of the h100 settings on the GPU.

    python scripts/profile_step.py --model /tmp/gptoss-full --shapes 2048,8192,packed:4x2048 --out benchmarks

Loads the model the way `swft-lite train` does (swft_lite.backends.load_for_training, a shipped profile), then for
each shape runs warm-up passes (compile, autotune) and profiles --passes full training steps (forward with the loss,
backward, 8-bit AdamW step). Shapes: N (one row of N tokens), BxN (B rows of N), packed:BxN (B rows of N packed into
one sequence with swft-lite's document mask). GPU kernel time is grouped by what the kernel does (its name); what
the step's wall time holds beyond the kernels is the CPU's: launch gaps, Python, synchronisation. Writes
profile_step.json and PROFILE_STEP.md to --out.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

# First match wins; kernel names as CUDA, Triton (inductor) and bitsandbytes name them.
CATEGORIES = [
    ("flex attention (and other Triton templates)", r"flex|triton_tem_fused|attn|sdpa|flash"),
    ("NF4 dequantisation", r"dequant|kDequantize|nf4|bnb"),
    ("8-bit AdamW", r"optimizer|adam|kOptimizer|kPreconditionOptimizer"),
    ("grouped expert GEMMs", r"grouped|moe|ragged"),
    ("other GEMMs (attention projections, LoRA, lm_head)", r"gemm|gemv|cutlass|xmma|nvjet|cublas|sm90|sm100|matmul"),
    ("loss (cross entropy)", r"cross_entropy|crossentropy|nll|log_softmax|logsumexp"),
    ("fused elementwise / norms / RoPE (Triton)", r"triton"),
    ("copies, fills, reductions", r"copy|fill|memcpy|memset|reduce|elementwise|vectorized|index|gather|scatter|cat"),
]


def category(name: str) -> str:
    for label, pattern in CATEGORIES:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def make_batch(shape: str, vocab: int, seed: int):
    import random

    import torch

    from swft_lite.batching import PackedCollator

    g = random.Random(seed)
    packed = shape.startswith("packed:")
    spec = shape.split(":", 1)[-1]
    rows, _, n = spec.rpartition("x")
    rows, n = int(rows or 1), int(n)
    ids = [[g.randrange(vocab) for _ in range(n)] for _ in range(rows)]
    if packed:
        return PackedCollator()([{"input_ids": r, "labels": r} for r in ids]), rows * n
    t = torch.tensor(ids)
    return {"input_ids": t, "labels": t.clone(), "attention_mask": torch.ones_like(t)}, rows * n


def profile_shape(model, optimizer, shape: str, passes: int, warmup: int) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    batch, tokens = make_batch(shape, 190000, seed=len(shape))
    batch = {k: v.cuda() for k, v in batch.items()}

    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    warm_s = time.perf_counter() - t0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(passes):
        step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / passes
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(passes):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, float] = {}
    for evt in prof.key_averages():
        device_us = getattr(evt, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(evt, "self_cuda_time_total", 0)
        if device_us and getattr(evt, "device_type", None) is not None and "CUDA" in str(evt.device_type):
            kernels[evt.key] = kernels.get(evt.key, 0.0) + device_us / 1e3 / passes
    by_cat: dict[str, float] = {}
    for name, ms in kernels.items():
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + ms
    gpu_ms = sum(kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1])[:25]
    return {"shape": shape, "tokens": tokens, "step_ms": round(wall * 1e3, 1),
            "tokens_per_second": round(tokens / wall), "gpu_kernel_ms": round(gpu_ms, 1),
            "cpu_side_ms": round(wall * 1e3 - gpu_ms, 1), "warmup_s": round(warm_s, 1),
            "categories_ms": {k: round(v, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": [[k[:120], round(v, 2)] for k, v in top],
            "peak_allocated_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def markdown(results: list[dict], meta: dict) -> str:
    cats = []
    for r in results:
        for c in r["categories_ms"]:
            if c not in cats:
                cats.append(c)
    head = "| | " + " | ".join(r["shape"] + f" ({r['tokens']:,} tok)" for r in results) + " |"
    lines = ["# One training step, profiled (scripts/profile_step.py)", "",
             f"{meta['gpu']}, {meta['model']}, profile `{meta['profile']}` (4-bit, no recomputation), Unsloth "
             f"{meta['unsloth']}; one step = forward with loss, backward, 8-bit AdamW; ms per step (mean of "
             f"{meta['passes']}). GPU kernel time grouped by kernel name; 'CPU side' is the step's wall time not "
             "covered by kernels (launch gaps, Python, synchronisation).", "",
             head, "|---|" + "---|" * len(results),
             "| step wall time | " + " | ".join(f"{r['step_ms']:.0f}" for r in results) + " |",
             "| tokens/s | " + " | ".join(f"{r['tokens_per_second']:,}" for r in results) + " |",
             "| CPU side (wall - kernels) | " + " | ".join(f"{r['cpu_side_ms']:.0f}" for r in results) + " |"]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{r['categories_ms'].get(c, 0):.0f}" for r in results) + " |")
    lines += ["", "Top kernels of the last shape (ms per step):", ""]
    lines += [f"- {ms:.1f} ms `{name}`" for name, ms in results[-1]["top_kernels_ms"][:15]]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/gptoss-full")
    ap.add_argument("--profile", default="h100")
    ap.add_argument("--shapes", default="2048,8192,packed:4x2048")
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks")
    args = ap.parse_args(argv)

    from swft_lite.backends import import_unsloth

    unsloth = import_unsloth()
    import dataclasses

    import bitsandbytes as bnb
    import torch

    from swft_lite.backends import load_for_training
    from swft_lite.profiles import load_profile

    profile = dataclasses.replace(load_profile(args.profile), token_budget=8192, packing=True)
    t0 = time.perf_counter()
    model, _, _ = load_for_training("unsloth", args.model, profile)
    load_s = time.perf_counter() - t0
    model.train()
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    results = []
    for shape in args.shapes.split(","):
        r = profile_shape(model, optimizer, shape, args.passes, args.warmup)
        print(json.dumps({k: v for k, v in r.items() if k != "top_kernels_ms"}), flush=True)
        results.append(r)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "profile_step.json").write_text(json.dumps({"results": results}, indent=2))
    meta = {"gpu": torch.cuda.get_device_name(0), "model": args.model, "profile": args.profile,
            "unsloth": getattr(unsloth, "__version__", "?"), "passes": args.passes, "load_seconds": round(load_s, 1)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "profile_step.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    (args.out / "PROFILE_STEP.md").write_text(markdown(results, meta))
    print(markdown(results, meta))
    return 0


if __name__ == "__main__":
    sys.exit(main())
