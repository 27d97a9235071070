"""The bytes of a GGUF, tensor by tensor, against the merged weights quantized the same way.

The logit check (gguf_export.verify_gguf) sees only what the probe tokens reach: a changed row of the embedding for a
token that is not in the probes, or a block of an expert the probes never route to, passes it. So every tensor of
the file is read back (gguf's GGUFReader), dequantized (gguf.quants.dequantize), and compared with the merged
model's tensor put through the same quantization in numpy (gguf.quants.quantize: the converter's own code for
f32/f16/bf16/q8_0, and a port of llama.cpp's reference quantizers for the types llama-quantize writes):

* f32 / f16 / bf16: every element must be equal (the conversion is a plain cast);
* block types with a numpy quantizer (q8_0, mxfp4, q4_0, q4_1, q5_0, q5_1): every element within one grid step of its
  block (`GRID_STEP` x the block's largest magnitude) of the re-quantized value. Measured: the converter's and
  llama-quantize's blocks are byte for byte what numpy writes (0 elements differ); a block of random bytes moves
  elements by many steps;
* the other types (k-quants, i-quants: no numpy quantizer): within half the block's largest magnitude of the merged
  value (coarse; reported as `approximate`).

The name mapping is gpt-oss's, as llama.cpp's converter (conversion/gpt_oss.py) writes it: gate_up_proj is
transposed and split into ffn_gate_exps (even rows) and ffn_up_exps (odd rows), down_proj transposed.
Imports nothing of swft-lite but errors.
"""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

from swft_lite.errors import GGUFError

# One grid step as a fraction of a block's largest magnitude, for the block types checked against re-quantization.
# q8_0: amax/127; q4_0 ... q5_1: 1/7 ... 1/31 of the range; mxfp4 (E2M1, scale 2^(floor(log2 amax) - 2)): the top
# spacing is 2 * 2^e <= amax / 2.
GRID_STEP = {"Q8_0": 1 / 127, "Q4_0": 1 / 7, "Q4_1": 1 / 15, "Q5_0": 1 / 15, "Q5_1": 1 / 31, "MXFP4": 1 / 2}
EXACT_TYPES = ("F32", "F16", "BF16")
APPROX_FRACTION = 0.5  # types without a numpy quantizer: |file - merged| <= this x block amax
CHUNK_ELEMENTS = 1 << 24  # rows are compared in slices of about this many elements (bounded memory at 20B)


# --- reading -------------------------------------------------------------------------------------------------------


class _PlainMemmapNumpy:
    """numpy, except that memmap() returns a plain ndarray view of the map. GGUFReader slices its map once per
    vocabulary string (~650k times for gpt-oss's 201k tokens + 446k merges), and each slice of an np.memmap runs
    memmap bookkeeping in Python; on a plain view the same read is ~2.5x faster (15-25 s -> 6-10 s here)."""

    def __getattr__(self, name):
        import numpy

        return getattr(numpy, name)

    @staticmethod
    def memmap(path, mode="r", *args, **kwargs):
        import numpy

        return numpy.memmap(path, mode=mode, *args, **kwargs).view(numpy.ndarray)


def reader_for(path: Path):
    """read_gguf, kept for the process per file version (the header check and the bytes check read the same file)."""
    path = Path(path).resolve()
    st = path.stat()
    return _reader_cached(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _reader_cached(path: str, _size: int, _mtime: int):
    return read_gguf(Path(path))


def read_gguf(path: Path):
    """gguf.GGUFReader on `path` (read-only), with the faster plain-view map when that works."""
    import gguf
    import gguf.gguf_reader as gr

    saved = gr.np
    try:
        gr.np = _PlainMemmapNumpy()
        return gguf.GGUFReader(str(path))
    except Exception:  # noqa: BLE001 - a gguf release that needs the real memmap: read it the normal way
        gr.np = saved
        return gguf.GGUFReader(str(path))
    finally:
        gr.np = saved


# --- gpt-oss: GGUF tensor name -> (merged tensor name, transform) ----------------------------------------------------

_GLOBAL = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
           "output.weight": "lm_head.weight"}
_LAYER = {"attn_norm.weight": "input_layernorm.weight", "post_attention_norm.weight": "post_attention_layernorm.weight",
          "attn_sinks.weight": "self_attn.sinks", "ffn_gate_inp.weight": "mlp.router.weight",
          "ffn_gate_inp.bias": "mlp.router.bias", "ffn_down_exps.bias": "mlp.experts.down_proj_bias"}
for _g, _h in (("attn_q", "q_proj"), ("attn_k", "k_proj"), ("attn_v", "v_proj"), ("attn_output", "o_proj")):
    for _p in ("weight", "bias"):
        _LAYER[f"{_g}.{_p}"] = f"self_attn.{_h}.{_p}"


def hf_source(gguf_name: str) -> tuple[str, str] | None:
    """(merged tensor name, transform) for a gpt-oss GGUF tensor; transform is one of
    none | gate | up (gate_up_proj transposed, even / odd rows) | gate_bias | up_bias | down (transposed)."""
    if gguf_name in _GLOBAL:
        return _GLOBAL[gguf_name], "none"
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    if not m:
        return None
    pre, rest = f"model.layers.{m.group(1)}.", m.group(2)
    if rest in _LAYER:
        return pre + _LAYER[rest], "none"
    return {"ffn_gate_exps.weight": (pre + "mlp.experts.gate_up_proj", "gate"),
            "ffn_up_exps.weight": (pre + "mlp.experts.gate_up_proj", "up"),
            "ffn_down_exps.weight": (pre + "mlp.experts.down_proj", "down"),
            "ffn_gate_exps.bias": (pre + "mlp.experts.gate_up_proj_bias", "gate_bias"),
            "ffn_up_exps.bias": (pre + "mlp.experts.gate_up_proj_bias", "up_bias")}.get(rest)


def _transform(t, how: str):
    if how == "gate":
        return t.transpose(-1, -2)[..., ::2, :]
    if how == "up":
        return t.transpose(-1, -2)[..., 1::2, :]
    if how == "down":
        return t.transpose(-1, -2)
    if how == "gate_bias":
        return t[..., ::2]
    if how == "up_bias":
        return t[..., 1::2]
    return t


class _MergedTensors:
    """The merged folder's tensors by name, read one at a time (fp32 numpy)."""

    def __init__(self, model_dir: Path):
        self.dir = Path(model_dir)
        index = self.dir / "model.safetensors.index.json"
        if index.exists():
            self.files = dict(json.loads(index.read_text())["weight_map"])
        else:
            from safetensors import safe_open

            self.files = {}
            for f in sorted(self.dir.glob("*.safetensors")):
                with safe_open(str(f), "pt") as sf:
                    self.files.update({k: f.name for k in sf.keys()})

    def get(self, name: str, how: str):
        import torch
        from safetensors import safe_open

        with safe_open(str(self.dir / self.files[name]), "pt") as sf:
            t = sf.get_tensor(name)
        return _transform(t.to(torch.float32), how).contiguous().numpy()


# --- the comparison --------------------------------------------------------------------------------------------------


def _rows(a, n_rows: int):
    return a.reshape(n_rows, -1)


def _compare_tensor(file_data, qtype, x) -> dict:
    """One tensor: the file's (raw data, type) vs the merged fp32 values x (numpy, the GGUF's row layout)."""
    import numpy as np
    from gguf import quants
    from gguf.constants import GGML_QUANT_SIZES

    name = qtype.name
    block, _ = GGML_QUANT_SIZES[qtype]
    n_rows = int(np.prod(x.shape[:-1])) if x.ndim > 1 else 1
    width = x.shape[-1]
    xr = x.reshape(n_rows, width)
    fr = file_data.reshape(n_rows, -1)
    rows_per_chunk = max(1, CHUNK_ELEMENTS // max(1, width))
    mode = "exact" if name in EXACT_TYPES else ("requantized" if name in GRID_STEP else "approximate")
    differ = bad = 0
    worst = 0.0  # largest |diff| in units of the element's allowance (> 1 fails)
    worst_abs = 0.0
    for r0 in range(0, n_rows, rows_per_chunk):
        xs = np.ascontiguousarray(xr[r0:r0 + rows_per_chunk])
        raw = np.ascontiguousarray(fr[r0:r0 + rows_per_chunk])
        if mode == "approximate":
            want = xs
        else:
            q = np.ascontiguousarray(quants.quantize(xs, qtype))
            if q.view(np.uint8).tobytes() == raw.view(np.uint8).tobytes():
                continue  # byte for byte what the same quantization of the merged weights writes
            want = quants.dequantize(q, qtype).reshape(xs.shape)
        got = quants.dequantize(raw, qtype).reshape(xs.shape)
        diff = np.abs(got.astype(np.float64) - want.astype(np.float64))
        diff[np.isnan(diff)] = np.inf
        differ += int((diff > 0).sum())
        worst_abs = max(worst_abs, float(diff.max()) if diff.size else 0.0)
        if mode == "exact":
            bad += int((diff > 0).sum())
            continue
        frac = GRID_STEP[name] if mode == "requantized" else APPROX_FRACTION
        amax = np.abs(xs.reshape(xs.shape[0], -1, block)).max(-1, keepdims=True).astype(np.float64)
        allow = np.broadcast_to(frac * amax * 1.001 + 1e-30, (xs.shape[0], width // block, block)).reshape(xs.shape)
        ratio = diff / allow
        bad += int((ratio > 1).sum())
        worst = max(worst, float(ratio.max()) if ratio.size else 0.0)
    return {"type": name, "mode": mode, "elements": int(x.size), "elements_differ": differ,
            "elements_out_of_tolerance": bad, "max_abs_diff": worst_abs,
            "worst_in_steps": worst if mode != "exact" else (float("inf") if bad else 0.0)}


def check_gguf_bytes(path: str | Path, model_dir: str | Path, reader=None) -> dict:
    """Every tensor of a gpt-oss GGUF against the merged model's, quantized the same way (see the module doc).

    Returns {"passed", "failures": [str], "tensors": n, "elements": n, "elements_differ": n (any difference),
             "elements_out_of_tolerance": n, "modes": {exact|requantized|approximate: tensor count},
             "worst": {"tensor", "type", "max_abs_diff", "elements_out_of_tolerance"} or None,
             "bad_tensors": [{"name", ...per-tensor figures}], "seconds"}."""
    import time

    import numpy as np

    t0 = time.time()
    path, model_dir = Path(path), Path(model_dir)
    try:
        reader = reader or reader_for(path)
    except Exception as exc:  # noqa: BLE001 - a file gguf cannot parse is a failed check, said in one line
        raise GGUFError(f"{path} cannot be read as a GGUF ({type(exc).__name__}: {exc})") from None
    merged = _MergedTensors(model_dir)
    failures, bad_tensors, modes = [], [], {}
    totals = {"elements": 0, "elements_differ": 0, "elements_out_of_tolerance": 0}
    worst = None
    for t in reader.tensors:
        src = hf_source(t.name)
        if src is None or src[0] not in merged.files:
            failures.append(f"{t.name}: no tensor of the merged model maps to it")
            continue
        x = merged.get(*src)
        shape = tuple(int(n) for n in reversed(t.shape.tolist()))
        if int(np.prod(shape)) != x.size:
            failures.append(f"{t.name}: {shape} in the file, {tuple(x.shape)} in the merged model")
            continue
        try:
            r = _compare_tensor(np.asarray(t.data), t.tensor_type, x.reshape(shape))
        except NotImplementedError:
            failures.append(f"{t.name}: type {t.tensor_type.name} cannot be dequantized by this gguf package")
            continue
        modes[r["mode"]] = modes.get(r["mode"], 0) + 1
        for k in totals:
            totals[k] += r[k]
        if r["elements_out_of_tolerance"]:
            bad_tensors.append({"name": t.name, **r})
            if worst is None or r["elements_out_of_tolerance"] > worst["elements_out_of_tolerance"]:
                worst = {"tensor": t.name, **r}
    for b in bad_tensors[:5]:
        how = {"exact": "differ from the merged weights",
               "requantized": "are more than one grid step from the merged weights quantized the same way",
               "approximate": "are further than half their block's range from the merged weights"}[b["mode"]]
        failures.append(f"{b['name']} ({b['type']}): {b['elements_out_of_tolerance']} of {b['elements']} elements "
                        f"{how} (largest difference {b['max_abs_diff']:.3g})")
    if len(bad_tensors) > 5:
        failures.append(f"... and {len(bad_tensors) - 5} more tensors")
    return {"passed": not failures, "failures": failures, "tensors": len(reader.tensors), **totals, "modes": modes,
            "worst": worst, "bad_tensors": bad_tensors, "seconds": time.time() - t0}


def format_bytes_check(b: dict) -> str:
    modes = ", ".join(f"{n} {m}" for m, n in sorted(b["modes"].items()))
    return (f"  bytes: {b['tensors']} tensors ({modes}), {b['elements']:,} elements vs the merged weights quantized "
            f"the same way: {b['elements_differ']:,} differ, {b['elements_out_of_tolerance']:,} beyond tolerance "
            f"({b['seconds']:.1f} s)  ->  " + ("PASSED" if b["passed"] else "FAILED: " + "; ".join(b["failures"])))
