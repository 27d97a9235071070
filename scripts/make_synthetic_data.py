"""Write synthetic chat rows whose rendered harmony length is (almost exactly) a target token count.

Benchmarks must train the tokens they claim: a "4096-token" benchmark whose rows render to 2,600 tokens measures
something else. Each row here is a user question plus an assistant answer (with reasoning), padded with random
words until the whole harmony rendering is within 1 % below the target, measured with swft-lite's own renderer.

    python scripts/make_synthetic_data.py --rows 64 --tokens 4096 --out /tmp/rows-4096.jsonl
    python scripts/make_synthetic_data.py --rows 400 --tokens 8192 --variable --out /tmp/chats.jsonl

--variable writes chats whose lengths vary as a real SFT set's do instead (lognormal; for --tokens 8192: median
~2,300 rendered tokens, 10th / 90th percentiles ~1,000 / ~6,000, capped at 8,000, mean ~2,900; scaled for others).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

WORDS = ("service queue cache request latency replica shard schema index commit rollback cluster node gateway "
         "token budget module interface contract deploy rollout metric alert trace span storage bucket region "
         "failover quorum lease heartbeat partition consumer producer backlog throughput capacity migration "
         "version adapter handler pipeline batch stream window checkpoint snapshot journal ledger audit policy "
         "tenant quota limiter retry backoff timeout circuit breaker fallback idempotent ordering consistency").split()


def make_row(rng: random.Random, n_words: int) -> dict:
    def text(n):
        return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."

    return {"messages": [
        {"role": "system", "content": "You are a concise software architect."},
        {"role": "user", "content": text(max(8, n_words // 8))},
        {"role": "assistant", "thinking": text(max(8, n_words // 4)), "content": text(max(8, n_words - n_words // 8
                                                                                        - n_words // 4))},
    ]}


def rendered_length(row: dict, options) -> int:
    from swft_lite.data import render_conversation

    ids, _ = render_conversation(row, options)
    return len(ids)


# The variable-length spread, as fractions of 8,192 tokens: median 2,300, cap 8,000, floor 300; sigma 0.72 gives
# p10 ~ median / 2.5 and p90 ~ median x 2.5.
MEDIAN, CAP, FLOOR, SIGMA = 2300 / 8192, 8000 / 8192, 300 / 8192, 0.72


def write_variable_rows(out: Path, rows: int, max_tokens: int, seed: int = 0) -> dict:
    """Chats of lognormally varying rendered length (at most ~97.7 % of max_tokens); returns their statistics."""
    from swft_lite.data import DataOptions

    options = DataOptions(max_seq_length=max_tokens + 200)
    median, cap, floor = MEDIAN * max_tokens, int(CAP * max_tokens), max(64, int(FLOOR * max_tokens))
    per_word = rendered_length(make_row(random.Random(1), 1000), options) / 1000  # incl. the fixed parts
    g = random.Random(seed)
    lengths = []
    with Path(out).open("w") as fh:
        for i in range(rows):
            target = min(cap, max(floor, int(g.lognormvariate(math.log(median), SIGMA))))
            words = max(8, int(target / per_word))
            row = make_row(random.Random(seed * 100003 + i), words)
            n = rendered_length(row, options)
            while n > cap:
                words = int(words * 0.97)
                row = make_row(random.Random(seed * 100003 + i), words)
                n = rendered_length(row, options)
            fh.write(json.dumps(row) + "\n")
            lengths.append(n)
    q = statistics.quantiles(lengths, n=10)
    return {"rows": rows, "median": statistics.median(lengths), "mean": round(statistics.mean(lengths)),
            "p10": q[0], "p90": q[-1], "max": max(lengths), "min": min(lengths), "out": str(out)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, required=True)
    ap.add_argument("--tokens", type=int, required=True, help="target rendered length of every row")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variable", action="store_true", help="chats of varying length up to --tokens (see above)")
    args = ap.parse_args()
    if args.variable:
        print(json.dumps(write_variable_rows(args.out, args.rows, args.tokens, args.seed)))
        return

    from swft_lite.data import DataOptions

    options = DataOptions(max_seq_length=args.tokens)
    lengths = []
    with args.out.open("w") as fh:
        for i in range(args.rows):
            lo, hi = 8, args.tokens  # words; each word is >= 1 token, so hi words always overshoot
            best = None
            while lo <= hi:  # binary search on the word count for the longest row that fits
                mid = (lo + hi) // 2
                row = make_row(random.Random(args.seed * 100003 + i), mid)
                n = rendered_length(row, options)
                if n <= args.tokens:
                    best, lo = (row, n), mid + 1
                else:
                    hi = mid - 1
            fh.write(json.dumps(best[0]) + "\n")
            lengths.append(best[1])
    print(json.dumps({"rows": args.rows, "target": args.tokens, "min": min(lengths), "max": max(lengths),
                      "mean": sum(lengths) / len(lengths), "out": str(args.out)}))


if __name__ == "__main__":
    main()
