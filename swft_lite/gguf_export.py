"""Merged gpt-oss -> GGUF (llama.cpp, Ollama), checked along the whole chain before it is called done.

Before anything is converted, merged/ is checked again against base + adapter and the trained-model record of its
run (merge.recheck_merged); a merged/ that does not match is refused. Conversion is llama.cpp's own
`convert_hf_to_gguf.py`, run as a subprocess; quantization is the `llama-quantize` binary when one is found, else
the same code through llama-cpp-python's `llama_model_quantize`. Every file is then read back (gguf.GGUFReader:
architecture, tensor count, vocabulary, chat template, special token ids, tensor types), compared tensor by tensor
with the merged weights quantized the same way (swft_lite.gguf_bytes), and run with llama-cpp-python on the probe
tokens against the merged model in transformers (fp32, YaRN rounded as llama.cpp rounds it) and against the base
(how much of the fine-tuning it keeps): see `GGUF_THRESHOLDS` and `RETENTION_THRESHOLDS`. A file that fails is
renamed to `<file>.failed`; the GGUF is written as `<file>.partial` and gets its name only after passing.

Where llama.cpp's converter comes from (first found wins):
  --llama-cpp DIR, $SWFT_LLAMA_CPP, $UNSLOTH_LLAMA_CPP_PATH, ~/.unsloth/llama.cpp, and the copy that
  `swft-lite save-gguf --fetch-converter` puts in ~/.cache/swft-lite (llama.cpp's converter as shipped inside the
  llama-cpp-python source package on PyPI: vendor/llama.cpp/convert_hf_to_gguf.py + gguf-py). Nothing is cloned.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Callable

from swft_lite.errors import GGUFError, GGUFVerificationError
from swft_lite.gguf_bytes import read_gguf, reader_for
from swft_lite.run_folder import RunFolder, find_merged
from swft_lite.probes import compare_logits, load_tokenizer, probe_token_ids

LLAMA_CPP_PYTHON_VERSION = "0.3.36"  # whose vendored llama.cpp we fetch when none is installed
CACHE_DIR = Path(os.environ.get("SWFT_CACHE", Path.home() / ".cache" / "swft-lite"))

# quant name -> (convert_hf_to_gguf --outtype, llama.cpp LLAMA_FTYPE_MOSTLY_* to quantize to, or None, check family)
QUANTS: dict[str, tuple[str, str | None, str]] = {
    "f32": ("f32", None, "exact"),
    "f16": ("f16", None, "exact"),
    "bf16": ("bf16", None, "exact"),
    "q8_0": ("q8_0", None, "q8"),
    "mxfp4": ("bf16", "MXFP4_MOE", "low"),
    "q6_k": ("bf16", "Q6_K", "low"),
    "q5_k_m": ("bf16", "Q5_K_M", "low"),
    "q5_k_s": ("bf16", "Q5_K_S", "low"),
    "q5_0": ("bf16", "Q5_0", "low"),
    "q5_1": ("bf16", "Q5_1", "low"),
    "q4_k_m": ("bf16", "Q4_K_M", "low"),
    "q4_k_s": ("bf16", "Q4_K_S", "low"),
    "q4_0": ("bf16", "Q4_0", "low"),
    "q4_1": ("bf16", "Q4_1", "low"),
    "iq4_nl": ("bf16", "IQ4_NL", "low"),
    "iq4_xs": ("bf16", "IQ4_XS", "low"),
    "q3_k_m": ("bf16", "Q3_K_M", "low"),
    "q3_k_l": ("bf16", "Q3_K_L", "low"),
    "q3_k_s": ("bf16", "Q3_K_S", "low"),
    "q2_k": ("bf16", "Q2_K", "low"),
}
# q8_0, not mxfp4: the merge adds a LoRA delta to the (dequantized MXFP4) experts, and re-quantizing them to MXFP4
# snaps most of a trained delta back onto the base's grid (a delta of a few % of the weights is far below MXFP4's
# step), so an mxfp4 export keeps little of the fine-tuning and fails the retention check. Q8_0's grid is 10-40x
# finer.
DEFAULT_QUANT = "q8_0"

# GGUF vs the merged model (transformers, fp32, YaRN rounded as llama.cpp rounds it: see llama_cpp_rope_config) on
# the probe tokens. The lossless kinds (f32/f16/bf16: the weights are the merged model's or the same bf16 numbers)
# must match at EVERY position within a bound x max(1, RMS of the reference logits); the figures they were set from
# are in benchmarks/gguf_checks.json (tiny test model, logit RMS 1.6). f16/bf16 bounds are wider than f32's because
# llama.cpp rounds activations to the weights' type in its f16/bf16 matmuls. A top-1 flip is forgiven only within
# twice that bound. No fallback: before the reference rounded YaRN's correction range the way llama.cpp does, these
# files missed the strict bound by a deviation growing with position, and a "no worse than transformers' bf16 run"
# fallback hid it (issue 12).
# Quantized files are judged on the mean and 10th-percentile logit cosine (their weights differ, and a rounded
# router can pick another expert at a near-tie), and every file - lossless or not - on how much of the fine-tuning
# it keeps (RETENTION_THRESHOLDS) and on its bytes (swft_lite.gguf_bytes).
GGUF_THRESHOLDS = {
    "exact": {"max_abs_logit_diff": {"f32": 3e-3, "f16": 1e-2, "bf16": 4e-2},  # x max(1, RMS of ref logits)
              "top1_agreement_min": 1.0},
    # q8_0 on a random real-width gpt-oss (2 layers, hidden 2880, 32 experts; H200, 2026-11-27) measured cosine mean
    # 0.990 and p10 0.973 - random routers sit on near-ties that 8-bit rounding flips; the tiny test model 0.999 /
    # 0.9999. A GGUF that lost the adapter scores ~0.8.
    "q8": {"cos_mean_min": 0.98, "cos_p10_min": 0.95},
    "low": {"cos_mean_min": 0.95, "cos_p10_min": 0.90},
}
# How much of the fine-tuning the file keeps, on the probe tokens (adapter_retention): by KL, 1 - KL(merged||gguf) /
# KL(merged||base), and the share of the adapter's top-1 changes the file reproduces. Measured on the tiny test
# model with MXFP4-representable experts (benchmarks/gguf_checks.json): q8_0 keeps 97-99 % by KL and 84-96 % of the
# top-1 changes (but 88 % by KL in a scratch run whose adapter also moved attention: router flips at a few positions
# carried most of the mean KL), mxfp4 (experts re-quantized onto MXFP4's grid, too coarse for trained deltas)
# 55-73 % / 49-74 %.
RETENTION_THRESHOLDS = {"kl_retention_min": 0.90, "top1_retention_min": 0.80}
NOOP_EFFECT_KL = 1e-6  # an adapter that moves the probes less than this: retention is not measurable
GPT_OSS_TENSORS_PER_LAYER = 19   # attn_norm, attn_{q,k,v,output}.{weight,bias}, attn_sinks, post_attention_norm,
GPT_OSS_GLOBAL_TENSORS = 3       # ffn_gate_inp.{weight,bias}, ffn_{gate,up,down}_exps.{weight,bias}; token_embd,
#                                  output_norm, output
GENERATE_TOKENS = 8


# --- finding llama.cpp -----------------------------------------------------------------------------------------------


def _converter_in(d: Path) -> Path | None:
    d = d.expanduser()
    for cand in (d, d / "vendor" / "llama.cpp"):
        if (cand / "convert_hf_to_gguf.py").exists():
            return cand.resolve()
    return None


def fetched_converter_dir(version: str = LLAMA_CPP_PYTHON_VERSION) -> Path:
    return CACHE_DIR / f"llama-cpp-python-{version}" / "vendor" / "llama.cpp"


def converter_candidates(llama_cpp: str | Path | None = None) -> list[tuple[str, Path]]:
    cands = []
    if llama_cpp:
        cands.append(("--llama-cpp", Path(llama_cpp)))
    for env in ("SWFT_LLAMA_CPP", "UNSLOTH_LLAMA_CPP_PATH"):
        if os.environ.get(env):
            cands.append((f"${env}", Path(os.environ[env])))
    cands.append(("~/.unsloth/llama.cpp", Path.home() / ".unsloth" / "llama.cpp"))
    cands.append(("swft-lite save-gguf --fetch-converter", fetched_converter_dir()))
    return cands


def find_converter(llama_cpp: str | Path | None = None) -> Path:
    """The llama.cpp folder holding convert_hf_to_gguf.py, or a GGUFError that lists every way to provide one."""
    tried = []
    for how, path in converter_candidates(llama_cpp):
        found = _converter_in(path)
        if found:
            return found
        tried.append(f"{how}: {path}")
        if how == "--llama-cpp":
            raise GGUFError(f"--llama-cpp {path} holds no convert_hf_to_gguf.py (nor vendor/llama.cpp/...)")
    raise GGUFError(
        "llama.cpp's convert_hf_to_gguf.py was not found. Looked in:\n  " + "\n  ".join(tried) + "\n"
        "Any one of these works:\n"
        "  swft-lite save-gguf --fetch-converter     downloads the llama-cpp-python source package from PyPI "
        f"(pip download llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} --no-binary :all:) and keeps its "
        f"vendor/llama.cpp converter in {fetched_converter_dir().parent.parent}\n"
        "  --llama-cpp DIR                          a llama.cpp checkout (git clone https://github.com/ggml-org/"
        "llama.cpp), or an extracted llama-cpp-python sdist\n"
        "  SWFT_LLAMA_CPP=DIR or UNSLOTH_LLAMA_CPP_PATH=DIR, or a checkout at ~/.unsloth/llama.cpp\n"
        "The converter also needs `pip install gguf` (swft-lite[gguf]).")


def fetch_converter(version: str = LLAMA_CPP_PYTHON_VERSION, log: Callable[[str], None] = print) -> Path:
    """Download llama-cpp-python's source package with pip (PyPI) and keep only llama.cpp's converter scripts."""
    dest = fetched_converter_dir(version)
    if _converter_in(dest):
        return dest
    dest.parent.parent.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent.parent.parent) as tmp:
        log(f"Downloading llama-cpp-python=={version} (source package, ~75 MB) from PyPI ...")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "-d", tmp, f"llama-cpp-python=={version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if r.returncode != 0 or not sdists:
            raise GGUFError(f"pip download of llama-cpp-python=={version} failed (exit {r.returncode}):\n"
                            f"{(r.stderr or r.stdout)[-2000:]}")
        top = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
        with tarfile.open(sdists[0]) as tf:
            members = [m for m in tf.getmembers() if m.name.startswith(top)
                       and m.name[len(top):].startswith(keep) and (m.isfile() or m.isdir())]
            if not any(m.name.endswith("convert_hf_to_gguf.py") for m in members):
                raise GGUFError(f"{sdists[0].name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
            stage = Path(tmp) / "x"
            tf.extractall(stage, members=members, filter="data")
        final_root = dest.parent.parent  # .../llama-cpp-python-<v>
        if final_root.exists():
            shutil.rmtree(final_root)
        os.replace(stage / f"llama_cpp_python-{version}", final_root)
    log(f"llama.cpp converter ready in {dest}")
    return dest


def find_quantize_binary(converter_dir: Path | None) -> Path | None:
    names = ["llama-quantize", "llama-quantize.exe"]
    if converter_dir:
        for sub in ("build/bin", "build/bin/Release", "bin", "."):
            for n in names:
                p = converter_dir / sub / n
                if p.is_file() and os.access(p, os.X_OK):
                    return p
    for n in names:
        w = shutil.which(n)
        if w:
            return Path(w)
    return None


# --- steps ---------------------------------------------------------------------------------------------------------


def _run_logged(cmd: list[str], log_file: Path, what: str, env: dict | None = None) -> str:
    with open(log_file, "a") as lf:
        lf.write(f"$ {' '.join(cmd)}\n")
        lf.flush()
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        lf.write(r.stdout)
    if r.returncode != 0:
        raise GGUFError(f"{what} failed (exit {r.returncode}); the last lines of its output ({log_file}):\n"
                        + "\n".join(r.stdout.splitlines()[-25:]))
    return r.stdout


def convert_hf_to_gguf(model_dir: Path, out_file: Path, outtype: str, converter_dir: Path, log_file: Path) -> None:
    """llama.cpp's converter as a subprocess (argument list, this Python)."""
    cmd = [sys.executable, str(converter_dir / "convert_hf_to_gguf.py"), str(model_dir), "--outfile", str(out_file),
           "--outtype", outtype]
    _run_logged(cmd, log_file, "convert_hf_to_gguf.py")


_QUANTIZE_SNIPPET = """
import ctypes, sys
import llama_cpp
src, dst, name = sys.argv[1:4]
ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + name, None)
if ftype is None:
    sys.exit(f"this llama-cpp-python ({llama_cpp.__version__}) has no LLAMA_FTYPE_MOSTLY_{name}")
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = ftype
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(rc)
"""


def quantize_gguf(src: Path, dst: Path, ftype_name: str, converter_dir: Path | None, log_file: Path) -> dict:
    """llama-quantize if found, else llama-cpp-python's llama_model_quantize (in a subprocess, so llama.cpp's own
    printing goes to the log). Returns {"tool", "fallbacks": [lines where a tensor fell back to another type]}."""
    binary = find_quantize_binary(converter_dir)
    if binary:
        out = _run_logged([str(binary), str(src), str(dst), ftype_name], log_file, "llama-quantize")
        tool = str(binary)
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            raise GGUFError("quantizing needs llama.cpp's llama-quantize on PATH (or in --llama-cpp DIR/build/bin) "
                            "or llama-cpp-python (pip install 'swft-lite[gguf]')") from None
        out = _run_logged([sys.executable, "-c", _QUANTIZE_SNIPPET, str(src), str(dst), ftype_name], log_file,
                          "llama_model_quantize")
        tool = "llama_cpp.llama_model_quantize"
    fallbacks = [ln.strip() for ln in out.splitlines() if "falling back" in ln]
    return {"tool": tool, "fallbacks": fallbacks}


# --- reading back --------------------------------------------------------------------------------------------------


def _field(reader, key):
    f = reader.fields.get(key)
    if f is None:
        return None
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - older gguf without contents()
        return f.parts[f.data[0]].tolist()


def read_gguf_header(path: Path) -> dict:
    """What the checks need from a GGUF, read with gguf.GGUFReader; cached per file version within the process
    (reading gpt-oss's 201k-token vocabulary takes several seconds)."""
    path = Path(path).resolve()
    st = path.stat()
    return dict(_header_cached(str(path), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _header_cached(path: str, _size: int, _mtime: int) -> dict:
    reader = reader_for(Path(path))
    arch = _field(reader, "general.architecture")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    types: dict[str, int] = {}
    expert_types = set()
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if re.search(r"ffn_(gate|up|down)_exps\.weight$", t.name):
            expert_types.add(t.tensor_type.name)
    return {"architecture": arch, "block_count": _field(reader, f"{arch}.block_count"),
            "tensor_count": len(reader.tensors), "vocab_size": len(tokens.data) if tokens is not None else 0,
            "chat_template": _field(reader, "tokenizer.chat_template"),
            "bos": _field(reader, "tokenizer.ggml.bos_token_id"), "eos": _field(reader, "tokenizer.ggml.eos_token_id"),
            "pad": _field(reader, "tokenizer.ggml.padding_token_id"), "tensor_types": types,
            "expert_types": sorted(expert_types), "file_type": _field(reader, "general.file_type")}


def inspect_gguf(path: Path, model_dir: Path) -> dict:
    """Read the GGUF back and compare its header with the merged model's config and tokenizer.
    Returns {"ok", "problems": [str], "architecture", "block_count", "tensor_count", "expected_tensor_count",
    "vocab_size", "chat_template": bool, "special_ids": {"bos"/"eos"/"pad": {"gguf", "tokenizer"}},
    "tensor_types": {type: count}, "expert_types": [...], "file_type"}."""
    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    tok = load_tokenizer(model_dir)
    h = read_gguf_header(path)
    problems = []
    arch = h["architecture"]
    if arch != "gpt-oss":
        problems.append(f"architecture is {arch!r}, expected 'gpt-oss'")
    n_layers = cfg["num_hidden_layers"]
    if h["block_count"] != n_layers:
        problems.append(f"block_count {h['block_count']} != the model's {n_layers} layers")
    expected = GPT_OSS_TENSORS_PER_LAYER * n_layers + GPT_OSS_GLOBAL_TENSORS
    if h["tensor_count"] != expected:
        problems.append(f"{h['tensor_count']} tensors, expected {expected} ({GPT_OSS_TENSORS_PER_LAYER} per layer "
                        f"x {n_layers} + {GPT_OSS_GLOBAL_TENSORS})")
    if h["vocab_size"] != cfg["vocab_size"]:
        problems.append(f"vocabulary has {h['vocab_size']} tokens, the model {cfg['vocab_size']}")
    template = h["chat_template"]
    if not template or "<|start|>" not in template:
        problems.append("no harmony chat template (tokenizer.chat_template) in the file")
    special = {}
    for what in ("bos", "eos", "pad"):
        want = getattr(tok, f"{what}_token_id")
        special[what] = {"gguf": h[what], "tokenizer": want}
        if want is not None and h[what] != want:
            problems.append(f"{what} token id {h[what]} in the GGUF, {want} in the tokenizer")
    return {"ok": not problems, "problems": problems, "architecture": arch, "block_count": h["block_count"],
            "tensor_count": h["tensor_count"], "expected_tensor_count": expected, "vocab_size": h["vocab_size"],
            "chat_template": bool(template), "special_ids": special, "tensor_types": dict(h["tensor_types"]),
            "expert_types": list(h["expert_types"]), "file_type": h["file_type"]}


# --- running it ----------------------------------------------------------------------------------------------------


def llama_cpp_rope_config(model_dir: Path, rope_truncate: bool | None = True):
    """The model's config as llama.cpp computes it. gpt-oss's config says `rope_scaling.truncate: false` (YaRN's
    correction range is used unrounded), but llama.cpp always rounds it (`floorf`/`ceilf` in
    `ggml_rope_yarn_corr_dims`, ggml/src/ggml.c), so a GGUF differs from transformers' reading of the same weights
    by an amount that grows with position (benchmarks/rope_rounding.md). The reference is therefore computed with
    truncate=True, what llama.cpp does; `rope_truncate=None` keeps the config as written."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(str(model_dir))
    if rope_truncate is not None:
        for attr in ("rope_parameters", "rope_scaling"):
            rp = getattr(cfg, attr, None)
            if isinstance(rp, dict) and rp.get("rope_type", rp.get("type")) == "yarn":
                rp["truncate"] = bool(rope_truncate)
    return cfg


def reference_logits(model_dir: Path, probes: list[list[int]], gen_prompt: list[int] | None = None,
                     n_gen: int = GENERATE_TOKENS, dtype: str = "float32", rope_truncate: bool | None = True):
    """A model folder in transformers (fp32 unless told, CPU, YaRN rounded as llama.cpp rounds it unless told) on
    the probes: (logits per probe, greedy continuation of gen_prompt, the logits at each greedy step). Cached per
    folder version, probe set and setting within the process."""
    return _reference(model_dir, probes, gen_prompt, n_gen, dtype, rope_truncate)[:3]


def router_gaps(model_dir: Path, probes: list[list[int]], gen_prompt: list[int] | None = None,
                n_gen: int = GENERATE_TOKENS, dtype: str = "float32", rope_truncate: bool | None = True):
    """Per probe, per position: (the smallest gap between the k-th and (k+1)-th expert score over the layers, the
    layer), from the same reference pass as `reference_logits` (cached). A tiny gap is a router near-tie: there the
    slightest arithmetic difference picks another expert."""
    return _reference(model_dir, probes, gen_prompt, n_gen, dtype, rope_truncate)[3]


def _reference(model_dir, probes, gen_prompt, n_gen, dtype, rope_truncate):
    stamp = tuple(sorted((p.name, p.stat().st_mtime_ns) for p in Path(model_dir).glob("*.safetensors")))
    key = (tuple(map(tuple, probes)), tuple(gen_prompt or ()), n_gen, dtype, rope_truncate)
    return _reference_cached(str(Path(model_dir).resolve()), stamp, key)


@functools.lru_cache(maxsize=4)
def _reference_cached(model_dir: str, _stamp, key):
    import torch
    from transformers import AutoModelForCausalLM

    probes, gen_prompt, n_gen, dtype, rope_truncate = key
    kwargs = {}
    raw = json.loads((Path(model_dir) / "config.json").read_text())
    if (raw.get("quantization_config") or {}).get("quant_method") == "mxfp4":  # an original MXFP4 base
        from transformers import Mxfp4Config

        kwargs["quantization_config"] = Mxfp4Config(dequantize=True)
    cfg = llama_cpp_rope_config(Path(model_dir), rope_truncate)
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=cfg, dtype=getattr(torch, dtype), **kwargs).eval()
    logits, greedy, step_logits, gaps = [], [], [], []
    seen: list = []
    k = getattr(model.config, "num_experts_per_tok", 0) or 0
    hooks = []
    for li, layer in enumerate(getattr(getattr(model, "model", None), "layers", [])):
        router = getattr(getattr(layer, "mlp", None), "router", None)
        if router is not None and k:
            hooks.append(router.register_forward_hook(
                lambda mod, inp, out, li=li: seen.append((li, out[0] if isinstance(out, tuple) else out))))
    with torch.no_grad():
        for ids in probes:
            seen.clear()
            logits.append(model(input_ids=torch.tensor([ids])).logits[0].float())
            gap = torch.full((len(ids),), float("inf"))
            where = torch.full((len(ids),), -1, dtype=torch.long)
            for li, rl in seen:
                srt = rl.reshape(len(ids), -1).float().sort(-1, descending=True).values
                if srt.shape[-1] > k:
                    g = (srt[:, k - 1] - srt[:, k]).cpu()
                    better = g < gap
                    gap, where = torch.where(better, g, gap), torch.where(better, torch.tensor(li), where)
            gaps.append((gap, where))
        for h in hooks:
            h.remove()
        if gen_prompt:
            out = model(input_ids=torch.tensor([list(gen_prompt)]), use_cache=True)
            for _ in range(n_gen):
                last = out.logits[0, -1].float()
                tok = int(last.argmax())
                step_logits.append(last)
                greedy.append(tok)
                out = model(input_ids=torch.tensor([[tok]]), past_key_values=out.past_key_values, use_cache=True)
    del model
    return logits, greedy, step_logits, gaps


def _llama(path: Path, n_ctx: int):
    from llama_cpp import Llama

    return Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx, n_threads=os.cpu_count() or 1,
                 verbose=False, seed=0)


def run_gguf(path: Path, probes: list[list[int]], gen_prompt: list[int] | None, n_gen: int = GENERATE_TOKENS,
             eog_ids: tuple[int, ...] = ()):
    """llama-cpp-python: logits on every probe position, and a greedy continuation of gen_prompt."""
    import numpy as np
    import torch
    import llama_cpp

    n_ctx = 64 * ((max(max(map(len, probes)), len(gen_prompt or ()) + n_gen) + 64) // 64)
    llm = _llama(path, n_ctx)
    try:
        logits = []
        for ids in probes:
            llm.reset()
            llm.eval(ids)
            logits.append(torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32)))
        llm.reset()
        generated = []
        if gen_prompt:
            for tok in llm.generate(gen_prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0):
                generated.append(int(tok))
                if len(generated) >= n_gen:
                    break
        vocab = llama_cpp.llama_model_get_vocab(llm.model)
        eog = {i: bool(llama_cpp.llama_vocab_is_eog(vocab, i)) for i in eog_ids}
    finally:
        llm.close()
    return logits, generated, eog


def quant_of_file(path: Path) -> str:
    """The --quant a GGUF was exported at: its export report's, else read from its expert tensors' type."""
    rep = Path(str(path) + ".report.json")
    if rep.exists():
        try:
            q = json.loads(rep.read_text()).get("quant")
            if q in QUANTS:
                return q
        except ValueError:
            pass
    types = read_gguf_header(path)["expert_types"]
    by_type = {"F32": "f32", "F16": "f16", "BF16": "bf16", "Q8_0": "q8_0", "MXFP4": "mxfp4"}
    if len(types) == 1 and types[0] in by_type:
        return by_type[types[0]]
    return "q4_k_m"  # some other quant: judged as the low-bit family


def verify_gguf(path: str | Path, model_dir: str | Path, quant: str, *, probes: list[list[int]] | None = None,
                thresholds: dict | None = None, base_dir: str | Path | None = None,
                rope_truncate: bool | None = True, check_bytes: bool = True) -> dict:
    """Read the GGUF back, compare its bytes with the merged weights (gguf_bytes), and run it against the merged
    model (transformers fp32, YaRN as llama.cpp computes it) on the probe tokens; with `base_dir`, also measure how
    much of the adapter's effect the file keeps (`adapter_retention`).

    Returns {"passed", "failures": [str], "quant", "family", "thresholds", "header": inspect_gguf(...),
             "bytes": check_gguf_bytes(...) or None, "retention": adapter_retention(...) or None,
             "max_abs_logit_diff", "max_abs_logit_diff_limit", "worst_position", "mean_abs_logit_diff", "kl_mean",
             "kl_max", "top1_agreement", "top1_agreement_tol", "cos_mean", "cos_min", "cos_p10", "ref_logit_rms",
             "generated": [ids], "generated_text", "greedy_reference": the merged model's greedy ids,
             "greedy_diverges_at": index or None, "greedy_match": bool, "eog": {id: bool}, "rope_truncate"}.
    `rope_truncate=False` computes the reference as gpt-oss's config is written (what llama.cpp does not do): for
    measuring the runtime's deviation (scripts/rope_rounding.py) and for the test that shows the check sees it."""
    import torch

    from swft_lite.gguf_bytes import check_gguf_bytes

    path, model_dir = Path(path), Path(model_dir)
    family = QUANTS[quant][2]
    th = json.loads(json.dumps(GGUF_THRESHOLDS[family]))
    th.update(RETENTION_THRESHOLDS)
    th.update(thresholds or {})
    header = inspect_gguf(path, model_dir)
    failures = list(header["problems"])
    expert_want = {"mxfp4": "MXFP4", "q8_0": "Q8_0", "f16": "F16", "bf16": "BF16", "f32": "F32"}.get(quant)
    if expert_want and header["expert_types"] != [expert_want]:
        failures.append(f"expert tensors are {header['expert_types']}, expected {expert_want} for --quant {quant}")
    byte_check = None
    if check_bytes:
        byte_check = check_gguf_bytes(path, model_dir)
        failures += byte_check["failures"]

    probes = probes if probes is not None else probe_token_ids(model_dir)
    gen_prompt = probe_token_ids(model_dir)[1]  # ends with "<|start|>assistant": the model answers
    ref, hf_greedy, hf_steps = reference_logits(model_dir, probes, gen_prompt, rope_truncate=rope_truncate)
    tok = load_tokenizer(model_dir)
    stop_ids = tuple(i for i in (tok.convert_tokens_to_ids(t) for t in ("<|return|>", "<|call|>"))
                     if isinstance(i, int) and i >= 0)
    logits, generated, eog = run_gguf(path, probes, gen_prompt, eog_ids=stop_ids)
    rms = float(torch.cat([r.flatten() for r in ref]).pow(2).mean().sqrt())
    limit = None
    if family == "exact":
        per = th["max_abs_logit_diff"]
        limit = (per[quant] if isinstance(per, dict) else per) * max(1.0, rms)
        th["top1_tolerance"] = 2 * limit
    cmp = compare_logits(ref, logits, th.get("top1_tolerance", 0.0))
    coss = torch.cat([(a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)) for a, b in zip(ref, logits)])
    cmp["cos_p10"] = float(torch.quantile(coss, 0.10))
    cmp["ref_logit_rms"] = rms
    cmp["max_abs_logit_diff_limit"] = limit
    # where the largest deviation sits (probe, position): a deviation that grows with position is RoPE's
    per_pos = [(a - b).abs().amax(-1) for a, b in zip(ref, logits)]
    worst = max(((i, int(d.argmax()), float(d.max())) for i, d in enumerate(per_pos)), key=lambda x: x[2])
    cmp["worst_position"] = {"probe": worst[0], "position": worst[1], "max_abs_logit_diff": worst[2]}

    # greedy continuation: llama.cpp's greedy tokens vs the merged model's. At the first difference the prefixes are
    # equal, so the merged model's logits there say how far apart the two candidates were.
    diverge = next((i for i, (a, b) in enumerate(zip(generated, hf_greedy)) if a != b), None)
    greedy_ok, regret = True, 0.0
    if diverge is not None:
        step = hf_steps[diverge]
        regret = float(step[hf_greedy[diverge]] - step[generated[diverge]])
        greedy_ok = regret <= th.get("top1_tolerance", 0.0)
    cmp.update({"greedy_reference": hf_greedy, "greedy_diverges_at": diverge, "greedy_regret": regret})

    if family == "exact":
        # The weights are the merged model's (f32/f16) or the same bf16 numbers: the file must compute the same
        # logits at every position, within what llama.cpp's f16/bf16 arithmetic rounds (GGUF_THRESHOLDS).
        if not cmp["max_abs_logit_diff"] <= limit:
            # not forgiven; said, so that a router near-tie (where any arithmetic difference picks another expert)
            # can be told from a deviation everywhere
            w = cmp["worst_position"]
            gaps = router_gaps(model_dir, probes, gen_prompt, rope_truncate=rope_truncate)
            gap, layer = (float(gaps[w["probe"]][0][w["position"]]), int(gaps[w["probe"]][1][w["position"]]))
            median = float(torch.cat([g for g, _ in gaps]).median())
            w.update({"router_gap": gap, "router_gap_layer": layer, "router_gap_median": median})
            failures.append(f"max |dlogit| {cmp['max_abs_logit_diff']:.3g} > {limit:.3g} (worst at probe {w['probe']} "
                            f"position {w['position']}; there the merged model's last chosen and first unchosen "
                            f"expert scores are {gap:.2g} apart in layer {layer}, median over positions "
                            f"{median:.2g})")
        if not cmp["top1_agreement_tol"] >= th["top1_agreement_min"]:
            failures.append(f"top-1 agreement {cmp['top1_agreement_tol']:.4f} < {th['top1_agreement_min']:g}")
        if not greedy_ok:
            failures.append("greedy generation differs from the merged model's")
    else:
        if not cmp["cos_mean"] >= th["cos_mean_min"]:
            failures.append(f"mean logit cosine {cmp['cos_mean']:.4f} < {th['cos_mean_min']:g}")
        if not cmp["cos_p10"] >= th["cos_p10_min"]:
            failures.append(f"10th-percentile logit cosine {cmp['cos_p10']:.4f} < {th['cos_p10_min']:g}")

    retention = None
    if base_dir is not None:
        base_logits = reference_logits(Path(base_dir), probes, rope_truncate=rope_truncate)[0]
        retention = adapter_retention(ref, base_logits, logits)
        if retention["kl_retention"] is not None and not retention["kl_retention"] >= th["kl_retention_min"]:
            failures.append(f"keeps {retention['kl_retention']:.1%} of the fine-tuning by KL (1 - KL(merged||gguf) / "
                            f"KL(merged||base)) < {th['kl_retention_min']:.0%}")
        if retention["top1_retention"] is not None and not retention["top1_retention"] >= th["top1_retention_min"]:
            failures.append(f"reproduces {retention['top1_retention']:.1%} of the {retention['top1_changes']} top-1 "
                            f"changes the adapter made < {th['top1_retention_min']:.0%}")
    if len(generated) < GENERATE_TOKENS and not (generated and eog.get(generated[-1])):
        failures.append(f"generated only {len(generated)} tokens")
    for tid in stop_ids:
        if not eog.get(tid):
            failures.append(f"llama.cpp does not treat {tok.convert_ids_to_tokens(tid)} ({tid}) as end-of-generation")
    report = dict(cmp)
    report.update({"passed": not failures, "failures": failures, "quant": quant, "family": family,
                   "thresholds": th, "header": header, "bytes": byte_check, "retention": retention,
                   "generated": generated, "generated_text": tok.decode(generated), "greedy_match": greedy_ok,
                   "eog": eog, "probe_tokens": sum(map(len, probes)), "rope_truncate": rope_truncate})
    return report


def what_to_do(v: dict) -> str:
    """The advice that ends a failed verification's Error line, by what failed."""
    worst = v.get("worst_position") or {}
    gap, median = worst.get("router_gap"), worst.get("router_gap_median")
    if gap is not None and median and gap < 0.01 * median:
        return (f"The worst position sits on a router near-tie (expert scores {gap:.2g} apart, median {median:.2g}): "
                "any difference in arithmetic picks another expert there, so the file may be sound; try its answers "
                "with `swft-lite chat FILE.gguf`, keep it with --no-verify, or export q8_0 (the default)")
    retention = v.get("retention") or {}
    if any("of the fine-tuning" in f or "top-1 changes" in f for f in v.get("failures", [])):
        kept = retention.get("kl_retention")
        return (f"This quant keeps too little of the fine-tuning{'' if kept is None else f' ({kept:.0%})'}: export "
                "a finer one (q8_0, the default, or f16)")
    return "The file does not compute what merged/ computes: see the report beside it, and rerun `swft-lite verify`"


def adapter_retention(merged: list, base: list, gguf: list) -> dict:
    """How much of the adapter's effect a file keeps, on the probe tokens: kl_retention = 1 - mean KL(merged||gguf) /
    mean KL(merged||base) (1: all of it, 0: no closer to the merged model than the base is, < 0: further), and of
    the positions where the adapter changed the top-1 token (base's != merged's), the share where the file's top-1
    is the merged model's (top1_retention). Both None when the adapter changed nothing measurable."""
    eff = compare_logits(merged, base)
    got = compare_logits(merged, gguf)
    changes = reproduced = 0
    for m, b, g in zip(merged, base, gguf):
        im, ib, ig = m.argmax(-1), b.argmax(-1), g.argmax(-1)
        changed = im != ib
        changes += int(changed.sum())
        reproduced += int((ig[changed] == im[changed]).sum())
    noop = eff["kl_mean"] < NOOP_EFFECT_KL
    return {"kl_effect": eff["kl_mean"], "kl_gguf": got["kl_mean"],
            "kl_retention": None if noop else 1.0 - got["kl_mean"] / eff["kl_mean"],
            "top1_changes": changes, "top1_reproduced": reproduced,
            "top1_retention": reproduced / changes if changes and not noop else None}


def format_gguf_verification(v: dict) -> str:
    h = v["header"]
    limit = v.get("max_abs_logit_diff_limit")
    lines = [
        f"  header: arch {h['architecture']}, {h['block_count']} blocks, {h['tensor_count']} tensors "
        f"(expected {h['expected_tensor_count']}), vocab {h['vocab_size']}, chat template "
        f"{'yes' if h['chat_template'] else 'NO'}, experts {','.join(h['expert_types'])}, "
        f"bos/eos/pad {h['special_ids']['bos']['gguf']}/{h['special_ids']['eos']['gguf']}/"
        f"{h['special_ids']['pad']['gguf']}",
    ]
    if v.get("bytes"):
        from swft_lite.gguf_bytes import format_bytes_check

        lines.append(format_bytes_check(v["bytes"]))
    lines += [
        f"  vs merged model on {v['probe_tokens']} probe tokens: max |dlogit| {v['max_abs_logit_diff']:.2e}"
        + (f" (limit {limit:.2e}, every position)" if limit is not None else "")
        + f", mean {v['mean_abs_logit_diff']:.2e}, cosine mean {v['cos_mean']:.5f} p10 {v['cos_p10']:.5f} min "
        f"{v['cos_min']:.4f}, top-1 {v['top1_agreement']:.4f}, KL mean {v['kl_mean']:.2e}",
    ]
    r = v.get("retention")
    if r is not None:
        if r["kl_retention"] is None:
            lines.append(f"  fine-tuning kept: not measurable (the adapter moved the probes by KL {r['kl_effect']:.1e})")
        else:
            lines.append(f"  fine-tuning kept: {r['kl_retention']:.1%} by KL (gguf {r['kl_gguf']:.2e} vs adapter "
                         f"effect {r['kl_effect']:.2e}), {r['top1_reproduced']}/{r['top1_changes']} of the adapter's "
                         f"top-1 changes ({r['top1_retention']:.1%})")
    else:
        lines.append("  fine-tuning kept: not measured (no run folder: the base is unknown)")
    lines += [
        f"  generated {len(v['generated'])} tokens: {v['generated_text']!r} (greedy match: {v['greedy_match']})",
        "  " + ("PASSED" if v["passed"] else "FAILED: " + "; ".join(v["failures"])),
    ]
    return "\n".join(lines)


# --- Ollama ----------------------------------------------------------------------------------------------------------
# A Go template (Ollama's format) that renders OpenAI's harmony format the way gpt-oss was trained: system message
# with knowledge cutoff, current date, reasoning level and the valid channels; the Modelfile's SYSTEM / the user's
# system prompt goes into a developer message under "# Instructions"; earlier assistant turns are rendered as
# `<|start|>assistant<|channel|>final<|message|>...<|end|>` (their reasoning only after the last user turn); tool
# calls/results in the commentary channel; the generation prompt is `<|start|>assistant`. Ollama switches to its
# harmony parser (reasoning/"thinking" and tool calls) only when the template contains both <|start|> and <|end|>.
# Tool definitions go into the developer message as TypeScript-like declarations in `namespace functions { ... }`,
# the way openai-harmony and Ollama's own gpt-oss template (ollama.com/library/gpt-oss) render them.
# Generation stops on <|return|> / <|call|>, which the GGUF marks end-of-generation (checked by verify_gguf), so
# no PARAMETER stop lines are needed. Sampling as Ollama's library gpt-oss sets it: temperature 1.0, top_p 1.0 and
# top_k 0 (off; Ollama's default would be 40).
OLLAMA_TEMPLATE = """<|start|>system<|message|>You are ChatGPT, a large language model trained by OpenAI.
Knowledge cutoff: 2024-06
Current date: {{ currentDate }}
{{- if or (not .IsThinkSet) .Think }}

Reasoning: {{ if .ThinkLevel }}{{ .ThinkLevel }}{{ else }}medium{{ end }}
{{- end }}

# Valid channels: analysis, commentary, final. Channel must be included for every message.
{{- if .Tools }}
Calls to these tools must go to the commentary channel: 'functions'.
{{- end }}<|end|>
{{- if or .Tools .System }}<|start|>developer<|message|>
{{- if .Tools }}# Tools

## functions

namespace functions {
{{- range .Tools }}
{{ if .Function.Description }}
// {{ .Function.Description }}
{{- end }}
{{- if .Function.Parameters.Properties }}
type {{ .Function.Name }} = (_: {
{{- range $name, $prop := .Function.Parameters.Properties }}
{{- if $prop.Description }}
  // {{ $prop.Description }}
{{- end }}
  {{ $name }}: {{ if gt (len $prop.Type) 1 }}{{ range $j, $t := $prop.Type }}{{ if $j }} | {{ end }}{{ $t }}{{ end }}{{ else }}{{ index $prop.Type 0 }}{{ end }},
{{- end }}
}) => any;
{{- else }}
type {{ .Function.Name }} = () => any;
{{- end }}
{{- end }}

} // namespace functions
{{- end }}
{{- if .System }}
{{- if .Tools }}

{{ end }}# Instructions

{{ .System }}
{{- end }}<|end|>
{{- end }}
{{- $lastUser := -1 }}
{{- $prefill := false }}
{{- range $i, $m := .Messages }}
  {{- if eq $m.Role "user" }}{{ $lastUser = $i }}{{ end }}
  {{- if and (eq $m.Role "assistant") (eq (len (slice $.Messages $i)) 1) }}{{ $prefill = true }}{{ end }}
{{- end }}
{{- range $i, $m := .Messages }}
  {{- $last := eq (len (slice $.Messages $i)) 1 }}
  {{- if eq $m.Role "user" }}<|start|>user<|message|>{{ $m.Content }}<|end|>
  {{- else if eq $m.Role "assistant" }}
    {{- if and $m.Thinking (gt $i $lastUser) }}<|start|>assistant<|channel|>analysis<|message|>{{ $m.Thinking }}
      {{- if not (and $last (not $m.Content)) }}<|end|>{{ end }}
    {{- end }}
    {{- if $m.Content }}<|start|>assistant<|channel|>final<|message|>{{ $m.Content }}
      {{- if not $last }}<|end|>{{ end }}
    {{- end }}
    {{- range $m.ToolCalls }}<|start|>assistant<|channel|>commentary to=functions.{{ .Function.Name }} <|constrain|>json<|message|>{{ .Function.Arguments }}<|call|>
    {{- end }}
  {{- else if eq $m.Role "tool" }}<|start|>functions.{{ $m.ToolName }} to=assistant<|channel|>commentary<|message|>{{ $m.Content }}<|end|>
  {{- end }}
{{- end }}
{{- if not $prefill }}<|start|>assistant{{ end }}"""


def modelfile_path(gguf_path: Path) -> Path:
    """One Modelfile per GGUF, named after it: RUN-q8_0.gguf -> RUN-q8_0.Modelfile."""
    gguf_path = Path(gguf_path)
    return gguf_path.with_name(gguf_path.stem + ".Modelfile")


def ollama_command(gguf_path: Path, name: str | None = None) -> str:
    """The command that creates an Ollama model from the GGUF's Modelfile, paths quoted for a POSIX shell."""
    gguf_path = Path(gguf_path)
    mf = modelfile_path(gguf_path)
    name = name or re.sub(r"[^a-z0-9._-]+", "-", gguf_path.stem.lower()).strip("-") or "my-gpt-oss"
    return f"cd {shlex.quote(str(gguf_path.parent))} && ollama create {shlex.quote(name)} -f {shlex.quote(mf.name)}"


def _sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def write_modelfile(gguf_path: Path, *, overwrite: bool = False, written_sha256: str | None = None,
                    log: Callable[[str], None] = print) -> dict:
    """An Ollama Modelfile beside the GGUF (`modelfile_path`). An existing one is replaced only when it is still
    what swft-lite wrote (its sha256 equals `written_sha256`, recorded in the export report) or with `overwrite`;
    a Modelfile the user changed is kept. Returns {"path", "sha256" (of what swft-lite wrote, or None when kept),
    "status": written | replaced | kept}."""
    from swft_lite import __version__

    gguf_path = Path(gguf_path)
    dest = modelfile_path(gguf_path)
    status = "written"
    if dest.exists():
        current = _sha256(dest)
        if current == written_sha256:
            status = "replaced"
        elif overwrite:
            status = "replaced"
            log(f"  --overwrite: replacing {dest.name}, which was changed after swft-lite wrote it")
        else:
            log(f"  kept {dest.name}: it was changed after swft-lite wrote it (or swft-lite did not write it); "
                "--overwrite replaces it")
            return {"path": str(dest), "sha256": written_sha256, "status": "kept"}
    from_path = f"./{gguf_path.name}"
    if any(c.isspace() for c in from_path):
        from_path = json.dumps(from_path)
    text = (f"# Ollama Modelfile written by swft-lite {__version__} for {gguf_path.name}.\n"
            f"# Use: {ollama_command(gguf_path)}\n"
            "# The template renders OpenAI's harmony format (gpt-oss's chat format) with tool definitions. Generation\n"
            "# stops on <|return|> and <|call|>, which the GGUF marks as end-of-generation tokens.\n"
            f"FROM {from_path}\n\n"
            f'TEMPLATE """{OLLAMA_TEMPLATE}"""\n\n'
            "# sampling as Ollama's library gpt-oss: OpenAI's recommendation, top_k off\n"
            "PARAMETER temperature 1.0\n"
            "PARAMETER top_p 1.0\n"
            "PARAMETER top_k 0\n")
    dest.write_text(text)
    return {"path": str(dest), "sha256": _sha256(dest), "status": status}


# --- the command -----------------------------------------------------------------------------------------------------


def resolve_source(source: str | Path, log: Callable[[str], None] = print,
                   **merge_kwargs) -> tuple[Path, Path | None, dict | None]:
    """(merged model folder, run folder or None, the merge's report when it was merged just now) for RUN_DIR or
    MERGED_DIR; a run without merged/ is merged (and verified) first."""
    source = Path(source).expanduser().resolve()
    found = find_merged(source)
    if found is not None:
        merged, run = found
        merge_report = None
        if merged is None:
            from swft_lite.merge import merge_adapter

            log(f"{source} has no merged/ yet: merging (and verifying) first.")
            merge_report = merge_adapter(source, log=log, **merge_kwargs)  # says so when the run did not finish
            merged = run.merged
        elif run is not None:
            from swft_lite.merge import unfinished_run_note

            note = unfinished_run_note(run.path)
            if note:
                log(note + " (its merged/)")
        return merged, (run.path if run is not None else None), merge_report
    if RunFolder(source).has_record():
        from swft_lite.merge import unfinished_run_message

        raise GGUFError(unfinished_run_message(RunFolder(source), "holds no adapter/ or merged/ to export"))
    raise GGUFError(f"{source} is neither a merged model folder (config.json + *.safetensors) nor a run folder "
                    "(adapter/ or merged/)")


def check_chain(model_dir: Path, run_dir: Path | None, log: Callable[[str], None] = print) -> dict | None:
    """merged/ against base + adapter and the trained-model record (merge.recheck_merged); None without a run
    folder (nothing to compare with). Raises GGUFVerificationError when merged/ is not the trained model."""
    if run_dir is None or not (RunFolder(run_dir).adapter / "adapter_config.json").exists():
        log("  note: no run folder with adapter/ beside this merged model: it cannot be checked against base + "
            "adapter, and how much of the fine-tuning a GGUF keeps cannot be measured")
        return None
    from swft_lite.merge import format_verification, recheck_merged

    log(f"Checking {model_dir} against base + adapter and the trained-model record first ...")
    v = recheck_merged(model_dir, run_dir, log=log)
    log(format_verification(v))
    if not v["passed"]:
        raise GGUFVerificationError(
            f"{model_dir} is not the model that was trained: " + "; ".join(v["failures"]) + ". Nothing was "
            f"exported. Merge again with `swft-lite merge {shlex.quote(str(run_dir))} --overwrite`.", {"chain": v})
    return v


def export_gguf(source: str | Path, *, quant: str = DEFAULT_QUANT, out: str | Path | None = None,
                llama_cpp: str | Path | None = None, verify: bool = True, overwrite: bool = False,
                modelfile: bool = True, thresholds: dict | None = None,
                log: Callable[[str], None] = print) -> dict:
    """Check merged/ against the run it came from, convert it to GGUF at `quant`, verify the file, write a
    Modelfile.

    Returns {"gguf", "quant", "outtype", "ftype", "quantize": {"tool", "fallbacks"} or None, "converter",
             "size_bytes", "chain": merged/ vs base + adapter + trained record (recheck_merged) or None,
             "modelfile": {"path", "sha256", "status"} or None, "seconds", "log",
             "verification": verify_gguf(...) or None}.
    Raises GGUFError (GGUFVerificationError with `.report` when a check fails: merged/ not the trained model -
    nothing is converted - or the file not what merged/ computes - it is then renamed `<file>.failed`)."""
    t0 = time.time()
    quant = quant.lower()
    if quant not in QUANTS:
        raise GGUFError(f"unknown --quant {quant!r}; choose one of {', '.join(QUANTS)}")
    outtype, ftype, family = QUANTS[quant]
    model_dir, run_dir, merge_report = resolve_source(source, log=log)
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "gpt_oss":
        raise GGUFError(f"{model_dir} is a {cfg.get('model_type')!r} model; save-gguf exports gpt-oss")
    if out is None:
        name = (run_dir.name if run_dir else model_dir.name)
        out = (RunFolder(run_dir).gguf if run_dir else model_dir.parent / "gguf") / f"{name}-{quant}.gguf"
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise GGUFError(f"{out} already exists; pass --overwrite to replace it")
    if ftype and ftype.startswith(("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ")):
        log(f"Warning: {quant} is a k-/i-quant (256-wide blocks). gpt-oss's tensors are {cfg.get('hidden_size')} "
            "wide and llama.cpp falls back to q5_0/q8_0 for every tensor whose width is not a multiple of 256 "
            "(gpt-oss-20b's 2880 is not), so the file is larger than that quant usually is and not uniformly that "
            "quant. q8_0 (the default) keeps the fine-tuning.")
    converter = find_converter(llama_cpp)
    report: dict = {"gguf": str(out), "quant": quant, "outtype": outtype, "ftype": ftype, "converter": str(converter),
                    "model_dir": str(model_dir), "quantize": None, "chain": None, "verification": None}
    chain = None
    if verify:
        if merge_report is not None and run_dir is not None:
            chain = merge_report.get("verification")  # verified by the merge a moment ago
            if chain is not None:
                inputs_base = merge_report.get("base_dir")
                chain = dict(chain, base_dir=inputs_base, adapter_dir=merge_report.get("adapter"))
        if chain is None:
            chain = check_chain(model_dir, run_dir, log=log)
        report["chain"] = chain
    previous = out.with_name(out.name + ".report.json")
    written_sha = None
    if previous.exists():
        try:
            written_sha = (json.loads(previous.read_text()).get("modelfile") or {}).get("sha256")
        except ValueError:
            pass
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    log_file = out.with_name(out.name + ".log")
    log_file.write_text("")
    report["log"] = str(log_file)
    log(f"Converting {model_dir} -> {out.name} ({quant}) with {converter / 'convert_hf_to_gguf.py'}")
    try:
        if ftype is None:
            convert_hf_to_gguf(model_dir, partial, outtype, converter, log_file)
        else:
            inter = out.with_name(out.name + f".{outtype}.tmp")
            try:
                convert_hf_to_gguf(model_dir, inter, outtype, converter, log_file)
                log(f"Quantizing to {ftype} ...")
                report["quantize"] = quantize_gguf(inter, partial, ftype, converter, log_file)
            finally:
                if inter.exists():
                    inter.unlink()
            fb = report["quantize"]["fallbacks"]
            if fb:
                log(f"  {len(fb)} tensor(s) fell back to another type (see {log_file.name}), e.g. {fb[0]}")
        report["size_bytes"] = partial.stat().st_size
        report["convert_seconds"] = time.time() - t0
        if verify:
            log("Verifying the GGUF: header, every tensor's bytes, then llama.cpp vs the merged model (and the base) "
                "on the probe tokens ...")
            v = verify_gguf(partial, model_dir, quant, thresholds=thresholds,
                            base_dir=chain["base_dir"] if chain else None)
            report["verification"] = v
            log(format_gguf_verification(v))
            if not v["passed"]:
                raise GGUFVerificationError(f"GGUF verification FAILED for {out.name}: " + "; ".join(v["failures"])
                                            + ". " + what_to_do(v), report)
    except BaseException as exc:
        if partial.exists():
            failed = out.with_name(out.name + ".failed")
            os.replace(partial, failed)
            report["failed_file"] = str(failed)
            report["seconds"] = time.time() - t0
            out.with_name(out.name + ".failed.report.json").write_text(
                json.dumps(report, indent=2, default=str) + "\n")
            if isinstance(exc, GGUFError):
                exc.args = (f"{exc.args[0]}\nThe file was renamed to {failed} so it is not mistaken for a good "
                            "export.",)
        raise
    os.replace(partial, out)
    if modelfile:
        report["modelfile"] = write_modelfile(out, overwrite=overwrite, written_sha256=written_sha, log=log)
    report["seconds"] = time.time() - t0
    out.with_name(out.name + ".report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    v = report["verification"]
    kept = ""
    if v and v.get("retention") and v["retention"]["kl_retention"] is not None:
        r = v["retention"]
        kept = (f"; keeps {r['kl_retention']:.1%} of the fine-tuning by KL and {r['top1_retention']:.0%} of its "
                "top-1 changes")
    log(f"GGUF written to {out} ({report['size_bytes'] / 2**20:.1f} MiB{kept})"
        + (f"\nOllama: {ollama_command(out)}" if modelfile else ""))
    return report
