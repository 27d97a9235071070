"""`swft-lite chat` and `swft-lite eval` speed on the real-width gpt-oss (issue 14, "On the GPU"), through the CLI.

    python scripts/chat_eval_gpu.py                 on the lent GPU machine (after `. scripts/device_env.sh`)
    python scripts/chat_eval_gpu.py --cpu-smoke     the same steps on a tiny model on CPU (checks the script)

1. build   a 2-layer gpt-oss of the real width (hidden 2880, 32 experts, vocabulary 201,088), random bf16 weights,
           on the GPU, saved as one file; validation rows: the shipped sample conversations, cycled to --rows
2. train   `swft-lite train --backend unsloth --profile h100` for --steps steps on the sample set, with
           --eval-data and --eval-generate 2 (the generation-during-training path through Unsloth), then the
           verified merge (RUN/merged)
3. chat    `swft-lite chat RUN --prompt ... --json` twice (the second is warm): generation tokens/s of the merged
           model through transformers on the GPU, and the wall time of the whole command
4. eval    `swft-lite eval RUN --data val.jsonl --limit --rows --json`: total seconds, per row, tokens/s
5. gguf    only where llama_cpp imports: `swft-lite save-gguf RUN --quant q8_0` (checked), then chat and eval on the
           GGUF (eval's GGUF engine runs on the CPU; chat offloads every layer with --n-gpu-layers -1)

Random weights never emit <|return|>, so every answer runs to its max_new_tokens: the tokens/s are those of steady
generation at that length. Results: $OUT/chat_eval.json (or --out), one log per step under logs/, a summary last.
Every step runs in its own `python -m swft_lite.cli` process with a timeout inside --time-budget (default 540 s, under
the device's 10-minute limit); a step that fails or has no time left is recorded as such and the rest still run.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PROMPT = ("Document the request path of the order service: which components a POST /orders passes through, with a "
          "Mermaid flowchart.")
# CPU smoke: the tests' tiny gpt-oss (tests/conftest.py TINY_SIZE) and their CPU training flags.
TINY_SIZE = dict(num_layers=2, hidden_size=64, num_experts=4, experts_per_token=2, num_heads=4, num_kv_heads=2,
                 head_dim=16)
CPU_TRAIN = ["--profile", "rtx4070", "--backend", "hf", "--no-load-in-4bit", "--lora-targets", "attention",
             "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1", "--max-seq-length", "2048"]
GPU_TRAIN = ["--profile", "h100", "--backend", "unsloth", "--gradient-accumulation-steps", "2",
             "--max-seq-length", "4096"]


class Steps:
    def __init__(self, out: Path, budget: float):
        self.out, self.logs = out, out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + budget
        self.results: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cli(self, name: str, args: list, min_seconds: float = 20) -> tuple[int | None, str, float]:
        """Run `python -m swft_lite.cli ARGS`; (exit code or None when skipped/timed out, stdout, wall seconds)."""
        log = self.logs / f"{name}.log"
        if self.left() < min_seconds:
            self.results[name] = {"skipped": f"{self.left():.0f} s of the time budget left"}
            return None, "", 0.0
        cmd = [sys.executable, "-m", "swft_lite.cli", *map(str, args)]
        print(f"=== {name}: {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.left() - 5, cwd=REPO)
        except subprocess.TimeoutExpired as exc:
            log.write_text(f"$ {' '.join(cmd)}\n{exc.stdout or ''}\n--- stderr\n{exc.stderr or ''}")
            self.results[name] = {"error": f"timed out after {time.perf_counter() - t0:.0f} s"}
            return None, "", time.perf_counter() - t0
        wall = time.perf_counter() - t0
        log.write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n--- stderr\n{proc.stderr}")
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            self.results[name] = {"error": f"exit {proc.returncode}: {tail}", "wall_s": round(wall, 1)}
        return proc.returncode, proc.stdout, wall


def last_json(stdout: str):
    """The JSON document a --json command printed last on stdout (chat: one line; eval: one indented document)."""
    text = stdout.strip()
    starts = [0] + [k + 1 for k in range(len(text) - 1) if text[k] == "\n" and text[k + 1] == "{"]
    for i in reversed(starts):
        try:
            return json.loads(text[i:])
        except ValueError:
            continue
    return None


def build(work: Path, smoke: bool) -> tuple[Path, Path, dict]:
    import torch

    from swft_lite.data.sources import sample_path
    from swft_lite.random_model import save_random_gpt_oss

    model_files = os.environ.get("SWFT_SHARED_MODEL")  # device_env.sh: .device/gpt-oss-20b
    t0 = time.perf_counter()
    model_dir = work / "m2"
    if model_dir.exists():
        shutil.rmtree(model_dir)
    if smoke:
        save_random_gpt_oss(model_dir, model_files, seed=0, initializer_range=0.1, **TINY_SIZE)
    else:
        with torch.device("cuda"):
            save_random_gpt_oss(model_dir, model_files, num_layers=2, dtype=torch.bfloat16)
    build_s = time.perf_counter() - t0
    rows = [json.loads(line) for line in sample_path().read_text().splitlines() if line.strip()]
    return model_dir, rows, {"model": str(model_dir), "build_s": round(build_s, 1),
                             "config": json.loads((model_dir / "config.json").read_text())}


def write_rows(path: Path, rows: list, n: int) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in itertools.islice(itertools.cycle(rows), n)))
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/chat-eval"), help="results folder (default $OUT)")
    ap.add_argument("--work", default="/tmp/chat-eval-work", help="model, data and run folder")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on CPU, hf backend, few tokens")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=50, help="eval rows (--limit)")
    ap.add_argument("--chat-tokens", type=int, default=256, help="max_new_tokens of each chat reply")
    ap.add_argument("--eval-tokens", type=int, default=64, help="max_new_tokens of each eval answer")
    ap.add_argument("--time-budget", type=float, default=540)
    ap.add_argument("--parts", default="build,train,chat,eval,gguf")
    a = ap.parse_args()
    smoke = a.cpu_smoke
    if smoke:
        a.steps, a.rows, a.chat_tokens, a.eval_tokens = min(a.steps, 2), min(a.rows, 3), min(a.chat_tokens, 8), \
            min(a.eval_tokens, 4)
    out, work = Path(a.out), Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = set(a.parts.split(","))
    s = Steps(out, a.time_budget)
    device = "cpu" if smoke else "cuda"
    res = s.results
    res["settings"] = {"cpu_smoke": smoke, "steps": a.steps, "rows": a.rows, "chat_max_new_tokens": a.chat_tokens,
                       "eval_max_new_tokens": a.eval_tokens, "prompt": PROMPT}
    try:
        import torch

        res["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        from swft_lite.train import package_versions

        res["packages"] = package_versions()
    except Exception as exc:  # noqa: BLE001 - recorded, the steps say the rest
        res["gpu"] = f"unknown ({exc})"

    run = work / "runs" / "ce"
    val = work / "val.jsonl"
    if "build" in parts:
        model_dir, rows, info = build(work, smoke)
        res["build"] = info
        write_rows(val, rows, a.rows)
        write_rows(work / "val-train.jsonl", rows[-4:], 4)  # eval rows during training
    model_dir = work / "m2"

    if "train" in parts:
        shutil.rmtree(run, ignore_errors=True)
        train_args = ["train", *(CPU_TRAIN if smoke else GPU_TRAIN), "--model", model_dir, "--data", "sample",
                      "--max-steps", a.steps, "--save-steps", a.steps, "--output-root", run.parent,
                      "--run-name", run.name]
        # One evaluation, at the last step: eval loss and 2 generated answers through the training backend.
        eval_args = ["--eval-data", work / "val-train.jsonl", "--eval-generate", 2, "--eval-steps", a.steps,
                     "--eval-max-new-tokens", 4 if smoke else 32]
        code, stdout, wall = s.cli("train", train_args + eval_args, min_seconds=60)
        if code != 0 and code is not None:
            # The chat and eval figures need a run: once more without the evaluation during training.
            shutil.rmtree(run, ignore_errors=True)
            code, stdout, wall = s.cli("train_without_eval", train_args, min_seconds=60)
        if code == 0:
            rec = json.loads((run / "run.json").read_text())
            first = res.pop("train", {}).get("error")
            if first:
                res["eval_during_training_failed"] = {"error": first, "log": str(s.logs / "train.log")}
            res["train"] = {"wall_s": round(wall, 1), "status": rec.get("status"), "steps": rec.get("global_step"),
                            "backend": rec.get("backend"), "train_seconds": rec.get("train_seconds"),
                            "tokens_per_second_median": rec.get("tokens_per_second_median"),
                            "eval_metrics": rec.get("eval_metrics"), "eval_generate": rec.get("eval_generate"),
                            "merge_passed": ((rec.get("merge") or {}).get("verification") or {}).get("passed")}

    def chat(name: str, ref, extra=()):
        runs = []
        for _ in range(2):  # the second run finds the files in the page cache and the kernels compiled
            code, stdout, wall = s.cli(name, ["chat", ref, "--prompt", PROMPT, "--json", "--max-new-tokens",
                                              a.chat_tokens, *extra])
            doc = last_json(stdout) if code == 0 else None
            if doc is None:
                break
            runs.append({"wall_s": round(wall, 2), "generated_tokens": doc.get("generated_tokens"),
                         "generation_s": doc.get("seconds"), "tokens_per_s": doc.get("tokens_per_s"),
                         "stopped": doc.get("stopped"), "engine": doc.get("engine")})
        if runs:
            res[name] = {"runs": runs, "tokens_per_s": runs[-1]["tokens_per_s"], "engine": runs[-1]["engine"]}

    def evaluate(name: str, ref):
        code, stdout, wall = s.cli(name, ["eval", ref, "--data", val, "--limit", a.rows, "--json", "--max-new-tokens",
                                          a.eval_tokens, "--mermaid-checker", "subset",
                                          "--rows-out", s.out / f"{name}_rows.jsonl"], min_seconds=30)
        doc = last_json(stdout) if code == 0 else None
        if doc:
            m = next(iter(doc["models"].values()))
            res[name] = {"wall_s": round(wall, 1), "rows": m["rows"], "per_row_s": round(wall / m["rows"], 3),
                         "model_seconds": m.get("seconds"), "generation_s": m.get("generation_s"),
                         "generated_tokens": m.get("generated_tokens"), "tokens_per_s": m.get("tokens_per_s"),
                         "eval_loss": m.get("eval_loss"), "engine": m.get("engine"),
                         "format_ok": m.get("format_ok"), "markdown_valid": m.get("markdown_valid")}

    if "chat" in parts:
        chat("chat", run, ["--device", device])
    if "eval" in parts:
        evaluate("eval", run)
    if "gguf" in parts:
        if importlib.util.find_spec("llama_cpp") is None:
            res["gguf"] = {"skipped": "llama_cpp is not importable here. To measure the GGUF path, carry a "
                                      "llama-cpp-python 0.3.36 wheel for this Python (cp312), built with "
                                      "CMAKE_ARGS=-DGGML_CUDA=on for GPU offload, in .device/whl/, or a CPU "
                                      "build's site-packages llama_cpp + diskcache as .device/llama_cpp_cpu.tgz "
                                      "(device_env.sh installs either); save-gguf also needs gguf (in the pack) and "
                                      "the converter (.device/pack/llamacpp.tgz -> $SWFT_LLAMA_CPP)"}
        else:
            import llama_cpp

            offload = bool(llama_cpp.llama_supports_gpu_offload())
            res["gguf"] = {"llama_cpp_version": llama_cpp.__version__, "gpu_offload": offload,
                           "note": "chat offloads every layer" if offload else
                           "this llama-cpp-python has no GPU backend: chat and eval on the GGUF run on the CPU"}
            code, stdout, wall = s.cli("save_gguf", ["save-gguf", run, "--quant", "q8_0", "--overwrite"],
                                       min_seconds=60)
            ggufs = sorted((run / "gguf").glob("*.gguf"))
            if code == 0 and ggufs:
                res["save_gguf"] = {"wall_s": round(wall, 1), "file": str(ggufs[0]),
                                    "bytes": ggufs[0].stat().st_size}
                chat("chat_gguf", ggufs[0], ["--n-gpu-layers", "-1"] if offload else [])
                evaluate("eval_gguf", ggufs[0])

    out.mkdir(parents=True, exist_ok=True)
    (out / "chat_eval.json").write_text(json.dumps(res, indent=2, default=str))
    print("\n=== summary")
    for key in ("build", "eval_during_training_failed", "train", "train_without_eval", "chat", "eval", "gguf", "save_gguf", "chat_gguf", "eval_gguf"):
        v = res.get(key)
        if v is None:
            continue
        if "error" in v or "skipped" in v:
            print(f"{key:10s} {v.get('error') or 'skipped: ' + v['skipped']}")
        elif key == "build":
            print(f"{key:10s} {v['build_s']} s, hidden {v['config']['hidden_size']}, "
                  f"{v['config']['num_local_experts']} experts, {v['config']['num_hidden_layers']} layers")
        elif key == "train":
            print(f"{key:10s} {v['status']} after {v['steps']} steps ({v['backend']}), {v['wall_s']} s wall; "
                  f"eval metrics {json.dumps((v.get('eval_metrics') or [{}])[-1])}")
        elif key.startswith("chat"):
            print(f"{key:10s} {v['tokens_per_s'] and round(v['tokens_per_s'], 1)} tokens/s "
                  f"({v['runs'][-1]['generated_tokens']} tokens, warm run {v['runs'][-1]['wall_s']} s wall) "
                  f"- {v['engine']}")
        elif key.startswith("eval"):
            print(f"{key:10s} {v['rows']} rows in {v['wall_s']} s wall ({v['per_row_s']} s a row), generation "
                  f"{v['tokens_per_s']} tokens/s - {v['engine']}")
        else:
            print(f"{key:10s} {json.dumps(v)}")
    print(f"results: {out / 'chat_eval.json'}")
    return 0 if not any(isinstance(v, dict) and "error" in v for v in res.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
