#!/usr/bin/env bash
# The Unsloth path end to end on a CUDA machine, through swft-lite's own CLI, with raw Unsloth side by side.
#
#   bash scripts/gpu_e2e.sh [OUT_DIR]
#
# 1. `swft-lite detect`
# 2. a 2-layer gpt-oss of the real width (hidden 2880, 32 experts, vocab 201,088), random weights, saved as one file
#    and again as several shards (the layout that broke Unsloth's merge)
# 3. rows that render to 2,048 tokens; `swft-lite train --backend unsloth` at batch 2 (4,096 tokens a step),
#    4-bit, LoRA r 16 on attention + experts, then the verified merge into the single-file base
# 4. raw Unsloth (scripts/raw_unsloth.py) at the same settings, for the wrapper's cost in tokens/s
# 5. `swft-lite merge` into the sharded base, `swft-lite save-gguf` (mxfp4 and q8_0) with their parity checks
#
# On the lent GPU machine the packages it lacks travel as .device/ (see README, "Developing"); set up by the caller.
set -uo pipefail
OUT=${1:-${OUT:-/tmp/swft-e2e}}
WORK=${SWFT_E2E_WORK:-/tmp/swft-e2e-work}
SHARED_MODEL=${SWFT_SHARED_MODEL:-../shared/models/gpt-oss-20b}
LLAMA_CPP=${SWFT_LLAMA_CPP:-}
STEPS=${SWFT_E2E_STEPS:-30}
PARTS=${SWFT_E2E_PARTS:-detect,build,train,raw,merge,gguf}   # a subset reuses what an earlier call left in $WORK
MERGE_FLAG=--merge; [[ ",$PARTS," == *",merge,"* ]] || MERGE_FLAG=--no-merge
mkdir -p "$OUT" "$WORK"
want() { [[ ",$PARTS," == *",$1,"* ]]; }
swft() { python -m swft_lite.cli "$@"; }
step() { echo; echo "=== $* ($(date +%T))"; }

if want detect; then
step detect
swft detect 2>&1 | tee "$OUT/detect.txt"
fi

if want build; then
step "build 2-layer real-width gpt-oss"
python - "$SHARED_MODEL" "$WORK" <<'EOF'
import sys, time, torch
from swft_lite.random_model import save_random_gpt_oss
shared, work = sys.argv[1], sys.argv[2]
t = time.time()
with torch.device("cuda"):
    save_random_gpt_oss(f"{work}/m2", shared, num_layers=2, dtype=torch.bfloat16)
    save_random_gpt_oss(f"{work}/m2-sharded", shared, num_layers=2, dtype=torch.bfloat16, max_shard_size="1GB")
print(f"built in {time.time() - t:.0f}s")
EOF
ls -la "$WORK/m2" "$WORK/m2-sharded" | tee "$OUT/models.txt"

step "synthetic rows of 2048 tokens"
python scripts/make_synthetic_data.py --rows 96 --tokens 2048 --out "$WORK/rows-2048.jsonl" | tee "$OUT/data.json"
fi

if want train; then
step "swft-lite train (unsloth backend) $MERGE_FLAG"
rm -rf "$WORK/runs/e2e"
swft train --backend unsloth --profile rtx4090 --model "$WORK/m2" --data "$WORK/rows-2048.jsonl" \
  --max-seq-length 2048 --per-device-batch-size 2 --gradient-accumulation-steps 1 --max-steps "$STEPS" \
  --save-steps 15 --output-root "$WORK/runs" --run-name e2e $MERGE_FLAG 2>&1 | tee "$OUT/train.log"
cp "$WORK/runs/e2e/run.json" "$OUT/run.json" 2>/dev/null
fi

if want raw; then
step "raw unsloth, same settings"
python scripts/raw_unsloth.py --model "$WORK/m2" --data "$WORK/rows-2048.jsonl" --seq 2048 --batch 2 \
  --steps "$STEPS" --out "$OUT/raw_unsloth.json" > "$OUT/raw_unsloth.log" 2>&1; tail -n 3 "$OUT/raw_unsloth.log"
fi

if want merge; then
step "merge into the sharded base"
swft merge "$WORK/runs/e2e" --base "$WORK/m2-sharded" --out "$WORK/runs/e2e/merged-sharded" --device cuda 2>&1 | tee "$OUT/merge_sharded.log"
fi

if want gguf; then
for q in mxfp4 q8_0; do
  step "save-gguf $q"
  swft save-gguf "$WORK/runs/e2e" --quant "$q" ${LLAMA_CPP:+--llama-cpp "$LLAMA_CPP"} 2>&1 | tee "$OUT/gguf_$q.log"
done
fi
ls -la "$WORK/runs/e2e" "$WORK/runs/e2e/gguf" 2>&1 | tee "$OUT/run_dir.txt"

step summary
python - "$OUT" <<'EOF'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
run = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else {}
raw = json.loads((out / "raw_unsloth.json").read_text()) if (out / "raw_unsloth.json").exists() else {}
ours, theirs = run.get("tokens_per_second_median"), raw.get("tokens_per_second_median")
summary = {"status": run.get("status"), "steps": run.get("global_step"), "swft_tokens_per_s": ours,
           "raw_unsloth_tokens_per_s": theirs, "ratio": (ours / theirs) if ours and theirs else None,
           "swft_peak_gib": run.get("peak_memory_gib"), "raw_peak_gib": raw.get("peak_memory_gib"),
           "first_loss": (run.get("losses") or [{}])[0].get("loss"), "last_loss": (run.get("losses") or [{}])[-1].get("loss"),
           "merge": {k: v for k, v in (run.get("merge") or {}).items() if not isinstance(v, (list, dict))}}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
EOF
