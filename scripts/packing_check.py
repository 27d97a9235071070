"""Proof that packing keeps rows apart on a backend: packed rows against each row alone, at the real width.

    python scripts/packing_check.py --backend unsloth --model /tmp/gptoss-full     (GPU, bf16 or 4-bit)
    python scripts/packing_check.py --backend hf --tiny                             (CPU plumbing)

Loads the model the way `swft-lite train` does (swft_lite.backends.load_for_training with a profile whose packing
is on), then for rows longer than the 128-token sliding window compares, position by position, the logits of:
  packed   the rows packed into one sequence (position ids restarting per row, swft-lite's document mask)
  batched  the rows right-padded into one batch (the ordinary, known-good path): the size of the numerical noise
           that a different kernel shape alone causes in this precision
  leak     the rows packed with positions running on (no row boundaries): what a mask that ignores rows gives
Isolation holds when `packed` is no worse than `batched`, and `leak` shows the check can see a leak. Prints one
JSON document (and writes it to --out).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def batched_error(model, rows, reduce: str = "max") -> float:
    import torch

    from swft_lite.batching import PaddedCollator

    device = next(model.parameters()).device
    batch = PaddedCollator(pad_token_id=0)(rows)
    worst, total, count = 0.0, 0.0, 0
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False).logits.float()
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]], device=device), use_cache=False).logits[0].float()
            diff = (together[i, :n] - alone).abs()
            worst = max(worst, float(diff.max()))
            if i:
                total, count = total + float(diff.sum()), count + diff.numel()
    return worst if reduce == "max" else total / max(count, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="unsloth", choices=["unsloth", "hf"])
    ap.add_argument("--model", default="/tmp/gptoss-full")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random gpt-oss on the CPU (plumbing)")
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--lengths", default="300,190,700,45,410")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from swft_lite.backends import import_unsloth

    if args.backend == "unsloth":
        import_unsloth()
    import torch

    from swft_lite.backends import load_for_training
    from swft_lite.batching import packed_isolation_error
    from swft_lite.profiles import Profile

    model_path = args.model
    if args.tiny:
        import tempfile

        from swft_lite.random_model import save_random_gpt_oss

        from swft_lite.tokenizer import gpt_oss_files

        # gpt-oss-20b's config and tokenizer: $SWFT_SHARED_MODEL, else built from the o200k vocabulary (cached)
        files = os.environ.get("SWFT_SHARED_MODEL") or str(gpt_oss_files())
        model_path = str(save_random_gpt_oss(Path(tempfile.mkdtemp()) / "tiny", files, seed=0, num_layers=2,
                                             hidden_size=64, num_experts=4, experts_per_token=2, num_heads=4,
                                             num_kv_heads=2, head_dim=16, initializer_range=0.1))
    profile = Profile(name="packing-check", max_seq_length=4096, token_budget=4096, packing=True,
                      load_in_4bit=args.load_in_4bit, lora_targets="attention+experts", gradient_checkpointing="false")
    t0 = time.perf_counter()
    model, _, _ = load_for_training(args.backend, model_path, profile)
    load_s = time.perf_counter() - t0
    g = random.Random(0)
    vocab = 190000
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = [g.randrange(vocab) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": ids})
    # Training mode (no dropout in this profile): Unsloth trains gpt-oss through its flex-attention path and
    # evaluates through eager attention; the packed batches are for training.
    model.train()
    result = {
        "backend": args.backend, "model": model_path, "load_in_4bit": args.load_in_4bit,
        "dtype": str(next(model.parameters()).dtype), "device": str(next(model.parameters()).device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "row_lengths": [len(r["input_ids"]) for r in rows],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "max_abs_dlogit": {
            "packed": packed_isolation_error(model, rows),
            "batched": batched_error(model, rows),
            "leak": packed_isolation_error(model, rows, restart_positions=False),
        },
        "mean_abs_dlogit_after_first_row": {
            "packed": packed_isolation_error(model, rows, reduce="mean"),
            "batched": batched_error(model, rows, reduce="mean"),
            "leak": packed_isolation_error(model, rows, restart_positions=False, reduce="mean"),
        },
        "load_seconds": round(load_s, 1),
    }
    # In fp32 the bound is absolute; in bf16 the padded batch's own difference is the noise floor, and the mean over
    # the rows after the first (the only ones a leak can reach) separates a leak from that noise.
    d = result["mean_abs_dlogit_after_first_row"]
    result["isolated"] = (d["packed"] <= max(1e-3, 1.5 * d["batched"])
                          and d["leak"] > 5 * max(d["packed"], 1e-4))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["isolated"] else 1


if __name__ == "__main__":
    sys.exit(main())
