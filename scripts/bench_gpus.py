"""Data-parallel benchmark: the same profile on 1 and on 2 GPUs (nvidia-h200-x2), through `swft-lite train --gpus N`.

    python scripts/bench_gpus.py --dry-run          the commands it would run (works on a CPU machine)
    python scripts/bench_gpus.py                    rtx4090 and h100, 1 and 2 GPUs, full gpt-oss-20b shape

For each profile and N: `swft-lite train --profile P --gpus N --max-steps S --no-merge` on rows as long as the
profile's sequence length, every process's CUDA allocator capped at the profile's card limit (22.5 GiB for 24 GB,
76 for 80 GB; scripts/bench_gpus_cap/sitecustomize.py, which also writes each rank's peak memory at exit). Results:
tokens/s of the whole run (rank 0's median tokens/s x N: every rank trains as many passes of the same shape),
scaling (2-GPU tokens/s over 1-GPU), peak allocated/reserved per GPU; appended to benchmarks/gpus.json.

The model and data are bench.py's: its `--build` of the full shape into --model-dir (done here when the folder has
no .complete marker; tokenizer files from ../shared/models/gpt-oss-20b or the carried .device/gpt-oss-20b, as
bench.py), and make_synthetic_data.py rows of each profile's sequence length.
NOT RUN YET: no multi-GPU machine was lent (see README, "Several GPUs").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CAP_DIR = REPO / "scripts" / "bench_gpus_cap"
PROFILES = ("rtx4090", "h100")


def train_command(profile: str, gpus: int, model: str, data: str, root: str, steps: int) -> list[str]:
    return [sys.executable, "-m", "swft_lite.cli", "train", "--profile", profile, "--gpus", str(gpus),
            "--model", model, "--data", data, "--output-root", root, "--run-name", f"{profile}-{gpus}gpu",
            "--overwrite", "--max-steps", str(steps), "--save-steps", "100000", "--no-merge", "--backend", "unsloth"]


def cap_env(cap_gib: float, peaks_dir: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(CAP_DIR), str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["SWFT_BENCH_CAP_GIB"] = str(cap_gib)
    env["SWFT_BENCH_PEAKS"] = str(peaks_dir)
    return env


def summarise(runs: list[dict]) -> list[dict]:
    """One row per profile: tokens/s on 1 and 2 GPUs, scaling and its efficiency, peak memory per GPU."""
    rows = []
    for profile in sorted({r["profile"] for r in runs}):
        by_n = {r["gpus"]: r for r in runs if r["profile"] == profile and r.get("tokens_per_second")}
        one, two = by_n.get(1), by_n.get(2)
        scaling = two["tokens_per_second"] / one["tokens_per_second"] if one and two else None
        rows.append({"profile": profile,
                     "tokens_per_second_1": one and one["tokens_per_second"],
                     "tokens_per_second_2": two and two["tokens_per_second"],
                     "scaling": None if scaling is None else round(scaling, 3),
                     "efficiency": None if scaling is None else round(scaling / 2, 3),
                     "meets_1_8x": None if scaling is None else scaling >= 1.8,
                     "peak_reserved_gib_per_gpu": {n: r.get("peak_reserved_gib") for n, r in sorted(by_n.items())}})
    return rows


def read_run(run_dir: Path, peaks_dir: Path, profile: str, gpus: int, cap: float) -> dict:
    record = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
    peaks = [json.loads(p.read_text()) for p in sorted(peaks_dir.glob("peak-rank*.json"))]
    rank0 = record.get("tokens_per_second_median")
    return {"profile": profile, "gpus": gpus, "cap_gib": cap, "status": record.get("status"),
            "tokens_per_second_rank0": rank0, "tokens_per_second": None if rank0 is None else rank0 * gpus,
            "peak_reserved_gib": [p["peak_reserved_gib"] for p in peaks],
            "peak_allocated_gib": [p["peak_allocated_gib"] for p in peaks],
            "date": datetime.now(timezone.utc).isoformat()}


def main(argv=None) -> int:
    from swft_lite.estimate import headroom_limit
    from swft_lite.profiles import load_profile

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--profiles", nargs="*", default=list(PROFILES))
    ap.add_argument("--gpus", nargs="*", type=int, default=[1, 2])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--model-dir", default="/tmp/gptoss-full")
    ap.add_argument("--work", default="/tmp/swft-bench-gpus")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "gpus.json"))
    args = ap.parse_args(argv)
    work = Path(args.work)
    if not args.dry_run and not (Path(args.model_dir) / ".complete").exists():
        # bench.py's full-shape random model (its --build), from the tokenizer folder it looks for
        sys.path.insert(0, str(REPO / "scripts"))
        import bench

        tok = next((p for p in (REPO.parent / "shared" / "models" / "gpt-oss-20b", REPO / ".device" / "gpt-oss-20b")
                    if p.exists()), None)
        if tok is None:
            raise SystemExit("bench_gpus: no tokenizer folder (../shared/models/gpt-oss-20b or .device/gpt-oss-20b)")
        bench.prepare_model_source(tok, work, None)
        subprocess.run([sys.executable, str(REPO / "scripts" / "bench.py"), "--build", "--model-dir", args.model_dir,
                        "--work", str(work)], check=True)
    runs = []
    for name in args.profiles:
        profile = load_profile(name)
        cap = headroom_limit(profile.vram_budget_gib)
        data = work / f"data-{profile.max_seq_length}.jsonl"
        if not args.dry_run and not data.exists():
            work.mkdir(parents=True, exist_ok=True)
            rows = profile.per_device_batch_size * profile.gradient_accumulation_steps * max(args.gpus) * args.steps
            subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_data.py"), "--rows", str(rows),
                            "--tokens", str(profile.max_seq_length), "--out", str(data)], check=True)
        for n in args.gpus:
            cmd = train_command(name, n, args.model_dir, str(data), str(work / "runs"), args.steps)
            print(f"{name} on {n} GPU(s), cap {cap:g} GiB each: {' '.join(cmd)}")
            if args.dry_run:
                continue
            peaks = work / "peaks" / f"{name}-{n}"
            peaks.mkdir(parents=True, exist_ok=True)
            subprocess.run(cmd, env=cap_env(cap, peaks), check=False)
            runs.append(read_run(work / "runs" / f"{name}-{n}gpu", peaks, name, n, cap))
    if args.dry_run:
        return 0
    out = Path(args.results)
    previous = json.loads(out.read_text()) if out.exists() else {"runs": []}
    doc = {"runs": previous["runs"] + runs, "summary": summarise(previous["runs"] + runs)}
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["summary"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
