"""Proof that packing keeps rows apart on a backend: packed rows against each row alone, at the real width.

    python scripts/packing_check.py --backend unsloth --model /tmp/gptoss-full     (GPU, bf16 or 4-bit)
    python scripts/packing_check.py --backend hf --tiny                             (CPU plumbing)

Loads the model the way `swft-lite train` does (swft_lite.backends.load_for_training with a profile whose packing
is on), then for rows longer than the 128-token sliding window compares, row by row, the logits of each row alone
with the logits of the same row in:
  packed   the rows packed into one sequence (position ids restarting per row, swft-lite's document mask)
  same_path the row packed alone with a padding row after it: the same attention code as `packed` (without the
           patch a lone row goes through Unsloth's own), so `packed` vs `same_path` is isolation and nothing else
  batched  the rows right-padded into one batch (the ordinary, known-good path): the numerical noise that another
           kernel shape alone causes in this precision
  leak     the rows packed with positions running on (no row boundaries): what a mask that ignores rows gives
The first row of a pack sees nothing before it (causality), so its difference is noise too. Isolation holds when
the rows after the first are no worse than that noise, and `leak` shows the check can see a leak. Prints one JSON
document (and writes it to --out).
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


def batched_errors(model, rows) -> list[dict]:
    import torch

    from swft_lite.batching import PaddedCollator

    device = next(model.parameters()).device
    batch = PaddedCollator(pad_token_id=0)(rows)
    errors = []
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                         use_cache=False).logits.float()
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            alone = model(input_ids=torch.tensor([r["input_ids"]], device=device), use_cache=False).logits[0].float()
            diff = (together[i, :n] - alone).abs()
            errors.append({"tokens": n, "max": float(diff.max()), "mean": float(diff.mean())})
    return errors


def same_path_errors(model, rows) -> list[dict]:
    """Each row packed with the others vs the same row packed alone (plus one padding row, so that it takes the
    packed path too)."""
    import torch

    from swft_lite.batching import PackedCollator

    device = next(model.parameters()).device

    def logits(batch):
        return model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                     use_cache=False).logits[0].float()

    errors = []
    with torch.no_grad():
        together = logits(PackedCollator()(rows))
        start = 0
        for r in rows:
            n = len(r["input_ids"])
            alone = logits(PackedCollator(pad_to=n + 16)([r]))[:n]
            diff = (together[start:start + n] - alone).abs()
            errors.append({"tokens": n, "max": float(diff.max()), "mean": float(diff.mean())})
            start += n
    return errors


def swap_error(model, rows) -> dict:
    """The last row packed after the first row, against the same last row packed after other tokens of the same
    length: same kernel, same alignment, only what comes before differs. A mask that keeps rows apart leaves the
    last row's logits unchanged (up to numerics that depend on other tokens, e.g. the experts' token grouping)."""
    import random

    import torch

    from swft_lite.batching import PackedCollator

    device = next(model.parameters()).device
    first, last = rows[0], rows[-1]
    g = random.Random(7)
    other = [g.randrange(190000) for _ in first["input_ids"]]
    other_row = {"input_ids": other, "labels": other}
    n, m = len(first["input_ids"]), len(last["input_ids"])
    out = {}
    with torch.no_grad():
        for name, restart in (("packed", True), ("leak", False)):
            got = []
            for before in (first, other_row):
                b = PackedCollator()([before, last])
                if not restart:
                    b["position_ids"] = torch.arange(n + m).unsqueeze(0)
                got.append(model(input_ids=b["input_ids"].to(device), position_ids=b["position_ids"].to(device),
                                 use_cache=False).logits[0, n:].float())
            diff = (got[0] - got[1]).abs()
            out[name] = {"max": float(diff.max()), "mean": float(diff.mean())}
    return out


def summary(errors: list[dict]) -> dict:
    later = errors[1:]
    return {"rows": errors, "first_row_mean": errors[0]["mean"],
            "later_rows_mean": sum(e["mean"] * e["tokens"] for e in later) / sum(e["tokens"] for e in later),
            "max": max(e["max"] for e in errors)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", default="unsloth", choices=["unsloth", "hf"])
    ap.add_argument("--model", default="/tmp/gptoss-full")
    ap.add_argument("--tiny", action="store_true", help="build a tiny random gpt-oss on the CPU (plumbing)")
    ap.add_argument("--load-in-4bit", action="store_true")
    ap.add_argument("--lengths", default="300,190,700,45,410")
    ap.add_argument("--out", default=None)
    ap.add_argument("--float32", action="store_true",
                    help="cast the loaded model to float32 (the fp32 bound of 1e-3 applies; bf16 noise gone)")
    args = ap.parse_args(argv)

    from swft_lite.backends import import_unsloth

    if args.backend == "unsloth":
        import_unsloth()
    import torch

    from swft_lite.backends import load_for_training
    from swft_lite.batching import packed_row_errors
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
    if args.float32:
        model = model.float()
    g = random.Random(0)
    vocab = 190000
    rows = []
    for n in (int(x) for x in args.lengths.split(",")):
        ids = [g.randrange(vocab) for _ in range(n)]
        rows.append({"input_ids": ids, "labels": ids})
    # The same rows cut to multiples of 128 tokens (the attention kernel's block): each row then starts on a block
    # boundary, in the pack as alone, so any difference left is not the kernel's tiling.
    aligned = [{"input_ids": r["input_ids"][:max(128, len(r["input_ids"]) // 128 * 128)],
                "labels": r["labels"][:max(128, len(r["input_ids"]) // 128 * 128)]} for r in rows]
    # Training mode (no dropout in this profile): Unsloth trains gpt-oss through its flex-attention path and
    # evaluates through eager attention; the packed batches are for training.
    model.train()
    result = {
        "backend": args.backend, "model": model_path, "load_in_4bit": args.load_in_4bit,
        "dtype": str(next(model.parameters()).dtype), "device": str(next(model.parameters()).device),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "row_lengths": [len(r["input_ids"]) for r in rows],
        "attn_implementation": getattr(model.config, "_attn_implementation", None),
        "packed": summary(packed_row_errors(model, rows)),
        "same_path": summary(same_path_errors(model, rows)),
        "batched": summary(batched_errors(model, rows)),
        "leak": summary(packed_row_errors(model, rows, restart_positions=False)),
        "swap": swap_error(model, rows),
        "aligned_same_path": summary(same_path_errors(model, aligned)),
        "aligned_packed": summary(packed_row_errors(model, aligned)),
        "aligned_swap": swap_error(model, aligned),
        "load_seconds": round(load_s, 1),
    }
    # In fp32 the bound is absolute. In bf16 the noise is what the same rows show without any leak being possible:
    # the first row of each pack, and a padded batch. The rows after the first are the only ones a leak can reach.
    noise = max(result["packed"]["first_row_mean"], result["batched"]["later_rows_mean"],
                result["same_path"]["first_row_mean"])
    packed = max(result["packed"]["later_rows_mean"], result["same_path"]["later_rows_mean"])
    result["noise_mean"], result["packed_later_rows_mean"] = noise, packed
    swap = result["swap"]
    result["isolated"] = (packed <= max(1e-3, 1.5 * noise)
                          and result["leak"]["later_rows_mean"] > 5 * max(packed, 1e-4))
    # The swap changes only what comes before the last row (same kernel, same offsets): a mask that keeps rows
    # apart leaves it unchanged up to numerics of the other tokens, a leak does not.
    result["isolated_by_swap"] = (swap["packed"]["mean"] <= max(1e-3, 1.5 * noise)
                                  and swap["leak"]["mean"] > 5 * max(swap["packed"]["mean"], 1e-4))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0 if result["isolated"] or result["isolated_by_swap"] else 1


if __name__ == "__main__":
    sys.exit(main())
