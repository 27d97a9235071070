"""GPU benchmark of swft-lite's own training path, profile by profile: peak memory, speed, MFU, estimate vs measured.

    python scripts/bench.py --dry-run                          the plan: configs, estimates, memory caps, time
    python scripts/bench.py                                    rtx4070, rtx4090 (= rtx3090's settings), h100
    python scripts/bench.py h100:load_in_4bit=true plan-20     extra variants: PROFILE:key=value,... or plan-GIB
    python scripts/bench.py --backends raw                     the same configs through raw Unsloth
    python scripts/bench.py --layers 2 --steps 3               a quick smoke test on a 2-layer model
    python scripts/bench.py h100@exact h100@variable           one profile on full rows and on real-length chats

What it does, in one command (keep it under the device's 10-minute limit: --time-budget, default 540 s):
1. builds the full gpt-oss-20b architecture with random bf16 weights directly on the GPU and saves it as ONE
   safetensors file (default /tmp/gptoss-full, ~42 GB; kept and reused when it is already there);
2. writes synthetic chat rows whose rendered length is within 1 % below each profile's max_seq_length
   (scripts/make_synthetic_data.py), so a "4096-token" run trains ~4096 tokens per row - and, for a config asked
   for with "@variable" (or every config with --data-kinds exact,variable), chats whose lengths vary as a real
   SFT set's do (make_synthetic_data.py --variable: median ~28 % of max_seq_length): what users' data costs;
3. runs every config in a fresh subprocess (`--one`) that caps the CUDA caching allocator at the profile's
   headroom limit (torch.cuda.set_per_process_memory_fraction before any CUDA allocation: 14.5 GiB for a 16 GB
   profile, 22.5 for 24 GB, 76 for 80 GB), so a profile that passes here cannot exceed that on the real card, then
   calls swft_lite.train.train(...) - the same code `swft-lite train` runs - with --no-merge and a few steps;
   the same settings go through the plain `hf` backend where the estimate says its allocations fit the cap, and
   with `--backends raw` through raw Unsloth (scripts/raw_unsloth.py, no swft-lite code in the loop: the
   wrapper's cost);
   an out-of-memory is recorded as a result ("oom"), not a crash, and a config that no longer fits in the time
   budget is recorded as "skipped";
4. appends one record per run to benchmarks/results.json (the schema of the calibration records, source
   "scripts/bench.py"), writes benchmarks/RESULTS.md, prints the table and the refitted estimator coefficients.
   When $OUT is set (the device machine), copies of both files and the run logs go there too.

On the lent GPU machine (../shared/gpu/README.md: pack, prelude, $OUT) ../shared does not travel: put the vocabulary
and the tokenizer into the carried .device/ folder first (the tokenizer.json may go gzipped: 4.5 MB instead of 28):
    D=.device/gpt-oss-20b; S=../shared/models/gpt-oss-20b; mkdir -p $D && cp -r ../shared/tiktoken .device/
    cp $S/tokenizer_config.json $S/special_tokens_map.json $S/chat_template.jinja $D/
    gzip -9 -c $S/tokenizer.json > $D/tokenizer.json.gz
and read the results from $OUT/benchmarks/ (copy them over benchmarks/ here) and the logs from $OUT/bench-logs/.

Gradient accumulation is capped at --max-accum (default 2) to keep the runs short: gradients are live from the
second micro-batch on either way, so peak memory and tokens/s are those of the profile's 4 or 8.

Caveat: the cap limits what PyTorch allocates, but torch.cuda.mem_get_info still reports the whole card, and Unsloth
sizes some chunks (fused cross-entropy, tiled MLP) from the free memory it reports - capped at a few GiB - so on a
big card those chunks can be larger than on the real small card: the measured peak is an upper bound for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from swft_lite import estimate as est  # noqa: E402  (light: no torch)
from swft_lite.profiles import Profile, load_profile, parse_override  # noqa: E402
from swft_lite.run_folder import RunFolder  # noqa: E402

GIB = 1024**3
SOURCE = "scripts/bench.py"
DEFAULT_PROFILES = ["rtx4070", "rtx4090", "h100"]   # rtx3090 has rtx4090's settings: run once
DATA_KINDS = ("exact", "variable")
VARIABLE_ROWS = 400  # real-length chats per data file: enough for a few packed steps of any profile
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "UNSLOTH_DISABLE_STATISTICS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
# Rough wall-clock costs used to plan within --time-budget (seconds): model build, one data file, one run's fixed
# part (start, imports, model load, first-step compile) and per-token training time.
BUILD_SECONDS = {True: 90, False: 30}           # full shape / reduced depth (data is made meanwhile)
DATA_SECONDS = 20
RUN_FIXED_SECONDS = {"unsloth": 75, "raw": 75, "hf": 60}
RUN_TOKENS_PER_SECOND = {"unsloth": 10000, "raw": 10000, "hf": 2000}
# backend -> the record's "stack" and the estimator's stack. "raw" is Unsloth as its own notebook drives it
# (scripts/raw_unsloth.py): the baseline for swft-lite's wrapper cost; its records do not calibrate the estimate.
RECORD_STACK = {"unsloth": "unsloth", "raw": "raw-unsloth", "hf": "hf"}
ESTIMATE_STACK = {"unsloth": "unsloth", "raw": "unsloth", "hf": "hf"}


# --- configs -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Config:
    label: str                  # what was asked: "h100", "h100:load_in_4bit=true", "plan-20"
    profile: Profile
    backend: str                # unsloth | raw | hf
    steps: int
    estimate: est.Estimate
    cap_gib: float              # memory cap = headroom limit of the profile's card
    run: bool = True
    reason: str = ""            # why it is skipped
    data_kind: str = "exact"    # exact: every row ~max_seq_length tokens; variable: real-length chats

    @property
    def key(self) -> str:
        return (f"{self.label}-{self.backend}-{self.data_kind}".replace(":", "_").replace("=", "-")
                .replace(",", "_").replace("@", "-"))

    @property
    def tokens_per_step(self) -> int:
        p = self.profile
        return p.max_seq_length * p.per_device_batch_size * p.gradient_accumulation_steps


def resolve_spec(spec: str) -> Profile:
    """"rtx4090", "h100:load_in_4bit=true,lora_targets=attention", or "plan-20" (estimate.plan_for_card(20))."""
    if spec.startswith("plan-"):
        return est.plan_for_card(float(spec[5:]))
    name, _, rest = spec.partition(":")
    overrides = dict(parse_override(t) for t in rest.split(",") if t.strip())
    profile = load_profile(name, overrides)
    if rest:
        profile = dataclasses.replace(profile, name=spec)
    return profile


def plan_configs(args, shape: est.ModelShape) -> list[Config]:
    kinds = [k.strip() for k in args.data_kinds.split(",") if k.strip()]
    specs = []
    for spec in list(args.profiles or DEFAULT_PROFILES) + list(args.variants):
        name, _, kind = spec.partition("@")
        specs += [(name, kind)] if kind else [(name, k) for k in kinds]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    configs, raw, hf = [], [], []
    for spec, kind in specs:
        if kind not in DATA_KINDS:
            raise SystemExit(f"bench: {spec}@{kind}: data kind must be one of {', '.join(DATA_KINDS)}")
        profile = resolve_spec(spec)
        if args.max_accum and profile.gradient_accumulation_steps > args.max_accum:
            profile = dataclasses.replace(profile, gradient_accumulation_steps=args.max_accum)
        cap = est.headroom_limit(profile.vram_budget_gib)
        if "unsloth" in backends:
            e = est.estimate(profile, shape, stack="unsloth")
            configs.append(Config(spec, profile, "unsloth", args.steps, e, cap, data_kind=kind))
        if "raw" in backends:
            raw.append(Config(spec, profile, "raw", args.steps, est.estimate(profile, shape, stack="unsloth"), cap,
                              data_kind=kind))
        if "hf" not in backends:
            continue
        e_hf = est.estimate(profile, shape, stack="hf")
        c = Config(spec, profile, "hf", args.hf_steps, e_hf, cap, data_kind=kind)
        # "Where it fits": the estimated allocations fit the cap (hf's reserved-memory estimate extrapolates a
        # large fragmentation gap from two measurements; the cap turns a wrong guess into an "oom" record).
        if e_hf.total_gib > cap:
            c.run, c.reason = False, f"estimate {e_hf.total_gib:.1f} GiB allocated > {cap:g} GiB cap"
        hf.append(c)
    return configs + raw + hf  # the hf runs last: slower, and secondary


def expected_seconds(c: Config) -> float:
    return RUN_FIXED_SECONDS[c.backend] + c.steps * c.tokens_per_step / RUN_TOKENS_PER_SECOND[c.backend]


# --- the child: one training run under a memory cap ----------------------------------------------------------------


def run_one(args) -> int:
    """Runs in a fresh process. The cap is set before anything touches CUDA memory."""
    import torch

    result: dict = {"status": "error", "label": args.label, "backend": args.backend, "cap_gib": args.cap_gib}
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory  # no allocation
        fraction = min(1.0, args.cap_gib * GIB / total)
        torch.cuda.set_per_process_memory_fraction(fraction, 0)
        result.update(gpu=torch.cuda.get_device_name(0), gpu_total_gib=round(total / GIB, 2),
                      memory_fraction=round(fraction, 4))
    out = Path(args.result)

    from swft_lite.train import TrainOptions, train

    profile = Profile(**json.loads(args.profile_json))
    if args.backend == "raw":
        return run_one_raw(args, profile, result, out)
    options = TrainOptions(model=args.model, data=args.data, max_steps=args.steps, merge=False,
                           backend=args.backend, output_root=args.output_root, run_name=args.run_name,
                           save_steps=10**6, logging_steps=1, overwrite=True)
    run_dir = options.run_dir(profile)
    run = RunFolder(run_dir)
    t0 = time.perf_counter()
    try:
        train(profile, options, echo=print)
        result["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded result
        text = f"{type(exc).__name__}: {exc}"
        oom = isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower()
        record = run.record_or_empty()
        if record.get("status") == "out_of_memory" or oom:
            result["status"] = "oom"
            result["oom_phase"] = "train" if "load_seconds" in record else "load"
        result["error"] = text[:2000]
        print(f"bench: {result['status']}: {text[:500]}", file=sys.stderr)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    record = run.record_or_empty()
    if torch.cuda.is_available():
        result["max_allocated_gib_at_exit"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
        result["max_reserved_gib_at_exit"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
    train_split = (record.get("data") or {}).get("splits", {}).get("train", {})
    result.update({
        "peak_allocated_gib": record.get("peak_memory_gib"), "peak_reserved_gib": record.get("peak_reserved_gib"),
        "tokens_per_second": record.get("tokens_per_second_median"),
        "tokens_per_second_samples": record.get("tokens_per_second"), "global_step": record.get("global_step"),
        "load_seconds": record.get("load_seconds"), "train_seconds": record.get("train_seconds"),
        "trainable_params": (record.get("adapters") or {}).get("trainable"),
        "rows": train_split.get("kept"), "tokens_total": train_split.get("tokens_total"),
        "losses": [x["loss"] for x in record.get("losses", [])], "packages": record.get("packages"),
        "padding_fraction": record.get("padding_fraction"),
        "run_dir": str(run_dir),
    })
    if result["status"] == "oom" and result.get("peak_allocated_gib") is None:
        result["peak_allocated_gib"] = result.get("max_allocated_gib_at_exit")
        result["peak_reserved_gib"] = result.get("max_reserved_gib_at_exit")
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def run_one_raw(args, profile: Profile, result: dict, out: Path) -> int:
    """The same settings through raw Unsloth (scripts/raw_unsloth.py), under the same memory cap."""
    import torch

    sys.path.insert(0, str(REPO / "scripts"))
    t0 = time.perf_counter()
    try:
        from raw_unsloth import train_raw

        from swft_lite.backends import unsloth_gradient_checkpointing

        raw = train_raw(args.model, args.data, seq=profile.max_seq_length, batch=profile.per_device_batch_size,
                        accum=profile.gradient_accumulation_steps, steps=args.steps, rank=profile.lora_rank,
                        alpha=profile.lora_alpha, targets=profile.lora_targets, four_bit=profile.load_in_4bit,
                        optimizer=profile.optimizer, learning_rate=profile.learning_rate,
                        gradient_checkpointing=unsloth_gradient_checkpointing(profile))
        result.update(status="ok", peak_allocated_gib=raw["peak_memory_gib"],
                      peak_reserved_gib=raw["peak_reserved_gib"], tokens_per_second=raw["tokens_per_second_median"],
                      tokens_per_second_samples=raw["tokens_per_second"], global_step=raw["global_step"],
                      train_seconds=raw["train_seconds"], trainable_params=raw["trainable_params"],
                      rows=raw["rows"], tokens_total=raw["tokens_total"])
    except Exception as exc:  # noqa: BLE001 - every failure becomes a recorded result
        text = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in text.lower():
            result["status"] = "oom"
            result["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            result["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
        result["error"] = text[:2000]
        print(f"bench: {result['status']}: {text[:500]}", file=sys.stderr)
    result["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out.write_text(json.dumps(result, indent=2, default=str))
    return 0


def _read_json(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


# --- the child: build the random model -----------------------------------------------------------------------------


def build_model(args) -> int:
    """Random-init gpt-oss of the real shape (or --layers N), built in bf16 on the GPU and saved as one file."""
    import torch

    from swft_lite.random_model import save_random_gpt_oss

    out = Path(args.model_dir)
    src = Path(args.work) / "model-source"
    t0 = time.perf_counter()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.set_default_dtype(torch.bfloat16)
    size = {"num_layers": args.layers} if args.layers else {}
    if args.tiny:  # plumbing test on CPU: the reduced width of tests/conftest.py
        size.update(hidden_size=64, num_experts=4, experts_per_token=2, num_heads=4, num_kv_heads=2, head_dim=16)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.device(device):
        save_random_gpt_oss(tmp, src, seed=0, dtype=torch.bfloat16, max_shard_size="1000GB", **size)
    files = sorted(p.name for p in tmp.glob("*.safetensors"))
    if len(files) != 1:
        raise SystemExit(f"expected one safetensors file, got {files}")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    (out / ".complete").write_text(json.dumps({"seconds": round(time.perf_counter() - t0, 1), "size": size}))
    print(f"bench: built {out} in {time.perf_counter() - t0:.0f} s ({device})")
    return 0


def prepare_model_source(tokenizer_dir: Path, work: Path, shape_layers: int | None) -> Path:
    """A folder like a hub download without weights: the built-in gpt-oss-20b config and the tokenizer files
    (tokenizer.json may be carried gzipped: tokenizer.json.gz, 4.5 MB instead of 28)."""
    src = work / "model-source"
    src.mkdir(parents=True, exist_ok=True)
    (src / "config.json").write_text(json.dumps(est.GPT_OSS_20B_CONFIG, indent=2))
    for name in TOKENIZER_FILES:
        p = tokenizer_dir / name
        if p.exists():
            shutil.copy(p, src / name)
        elif (tokenizer_dir / (name + ".gz")).exists():
            with gzip.open(tokenizer_dir / (name + ".gz"), "rb") as fin, open(src / name, "wb") as fout:
                shutil.copyfileobj(fin, fout)
        elif name in ("tokenizer.json", "tokenizer_config.json"):
            raise SystemExit(f"bench: {tokenizer_dir} lacks {name} (or {name}.gz); pass --tokenizer-dir")
    return src


def default_tiktoken_dir() -> Path | None:
    """openai-harmony reads its vocabulary from TIKTOKEN_ENCODINGS_BASE when offline."""
    for d in (os.environ.get("SWFT_SHARED") and Path(os.environ["SWFT_SHARED"]) / "tiktoken",
              REPO.parent / "shared" / "tiktoken", REPO / ".device" / "tiktoken"):
        if d and (Path(d) / "o200k_base.tiktoken").exists():
            return Path(d)
    return None


def default_tokenizer_dir() -> Path:
    for d in (os.environ.get("SWFT_SHARED") and Path(os.environ["SWFT_SHARED"]) / "models" / "gpt-oss-20b",
              REPO.parent / "shared" / "models" / "gpt-oss-20b", REPO / ".device" / "gpt-oss-20b"):
        if d and (Path(d) / "tokenizer_config.json").exists():
            return Path(d)
    return REPO / ".device" / "gpt-oss-20b"


# --- the parent ----------------------------------------------------------------------------------------------------


class Clock:
    def __init__(self, budget: float):
        self.t0, self.budget = time.monotonic(), budget

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    @property
    def left(self) -> float:
        return self.budget - self.elapsed


def start_child(cmd: list[str], log: Path) -> subprocess.Popen:
    """A child in its own process group (so a timeout can stop it and everything it started), output to `log`."""
    env = {**os.environ, **{k: v for k, v in CHILD_ENV.items() if k not in os.environ}}
    tiktoken = default_tiktoken_dir()
    if "TIKTOKEN_ENCODINGS_BASE" not in env and tiktoken is not None:
        env["TIKTOKEN_ENCODINGS_BASE"] = str(tiktoken)
    with open(log, "w") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)


def stop_child(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def wait_child(proc: subprocess.Popen, timeout: float) -> int | None:
    """The child's exit status, or None when it ran past `timeout` seconds (then it is stopped)."""
    try:
        return proc.wait(timeout=max(1.0, timeout))
    except subprocess.TimeoutExpired:
        stop_child(proc)
        return None


def child(cmd: list[str], log: Path, timeout: float) -> tuple[int | None, float]:
    """Run a child to the end or `timeout`: (exit status or None on timeout, seconds)."""
    t0 = time.monotonic()
    rc = wait_child(start_child(cmd, log), timeout)
    return rc, time.monotonic() - t0


def tail(p: Path, n: int = 25) -> str:
    try:
        return "\n".join(p.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def make_record(c: Config, res: dict, shape: est.ModelShape, args) -> dict:
    p = c.profile
    rows, tokens_total = res.get("rows"), res.get("tokens_total")
    per_row = round(tokens_total / rows) if rows and tokens_total else p.max_seq_length
    tokens_per_step = per_row * p.per_device_batch_size * p.gradient_accumulation_steps
    tps = res.get("tokens_per_second")
    measured = {"peak_allocated_gib": res.get("peak_allocated_gib"), "peak_reserved_gib": res.get("peak_reserved_gib")}
    e = est.estimate(p, shape, stack=ESTIMATE_STACK[c.backend], tokens=per_row * p.per_device_batch_size)
    variable = c.data_kind == "variable"
    return {
        "data_kind": c.data_kind, "token_budget": p.token_budget, "packing": p.packing,
        "padding_fraction": res.get("padding_fraction"),
        # rows of varying length: a pass's tokens vary, so the record cannot calibrate the memory estimate
        **({"calibrates": False, "why_not": "variable-length rows"} if variable else {}),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"), "gpu": res.get("gpu") or args.gpu_name,
        "stack": RECORD_STACK[c.backend], "model": shape.to_record(), "four_bit": p.load_in_4bit,
        "targets": p.lora_targets,
        "rank": p.lora_rank, "seq": per_row, "batch": p.per_device_batch_size,
        "grad_accum": p.gradient_accumulation_steps, "tokens_per_step": tokens_per_step, **measured,
        "tokens_per_second": None if tps is None else round(tps, 1),
        "step_seconds": None if not tps or variable else round(tokens_per_step / tps, 3),
        "optimizer": p.optimizer,
        # the hf backend recomputes with plain (non-reentrant) checkpointing whenever the profile asks for any
        "gradient_checkpointing": ("true" if c.backend == "hf" and p.gradient_checkpointing == "unsloth"
                                   else p.gradient_checkpointing),
        "trainable_params": res.get("trainable_params"),
        "mfu": None if not tps else round(6 * shape.active_params * tps / (args.peak_tflops * 1e12), 4),
        "profile": c.label, "max_seq_length": p.max_seq_length, "steps": res.get("global_step"),
        "status": res.get("status", "error"), "reason": res.get("reason") or res.get("error", "")[:300] or None,
        "headroom_limit_gib": c.cap_gib, "memory_fraction": res.get("memory_fraction"),
        "estimate_allocated_gib": e.total_gib, "estimate_reserved_gib": e.reserved_gib,
        "load_seconds": res.get("load_seconds"), "source": SOURCE,
        "note": ("scripts/raw_unsloth.py train_raw" if c.backend == "raw" else
                 f"swft_lite.train.train, backend {c.backend}")
        + f", {c.steps} steps, logging each step; tokens/s = median over steps after the first; peak MFU basis "
          f"{args.peak_tflops:g} TFLOP/s",
    }


def skipped_record(c: Config, shape: est.ModelShape, args, reason: str, status: str = "skipped") -> dict:
    return make_record(c, {"status": status, "reason": reason}, shape, args)


def write_outputs(base: dict, new: list[dict], args) -> tuple[Path, Path]:
    """The results file as it was when the bench started (`base`) plus this run's records; written after every
    run, so a bench stopped from outside keeps what it measured."""
    results = Path(args.results)
    doc = {**base, "records": base["records"] + new}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(doc, indent=1) + "\n")
    md = Path(args.markdown)
    md.write_text(markdown(doc["records"], new))
    out = os.environ.get("OUT")
    if out:
        dest = Path(out) / "benchmarks"
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(results, dest / "results.json")
        shutil.copy(md, dest / "RESULTS.md")
    return results, md


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def table(records: list[dict]) -> str:
    head = ("profile", "stack", "settings", "tokens/step", "peak alloc (reserved) GiB", "limit GiB", "tokens/s",
            "MFU", "step s", "estimate alloc (reserved) GiB", "error", "status")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        m = r.get("model", {})
        settings = (f"L{m.get('layers')} {'4-bit' if r['four_bit'] else 'bf16'} r{r['rank']} {r['targets']}, "
                    f"{r['batch']}x{r['seq']}" + (f" x{r['grad_accum']}" if r.get("grad_accum", 1) > 1 else "")
                    + batching_note(r))
        alloc, res = r.get("peak_allocated_gib"), r.get("peak_reserved_gib")
        ea, er = r.get("estimate_allocated_gib"), r.get("estimate_reserved_gib")
        if r.get("status", "ok") == "ok" and r["stack"] in RECORD_STACK.values():
            # today's coefficients, not those of the day the record was made
            e = est.record_estimate({**r, "stack": "unsloth" if r["stack"] == "raw-unsloth" else r["stack"]})
            ea, er = e.total_gib, e.reserved_gib
        err = "-" if not alloc or ea is None or r.get("status", "ok") != "ok" else f"{100 * (ea / alloc - 1):+.1f} %"
        lines.append("| " + " | ".join([
            str(r.get("profile") or "-"), r["stack"], settings, str(r.get("tokens_per_step")),
            f"{_fmt(alloc, '.2f')} ({_fmt(res, '.2f')})", _fmt(r.get("headroom_limit_gib"), "g"),
            _fmt(r.get("tokens_per_second"), ".0f"), _fmt(r.get("mfu") and 100 * r["mfu"], ".1f") +
            ("" if r.get("mfu") is None else " %"), _fmt(r.get("step_seconds"), ".2f"),
            f"{_fmt(ea, '.2f')} ({_fmt(er, '.2f')})", err,
            r.get("status", "ok") + (f": {r['reason'][:60]}".replace("|", "/").replace("\n", " ")
                                     if r.get("reason") and r.get("status") != "ok" else ""),
        ]) + " |")
    return "\n".join(lines)


def batching_note(r: dict) -> str:
    mode = (f", packed {r['token_budget']}" if r.get("packing") else
            f", budget {r['token_budget']}" if r.get("token_budget") else "")
    return mode + (", real-length chats (seq = mean)" if r.get("data_kind") == "variable" else "")


def real_data_table(records: list[dict]) -> str:
    """Each config on real-length chats against the same config on full rows (newest run of each, same call)."""
    newest: dict[tuple[str, str, str], dict] = {}
    for r in records:
        if r.get("status") == "ok" and r.get("tokens_per_second") and r.get("source") == SOURCE:
            newest[(r.get("profile"), r["stack"], r.get("data_kind", "exact"))] = r
    lines = ["| config | stack | full rows tokens/s | real-length chats tokens/s | ratio | padding | "
             "peak alloc (reserved) GiB, chats | limit GiB | date |", "|---|---|---|---|---|---|---|---|---|"]
    for (label, stack, kind), var in newest.items():
        if kind != "variable":
            continue
        full = newest.get((label, stack, "exact"))
        pad = var.get("padding_fraction")
        lines.append(f"| {label} | {stack} | {_fmt(full and full['tokens_per_second'], '.0f')} | "
                     f"{var['tokens_per_second']:.0f} | "
                     f"{_fmt(full and var['tokens_per_second'] / full['tokens_per_second'], '.2f')} | "
                     f"{'-' if pad is None else f'{100 * pad:.1f} %'} | {_fmt(var.get('peak_allocated_gib'), '.2f')} "
                     f"({_fmt(var.get('peak_reserved_gib'), '.2f')}) | {_fmt(var.get('headroom_limit_gib'), 'g')} | "
                     f"{var['date']} |")
    return "\n".join(lines)


def comparisons(records: list[dict]) -> str:
    """swft-lite's Unsloth path against raw Unsloth and against the hf backend, config by config (same label, same
    settings), from the newest record of each (label, stack) that ran."""
    newest: dict[tuple[str, str], dict] = {}
    for r in records:
        if (r.get("status") == "ok" and r.get("tokens_per_second") and r.get("source") == SOURCE
                and r.get("data_kind", "exact") == "exact"):
            newest[(r.get("profile"), r["stack"])] = r
    lines = ["| config | swft-lite tokens/s | raw Unsloth tokens/s | swft-lite / raw | hf tokens/s | "
             "swft-lite / hf |", "|---|---|---|---|---|---|"]
    for (label, stack), ours in newest.items():
        if stack != "unsloth":
            continue
        raw, hf = newest.get((label, "raw-unsloth")), newest.get((label, "hf"))
        tps = ours["tokens_per_second"]
        lines.append(f"| {label} | {tps:.0f} | {_fmt(raw and raw['tokens_per_second'], '.0f')} | "
                     f"{_fmt(raw and tps / raw['tokens_per_second'], '.3f')} | "
                     f"{_fmt(hf and hf['tokens_per_second'], '.0f')} | "
                     f"{_fmt(hf and tps / hf['tokens_per_second'], '.2f')} |")
    return "\n".join(lines)


def shipped_profile_runs(records: list[dict]) -> list[tuple[Profile, dict | None]]:
    """Each shipped profile with the newest full-shape swft-lite run at its exact settings, or None."""
    from swft_lite.profiles import shipped_profile_names

    out = []
    for name in shipped_profile_names():
        p = load_profile(name)
        runs = est.bench_runs(p, records)
        out.append((p, runs[-1] if runs else None))
    return out


def profiles_table(records: list[dict]) -> str:
    lines = ["| profile | settings | measured peak alloc (reserved) GiB | limit GiB | estimate GiB | tokens/s | MFU "
             "| measured on |", "|---|---|---|---|---|---|---|---|"]
    for p, r in shipped_profile_runs(records):
        settings = (f"{'4-bit' if p.load_in_4bit else 'bf16'} r{p.lora_rank} {p.lora_targets}, "
                    f"{p.per_device_batch_size}x{p.max_seq_length}, recomputation {p.gradient_checkpointing}")
        if r is None:
            lines.append(f"| {p.name} | {settings} | not measured | - | - | - | - | - |")
            continue
        e = est.record_estimate(r)
        err = 100 * (e.total_gib / r["peak_allocated_gib"] - 1)
        lines.append(f"| {p.name} | {settings} | {r['peak_allocated_gib']:.2f} ({_fmt(r['peak_reserved_gib'], '.2f')})"
                     f" | {r['headroom_limit_gib']:g} | {e.total_gib:.2f} ({err:+.1f} %)"
                     f" | {r['tokens_per_second']:.0f} | {_fmt(r.get('mfu') and 100 * r['mfu'], '.1f')} % "
                     f"| {r['gpu']}, {r['date']} (as '{r['profile']}') |")
    return "\n".join(lines)


def markdown(all_records: list[dict], new: list[dict]) -> str:
    gpu = next((r["gpu"] for r in new if r.get("gpu")), "?")
    parts = [
        "# swft-lite benchmark results", "",
        "Written by `scripts/bench.py` from `benchmarks/results.json` (every record, newest run first). Memory is "
        "PyTorch's peak allocated (reserved) during training; the limit is the profile's headroom limit, enforced "
        "during the run with `torch.cuda.set_per_process_memory_fraction`. tokens/s counts real tokens (median over "
        "steps after the first); MFU = 6 x active params x tokens/s / peak bf16 FLOP/s. The estimate is "
        "`swft_lite.estimate` with the coefficients in the code at the time of writing.", "",
        "## The shipped profiles, measured", "",
        "Each profile at its own settings on the full gpt-oss-20b shape, with GPU memory capped at its card's "
        "headroom limit (newest matching run).", "", profiles_table(all_records), "",
        f"## Latest run ({new[0]['date'] if new else '-'}, {gpu})", "", table(new) if new else "(none)", "",
        "## Real-length chats against full rows (same config, newest run of each)", "",
        "Chats whose lengths vary as a real SFT set's (`make_synthetic_data.py --variable`) against rows of "
        "~max_seq_length tokens; tokens/s counts real tokens.", "", real_data_table(all_records), "",
        "## swft-lite against raw Unsloth and the hf backend (same settings, newest run of each)", "",
        comparisons(all_records), "",
        "## All records", "", table(list(reversed(all_records))), "",
    ]
    return "\n".join(parts)


def dry_run(configs: list[Config], args, shape: est.ModelShape) -> int:
    model_dir = Path(args.model_dir)
    print(f"bench plan (dry run: nothing is built, run or written); time budget {args.time_budget:g} s")
    built = (model_dir / ".complete").exists()
    print(f"model: {shape.describe()} -> {model_dir} "
          f"({'exists, reused' if built else f'built first, ~{BUILD_SECONDS[not args.layers]} s'})")
    print(f"tokenizer files from: {args.tokenizer_dir}")
    seqs = data_files(configs)
    for s, kind in seqs:
        rows = data_rows(configs, s, kind)
        what = f"rows of ~{s} tokens" if kind == "exact" else f"chats of varying length up to {s} tokens"
        print(f"data: {rows} {what} -> {Path(args.work) / data_name(s, kind)} (scripts/make_synthetic_data.py "
              f"--rows {rows} --tokens {s}{' --variable' if kind == 'variable' else ''}, while the model is built)")
    print(f"memory fraction on a {args.gpu_gib:g} GiB card = cap / card; MFU basis {args.peak_tflops:g} TFLOP/s\n")
    head = ("#", "config", "stack", "settings", "tokens/step", "estimate alloc (reserved) GiB", "cap GiB",
            "memory fraction", "steps", "~s", "plan")
    rows_out = [head]
    spent = max(0.0 if (model_dir / ".complete").exists() else BUILD_SECONDS[not args.layers],
                DATA_SECONDS * len(seqs))  # the data is written while the model is built
    for i, c in enumerate(configs, 1):
        p = c.profile
        secs = expected_seconds(c)
        if c.run and spent + secs > args.time_budget:
            plan = "skipped if out of time"
        else:
            plan = "run" if c.run else f"skip: {c.reason}"
        if c.run:
            spent += secs
        rows_out.append((str(i), f"{c.label}@{c.data_kind}", c.backend,
                         f"{'4-bit' if p.load_in_4bit else 'bf16'} r{p.lora_rank} {p.lora_targets} "
                         f"{p.per_device_batch_size}x{p.max_seq_length} x{p.gradient_accumulation_steps}",
                         str(c.tokens_per_step), f"{c.estimate.total_gib:.1f} ({c.estimate.reserved_gib:.1f})",
                         f"{c.cap_gib:g}", f"{min(1.0, c.cap_gib / args.gpu_gib):.3f}", str(c.steps),
                         f"{secs:.0f}", plan))
    widths = [max(len(r[i]) for r in rows_out) for i in range(len(head))]
    for r in rows_out:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    print(f"\nexpected total ~{spent:.0f} s of {args.time_budget:g} s. Each run: python scripts/bench.py --one ... "
          "(fresh process, memory fraction set before any CUDA allocation, then swft_lite.train.train).")
    print(f"results: appended to {args.results}, table in {args.markdown}"
          + (", copies under $OUT/benchmarks" if os.environ.get("OUT") else ""))
    return 0


def data_files(configs: list[Config]) -> list[tuple[int, str]]:
    return sorted({(c.profile.max_seq_length, c.data_kind) for c in configs if c.run})


def data_name(seq: int, kind: str) -> str:
    return f"data-{seq}.jsonl" if kind == "exact" else f"chats-{seq}.jsonl"


def data_rows(configs: list[Config], seq: int, kind: str = "exact") -> int:
    if kind == "variable":
        return VARIABLE_ROWS
    need = [c.steps * c.profile.per_device_batch_size * c.profile.gradient_accumulation_steps
            for c in configs if c.run and c.profile.max_seq_length == seq and c.data_kind == kind]
    return max(need) + 4 if need else 0


def main_parent(args) -> int:
    clock = Clock(args.time_budget)
    shape = dataclasses.replace(est.DEFAULT_SHAPE, layers=args.layers) if args.layers else est.DEFAULT_SHAPE
    if args.tiny:
        shape = dataclasses.replace(shape, hidden=64, intermediate=64, experts=4, experts_per_token=2, heads=4,
                                    kv_heads=2, head_dim=16)
    configs = plan_configs(args, shape)
    if args.dry_run:
        return dry_run(configs, args, shape)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    logs = Path(os.environ["OUT"]) / "bench-logs" if os.environ.get("OUT") else work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir)
    records: list[dict] = []
    results_path = Path(args.results)
    base = json.loads(results_path.read_text()) if results_path.exists() else {"schema": 1, "records": []}

    def finish(code: int) -> int:
        if records:
            results, md = write_outputs(base, records, args)
            print("\n" + table(records))
            print(f"\nbench: {len(records)} records appended to {results}; table in {md}; {clock.elapsed:.0f} s")
            try:
                allrec = est.load_records(results)
                fitted = est.fit_all(allrec)
                print("refitted coefficients (paste into swft_lite/estimate.py if they changed):")
                print(est.coefficients_source(fitted))
            except Exception as exc:  # noqa: BLE001
                print(f"bench: refit failed: {exc}")
        return code

    # 1. Data (CPU), one file per distinct (max_seq_length, kind), generated while the model is built (GPU + disk).
    data: dict[tuple[int, str], Path] = {}
    pending = []
    for seq, kind in data_files(configs):
        f = work / data_name(seq, kind)
        rows = data_rows(configs, seq, kind)
        data[seq, kind] = f
        if f.exists() and sum(1 for _ in f.open()) >= rows:
            continue
        cmd = [sys.executable, str(REPO / "scripts" / "make_synthetic_data.py"), "--rows", str(rows),
               "--tokens", str(seq), "--out", str(f)] + (["--variable"] if kind == "variable" else [])
        pending.append((f.stem, f, start_child(cmd, logs / f"{f.stem}.log"), time.monotonic()))

    # 2. The model.
    if not (model_dir / ".complete").exists():
        prepare_model_source(Path(args.tokenizer_dir), work, args.layers)
        cmd = [sys.executable, __file__, "--build", "--model-dir", str(model_dir), "--work", str(work)]
        cmd += ["--layers", str(args.layers)] if args.layers else []
        cmd += ["--tiny", "--cpu"] if args.tiny else []
        rc, secs = child(cmd, logs / "build.log", clock.left - 30)
        print(f"bench: model build rc={rc} in {secs:.0f} s")
        if rc != 0:
            print(tail(logs / "build.log"))
            for _, _, proc, _ in pending:
                stop_child(proc)
            return 1
    else:
        print(f"bench: reusing {model_dir}")
    shape = est.load_shape(model_dir)  # the records carry the shape that was actually built
    for stem, f, proc, t0 in pending:
        rc = wait_child(proc, clock.left - 30)
        log = logs / f"{stem}.log"
        print(f"bench: {stem}: rc={rc} in {time.monotonic() - t0:.0f} s: {tail(log, 1)}")
        if rc != 0:
            print(tail(log))
            return finish(1)

    # 3. The runs.
    for c in configs:
        if not c.run:
            records.append(skipped_record(c, shape, args, c.reason))
            print(f"bench: {c.key}: skipped ({c.reason})")
            continue
        need = min(expected_seconds(c), RUN_FIXED_SECONDS[c.backend])
        if clock.left - 15 < need:
            records.append(skipped_record(c, shape, args, f"time budget: {clock.left:.0f} s left of "
                                                          f"{args.time_budget:g}"))
            print(f"bench: {c.key}: skipped, out of time")
            continue
        result_file = work / f"result-{c.key}.json"
        result_file.unlink(missing_ok=True)
        cmd = [sys.executable, __file__, "--one", "--label", c.label, "--backend", c.backend,
               "--profile-json", json.dumps(c.profile.to_dict()), "--cap-gib", str(c.cap_gib),
               "--model", str(model_dir), "--data", str(data[c.profile.max_seq_length, c.data_kind]), "--steps", str(c.steps),
               "--output-root", str(work / "runs"), "--run-name", c.key, "--result", str(result_file)]
        rc, secs = child(cmd, logs / f"{c.key}.log", clock.left - 15)
        res = _read_json(result_file) or {"status": "timeout" if rc is None else "error",
                                          "reason": "time budget ran out during the run" if rc is None else
                                          f"child exited {rc}: {tail(logs / f'{c.key}.log', 3)}"}
        rec = make_record(c, res, shape, args)
        records.append(rec)
        write_outputs(base, records, args)
        print(f"bench: {c.key}: {rec['status']} in {secs:.0f} s: peak {rec['peak_allocated_gib']} "
              f"({rec['peak_reserved_gib']}) GiB, {rec['tokens_per_second']} tokens/s, estimate "
              f"{rec['estimate_allocated_gib']} ({rec['estimate_reserved_gib']})")
        if rec["status"] not in ("ok", "oom"):
            print(tail(logs / f"{c.key}.log"))
    return finish(0)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="*", metavar="CONFIG",
                    help="extra configs after the main set: PROFILE[:key=value,...] or plan-GIB")
    ap.add_argument("--profiles", nargs="*", default=None, metavar="CONFIG",
                    help=f"the main set (default: {' '.join(DEFAULT_PROFILES)})")
    ap.add_argument("--dry-run", action="store_true", help="print the plan; build, run and write nothing")
    ap.add_argument("--data-kinds", default="exact,variable",
                    help="data of each config without @KIND: exact (rows of ~max_seq_length tokens), variable "
                         "(real-length chats), or both (default)")
    ap.add_argument("--layers", type=int, default=None, help="reduced-depth model (smoke test)")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per unsloth run (logged every step)")
    ap.add_argument("--hf-steps", type=int, default=3, help="optimizer steps per hf run (slower stack)")
    ap.add_argument("--backends", default="unsloth,hf",
                    help="comma-separated: unsloth (swft-lite's path), raw (raw Unsloth, scripts/raw_unsloth.py, "
                         "the wrapper-cost baseline), hf (runs where its estimated allocations fit the cap); "
                         "default unsloth,hf")
    ap.add_argument("--max-accum", type=int, default=2,
                    help="cap gradient_accumulation_steps (default 2: gradients are live from the second micro-"
                         "batch on either way, so peak memory and tokens/s match the profile's 4 or 8 at a "
                         "quarter of the time; 0 keeps the profile's value)")
    ap.add_argument("--time-budget", type=float, default=540, help="seconds for everything (default 540)")
    ap.add_argument("--model-dir", default=None, help="default /tmp/gptoss-full, or /tmp/gptoss-<N>l with --layers")
    ap.add_argument("--tokenizer-dir", default=None, type=Path,
                    help="folder with tokenizer.json (or .json.gz), tokenizer_config.json, chat_template.jinja "
                         "(default: ../shared/models/gpt-oss-20b, else .device/gpt-oss-20b)")
    ap.add_argument("--work", default="/tmp/swft-bench", help="data, run folders, logs")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results.json"))
    ap.add_argument("--markdown", default=str(REPO / "benchmarks" / "RESULTS.md"))
    ap.add_argument("--peak-tflops", type=float, default=800.0,
                    help="bf16 matrix FLOP/s of the GPU for MFU (800: measured on the lent H100; 989 nominal)")
    ap.add_argument("--gpu-gib", type=float, default=79.19, help="card size used by --dry-run for the fraction")
    ap.add_argument("--gpu-name", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # CPU plumbing test: tiny width
    ap.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    # children
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--label", help=argparse.SUPPRESS)
    ap.add_argument("--backend", help=argparse.SUPPRESS)
    ap.add_argument("--profile-json", help=argparse.SUPPRESS)
    ap.add_argument("--cap-gib", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--output-root", help=argparse.SUPPRESS)
    ap.add_argument("--run-name", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.model_dir is None:
        args.model_dir = f"/tmp/gptoss-{args.layers}l" if args.layers else "/tmp/gptoss-full"
        if args.tiny:
            args.model_dir += "-tiny"
    if args.tokenizer_dir is None:
        args.tokenizer_dir = default_tokenizer_dir()
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one:
        return run_one(args)
    if args.build:
        return build_model(args)
    return main_parent(args)


if __name__ == "__main__":
    sys.exit(main())
