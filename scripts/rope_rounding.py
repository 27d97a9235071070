"""How far llama.cpp's YaRN rounding moves gpt-oss's logits, against position.

gpt-oss's config says `rope_scaling.truncate: false`: YaRN's correction range (the dimensions between fully
extrapolated and fully interpolated frequencies) is used as computed, unrounded. llama.cpp always rounds it
(`floorf`/`ceilf` in `ggml_rope_yarn_corr_dims`, ggml/src/ggml.c), so the frequencies of the dimensions in that
range differ, and the angle error - and with it the logits' deviation - grows with position. This is a property of
the runtime, not of an export: this script measures it on one f32 GGUF (llama.cpp computes f32 exactly enough that
nothing else shows) against transformers run both ways.

    python scripts/rope_rounding.py [--model MERGED_DIR] [--positions 4096] [--step 128] [--llama-cpp DIR]

Without --model it builds the tiny test model (conftest's TINY_SIZE, lm_head x10 as in tests/test_merge.py).
Writes benchmarks/rope_rounding.json and .md (or --out PREFIX). scripts/gguf_gpu.py calls `measure` at real width.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def correction_range(cfg: dict) -> dict:
    """YaRN's correction range for this config, unrounded (transformers with truncate=False) and rounded (llama.cpp)."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    base = cfg.get("rope_theta") or rs.get("rope_theta")
    orig = rs["original_max_position_embeddings"]

    def corr(n_rot):
        return dim * math.log(orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr(rs.get("beta_fast", 32)), corr(rs.get("beta_slow", 1))
    return {"head_dim": dim, "rope_theta": base, "factor": rs.get("factor"), "original_max_position_embeddings": orig,
            "unrounded": [max(low, 0), min(high, dim - 1)],
            "rounded": [max(math.floor(low), 0), min(math.ceil(high), dim - 1)]}


def _tokens(model_dir: Path, n: int) -> list[int]:
    from swft_lite.probes import probe_token_ids

    p = probe_token_ids(model_dir)
    one = p[0] + p[1] + p[2]
    return (one * (n // len(one) + 1))[:n]


def _hf_hidden(model_dir: Path, ids: list[int], truncate: bool, device: str = "cpu"):
    """transformers' final hidden states for the whole sequence, and its lm_head (logits are made per chunk)."""
    import torch
    from transformers import AutoModelForCausalLM

    from swft_lite.gguf_export import llama_cpp_rope_config

    cfg = llama_cpp_rope_config(model_dir, truncate)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), config=cfg, dtype=torch.float32,
                                                 device_map=device).eval()
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids], device=device)).last_hidden_state[0]
    head = model.lm_head
    model.model = None  # keep only lm_head
    return h, head


def _gguf_chunks(gguf: Path, ids: list[int], step: int, n_gpu_layers: int = 0):
    """llama.cpp's logits at every position, `step` positions at a time (one decode per chunk, every token's logits
    read from the context; logits_all would hold n_ctx x 201,088 floats at once)."""
    import numpy as np
    import torch
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=len(ids) + 64, n_batch=step, n_ubatch=step, logits_all=False,
                n_threads=os.cpu_count() or 1, n_gpu_layers=n_gpu_layers, verbose=False, seed=0)
    try:
        n_vocab = llm.n_vocab()
        for i in range(0, len(ids), step):
            chunk = ids[i:i + step]
            llm._batch.set_batch(batch=chunk, n_past=i, logits_all=True)
            llm._ctx.decode(llm._batch)
            rows = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(len(chunk) * n_vocab,))
            yield i, torch.from_numpy(rows.reshape(len(chunk), n_vocab).copy())
    finally:
        llm.close()


def measure(model_dir: Path, gguf: Path, n_positions: int, step: int, device: str = "cpu",
            n_gpu_layers: int = 0, bucket: int = 256) -> dict:
    """Per position: max |dlogit| of transformers truncate=False vs truncate=True (what the rounding itself
    changes), and of the f32 GGUF vs each; reported as the maximum over each `bucket` positions."""
    import torch

    ids = _tokens(model_dir, n_positions)
    t0 = time.time()
    h_t, head = _hf_hidden(model_dir, ids, True, device)
    h_f, _ = _hf_hidden(model_dir, ids, False, device)
    f_vs_t, g_vs_t, g_vs_f, sq, n = [], [], [], 0.0, 0
    with torch.no_grad():
        for i, gg in _gguf_chunks(gguf, ids, step, n_gpu_layers):
            lt = head(h_t[i:i + len(gg)]).float().cpu()
            lf = head(h_f[i:i + len(gg)]).float().cpu()
            f_vs_t += (lf - lt).abs().amax(-1).tolist()
            g_vs_t += (gg - lt).abs().amax(-1).tolist()
            g_vs_f += (gg - lf).abs().amax(-1).tolist()
            sq += float(lt.pow(2).sum())
            n += lt.numel()
    starts = list(range(0, n_positions, bucket))
    per_bucket = {k: [max(v[s:s + bucket]) for s in starts] for k, v in
                  (("truncate_false_vs_true", f_vs_t), ("gguf_vs_truncate_true", g_vs_t),
                   ("gguf_vs_truncate_false", g_vs_f))}
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return {"model_dir": str(model_dir), "gguf": str(gguf), "n_positions": n_positions, "bucket": bucket,
            "positions": [f"{s}-{min(s + bucket, n_positions) - 1}" for s in starts], "logit_rms": (sq / n) ** 0.5,
            "correction_range": correction_range(cfg), **per_bucket,
            "max": {k: max(v) for k, v in per_bucket.items()},
            "positions_over_1e-2": {"truncate_false_vs_true": sum(x > 1e-2 for x in f_vs_t),
                                    "gguf_vs_truncate_true": sum(x > 1e-2 for x in g_vs_t),
                                    "gguf_vs_truncate_false": sum(x > 1e-2 for x in g_vs_f)},
            "seconds": time.time() - t0}


def to_markdown(r: dict, title: str) -> str:
    cr = r["correction_range"]
    lines = [f"# {title}", "",
             f"Model: `{r['model_dir']}` (head_dim {cr['head_dim']}, rope_theta {cr['rope_theta']}, YaRN factor "
             f"{cr['factor']}, original context {cr['original_max_position_embeddings']}); logit RMS "
             f"{r['logit_rms']:.3g}. YaRN correction range: {cr['unrounded'][0]:.3f} .. {cr['unrounded'][1]:.3f} "
             f"as gpt-oss's config says (truncate: false), {cr['rounded'][0]} .. {cr['rounded'][1]} as llama.cpp "
             "computes it (always rounded).", "",
             f"Largest |dlogit| over the vocabulary at any position of each range of {r['bucket']} (f32 GGUF: "
             "llama.cpp's own arithmetic adds ~1e-3 at most):", "",
             "| positions | transformers truncate=false vs true | GGUF vs truncate=true | GGUF vs truncate=false |",
             "|---:|---:|---:|---:|"]
    for i, p in enumerate(r["positions"]):
        lines.append(f"| {p} | {r['truncate_false_vs_true'][i]:.3g} | {r['gguf_vs_truncate_true'][i]:.3g} | "
                     f"{r['gguf_vs_truncate_false'][i]:.3g} |")
    o = r["positions_over_1e-2"]
    lines += ["", f"Positions (of {r['n_positions']}) deviating by more than 1e-2: truncate=false vs true "
              f"{o['truncate_false_vs_true']}, GGUF vs truncate=true {o['gguf_vs_truncate_true']}, GGUF vs "
              f"truncate=false {o['gguf_vs_truncate_false']}.", "", "The GGUF follows transformers with `truncate=True` at every position; against the config as "
              "written (`truncate=false`) it drifts with position. swft-lite's lossless GGUF check therefore "
              "computes its reference with truncate=True, and this deviation is the runtime's, not the export's.", ""]
    return "\n".join(lines)


def _tiny_model(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "tests"))
    from conftest import TINY_SIZE  # noqa: E402  (sets the offline env and finds the vocabulary)
    from test_merge import save_sharp_base  # noqa: E402

    from swft_lite import tokenizer as tok
    from swft_lite.random_model import save_random_gpt_oss

    files = tok.gpt_oss_files(tok.use_vocab(download=False))
    tiny = save_random_gpt_oss(root / "tiny", files, seed=0, **TINY_SIZE)
    return save_sharp_base(tiny, root / "model")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, help="a gpt-oss model folder (default: the tiny test model, built here)")
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--step", type=int, default=256, help="positions decoded per llama.cpp call")
    ap.add_argument("--llama-cpp", default=None, help="llama.cpp folder with convert_hf_to_gguf.py")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "rope_rounding")
    args = ap.parse_args()
    from swft_lite.gguf_export import export_gguf

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or _tiny_model(tmp)
        gguf = export_gguf(model, quant="f32", out=tmp / "f32.gguf", llama_cpp=args.llama_cpp, verify=False,
                           modelfile=False, log=lambda s: None)["gguf"]
        r = measure(model, Path(gguf), args.positions, args.step)
    r["model_dir"] = str(args.model) if args.model else "tiny test model (2 layers, width 64, 4 experts, lm_head x10)"
    r["gguf"] = "f32 GGUF from llama.cpp's convert_hf_to_gguf.py (llama-cpp-python 0.3.36's vendored llama.cpp)"
    import llama_cpp

    r["llama_cpp_python"] = llama_cpp.__version__
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(r, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(to_markdown(r, "YaRN rounding in llama.cpp vs position (CPU)"))
    print(json.dumps(r["max"], indent=2))


if __name__ == "__main__":
    main()
