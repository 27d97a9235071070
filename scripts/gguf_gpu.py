"""Retention per quant, YaRN deviation to 8k, merge/export times and peak RSS on the real-width gpt-oss (GPU).

    . scripts/device_env.sh; python scripts/gguf_gpu.py        # JSON to $OUT (default ./out)/gguf_gpu.json

1. A 2-layer gpt-oss of the real width (config.json from $SWFT_SHARED_MODEL, default ../shared/models/gpt-oss-20b,
   num_hidden_layers=2: hidden 2880, 32 experts top-4, vocab 201,088), random weights, experts put through MXFP4 and
   back so they lie exactly on MXFP4's grid as openai/gpt-oss-20b's do.
2. `swft-lite train --backend unsloth` (hf when Unsloth is missing), bf16 weights, for $SWFT_GPU_STEPS steps (30) at
   the rtx4090 profile's learning rate, with its verified merge at the end.
3. `swft-lite save-gguf RUN --quant Q` for mxfp4, q8_0, f16: exit code, seconds, size, peak RSS, and the figures
   save-gguf stored (chain check, bytes, logits, fine-tuning retention).
4. scripts/rope_rounding.py's `measure` to 8,192 positions on an f32 GGUF (deleted afterwards).

llama.cpp's converter: $SWFT_LLAMA_CPP. llama.cpp layers on the GPU for step 4: $SWFT_GPU_LAYERS (default 0).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "scripts"), str(REPO / "tests")]
OUT = Path(os.environ.get("OUT", "out"))
WORK = Path(os.environ.get("SWFT_GPU_WORK", "/tmp/swft-gguf-gpu"))
SHARED = Path(os.environ.get("SWFT_SHARED_MODEL", REPO.parent / "shared" / "models" / "gpt-oss-20b"))
LLAMA_CPP = os.environ.get("SWFT_LLAMA_CPP")
STEPS = int(os.environ.get("SWFT_GPU_STEPS", "30"))
QUANTS = os.environ.get("SWFT_GPU_QUANTS", "mxfp4,q8_0,f16").split(",")
RESULT: dict = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def save():
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "gguf_gpu.json").write_text(json.dumps(RESULT, indent=2, default=str) + "\n")


def run_measured(cmd: list[str]) -> dict:
    """Run a command; its exit code, seconds and peak RSS (the process tree's, sampled every 0.1 s)."""
    import psutil

    t0 = time.time()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = [0]

    def sample():
        while p.poll() is None:
            try:
                procs = [psutil.Process(p.pid)] + psutil.Process(p.pid).children(recursive=True)
                peak[0] = max(peak[0], sum(q.memory_info().rss for q in procs))
            except psutil.Error:
                pass
            time.sleep(0.1)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = p.communicate()[0]
    th.join()
    print(out[-3000:], flush=True)
    return {"cmd": " ".join(cmd), "exit": p.returncode, "seconds": time.time() - t0, "peak_rss_gib": peak[0] / 2**30,
            "tail": out[-1500:]}


def build_base() -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    from swft_lite.merge import dequantize_mxfp4
    from swft_lite.random_model import save_random_gpt_oss
    from test_merge import quantize_mxfp4_reference

    base = WORK / "base"
    if (base / "model.safetensors").exists():
        return base
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        save_random_gpt_oss(base, SHARED, num_layers=2, dtype=torch.bfloat16, seed=0)
    f = base / "model.safetensors"
    sd = load_file(str(f))
    for k, v in sd.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            sd[k] = torch.cat([dequantize_mxfp4(*quantize_mxfp4_reference(v[e:e + 1].to(dev)), dtype=torch.float32)
                               .to(v.dtype).cpu() for e in range(v.shape[0])])
    save_file(sd, str(f), metadata={"format": "pt"})
    return base


def main():
    import importlib.util

    swft = [sys.executable, "-m", "swft_lite.cli"]
    t0 = time.time()
    base = build_base()
    RESULT["base"] = {"dir": str(base), "seconds": time.time() - t0,
                      "config": {k: json.loads((base / "config.json").read_text()).get(k) for k in
                                 ("hidden_size", "num_hidden_layers", "num_local_experts", "num_experts_per_tok",
                                  "intermediate_size", "vocab_size")}}
    save()
    data = WORK / "rows.jsonl"
    if not data.exists():
        subprocess.run([sys.executable, str(REPO / "scripts" / "make_synthetic_data.py"), "--rows", "64", "--tokens",
                        "1024", "--out", str(data)], check=True)
    backend = "unsloth" if importlib.util.find_spec("unsloth") else "hf"
    run = WORK / "runs" / "gguf"
    if not (run / "merged" / "config.json").exists():
        # bf16 weights (not 4-bit): the merge and save-gguf then gate on the trained-model record too
        RESULT["train"] = run_measured(swft + ["train", "--backend", backend, "--profile", "rtx4090",
                                               "--no-load-in-4bit", "--model",
                                               str(base), "--data", str(data), "--max-seq-length", "1024",
                                               "--per-device-batch-size", "2", "--gradient-accumulation-steps", "1",
                                               "--max-steps", str(STEPS), "--output-root", str(run.parent),
                                               "--run-name", run.name, "--overwrite"])
    record = json.loads((run / "run.json").read_text())
    merge = record.get("merge") or {}
    v = merge.get("verification") or {}
    RESULT["train"] = dict(RESULT.get("train", {}), backend=backend, status=record.get("status"),
                           steps=record.get("global_step"), tokens_per_s=record.get("tokens_per_second_median"),
                           first_loss=(record.get("losses") or [{}])[0].get("loss"),
                           last_loss=(record.get("losses") or [{}])[-1].get("loss"))
    RESULT["merge"] = {"seconds": merge.get("seconds"), "peak_rss_gib": merge.get("peak_rss_gib"),
                       "passed": v.get("passed"), "kl_mean_trimmed": v.get("kl_mean_trimmed"),
                       "adapter_effect_kl": (v.get("adapter_effect") or {}).get("kl_mean"), "dtype": v.get("dtype")}
    save()

    llama = ["--llama-cpp", LLAMA_CPP] if LLAMA_CPP else []
    RESULT["exports"] = {}
    for q in QUANTS:
        r = run_measured(swft + ["save-gguf", str(run), "--quant", q, "--overwrite", *llama])
        g = run / "gguf" / f"{run.name}-{q}.gguf"
        rep_file = g.with_name(g.name + (".report.json" if r["exit"] == 0 else ".failed.report.json"))
        rep = json.loads(rep_file.read_text()) if rep_file.exists() else {}
        gv = rep.get("verification") or {}
        ret = gv.get("retention") or {}
        r.update({"size_bytes": rep.get("size_bytes"), "convert_seconds": rep.get("convert_seconds"),
                  "chain_passed": (rep.get("chain") or {}).get("passed"), "passed": gv.get("passed"),
                  "failures": gv.get("failures"), "kl_retention": ret.get("kl_retention"),
                  "top1_retention": ret.get("top1_retention"), "top1_changes": ret.get("top1_changes"),
                  "kl_effect": ret.get("kl_effect"), "kl_gguf": ret.get("kl_gguf"), "cos_mean": gv.get("cos_mean"),
                  "cos_p10": gv.get("cos_p10"), "max_abs_logit_diff": gv.get("max_abs_logit_diff"),
                  "max_abs_logit_diff_limit": gv.get("max_abs_logit_diff_limit"),
                  "bytes_passed": (gv.get("bytes") or {}).get("passed"),
                  "bytes_seconds": (gv.get("bytes") or {}).get("seconds")})
        RESULT["exports"][q] = r
        save()

    from rope_rounding import measure

    from swft_lite.gguf_export import export_gguf

    f32 = WORK / "f32.gguf"
    try:
        export_gguf(run / "merged", quant="f32", out=f32, llama_cpp=LLAMA_CPP, verify=False, modelfile=False,
                    overwrite=True, log=print)
        rope = measure(run / "merged", f32, 8192, 512, device="cuda",
                       n_gpu_layers=int(os.environ.get("SWFT_GPU_LAYERS", "0")))
        RESULT["rope_rounding"] = {k: rope[k] for k in ("positions", "logit_rms", "correction_range", "max",
                                                        "positions_over_1e-2", "truncate_false_vs_true",
                                                        "gguf_vs_truncate_true", "gguf_vs_truncate_false",
                                                        "seconds")}
    except Exception as exc:  # noqa: BLE001 - keep what was measured so far
        RESULT["rope_rounding"] = {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for p in (f32, f32.with_name(f32.name + ".log")):
            if p.exists():
                p.unlink()
    RESULT["seconds"] = time.time() - t0
    save()
    print(json.dumps({q: {k: e.get(k) for k in ("exit", "kl_retention", "top1_retention", "size_bytes", "seconds",
                                                   "peak_rss_gib")} for q, e in RESULT["exports"].items()}, indent=2))
    print(json.dumps(RESULT.get("rope_rounding", {}).get("max"), indent=2))


if __name__ == "__main__":
    main()
