#!/usr/bin/env python
"""Benchmark the data path on 10k synthetic conversations of ~1k tokens each.

Times `check_file` (what `swft-lite data check` runs: validate + render every row, one process), `prepare_data`
cold (validate, render with datasets.map(num_proc=2), save to the cache) and `prepare_data` again (cache hit), and
writes the figures to benchmarks/data_bench.json. Target: the whole 10k in under a minute on a 2-core machine.

    python scripts/bench_data.py [--rows 10000] [--num-proc 2] [--out benchmarks/data_bench.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from swft_lite.tokenizer import VocabularyNotFound, use_vocab  # noqa: E402

try:  # openai-harmony offline: TIKTOKEN_ENCODINGS_BASE, ../shared/tiktoken or the cache
    use_vocab(download=False)
except VocabularyNotFound:
    pass  # harmony downloads it (online) or says what is missing

WORDS = ("service database cache queue event schema latency throughput replica partition consumer producer "
         "gateway boundary context decision consequence trade-off migration rollout rollback deployment region "
         "availability consistency idempotent retry backoff timeout circuit breaker observability metric trace log "
         "alert runbook owner team module interface contract version compatibility storage index shard tenant "
         "isolation security token session request response payload batch stream pipeline backlog capacity").split()


def _para(rng: random.Random, words: int) -> str:
    out, n = [], 0
    while n < words:
        k = rng.randint(8, 18)
        sent = " ".join(rng.choice(WORDS) for _ in range(k))
        out.append(sent[0].upper() + sent[1:] + ".")
        n += k
    return " ".join(out)


def make_rows(n: int, seed: int = 0):
    rng = random.Random(seed)
    for i in range(n):
        msgs = []
        if i % 3 == 0:
            msgs.append({"role": "system", "content": "You write architecture documentation. " + _para(rng, 20)})
        if i % 5 == 0:  # a two-turn conversation
            msgs += [{"role": "user", "content": _para(rng, 60)}, {"role": "assistant", "content": _para(rng, 120)}]
        msgs.append({"role": "user", "content": _para(rng, 120 if i % 5 else 60)})
        answer = {"role": "assistant", "content": _para(rng, 420 if i % 5 else 300)}
        if i % 2 == 0:
            answer["thinking"] = _para(rng, 160)
        msgs.append(answer)
        yield {"messages": msgs, "reasoning_effort": ("low", "medium", "high")[i % 3]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=10_000)
    ap.add_argument("--num-proc", type=int, default=2)
    ap.add_argument("--max-seq-length", type=int, default=4096)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "data_bench.json"))
    args = ap.parse_args()

    from swft_lite import __version__
    from swft_lite import data as D

    with tempfile.TemporaryDirectory(prefix="swft-bench-") as tmp:
        path = Path(tmp) / "synthetic.jsonl"
        t = time.perf_counter()
        with path.open("w") as fh:
            for row in make_rows(args.rows):
                fh.write(json.dumps(row) + "\n")
        gen_s = time.perf_counter() - t
        size = path.stat().st_size
        opts = D.DataOptions(max_seq_length=args.max_seq_length, num_proc=args.num_proc,
                             cache_dir=str(Path(tmp) / "cache"))
        D._encoding()  # load the vocabulary once, outside the timings (~0.5 s)
        import datasets  # noqa: F401 - imported outside the timings too (~2 s), as the trainer already has it

        t = time.perf_counter()
        check = D.check_file(path, opts)
        check_s = time.perf_counter() - t
        assert check.ok, [str(p) for p in check.problems[:5]]

        t = time.perf_counter()
        cold = D.prepare_data(str(path), None, opts)
        cold_s = time.perf_counter() - t
        assert cold.report["cache"]["hit"] is False

        t = time.perf_counter()
        warm = D.prepare_data(str(path), None, opts)
        warm_s = time.perf_counter() - t
        assert warm.report["cache"]["hit"] is True and len(warm.train) == len(cold.train)

    stats = check.length_stats()
    result = {
        "what": f"{args.rows} synthetic chat conversations (~1k harmony tokens each), JSONL",
        "rows": args.rows, "file_mb": round(size / 2**20, 1),
        "tokens_total": check.tokens_total, "tokens_per_row": stats,
        "generate_s": round(gen_s, 2),
        "check": {"seconds": round(check_s, 2), "rows_per_s": round(args.rows / check_s), "processes": 1},
        "prepare_cold": {"seconds": round(cold_s, 2), "rows_per_s": round(args.rows / cold_s),
                         "num_proc": cold.report["render"]["num_proc"], **cold.report["timing"]},
        "prepare_cached": {"seconds": round(warm_s, 2), "rows_per_s": round(args.rows / warm_s)},
        "total_s": round(check_s + cold_s + warm_s, 2),
        "target": "check + cold + cached under 60 s on 2 cores",
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "swft_lite": __version__,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.rows} rows, {result['file_mb']} MB, {check.tokens_total} tokens "
          f"(median {stats['median']}, max {stats['max']} per row)")
    print(f"check           {check_s:6.2f} s  {result['check']['rows_per_s']:>7} rows/s (1 process)")
    print(f"prepare (cold)  {cold_s:6.2f} s  {result['prepare_cold']['rows_per_s']:>7} rows/s "
          f"(num_proc {result['prepare_cold']['num_proc']}: validate {cold.report['timing']['validate_s']} s, "
          f"render {cold.report['timing']['render_s']} s)")
    print(f"prepare (cache) {warm_s:6.2f} s  {result['prepare_cached']['rows_per_s']:>7} rows/s")
    print(f"total           {result['total_s']:6.2f} s  -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
