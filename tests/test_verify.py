"""The chain checked end to end: faults planted in merged/ and in GGUF files are caught by the commands a user runs
(`swft-lite save-gguf` refuses, `swft-lite verify` exits 1), the lossless check is strict and sees a YaRN rounding
mismatch, and the Modelfile is never silently replaced. (`swft-lite verify` passing on a good run is in
test_gguf.py's end-to-end test.)

Everything runs on conftest's one shared run (`gguf_run`) and its exports (`gguf_exports`); faults are planted in
copies. merge.recheck_merged keeps its result per file version within the process, so save-gguf and verify on the
same planted copy compute the check once (the same function on the same files either way).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import copy_run, invoke_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("o200k_vocab")]


def _edit_merged(run: Path, edit) -> None:
    from safetensors.torch import load_file, save_file

    f = run / "merged" / "model.safetensors"
    sd = load_file(str(f))
    edit(sd)
    save_file(sd, str(f), metadata={"format": "pt"})


def _swap_experts(sd):
    # experts 0 and 1 of layer 1 trade places (weights and biases); the router still sends tokens by the old order
    for k in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        t = sd[f"model.layers.1.mlp.experts.{k}"]
        t[[0, 1]] = t[[1, 0]].clone()


def _remove_down_delta(base_dir: Path):
    def edit(sd):
        from safetensors.torch import load_file

        base = load_file(str(base_dir / "model.safetensors"))
        k = "model.layers.0.mlp.experts.down_proj"
        sd[k][2] = base[k][2].to(sd[k].dtype)  # expert 2 of layer 0 loses its down_proj delta
    return edit


@pytest.mark.parametrize("fault", ["swapped-experts", "removed-down-delta"])
def test_faulty_merged_refused_by_save_gguf_and_verify(gguf_run, llama_cpp_dir, tmp_path, fault):
    base = Path(json.loads((gguf_run / "run.json").read_text())["model"])
    run = copy_run(gguf_run, tmp_path / "run")
    _edit_merged(run, _swap_experts if fault == "swapped-experts" else _remove_down_delta(base))
    # merged/ still carries its merge report (merge_report.json): save-gguf does not take its word for it
    assert (run / "merged" / "merge_report.json").exists()

    result = invoke_cli(["save-gguf", run, "--llama-cpp", llama_cpp_dir])
    assert result.exit_code == 1
    errors = [ln for ln in result.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and "is not the model that was trained" in errors[0] and "Nothing was exported" in errors[0]
    assert "Traceback" not in result.output
    assert not (run / "gguf").exists() or not list((run / "gguf").glob("*.gguf*"))  # nothing converted

    result = invoke_cli(["verify", run, "--json"])
    assert result.exit_code == 1 and "FAILED" in result.output
    report = json.loads(result.output[result.output.index("{\n"):])
    v = report["merged"]
    print(f"{fault}: KL {v['kl_mean_trimmed']:.3g} (limit {v['kl_limit']:.3g}), vs PEFT's merge "
          f"{v['vs_control']['kl_mean_trimmed']:.3g}, vs trained {v['vs_trained']['kl_topk_mean_trimmed']:.3g}, "
          f"top-1 {v['top1_agreement_tol']:.3f}")
    assert not report["passed"] and not v["passed"]
    # against PEFT's own merge of base + adapter (fp32: the same bf16 numbers when merged/ is right) the removed
    # delta is 12x over the limit (KL 1.2e-3 > 1e-4); swapped experts fail every gate, the trained record included
    assert any("differs from PEFT's own merge" in f for f in v["failures"])
    if fault == "swapped-experts":
        assert any("differs from the model as trained" in f for f in v["failures"])


def _plant_bytes(src: Path, dst: Path, tensor: str, seed: int) -> Path:
    """dst = src with 16 random bytes written into `tensor`'s data (a place the probe tokens do not reach)."""
    import numpy as np

    from swft_lite.gguf_bytes import read_gguf

    shutil.copy(src, dst)
    t = next(t for t in read_gguf(src).tensors if t.name == tensor)
    rng = np.random.default_rng(seed)
    offset = int(t.data_offset) + int(rng.integers(0, int(t.n_bytes) - 16)) // 2 * 2
    with open(dst, "r+b") as f:
        f.seek(offset)
        f.write(rng.integers(0, 256, 16, dtype=np.uint8).tobytes())
    return dst


@pytest.mark.parametrize("quant,tensor", [("f16", "token_embd.weight"), ("q8_0", "blk.1.ffn_down_exps.weight")])
def test_altered_bytes_caught_by_verify(gguf_run, gguf_exports, tmp_path, quant, tensor):
    exit_code, output, report = gguf_exports(quant)
    assert exit_code == 0, output
    bad = _plant_bytes(Path(report["gguf"]), tmp_path / f"altered-{quant}.gguf", tensor, seed=7)
    result = invoke_cli(["verify", gguf_run, bad, "--json"])
    assert result.exit_code == 1
    out = json.loads(result.output[result.output.index("{\n"):])
    g = out["ggufs"][0]
    b = g["verification"]["bytes"]
    print(f"{quant}: {b['elements_out_of_tolerance']} elements out of tolerance in {b['worst']['tensor']} "
          f"(worst {b['worst']['max_abs_diff']:.3g}); logits max |dlogit| {g['verification']['max_abs_logit_diff']:.3g}")
    assert g["quant"] == quant and not g["passed"] and not b["passed"]
    assert b["worst"]["tensor"] == tensor and b["elements_out_of_tolerance"] >= 1
    assert any(f.startswith(tensor) for f in g["verification"]["failures"])


def test_yarn_truncation_mismatch_is_caught(gguf_exports, gguf_run):
    """The strict lossless check against a reference that computes YaRN as gpt-oss's config is written
    (truncate: false) - not as llama.cpp rounds it - fails on a long probe, where the deviation has grown; the same
    file against the llama.cpp-rounded reference passes the same bound at every position."""
    from swft_lite.gguf_export import verify_gguf
    from swft_lite.probes import probe_token_ids

    exit_code, output, report = gguf_exports("f16")
    assert exit_code == 0, output
    merged = gguf_run / "merged"
    p = probe_token_ids(merged)
    long_probe = [(p[0] + p[1] + p[2]) * 2]  # 850 positions
    good = verify_gguf(Path(report["gguf"]), merged, "f16", probes=long_probe, check_bytes=False)
    bad = verify_gguf(Path(report["gguf"]), merged, "f16", probes=long_probe, check_bytes=False, rope_truncate=False)
    print(f"f16 on {len(long_probe[0])} positions: max |dlogit| {good['max_abs_logit_diff']:.3g} with llama.cpp's "
          f"rounding, {bad['max_abs_logit_diff']:.3g} without (limit {good['max_abs_logit_diff_limit']:.3g}; worst "
          f"at position {bad['worst_position']['position']})")
    assert good["passed"], good["failures"]
    assert not bad["passed"] and any(f.startswith("max |dlogit|") for f in bad["failures"])
    assert bad["max_abs_logit_diff"] > 2 * bad["max_abs_logit_diff_limit"]
    assert bad["worst_position"]["position"] > len(long_probe[0]) // 2  # it grows with position
    assert "router_gap" in bad["worst_position"]  # the failure says how close the router was there


def test_modelfile_kept_when_edited_and_commands_quoted(gguf_exports, tmp_path):
    from swft_lite.gguf_export import ollama_command, write_modelfile

    exit_code, output, report = gguf_exports("f16")
    gguf_path = Path(report["gguf"])
    mf = Path(report["modelfile"]["path"])
    sha = report["modelfile"]["sha256"]
    # unchanged since swft-lite wrote it: a new export may replace it
    assert write_modelfile(gguf_path, written_sha256=sha, log=print)["status"] == "replaced"
    mf.write_text(mf.read_text() + "PARAMETER num_ctx 8192\n")  # the user's edit
    lines = []
    kept = write_modelfile(gguf_path, written_sha256=sha, log=lines.append)
    assert kept["status"] == "kept" and "num_ctx 8192" in mf.read_text() and "--overwrite" in lines[0]
    replaced = write_modelfile(gguf_path, written_sha256=sha, overwrite=True, log=lines.append)
    assert replaced["status"] == "replaced" and "num_ctx" not in mf.read_text()

    spaced = tmp_path / "my runs" / "run 1-q8_0.gguf"
    spaced.parent.mkdir()
    cmd = ollama_command(spaced)
    assert cmd == f"cd '{spaced.parent}' && ollama create run-1-q8_0 -f 'run 1-q8_0.Modelfile'"
    written = write_modelfile(spaced, log=print)
    text = Path(written["path"]).read_text()
    assert 'FROM "./run 1-q8_0.gguf"' in text and cmd in text
    assert f"Ollama: {ollama_command(gguf_path)}" in output
