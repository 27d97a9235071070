"""Fold a LoRA adapter into gpt-oss base weights, shard by shard, and prove that the result is the trained model.

Why not Unsloth's `save_pretrained_merged`: on a base split over several safetensors files it could not tell the
expert layout apart (gpt-oss's expert width equals its hidden size, so (E, 2880, 2880) reads the same either way),
fell back to the base weight, and left files that loaded into a wrong model (54 % top-token agreement with the trained
model, see ../shared/gpu/README.md). Here no layout is ever guessed:

* The PEFT model is built on the meta device from the base's config (no weight memory), the adapter's tensors are
  loaded into it, and every delta is computed by PEFT's own layer code: `lora.Linear.get_delta_weight` for the
  attention projections, `lora.ParamWrapper.get_delta_weight` for the expert `target_parameters` (gate_up_proj,
  down_proj). The delta for a base tensor is computed only when that tensor is read, so memory stays at one shard.
* A base stored in MXFP4 (the original openai/gpt-oss-20b: `*_blocks` / `*_scales`) has its experts dequantized to
  bf16 with transformers' own `convert_moe_packed_tensors`.
* Every LoRA layer of the adapter must land on exactly one base tensor of the same shape, or the merge stops.
* After writing, the merged folder is loaded and compared with base + adapter (PEFT, unmerged) on fixed
  harmony-formatted probe tokens; see `MERGE_THRESHOLDS`. The output is written to a temporary folder beside the
  target and renamed only when verification passes; a failed merge is left at `<out>.failed` for inspection.
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from swft_lite.errors import DiskSpaceError, MergeError, VerificationError
from swft_lite.hub import MODEL_PATTERNS, check_download_space

# The model is the repo's root, as from_pretrained reads it: snapshot_download's patterns also match in subfolders
# (fnmatch's `*` crosses "/"), and openai/gpt-oss-20b's original/ (another copy of the weights, ~13 GB) and metal/
# would be fetched for nothing.
SUBFOLDERS = ["*/*"]
from swft_lite.probes import (KL_TRIM, TRAINED_PROBE_TOPK, compare_logits, compare_with_trained,
                              default_dtype, empty_cache, load_causal_lm, load_trained_probe, model_logits,
                              probe_token_ids)
from swft_lite.run_folder import RunFolder, RunRecord, find_adapter

# --- thresholds ----------------------------------------------------------------------------------------------------
# What "the merged model is the trained model" means, measured on the probe tokens (425 positions) against base +
# adapter (PEFT, unmerged, same device and dtype). Per position we take KL(base+adapter || merged); the gate is their
# mean after leaving out the worst 2 % of positions, plus top-1 agreement with near-ties forgiven.
#
# Why trimmed: an MoE's routing is discontinuous. bf16 rounding of the merged weights can flip a router near-tie, and
# that one token then goes to another expert: on the tiny test model (4 experts, top-2) a single such position had
# KL 0.46 while the other 424 had ~1e-5, which alone lifts the plain mean to 2e-3. The merged weights were bit for bit
# PEFT's own merge_and_unload() there, so that is not a merge error. A layout error touches most positions instead.
#
# Measured on the tiny model (2 layers, width 64, 4 experts; adapter r=4 on q/k/v/o + both expert tensors, output in
# bf16, compared in fp32). "sharp" = lm_head x10 (peaked distributions like a trained model's), "flat" = as built:
#                               trimmed mean KL      plain mean KL    top-1 (near-ties forgiven)
#   correct merge, 3 adapters    1.3e-5 .. 1.7e-5     1.3e-5 .. 2e-3   0.998 .. 1.0     (sharp)
#                                2.9e-7 .. 3.5e-7     3.2e-7 .. 2e-5   0.998 .. 1.0     (flat)
#   the adapter itself vs base   0.51 .. 0.55 (sharp), 5e-3 (flat): how far training moved the probes
#   planted faults (sharp):  one q_proj delta dropped 1.8e-3 / 0.974; one expert's down delta in one layer 2.1e-2 /
#     0.84; one expert (gate_up+down) dropped 6.5e-2 / 0.72; down delta transposed 0.26 / 0.33; a layer's deltas
#     missing 0.28 / 0.22; gate/up de-interleaved 0.34 / 0.25
#   the same faults on the flat model move KL by < 3.4e-3 (the adapter itself only moves it 5e-3) but top-1 agreement
#     still falls to 0.37 .. 0.85 for the four layout faults (the two single-tensor faults, 0.988 / 0.993, pass there).
# So in fp32: trimmed mean KL <= 1e-3 (60x the worst correct merge, below every planted fault on the sharp model) and
# top-1 agreement >= 0.90 (a flat model's correct merge with a bf16 base reached only 0.965; Unsloth's broken merge
# scored 0.54). A fault whose effect on the probes is smaller than this is, by definition, not caught: the report
# always prints how far the adapter moved the logits from the base so that this margin can be judged.
#
# The control. At the real width (2880, 32 experts top-4; 4 random layers on an H200, adapter r=16 moving the probes
# by KL 0.31) storing W + delta in bf16 costs far more than on the tiny model: trimmed KL 0.011 / top-1 0.82 in fp32
# compute, 0.035 / 0.63 in bf16 compute, and PEFT's own merge_and_unload() scored the same (0.035 / 0.66 in bf16). A
# random network is chaotic (every router decision is a near-tie), so a trained model may be much calmer, but the
# fixed limits alone would fail correct merges there. So verify_merge also runs PEFT's own merge of the same model,
# rounded to bf16 (in place, no extra memory): the limits are raised to what that control costs (x1.25 for KL, -0.05
# for top-1), and in fp32 the merged folder must match the control itself (KL <= 1e-4: the weights are the same bf16
# numbers when the merge is right; the tests see exactly 0). fp32 (CPU, or a GPU with room) is therefore the sharp
# check; bf16 compute (a 20B model on one GPU) is noise-calibrated and can miss faults smaller than bf16's own noise.
# Measured there with this design: correct merge fp32 merged-vs-control KL 0.0 (max |dlogit| 0.0), bf16 0.0352 vs the
# control's 0.0346 -> passed in both; one expert's delta dropped in one layer: fp32 failed all three gates (vs
# control 0.013), bf16 failed on top-1 only (0.593 < 0.609); every down_proj delta transposed: failed in both.
MERGE_THRESHOLDS = {
    "kl_mean_trimmed_max": 1e-3,  # mean over the best 98 % of positions of KL(base+adapter || merged), nats
    "top1_agreement_min": 0.90,   # share of positions whose top-1 token matches, near-ties forgiven (below)
    "top1_tolerance": 0.05,       # a different top-1 counts as agreeing if base+adapter rates it within 0.05 logits
    #                               of its own top-1 (a near-tie: bf16 rounding flips those)
    "control_factor": 1.25,       # the KL limit is raised to 1.25x what PEFT's own merge, stored in bf16, costs ...
    "control_top1_slack": 0.05,   # ... and the top-1 limit lowered to 0.05 below it (a model that bf16 storage
    #                               itself moves more than the fixed limits; see below)
    "vs_control_kl_max": 1e-4,    # fp32 only: the merged folder vs PEFT's own merge (same bf16 weights expected)
}
MERGE_THRESHOLDS_LOW_PRECISION = dict(MERGE_THRESHOLDS, kl_mean_trimmed_max=1e-2, top1_tolerance=0.1)
# An adapter that moves the probes less than this (mean KL vs the base) is reported as a no-op (not a failure).
NOOP_KL = 1e-6

DEFAULT_MAX_SHARD_SIZE = "5GB"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


# --- finding things --------------------------------------------------------------------------------------------------


@dataclass
class MergeInputs:
    adapter_dir: Path
    base_ref: str
    base_dir: Path
    run_dir: Path | None
    out_dir: Path


def _read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def resolve_model_dir(ref: str | Path, log: Callable[[str], None] | None = None) -> Path:
    """A local folder for a model reference: the folder itself, or the Hugging Face cache's snapshot of a hub id
    (downloaded only if the hub is reachable and not switched off with HF_HUB_OFFLINE=1)."""
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve()
    ref = str(ref)
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        raise MergeError(f"base model {ref!r} is neither a folder nor a Hugging Face hub id")
    patterns = list(MODEL_PATTERNS)
    try:
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(ref, local_files_only=True, allow_patterns=patterns,
                                          ignore_patterns=SUBFOLDERS))
        except Exception:
            if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
                raise
            # refused here, with the numbers, when the download does not fit the cache's disk
            check_download_space(ref, "--base", patterns=patterns, echo=log)
            return Path(snapshot_download(ref, allow_patterns=patterns, ignore_patterns=SUBFOLDERS))
    except DiskSpaceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure gets the same advice
        raise MergeError(f"base model {ref!r} is not a local folder and could not be found in or fetched into the "
                         f"Hugging Face cache ({type(exc).__name__}: {exc}). Pass --base PATH to a local copy of "
                         "the model that was trained (its config.json and *.safetensors).") from None


def unfinished_run_message(run: RunFolder, what: str) -> str:
    """`merge RUN` / `save-gguf RUN` of a run folder with nothing to take: what its run.json says of how it ended
    (a run left "running" by a kill -9 is named as such: `RunRecord.unfinished`) and how to go on."""
    why = run.record_or_empty().unfinished() or "run.json says it finished, yet it saved none"
    return (f"{run.path} {what}: {why}. Continue it with the same `swft-lite train` command plus --resume "
            f"--run-name {run.name} (it takes the newest complete checkpoint), or train it again with --overwrite")


def unfinished_run_note(run_dir: Path | None) -> str | None:
    """A note for merging or exporting what a run left when that run did not finish (None when it did)."""
    if run_dir is None:
        return None
    why = RunFolder(run_dir).record_or_empty().unfinished()
    return None if why is None else f"note: {run_dir}: {why}; using what it saved so far"


def resolve_inputs(source: str | Path, base: str | Path | None = None, out: str | Path | None = None) -> MergeInputs:
    """Work out the adapter, the base and the output folder from RUN_DIR or ADAPTER_DIR (+ --base / --out)."""
    source = Path(source).expanduser().resolve()
    if not source.is_dir():
        raise MergeError(f"{source} is not a folder (expected a run folder or a PEFT adapter folder)")
    found = find_adapter(source)
    if found is None and RunFolder(source).has_record():
        raise MergeError(unfinished_run_message(RunFolder(source), "holds no adapter/ to merge"))
    if found is None:
        raise MergeError(f"{source} holds neither adapter_config.json nor adapter/adapter_config.json: pass a run "
                         "folder written by `swft-lite train` or a PEFT adapter folder")
    adapter_dir, run = found
    base_ref = base
    if base_ref is None and run is not None and run.has_record():
        base_ref = run.read_record().model
    if base_ref is None:
        base_ref = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
    if not base_ref:
        raise MergeError(f"cannot tell which base model {adapter_dir} was trained on: pass --base")
    base_dir = resolve_model_dir(base_ref)
    if out is None:
        out = run.merged if run is not None else adapter_dir.parent / f"{adapter_dir.name}-merged"
    return MergeInputs(adapter_dir, str(base_ref), base_dir, run.path if run is not None else None,
                       Path(out).expanduser().resolve())


def base_weight_map(base_dir: Path) -> dict[str, str]:
    """tensor name -> safetensors file name, for a single-file or sharded checkpoint."""
    index = base_dir / "model.safetensors.index.json"
    if index.exists():
        return dict(_read_json(index)["weight_map"])
    single = base_dir / "model.safetensors"
    if single.exists():
        from safetensors import safe_open

        with safe_open(str(single), "pt") as f:
            return {k: single.name for k in f.keys()}
    raise MergeError(f"{base_dir} has no model.safetensors or model.safetensors.index.json (only safetensors "
                     "checkpoints can be merged)")


def _check_base_config(base_dir: Path) -> dict:
    cfg_path = base_dir / "config.json"
    if not cfg_path.exists():
        raise MergeError(f"{base_dir} has no config.json")
    cfg = _read_json(cfg_path)
    if cfg.get("model_type") != "gpt_oss":
        raise MergeError(f"{base_dir} is a {cfg.get('model_type')!r} model; swft-lite merges gpt-oss only")
    qmethod = (cfg.get("quantization_config") or {}).get("quant_method")
    if qmethod not in (None, "mxfp4"):
        raise MergeError(f"the base at {base_dir} is stored quantized with {qmethod!r}. A LoRA must be merged into "
                         "full-precision (bf16) or original MXFP4 weights: pass --base openai/gpt-oss-20b (MXFP4) "
                         "or a bf16 copy such as unsloth/gpt-oss-20b-BF16.")
    return cfg


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


def _local_model_dir(ref: str | None) -> Path | None:
    """A model reference as a folder on this machine (a folder, or a hub id already in the cache), never fetched."""
    if not ref:
        return None
    p = Path(ref).expanduser()
    if p.is_dir():
        return p.resolve() if (p / "config.json").exists() else None
    if ref.count("/") != 1 or ref.startswith((".", "/", "~")):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(ref, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 - not in the cache: nothing to compare with
        return None


def check_base(inputs: MergeInputs, force_base: bool, log: Callable[[str], None]) -> str:
    """Refuse a --base that is not the model the adapter was trained on (swft_lite.base_identity): compared with the
    fingerprint `swft-lite train` wrote to adapter/swft_base.json, else with the model the adapter's
    base_model_name_or_path names when that is on this machine. Returns match | forced | unchecked."""
    from swft_lite import base_identity as bi

    expected, trained_on = None, None
    rec_path = inputs.adapter_dir / bi.BASE_FILE
    if rec_path.exists():
        try:
            rec = _read_json(rec_path)
            expected, trained_on = rec.get("fingerprint"), rec.get("base_model")
        except (OSError, ValueError):
            pass
    if expected is None:
        trained_on = _read_json(inputs.adapter_dir / "adapter_config.json").get("base_model_name_or_path")
        named = _local_model_dir(trained_on)
        if named is not None and named == inputs.base_dir.resolve():
            return "match"
        if named is not None:
            expected = bi.fingerprint(named)
    if expected is None:
        log(f"note: cannot check that {inputs.base_ref} is the model this adapter was trained on: no "
            f"{bi.BASE_FILE} beside it, and the base it names ({trained_on or 'none'}) is not on this machine")
        return "unchecked"
    diffs = bi.differences(expected, bi.fingerprint(inputs.base_dir))
    if not diffs:
        return "match"
    what = f"{', '.join(diffs[:4])}{' and more' if len(diffs) > 4 else ''} differ"
    if force_base:
        log(f"warning: --force-base: {inputs.base_ref} is not the model the adapter was trained on ({trained_on}: "
            f"{what}); merging anyway")
        return "forced"
    raise MergeError(f"--base {inputs.base_ref} ({inputs.base_dir}) is not the model the adapter in "
                     f"{inputs.adapter_dir} was trained on ({trained_on}): {what}. Merging would write a wrong model. "
                     f"Pass --base {trained_on}, or --force-base to merge into this model anyway")


def _header(path: Path) -> dict:
    import struct

    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def estimate_output_bytes(base_dir: Path, weight_map: dict[str, str] | None = None) -> int:
    """Bytes of the merged bf16 checkpoint, from the base's safetensors headers (no tensor is read)."""
    weight_map = weight_map or base_weight_map(base_dir)
    total = 0
    for fname in sorted(set(weight_map.values())):
        for name, info in _header(base_dir / fname).items():
            numel = 1
            for s in info["shape"]:
                numel *= s
            if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in weight_map:
                continue
            if name.endswith("_blocks"):
                total += numel * 2 * 2  # two fp4 values per byte, each becomes 2 bytes of bf16
            elif info["dtype"] in _FLOAT_DTYPES:
                total += numel * 2
            else:
                total += numel * _DTYPE_BYTES.get(info["dtype"], 4)
    return total


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free


def check_free_disk(folder: Path, need_bytes: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    free = _free_bytes(folder)
    if free < need_bytes:
        raise MergeError(f"not enough free disk in {folder}: the merged model needs about {need_bytes / 1e9:.1f} GB "
                         f"(bf16 size of the base plus a margin) and {free / 1e9:.1f} GB are free. Free some space "
                         "or pass --out to a folder on a larger disk.")
    return {"need_gb": need_bytes / 1e9, "free_gb": free / 1e9}


# --- where the verification runs ----------------------------------------------------------------------------------
# The check loads one whole model at a time (base + adapter, merged in place for the control, then the merged folder)
# in the verification dtype, plus the probe logits: peak ~ model bytes in that dtype x VERIFY_MEMORY_FACTOR. For
# gpt-oss-20b (41.8 GB in bf16) that is ~100 GB of RAM in fp32 on the CPU, ~50 GB in bf16: more than many machines
# have, so it is checked before the ~42 GB merge is written, not found out by the OOM killer after.
VERIFY_MEMORY_FACTOR = 1.2


def plan_verification(bf16_bytes: int, *, ram_free: float | None, vram_free: float | None, device: str = "auto",
                      dtype: str | None = None) -> tuple[str, str, str]:
    """(device, dtype, a sentence saying why) for the merge check of a model of `bf16_bytes`, given the free RAM and
    free GPU memory in bytes (None: unknown / no GPU). `device` auto tries the GPU in bf16, then the CPU in fp32
    (the exact check), then the CPU in bf16; an explicit device or dtype is kept and only checked. MergeError with
    the numbers when nothing fits."""
    gb = lambda b: b / 1e9  # noqa: E731
    need = {"float32": 2 * bf16_bytes * VERIFY_MEMORY_FACTOR, "bfloat16": bf16_bytes * VERIFY_MEMORY_FACTOR,
            "float16": bf16_bytes * VERIFY_MEMORY_FACTOR}
    if device == "auto":
        options = ([("cuda", "bfloat16")] if vram_free is not None else []) + [("cpu", "float32"), ("cpu", "bfloat16")]
    else:
        dev = "cuda" if device.startswith("cuda") else "cpu"
        default = "float32" if dev == "cpu" else "bfloat16"
        options = [(device, default)] + ([(device, "bfloat16")] if dev == "cpu" else [])
    if dtype is not None:
        options = [(d, dtype) for d, _ in options]
        options = list(dict.fromkeys(options))
    tried = []
    for dev, dt in options:
        free = vram_free if dev.startswith("cuda") else ram_free
        where = "GPU memory" if dev.startswith("cuda") else "RAM"
        if free is None and dev.startswith("cuda"):
            tried.append(f"{dev}: no GPU visible")
            continue
        if free is None or free >= need[dt]:
            said = "unknown" if free is None else f"{gb(free):.1f} GB"
            note = "" if dt == "float32" else " (bf16: the looser bf16 thresholds apply)"
            return dev, dt, (f"verification on {dev} in {dt}: needs ~{gb(need[dt]):.1f} GB of {where}, "
                             f"{said} free{note}")
        tried.append(f"{dev} in {dt} needs ~{gb(need[dt]):.1f} GB of {where}, {gb(free):.1f} GB free")
    raise MergeError(f"not enough memory to verify the merge ({gb(bf16_bytes):.1f} GB in bf16): " + "; ".join(tried) +
                     ". Close other programs, verify on a GPU with --device cuda, or merge with --no-verify (not "
                     "recommended: nothing then checks the merged model)")


def _free_memory(device: str) -> tuple[float | None, float | None]:
    """(free RAM, free GPU memory) in bytes, measured now; GPU None when there is none (or --device cpu)."""
    from swft_lite.hardware import system_memory

    _, avail_gib = system_memory()
    ram = None if avail_gib is None else avail_gib * 2**30
    vram = None
    if device != "cpu":
        import torch

        if torch.cuda.is_available():
            vram = float(torch.cuda.mem_get_info()[0])
    return ram, vram


# --- MXFP4 -------------------------------------------------------------------------------------------------------


def dequantize_mxfp4(blocks, scales, dtype=None):
    """MXFP4 expert weights as stored by openai/gpt-oss (`*_blocks` (E, rows, G, 16) uint8, `*_scales` (E, rows, G)
    uint8 exponents + 127) -> a dense tensor in transformers' parameter layout (E, in, out). Uses transformers' own
    `convert_moe_packed_tensors`, the code that dequantizes when the model is loaded."""
    import torch
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype or torch.bfloat16)


# --- the adapter, on a meta-device model ---------------------------------------------------------------------------


class AdapterDeltas:
    """The adapter loaded into a PEFT model whose base weights live on the meta device (no memory).

    `targets` maps each base tensor name (as in the checkpoint, e.g. `model.layers.3.mlp.experts.down_proj`) to the
    PEFT layer that adapts it. `delta(name, base_tensor)` returns PEFT's delta for that tensor, in fp32."""

    ADAPTER_NAME = "default"

    def __init__(self, adapter_dir: Path, base_dir: Path):
        import torch
        from peft import LoraConfig, PeftModel, set_peft_model_state_dict
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.lora.layer import LoraLayer, ParamWrapper
        from peft.utils import load_peft_weights
        from transformers import AutoConfig, AutoModelForCausalLM

        peft_cfg = _read_json(adapter_dir / "adapter_config.json")
        if peft_cfg.get("peft_type") != "LORA":
            raise MergeError(f"{adapter_dir} is a {peft_cfg.get('peft_type')} adapter; only LoRA can be merged")
        for key, what in (("use_dora", "DoRA"), ("modules_to_save", "modules_to_save"),
                          ("trainable_token_indices", "trainable tokens"), ("lora_bias", "LoRA bias"),
                          ("layer_replication", "layer replication")):
            if peft_cfg.get(key):
                raise MergeError(f"the adapter uses {what} ({key}={peft_cfg[key]!r}), which swft-lite's merge does "
                                 "not support")
        # Unsloth records how it packed the experts' lora_B (unsloth_zoo moe_utils: "rank_major" is PEFT's own
        # packing; "grouped_by_expert" is an older Unsloth one). PEFT ignores the key, so an adapter in the other
        # packing would merge - and check out against PEFT's own reading of it - while computing something else
        # than the model that was trained. Refuse it rather than guess.
        layout = peft_cfg.get("lora_B_layout")
        if layout not in (None, "rank_major"):
            raise MergeError(f"{adapter_dir}/adapter_config.json says lora_B_layout={layout!r}: the experts' LoRA "
                             "is packed in Unsloth's legacy layout, not PEFT's (rank_major). swft-lite merges with "
                             "PEFT's own delta code and will not guess another layout; retrain with Unsloth "
                             ">= 2026.10 (which writes rank_major), or merge inside Unsloth with "
                             "UNSLOTH_MOE_LORA_B_LAYOUT=grouped_by_expert and check the result.")
        config = AutoConfig.from_pretrained(str(base_dir))
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
        lora_config.inference_mode = True
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        try:
            peft_model = PeftModel(model, lora_config, adapter_name=self.ADAPTER_NAME)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise MergeError(f"the adapter in {adapter_dir} does not fit the base model at {base_dir}: PEFT could "
                             f"not apply its config ({exc})") from None
        inner = peft_model.base_model.model

        targets: dict[str, object] = {}
        for mod_name, module in inner.named_modules():
            if not isinstance(module, LoraLayer):
                continue
            # The LoRA weights were put on the base weights' (meta) device: give them real CPU memory.
            for attr in module.adapter_layer_names:
                container = getattr(module, attr, None)
                if container is not None and self.ADAPTER_NAME in container:
                    container[self.ADAPTER_NAME] = container[self.ADAPTER_NAME].to_empty(device="cpu")
            path = ".".join(p for p in mod_name.split(".") if p != "base_layer")
            if isinstance(module, ParamWrapper):
                target = f"{path}.{module.parameter_name}"
            elif isinstance(module, LoraLinear):
                if module.fan_in_fan_out:
                    raise MergeError(f"{mod_name}: fan_in_fan_out LoRA is not supported")
                target = f"{path}.weight"
            else:
                raise MergeError(f"{mod_name}: LoRA on a {type(module).__name__} layer is not supported by the merge")
            if self.ADAPTER_NAME not in module.lora_A:
                continue
            if target in targets:
                raise MergeError(f"two LoRA layers adapt the same base tensor {target}")
            targets[target] = module

        from safetensors import SafetensorError

        try:
            state = load_peft_weights(str(adapter_dir), device="cpu")
        except SafetensorError as exc:
            weights = adapter_dir / "adapter_model.safetensors"
            raise MergeError(f"{weights} cannot be read ({exc}): the file is truncated or damaged (an interrupted "
                             "copy or save). Copy it again, or merge a checkpoint's adapter instead: swft-lite merge "
                             "RUN/checkpoints/checkpoint-N --base BASE") from None
        result = set_peft_model_state_dict(peft_model, state, adapter_name=self.ADAPTER_NAME)
        lora_params = {n for n, _ in peft_model.named_parameters() if ".lora_" in n}
        missing = sorted(set(result.missing_keys) & lora_params)
        if missing or result.unexpected_keys:
            raise MergeError(f"the adapter in {adapter_dir} does not fit the base model's structure: "
                             f"{len(missing)} LoRA weights missing (e.g. {missing[:2]}), "
                             f"{len(result.unexpected_keys)} unexpected (e.g. {list(result.unexpected_keys)[:2]})")
        meta_left = [n for n, p in peft_model.named_parameters() if ".lora_" in n and p.device.type == "meta"]
        if meta_left:
            raise MergeError(f"internal error: LoRA weights not materialised: {meta_left[:3]}")
        self.peft_model = peft_model
        self.targets = targets
        self.config = config
        self.r = lora_config.r

    def delta(self, name: str, base_tensor):
        """PEFT's delta for base tensor `name` (fp32, same shape as the base tensor), or None if not adapted."""
        layer = self.targets.get(name)
        if layer is None:
            return None
        return _delta_for(layer, self.ADAPTER_NAME, name, base_tensor)


def _delta_for(layer, adapter_name: str, name: str, base_tensor):
    """The delta of one LoRA layer, computed by PEFT itself (`get_delta_weight`).

    `ParamWrapper.get_delta_weight` casts its result to the adapted parameter's device and dtype, so the parameter
    (a meta tensor in our skeleton) is swapped for the real fp32 base tensor for the duration of the call."""
    import torch
    from peft.tuners.lora.layer import ParamWrapper

    with torch.no_grad():
        if isinstance(layer, ParamWrapper):
            owner = layer.get_base_layer()
            pname = layer.parameter_name
            saved = owner._parameters[pname]
            owner._parameters[pname] = torch.nn.Parameter(base_tensor, requires_grad=False)
            try:
                delta = layer.get_delta_weight(adapter_name)
            finally:
                owner._parameters[pname] = saved
        else:
            delta = layer.get_delta_weight(adapter_name)
    delta = delta.to(torch.float32)
    if tuple(delta.shape) != tuple(base_tensor.shape):
        raise MergeError(f"the LoRA delta for {name} has shape {tuple(delta.shape)} but the base tensor has "
                         f"{tuple(base_tensor.shape)}: the adapter was trained on a different model")
    return delta


# --- memory watching -----------------------------------------------------------------------------------------------


class _PeakRSS:
    """Samples this process's resident memory every 20 ms in a thread; `peak` in bytes."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self._proc = psutil.Process()
        self.start = self.peak = self._proc.memory_info().rss
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self._interval):
            self.sample()

    def sample(self):
        self.peak = max(self.peak, self._proc.memory_info().rss)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def _parse_size(size: str | int) -> int:
    if isinstance(size, int):
        return size
    s = size.strip().upper()
    for unit, mult in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6), ("KB", 10**3),
                       ("B", 1)):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


# --- the merge -----------------------------------------------------------------------------------------------------


def _merge_tensors(base_dir: Path, weight_map: dict[str, str], deltas: AdapterDeltas, work_dir: Path,
                   max_shard_bytes: int, delta_hook, log, rss: _PeakRSS) -> dict:
    """Stream the base checkpoint file by file, fold deltas in, write bf16 shards. Returns statistics."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    stats = {"tensors": 0, "lora_tensors_merged": 0, "mxfp4_tensors_dequantized": 0, "bytes_written": 0,
             "max_buffered_bytes": 0, "largest_tensor_bytes": 0}
    applied: set[str] = set()
    buffer: dict[str, torch.Tensor] = {}
    buffered = 0
    shard_files: list[tuple[str, list[str]]] = []

    def flush():
        nonlocal buffer, buffered
        if not buffer:
            return
        tmp_name = f"shard-{len(shard_files):05d}.safetensors"
        save_file(buffer, str(work_dir / tmp_name), metadata={"format": "pt"})
        shard_files.append((tmp_name, list(buffer)))
        stats["bytes_written"] += buffered
        buffer, buffered = {}, 0
        gc.collect()
        rss.sample()

    def emit(name: str, tensor: torch.Tensor):
        nonlocal buffered
        nbytes = tensor.numel() * tensor.element_size()
        if buffer and buffered + nbytes > max_shard_bytes:
            flush()
        buffer[name] = tensor
        buffered += nbytes
        stats["tensors"] += 1
        stats["largest_tensor_bytes"] = max(stats["largest_tensor_bytes"], nbytes)
        stats["max_buffered_bytes"] = max(stats["max_buffered_bytes"], buffered)

    files = sorted(set(weight_map.values()), key=lambda f: min(k for k, v in weight_map.items() if v == f))
    for i, fname in enumerate(files):
        log(f"  [{i + 1}/{len(files)}] {fname}")
        with safe_open(str(base_dir / fname), "pt") as f:
            for name in f.keys():
                if name.endswith("_scales") and name[: -len("_scales")] + "_blocks" in weight_map:
                    continue  # consumed together with its _blocks
                if name.endswith("_blocks"):
                    stem = name[: -len("_blocks")]
                    scales_file = weight_map.get(stem + "_scales")
                    if scales_file is None:
                        raise MergeError(f"{name} has no matching {stem}_scales in the base checkpoint")
                    blocks = f.get_tensor(name)
                    with safe_open(str(base_dir / scales_file), "pt") as g:
                        scales = g.get_tensor(stem + "_scales")
                    tensor = dequantize_mxfp4(blocks, scales, dtype=torch.float32)
                    del blocks, scales
                    stats["mxfp4_tensors_dequantized"] += 1
                    name = stem
                else:
                    tensor = f.get_tensor(name)
                if tensor.is_floating_point():
                    w = tensor.to(torch.float32)
                    del tensor
                    delta = deltas.delta(name, w)
                    if delta is not None:
                        if delta_hook is not None:
                            delta = delta_hook(name, delta)
                        w.add_(delta)  # what PEFT's merge does (param.data += delta), in fp32
                        del delta
                        applied.add(name)
                        stats["lora_tensors_merged"] += 1
                    out = w.to(torch.bfloat16)
                    del w
                else:
                    if name in deltas.targets:
                        raise MergeError(f"the adapter targets {name}, which the base stores as {tensor.dtype}")
                    out = tensor
                emit(name, out.contiguous())
                rss.sample()
        gc.collect()
    flush()

    not_applied = sorted(set(deltas.targets) - applied)
    if not_applied:
        raise MergeError(f"{len(not_applied)} LoRA layers of the adapter found no tensor in the base checkpoint, "
                         f"e.g. {not_applied[:3]}: the adapter was trained on a different model or the base's "
                         "tensor names differ")

    # final names and the index
    n = len(shard_files)
    weight_map_out: dict[str, str] = {}
    for k, (tmp_name, names) in enumerate(shard_files):
        final = "model.safetensors" if n == 1 else f"model-{k + 1:05d}-of-{n:05d}.safetensors"
        os.replace(work_dir / tmp_name, work_dir / final)
        for t in names:
            weight_map_out[t] = final
    if n > 1:
        index = {"metadata": {"total_size": stats["bytes_written"]}, "weight_map": dict(sorted(weight_map_out.items()))}
        (work_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    stats["shards"] = n
    return stats


def _write_side_files(inputs: MergeInputs, work_dir: Path):
    cfg = _read_json(inputs.base_dir / "config.json")
    cfg.pop("quantization_config", None)
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    (work_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = inputs.base_dir / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, work_dir / gen.name)
    # the tokenizer and chat template the adapter was trained with, else the base's
    copied = []
    for name in TOKENIZER_FILES:
        for src_dir in (inputs.adapter_dir, inputs.base_dir):
            if (src_dir / name).exists():
                shutil.copy(src_dir / name, work_dir / name)
                copied.append(name)
                break
    if "tokenizer.json" not in copied and "tokenizer.model" not in copied:
        raise MergeError(f"no tokenizer found in {inputs.adapter_dir} or {inputs.base_dir}")
    return copied


def _trained_probe_of(run_dir: Path | None) -> tuple[Path | None, bool]:
    """The probe `swft-lite train` recorded in a run folder, and whether to gate on it (not for 4-bit training)."""
    if run_dir is None or not RunFolder(run_dir).trained_probe.exists():
        return None, False
    run = RunFolder(run_dir)
    record = run.read_record() if run.has_record() else RunRecord()
    return run.trained_probe, not record.trained_in_4bit


def _fail_dir(work_dir: Path, out_dir: Path) -> Path:
    failed = out_dir.with_name(out_dir.name + ".failed")
    if failed.exists():
        shutil.rmtree(failed)
    os.replace(work_dir, failed)
    return failed


def merge_adapter(source: str | Path, *, base: str | Path | None = None, out: str | Path | None = None,
                  overwrite: bool = False, verify: bool = True, max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
                  device: str = "auto", dtype=None, thresholds: dict | None = None,
                  delta_hook: Callable | None = None, log: Callable[[str], None] = print,
                  out_dir: str | Path | None = None, echo: Callable[[str], None] | None = None,
                  force_base: bool = False) -> dict:
    """Merge the LoRA adapter of a run folder (or an adapter folder) into its base and verify the result.

    Returns a report dict: out, base, adapter, shards, tensors, lora_tensors_merged, mxfp4_tensors_dequantized,
    bytes_written, max_buffered_bytes, largest_tensor_bytes, peak_rss_gib, rss_start_gib, disk (need/free GB),
    seconds, verification (see `verify_merge`, or None with verify=False).
    Raises MergeError (VerificationError when the check fails; its `.report` holds the figures).

    `device`/`dtype` are for the verification forward passes: auto picks what fits (`plan_verification`: the GPU
    in bf16, else fp32 on the CPU, else bf16 on the CPU) and says so; MergeError when nothing fits.
    `delta_hook(name, delta) -> delta` is for tests only: it lets a test plant a fault in a delta.
    `out_dir` and `echo` are accepted as other names for `out` and `log`.
    `force_base` merges into a --base that is not the model the adapter was trained on (see `check_base`).
    """
    t0 = time.time()
    if out_dir is not None:
        if out is not None:
            raise TypeError("pass out or out_dir, not both")
        out = out_dir
    if echo is not None:
        log = echo
    inputs = resolve_inputs(source, base, out)
    note = unfinished_run_note(inputs.run_dir)
    if note:
        log(note + " (its adapter/)")
    out_dir = inputs.out_dir
    if out_dir.exists() and not overwrite:
        raise MergeError(f"{out_dir} already exists; pass --overwrite to replace it (it is replaced only after the "
                         "new merge has been verified)")
    if inputs.adapter_dir in out_dir.parents or out_dir == inputs.adapter_dir or out_dir == inputs.base_dir:
        raise MergeError(f"--out {out_dir} would overwrite the adapter or the base")
    _check_base_config(inputs.base_dir)
    base_check = check_base(inputs, force_base, log)
    weight_map = base_weight_map(inputs.base_dir)
    need = estimate_output_bytes(inputs.base_dir, weight_map)
    disk = check_free_disk(out_dir.parent, int(need * 1.05) + 256 * 2**20)
    log(f"Merging {inputs.adapter_dir}\n   into {inputs.base_ref} ({inputs.base_dir})\n   -> {out_dir}  "
        f"(~{need / 1e9:.2f} GB bf16, {disk['free_gb']:.1f} GB free)")
    if verify:  # refused now, before the merge is written, when the check cannot fit in memory
        ram, vram = _free_memory(device)
        device, dtype_name, why = plan_verification(need, ram_free=ram, vram_free=vram, device=device,
                                                    dtype=dtype if isinstance(dtype, str) or dtype is None
                                                    else str(dtype).replace("torch.", ""))
        dtype = dtype_name
        log(f"  {why}")

    deltas = AdapterDeltas(inputs.adapter_dir, inputs.base_dir)
    work_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    report: dict = {"out": str(out_dir), "base": inputs.base_ref, "base_dir": str(inputs.base_dir),
                    "adapter": str(inputs.adapter_dir), "lora_layers": len(deltas.targets), "disk": disk,
                    "base_check": base_check}
    try:
        with _PeakRSS() as rss:
            stats = _merge_tensors(inputs.base_dir, weight_map, deltas, work_dir, _parse_size(max_shard_size),
                                   delta_hook, log, rss)
        report.update(stats)
        report["rss_start_gib"] = rss.start / 2**30
        report["peak_rss_gib"] = rss.peak / 2**30
        del deltas
        gc.collect()
        report["tokenizer_files"] = _write_side_files(inputs, work_dir)
        log(f"  wrote {stats['shards']} shard(s), {stats['tensors']} tensors, {stats['lora_tensors_merged']} with a "
            f"LoRA delta ({stats['mxfp4_tensors_dequantized']} dequantized from MXFP4); peak RSS "
            f"{report['peak_rss_gib']:.2f} GiB")
        report["verification"] = None
        if verify:
            log("Verifying: merged model vs base + adapter (PEFT, unmerged) on the probe tokens ...")
            probe, gate = _trained_probe_of(inputs.run_dir)
            v = verify_merge(work_dir, inputs.base_dir, inputs.adapter_dir, device=device, dtype=dtype,
                             thresholds=thresholds, trained_probe=probe, trained_gate=gate)
            report["verification"] = v
            log(format_verification(v))
            if not v["passed"]:
                raise VerificationError("merge verification FAILED: " + "; ".join(v["failures"]), report)
        report["seconds"] = time.time() - t0
        (work_dir / "merge_report.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    except BaseException as exc:
        failed = _fail_dir(work_dir, out_dir)
        report["failed_dir"] = str(failed)
        if isinstance(exc, MergeError):
            exc.args = (f"{exc.args[0]}\nThe unfinished output was left at {failed} for inspection (not at "
                        f"{out_dir}); delete it when done.",)
        raise
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(work_dir, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(work_dir, out_dir)
    log(f"Merged model written to {out_dir}")
    return report


# --- verification --------------------------------------------------------------------------------------------------


def verify_merge(merged_dir: str | Path, base_dir: str | Path, adapter_dir: str | Path, *, device: str = "cpu",
                 dtype=None, probes: list[list[int]] | None = None, thresholds: dict | None = None,
                 out_dtype=None, trained_probe: str | Path | None = None, trained_gate: bool = True) -> dict:
    """Run the probe tokens through base + adapter (PEFT, unmerged) = the trained model, the base alone, PEFT's own
    merge_and_unload() of the same model with its weights rounded to the output dtype (the control: what a correct
    merge stored in bf16 costs in this model and precision), and the merged folder.

    Returns {"passed", "failures": [str], "thresholds", "device", "dtype", "probe_tokens",
             "kl_mean", "kl_mean_trimmed", "kl_p50", "kl_max", "positions_kl_over_0.01", "top1_agreement",
             "top1_agreement_tol", "max_abs_logit_diff", "mean_abs_logit_diff", "cos_mean", "cos_min"
                 (merged folder vs base + adapter),
             "adapter_effect": {same keys: base alone vs base + adapter}, "adapter_is_noop": bool,
             "control": {same keys: PEFT's own merge, rounded to bf16, vs base + adapter},
             "vs_control": {same keys: merged folder vs that control},
             "vs_trained": compare_with_trained(...) or None}.
    `trained_probe`: the file `capture_trained_probe` wrote in the training process; the merged model must then
    also meet the same limits against it (`trained_gate`; off for a model trained on 4-bit weights, whose rounding
    the bf16 merge does not share - the figures are still reported).
    Models are held one at a time (PEFT's merge happens in place), so a 20B check needs memory for one model."""
    import torch
    from peft import PeftModel

    merged_dir, base_dir, adapter_dir = Path(merged_dir), Path(base_dir), Path(adapter_dir)
    dtype = default_dtype(device, dtype)
    out_dtype = out_dtype or torch.bfloat16
    exact = dtype == torch.float32
    th = dict(MERGE_THRESHOLDS if exact else MERGE_THRESHOLDS_LOW_PRECISION, **(thresholds or {}))
    tol = th["top1_tolerance"]
    if probes is None:
        tok_dir = adapter_dir if (adapter_dir / "tokenizer.json").exists() else merged_dir
        probes = probe_token_ids(tok_dir)

    model = load_causal_lm(base_dir, device, dtype)
    model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    ref = model_logits(model, probes, device)
    with model.disable_adapter():
        base_logits = model_logits(model, probes, device)
    effect = compare_logits(ref, base_logits, tol)
    del base_logits
    # the control: PEFT merges the same weights itself (in place, no extra memory), stored as the output dtype
    control_model = model.merge_and_unload()
    with torch.no_grad():
        for p in control_model.parameters():
            if p.is_floating_point():
                p.data = p.data.to(out_dtype).to(p.dtype)
    control_logits = model_logits(control_model, probes, device)
    del model, control_model
    empty_cache(device)
    control = compare_logits(ref, control_logits, tol)

    model = load_causal_lm(merged_dir, device, dtype)
    merged_logits = model_logits(model, probes, device)
    trained = None
    if trained_probe is not None:
        t_probes, t_ids, t_logprobs = load_trained_probe(trained_probe)
        t_logits = merged_logits if t_probes == probes else model_logits(model, t_probes, device)
        trained = compare_with_trained(t_ids, t_logprobs, t_logits, tol)
        del t_logits
    del model
    empty_cache(device)
    res = compare_logits(ref, merged_logits, tol)
    vs_control = compare_logits(control_logits, merged_logits, tol)
    del control_logits, merged_logits

    failures = []
    kl_limit = max(th["kl_mean_trimmed_max"], th["control_factor"] * control["kl_mean_trimmed"])
    if not res["kl_mean_trimmed"] <= kl_limit:
        failures.append(f"mean KL {res['kl_mean_trimmed']:.3g} (worst {KL_TRIM:.0%} of positions left out) > "
                        f"{kl_limit:.3g}")
    top1_limit = min(th["top1_agreement_min"], control["top1_agreement_tol"] - th["control_top1_slack"])
    if not res["top1_agreement_tol"] >= top1_limit:
        failures.append(f"top-1 agreement {res['top1_agreement_tol']:.3f} (near-ties forgiven) < {top1_limit:.3g}")
    if exact and not vs_control["kl_mean_trimmed"] <= th["vs_control_kl_max"]:
        failures.append(f"differs from PEFT's own merge: mean KL {vs_control['kl_mean_trimmed']:.3g} > "
                        f"{th['vs_control_kl_max']:g}")
    if trained is not None and trained_gate:
        if not trained["kl_topk_mean_trimmed"] <= kl_limit:
            failures.append(f"differs from the model as trained: mean KL over its top-{TRAINED_PROBE_TOPK} "
                            f"{trained['kl_topk_mean_trimmed']:.3g} > {kl_limit:.3g}")
        if not trained["top1_agreement_tol"] >= top1_limit:
            failures.append(f"differs from the model as trained: top-1 agreement {trained['top1_agreement_tol']:.3f} "
                            f"< {top1_limit:.3g}")
    report = dict(res)
    report.update({"passed": not failures, "failures": failures, "thresholds": th, "kl_limit": kl_limit,
                   "top1_limit": top1_limit, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
                   "probe_tokens": sum(len(p) for p in probes), "adapter_effect": effect,
                   "adapter_is_noop": effect["kl_mean"] < NOOP_KL, "control": control, "vs_control": vs_control,
                   "vs_trained": trained, "vs_trained_gated": trained is not None and trained_gate})
    return report


def format_verification(v: dict) -> str:
    e, c, vc = v["adapter_effect"], v["control"], v["vs_control"]
    lines = [
        f"  probe: {v['probe_tokens']} tokens ({v['device']}, {v['dtype']})",
        f"  merged vs base+adapter: KL mean {v['kl_mean_trimmed']:.2e} (worst {KL_TRIM:.0%} left out; all "
        f"{v['kl_mean']:.2e}, max {v['kl_max']:.2e}), top-1 agreement {v['top1_agreement']:.4f} "
        f"({v['top1_agreement_tol']:.4f} with near-ties forgiven), max |dlogit| {v['max_abs_logit_diff']:.2e}",
        f"  PEFT's own merge in bf16 (control): KL mean {c['kl_mean_trimmed']:.2e}, top-1 {c['top1_agreement_tol']:.4f}"
        f"; merged vs control: KL mean {vc['kl_mean_trimmed']:.2e}, max |dlogit| {vc['max_abs_logit_diff']:.2e}",
        f"  adapter vs base (how far training moved the model): KL mean {e['kl_mean']:.2e}, top-1 agreement "
        f"{e['top1_agreement']:.4f}, max |dlogit| {e['max_abs_logit_diff']:.2e}"
        + ("  <- the adapter is a no-op" if v["adapter_is_noop"] else ""),
        f"  limits: mean KL <= {v['kl_limit']:.3g}, top-1 agreement >= {v['top1_limit']:.3g} (near-tie: within "
        f"{v['thresholds']['top1_tolerance']:g} logits)"
        + (f", merged vs control KL <= {v['thresholds']['vs_control_kl_max']:g}" if v["dtype"] == "float32" else "")
        + "  ->  " + ("PASSED" if v["passed"] else "FAILED: " + "; ".join(v["failures"])),
    ]
    t = v.get("vs_trained")
    if t is not None:
        lines.insert(-1, f"  merged vs the model as trained (top-{TRAINED_PROBE_TOPK} recorded by train): KL mean "
                         f"{t['kl_topk_mean_trimmed']:.2e}, top-1 agreement {t['top1_agreement_tol']:.4f}"
                         + ("" if v.get("vs_trained_gated") else "  (reported only: trained on 4-bit weights)"))
    return "\n".join(lines)


# --- re-checking a merged folder later (save-gguf, swft-lite verify) ---------------------------------------------


def _stamp(folder: Path) -> tuple:
    return tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in Path(folder).glob("*.safetensors")))


def recheck_merged(merged_dir: str | Path, run_dir: str | Path, *, device: str = "auto", dtype=None,
                   log: Callable[[str], None] = print) -> dict:
    """merged/ against base + adapter and the trained-model record of its run, with `verify_merge`'s limits: what
    save-gguf does before it converts anything, and `swft-lite verify` does at any time. A merged/ changed after
    its merge (experts swapped, a delta lost) fails here even though its own merge report said PASSED.

    Returns verify_merge's report plus "base_dir", "adapter_dir" and "trained_probe" (path or None). Results are
    kept for the process per (merged, adapter, base) file versions, so several exports of one run check once.
    MergeError when the run has no adapter or its base cannot be found."""
    merged_dir, run_dir = Path(merged_dir).resolve(), Path(run_dir).resolve()
    inputs = resolve_inputs(run_dir, out=merged_dir)
    probe, gate = _trained_probe_of(inputs.run_dir)
    key = (str(merged_dir), _stamp(merged_dir), str(inputs.adapter_dir), _stamp(inputs.adapter_dir),
           str(inputs.base_dir), _stamp(inputs.base_dir), str(probe), device, str(dtype))
    if key in _RECHECKED:
        return _RECHECKED[key]
    ram, vram = _free_memory(device)
    need = estimate_output_bytes(inputs.base_dir)
    dev, dt, why = plan_verification(need, ram_free=ram, vram_free=vram, device=device,
                                     dtype=dtype if isinstance(dtype, str) or dtype is None
                                     else str(dtype).replace("torch.", ""))
    log(f"  {why}")
    v = verify_merge(merged_dir, inputs.base_dir, inputs.adapter_dir, device=dev, dtype=dt, trained_probe=probe,
                     trained_gate=gate)
    v.update({"base_dir": str(inputs.base_dir), "adapter_dir": str(inputs.adapter_dir),
              "trained_probe": str(probe) if probe else None, "merged_dir": str(merged_dir)})
    _RECHECKED[key] = v
    return v


_RECHECKED: dict = {}
