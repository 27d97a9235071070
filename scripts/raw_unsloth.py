"""Raw Unsloth, the way its gpt-oss notebook trains: the baseline swft-lite's own path is measured against.

Same data (rendered by swft-lite, so both train identical tokens), same LoRA settings, same batch; no swft-lite code
in the training loop. Prints and writes one JSON line: median tokens/s over the logged steps after the first,
peak allocated/reserved GPU memory.

    python scripts/raw_unsloth.py --model /tmp/m2 --data rows.jsonl --seq 4096 --batch 2 --steps 20 --out raw.json

scripts/bench.py calls train_raw() in its memory-capped child for the `raw` stack, with a profile's settings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
from unsloth import FastLanguageModel  # noqa: E402  (before trl/peft/transformers, as Unsloth requires)


def train_raw(model_path: str, data: str, *, seq: int, batch: int, accum: int, steps: int, rank: int,
              alpha: int, targets: str, four_bit: bool, optimizer: str = "adamw_8bit",
              learning_rate: float = 2e-4, gradient_checkpointing="unsloth") -> dict:
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from swft_lite.data import DataOptions, prepare_data

    prepared = prepare_data(data, None, DataOptions(max_seq_length=seq))

    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=model_path, max_seq_length=seq, load_in_4bit=four_bit, dtype=torch.bfloat16,
        use_exact_model_name=True)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
    if targets == "attention+experts":
        modules += ["gate_proj", "up_proj", "down_proj"]  # Unsloth maps these onto the fused expert parameters
    model = FastLanguageModel.get_peft_model(
        model, r=rank, lora_alpha=alpha, lora_dropout=0.0, bias="none", target_modules=modules,
        use_gradient_checkpointing=gradient_checkpointing, random_state=3407)

    samples = []
    seen = {"tokens": 0}

    class Clock(TrainerCallback):
        """Tokens/s between logged steps, counted the way swft-lite counts them (real tokens of each batch)."""
        last = None

        def on_log(self, a, state, control, logs=None, **kw):
            now = time.perf_counter()
            if logs and "loss" in logs:
                if self.last is not None and seen["tokens"] > self.last[0]:
                    samples.append((seen["tokens"] - self.last[0]) / (now - self.last[1]))
                self.last = (seen["tokens"], now)

    trainer = SFTTrainer(model=model, processing_class=tokenizer, train_dataset=prepared.train,
                         callbacks=[Clock()],
                         args=SFTConfig(output_dir="/tmp/raw-unsloth", per_device_train_batch_size=batch,
                                        gradient_accumulation_steps=accum, max_steps=steps,
                                        learning_rate=learning_rate, logging_steps=1, optim=optimizer, bf16=True,
                                        max_length=seq, report_to=[], save_strategy="no", seed=3407,
                                        router_aux_loss_coef=0.0))
    collate = trainer.data_collator

    def counting_collator(features):
        seen["tokens"] += sum(len(f["input_ids"]) for f in features)
        return collate(features)

    trainer.data_collator = counting_collator
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = trainer.train()
    train_seconds = time.perf_counter() - t0
    ordered = sorted(samples[1:])  # the first interval holds compilation
    lengths = [len(x) for x in prepared.train["input_ids"]]
    return {
        "stack": "raw unsloth", "seq": seq, "batch": batch, "accum": accum, "steps": steps,
        "targets": targets, "rank": rank, "four_bit": four_bit,
        "tokens_per_second_median": ordered[len(ordered) // 2] if ordered else None,
        "tokens_per_second": samples,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "global_step": out.global_step, "train_seconds": round(train_seconds, 1),
        "rows": len(lengths), "tokens_total": sum(lengths),
        "gpu": torch.cuda.get_device_name(0),
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--accum", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--targets", choices=["attention", "attention+experts"], default="attention+experts")
    ap.add_argument("--bf16-weights", action="store_true", help="no 4-bit")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result = train_raw(args.model, args.data, seq=args.seq, batch=args.batch, accum=args.accum, steps=args.steps,
                       rank=args.rank, alpha=2 * args.rank, targets=args.targets, four_bit=not args.bf16_weights)
    print(json.dumps({k: v for k, v in result.items() if k != "tokens_per_second"}))
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
