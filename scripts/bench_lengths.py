"""Real-length benchmark: each profile on rows of exactly max_seq_length tokens and on chats of varying length, with
and without token-budget batching or packing, side by side in one call on the full gpt-oss-20b shape.

    python scripts/bench_lengths.py data --out .device/bench-data        (here: writes the two data sets)
    python scripts/bench_lengths.py run --data .device/bench-data h100 h100@variable h100:token_budget=8192@variable
    python scripts/bench_lengths.py losses --model-dir /tmp/gptoss-2l      (the same rows plain and packed: eval loss)

A run spec is PROFILE[:key=value,...][@exact|@variable]. Each run is scripts/bench.py's child (`--one`): a fresh
process, GPU memory capped at the profile card's headroom limit, swft_lite.train.train - the code `swft-lite train`
runs - with --max-steps and gradient accumulation capped at --max-accum. Results go to --out (default $OUT or
benchmarks/) as lengths.json and are merged into benchmarks/RESULTS_LENGTHS.md by `report`.

The variable-length chats follow a real SFT set's spread: lognormal, median ~2,300 rendered tokens, 10th / 90th
percentiles ~1,000 / ~6,000, capped at 8,000 (mean ~2,900). The exact rows are within 1 % below 8,192 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

def make_variable(out: Path, rows: int, seed: int) -> dict:
    from make_synthetic_data import write_variable_rows

    return write_variable_rows(out, rows, 8192, seed)


def cmd_data(args) -> int:
    args.out.mkdir(parents=True, exist_ok=True)
    stats = {"variable": make_variable(args.out / "variable.jsonl", args.rows, args.seed)}
    subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_data.py"), "--rows", "48", "--tokens",
                    "8192", "--out", str(args.out / "exact-8192.jsonl")], check=True)
    (args.out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))
    return 0


def cmd_run(args) -> int:
    import dataclasses

    from bench import resolve_spec

    from swft_lite import estimate as est

    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results_path = out / "lengths.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else []
    t_start = time.monotonic()
    for spec in args.specs:
        profile_spec, _, kind = spec.partition("@")
        kind = kind or "exact"
        profile = resolve_spec(profile_spec)
        if profile.gradient_accumulation_steps > args.max_accum:
            profile = dataclasses.replace(profile, gradient_accumulation_steps=args.max_accum)
        left = args.time_budget - (time.monotonic() - t_start)
        if left < 90:
            print(f"lengths: skipping {spec}: {left:.0f} s left", flush=True)
            results.append({"spec": spec, "status": "skipped"})
            continue
        data = Path(args.data) / ("exact-8192.jsonl" if kind == "exact" else "variable.jsonl")
        key = spec.replace(":", "_").replace("=", "-").replace(",", "_").replace("@", "-")
        result_file = work / f"{key}.json"
        cap = est.headroom_limit(profile.vram_budget_gib)
        cmd = [sys.executable, str(REPO / "scripts" / "bench.py"), "--one", "--label", spec, "--backend", "unsloth",
               "--profile-json", json.dumps(dataclasses.asdict(profile)), "--cap-gib", str(cap),
               "--model", args.model_dir, "--data", str(data), "--output-root", str(work / "runs"),
               "--run-name", key, "--result", str(result_file), "--steps", str(args.steps)]
        t0 = time.monotonic()
        log = work / f"{key}.log"
        with log.open("w") as fh:
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=max(60, left - 20)).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        res = json.loads(result_file.read_text()) if result_file.exists() else {"status": f"rc={rc}"}
        run_json = work / "runs" / key / "run.json"
        record = json.loads(run_json.read_text()) if run_json.exists() else {}
        res.update({"spec": spec, "data_kind": kind, "profile": dataclasses.asdict(profile),
                    "cap_gib": cap, "wall": round(time.monotonic() - t0, 1),
                    "plan": record.get("plan"), "padding_fraction": record.get("padding_fraction"),
                    "losses_by_step": record.get("losses"),
                    "tokens_seen": None})
        res.pop("packages", None)
        results.append(res)
        results_path.write_text(json.dumps(results, indent=2, default=str))
        print(f"lengths: {spec}: {res.get('status')} {res.get('tokens_per_second')} tok/s, peak "
              f"{res.get('peak_allocated_gib')} ({res.get('peak_reserved_gib')}) GiB, {res['wall']} s", flush=True)
        if res.get("status") != "ok":
            print(log.read_text()[-3000:], flush=True)
    return 0


def cmd_report(args) -> int:
    results = [r for r in json.loads(Path(args.results).read_text()) if r.get("status") == "ok"]
    lines = ["# Real-length benchmark (scripts/bench_lengths.py)", "",
             "Full gpt-oss-20b shape (random weights), Unsloth 2026.10.9, swft-lite's training path, GPU memory "
             "capped at each profile card's limit, gradient accumulation capped at 2; tokens/s = real (unpadded) "
             "tokens, median over the logged steps after the first.", "",
             "| run | data | batching | tokens/s | vs full rows | padding | peak alloc (reserved) GiB | cap |",
             "|---|---|---|---|---|---|---|---|"]
    full = {}
    for r in results:
        if r["data_kind"] == "exact" and not r["profile"].get("token_budget"):
            full[r["profile"]["name"].split(":")[0]] = r["tokens_per_second"]
    for r in results:
        p = r["profile"]
        mode = "packed" if p.get("packing") else ("budget %d" % p["token_budget"] if p.get("token_budget")
                                                   else f"{p['per_device_batch_size']} row(s)")
        base = full.get(p["name"].split(":")[0])
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base and r["tokens_per_second"] else "-"
        pad = r.get("padding_fraction")
        lines.append(f"| {r['spec']} | {r['data_kind']} | {mode} | {r['tokens_per_second']:,.0f} | {ratio} | "
                     f"{'-' if pad is None else f'{100 * pad:.1f} %'} | {r['peak_allocated_gib']} "
                     f"({r['peak_reserved_gib']}) | {r['cap_gib']} |")
    Path(args.markdown).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def cmd_losses(args) -> int:
    """The same rows trained plain (one row a pass) and packed, one epoch each from the same seed, with the same
    held-out rows evaluated along the way: the eval losses must agree (packing changes the batches, not the task).
    The packed run goes first; the plain run then accumulates as many rows per optimizer step as the packed run's
    steps held on average (--accum applies to the packed run), so both take the same number of optimizer steps
    under the same learning-rate schedule and their curves compare step for step."""
    out = Path(args.out or os.environ.get("OUT") or REPO / "benchmarks")
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work)
    rows = Path(args.data).read_text().splitlines()
    (work / "data").mkdir(parents=True, exist_ok=True)
    train_file, eval_file = work / "data" / "train.jsonl", work / "data" / "val.jsonl"
    train_file.write_text("\n".join(rows[args.eval_rows:args.eval_rows + args.rows]) + "\n")
    eval_file.write_text("\n".join(rows[:args.eval_rows]) + "\n")
    runs = {"plain": ["--no-packing", "--token-budget", "0"], "packed": ["--set", f"token_budget={args.token_budget}", "--set", "packing=true",
                                    "--set", "per_device_batch_size=1"]}
    result = {"model": args.model_dir, "profile": args.profile, "train_rows": args.rows, "eval_rows": args.eval_rows,
              "token_budget": args.token_budget, "runs": {}}
    accum = {"packed": args.accum, "plain": args.accum}
    for name in ("packed", "plain"):
        extra = runs[name]
        if name not in args.runs.split(","):
            continue
        if name == "plain" and "packed" in result["runs"] and result["runs"]["packed"]["optimizer_steps"]:
            accum["plain"] = max(1, round(args.rows / result["runs"]["packed"]["optimizer_steps"]))
        cmd = [sys.executable, "-m", "swft_lite.cli", "train", "--profile", args.profile, "--model", args.model_dir,
               "--data", str(train_file), "--eval-data", str(eval_file), "--backend", "unsloth", "--no-merge",
               "--set", "num_epochs=1", "--set", f"gradient_accumulation_steps={accum[name]}",
               "--eval-steps", str(args.eval_steps), "--save-steps", "100000", "--output-root", str(work / "runs"),
               "--run-name", name, "--overwrite", *extra]
        t0 = time.monotonic()
        with (work / f"losses-{name}.log").open("w") as fh:
            rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT).returncode
        record_file = work / "runs" / name / "run.json"
        record = json.loads(record_file.read_text()) if record_file.exists() else {}
        steps = max([x["step"] for x in record.get("losses", [])] or [1])
        result["runs"][name] = {"rc": rc, "wall": round(time.monotonic() - t0, 1), "optimizer_steps": steps,
                                "gradient_accumulation_steps": accum[name],
                                "eval_losses": [{"epoch_fraction": round(e["step"] / steps, 3), **e}
                                                for e in record.get("eval_losses", [])],
                                "losses": record.get("losses"), "plan": record.get("plan")}
        if rc:
            print((work / f"losses-{name}.log").read_text()[-3000:], flush=True)
    (out / "loss_agreement.json").write_text(json.dumps(result, indent=2, default=str))
    for name, r in result["runs"].items():
        print(f"losses: {name}: rc {r['rc']}, {r['optimizer_steps']} steps, {r['wall']} s, eval "
              + ", ".join(f"{e['epoch_fraction']:.2f}:{e['eval_loss']:.4f}" for e in r["eval_losses"]), flush=True)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--out", type=Path, default=REPO / ".device" / "bench-data")
    d.add_argument("--rows", type=int, default=400)
    d.add_argument("--seed", type=int, default=0)
    r = sub.add_parser("run")
    r.add_argument("specs", nargs="+")
    r.add_argument("--data", default=str(REPO / ".device" / "bench-data"))
    r.add_argument("--model-dir", default="/tmp/gptoss-full")
    r.add_argument("--work", default="/tmp/swft-lengths")
    r.add_argument("--out", default=None)
    r.add_argument("--steps", type=int, default=8)
    r.add_argument("--max-accum", type=int, default=2)
    r.add_argument("--time-budget", type=float, default=540)
    lo = sub.add_parser("losses")
    lo.add_argument("--data", default=str(REPO / ".device" / "bench-data" / "variable.jsonl"))
    lo.add_argument("--model-dir", default="/tmp/gptoss-2l")
    lo.add_argument("--profile", default="h100")
    lo.add_argument("--rows", type=int, default=160)
    lo.add_argument("--eval-rows", type=int, default=16)
    lo.add_argument("--token-budget", type=int, default=8192)
    lo.add_argument("--accum", type=int, default=4)
    lo.add_argument("--eval-steps", type=int, default=5)
    lo.add_argument("--work", default="/tmp/swft-losses")
    lo.add_argument("--runs", default="plain,packed")
    lo.add_argument("--out", default=None)
    p = sub.add_parser("report")
    p.add_argument("--results", default=str(REPO / "benchmarks" / "lengths.json"))
    p.add_argument("--markdown", default=str(REPO / "benchmarks" / "RESULTS_LENGTHS.md"))
    args = ap.parse_args(argv)
    return {"data": cmd_data, "run": cmd_run, "report": cmd_report, "losses": cmd_losses}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
