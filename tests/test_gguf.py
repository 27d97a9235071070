"""`swft-lite save-gguf`: llama.cpp's converter, quantization, and the check of every file against the merged model.

llama.cpp's convert_hf_to_gguf.py comes from $SWFT_LLAMA_CPP when it is set, else from the llama-cpp-python source
package on PyPI, downloaded once with pip into ~/.cache/swft-lite (what `swft-lite save-gguf --fetch-converter`
does). Without either the tests skip and say why.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from test_merge import make_run, save_sharp_base

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("o200k_vocab")]  # harmony needs the o200k vocabulary

HARMONY_CHANNELS_LINE = "# Valid channels: analysis, commentary, final. Channel must be included for every message."


@pytest.fixture(scope="session")
def llama_cpp_dir() -> Path:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'swft-lite[gguf]')")
    pytest.importorskip("gguf", reason="gguf is not installed (pip install 'swft-lite[gguf]')")
    from swft_lite.gguf_export import GGUFError, _converter_in, fetch_converter

    env = os.environ.get("SWFT_LLAMA_CPP")
    if env:
        found = _converter_in(Path(env))
        if not found:
            pytest.fail(f"SWFT_LLAMA_CPP={env} holds no convert_hf_to_gguf.py")
        return found
    try:
        return fetch_converter()
    except GGUFError as exc:
        pytest.skip(f"llama.cpp's converter is not available: SWFT_LLAMA_CPP is unset and downloading the "
                    f"llama-cpp-python source package from PyPI failed: {exc}")


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """A run folder with a verified-elsewhere merge (--no-verify here: test_merge.py checks merges)."""
    from swft_lite.merge import merge_adapter

    root = tmp_path_factory.mktemp("gguf-run")
    base = save_sharp_base(tiny_model_dir, root / "base")
    run = make_run(root / "run", base)
    merge_adapter(run, verify=False, log=lambda s: None)
    return run


def _invoke(args):
    from click.testing import CliRunner

    from swft_lite.cli import main

    result = CliRunner().invoke(main, args, catch_exceptions=False)
    print(result.output)
    return result


def _export(run_dir: Path, quant: str, llama_cpp_dir: Path) -> dict:
    result = _invoke(["save-gguf", str(run_dir), "--quant", quant, "--llama-cpp", str(llama_cpp_dir)])
    assert result.exit_code == 0, result.output
    gguf_file = run_dir / "gguf" / f"{run_dir.name}-{quant}.gguf"
    assert gguf_file.exists() and "PASSED" in result.output
    assert not gguf_file.with_name(gguf_file.name + ".partial").exists()
    report = json.loads(gguf_file.with_name(gguf_file.name + ".report.json").read_text())
    v = report["verification"]
    h = v["header"]
    assert v["passed"] and h["ok"], v["failures"]
    assert h["architecture"] == "gpt-oss" and h["block_count"] == 2
    assert h["tensor_count"] == h["expected_tensor_count"] == 19 * 2 + 3
    assert h["vocab_size"] == 201088 and h["chat_template"]
    assert h["special_ids"]["eos"]["gguf"] == 200002 and h["special_ids"]["pad"]["gguf"] == 199999
    assert len(v["generated"]) == 8 and all(v["eog"].values())
    print(f"{quant}: max |dlogit| {v['max_abs_logit_diff']:.3g}, cosine mean {v['cos_mean']:.5f} p10 "
          f"{v['cos_p10']:.5f} min {v['cos_min']:.4f}, top-1 {v['top1_agreement']:.3f}, greedy match "
          f"{v['greedy_match']}, size {report['size_bytes'] / 2**20:.1f} MiB")
    return report


@pytest.fixture(scope="module")
def f16_export(run_dir, llama_cpp_dir) -> dict:
    return _export(run_dir, "f16", llama_cpp_dir)


def _template_blocks_balanced(template: str) -> bool:
    depth = 0
    for action in re.findall(r"{{-?\s*(.*?)\s*-?}}", template, flags=re.S):
        word = action.split()[0] if action.split() else ""
        if word in ("if", "range", "with", "define", "block"):
            depth += 1
        elif word == "end":
            depth -= 1
            if depth < 0:
                return False
    return depth == 0


def test_f16_export_matches_merged_model_and_writes_modelfile(f16_export, run_dir):
    v = f16_export["verification"]
    assert v["header"]["expert_types"] == ["F16"]
    assert v["max_abs_logit_diff"] <= 1e-2 * max(1.0, v["ref_logit_rms"])
    assert v["top1_agreement_tol"] == 1.0 and v["greedy_match"]

    modelfile = (run_dir / "gguf" / "Modelfile").read_text()
    assert f"FROM ./{Path(f16_export['gguf']).name}" in modelfile
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    # Ollama treats a model as harmony (its reasoning and tool-call parser) only with both of these in the template
    assert "<|start|>" in template and "<|end|>" in template
    for needle in ("Knowledge cutoff:", "Current date: {{ currentDate }}", "Reasoning: ", HARMONY_CHANNELS_LINE,
                   "<|start|>developer<|message|># Instructions", "{{ .System }}", "<|start|>user<|message|>",
                   "<|start|>assistant<|channel|>final<|message|>", "<|channel|>analysis<|message|>",
                   "range $i, $m := .Messages", ".Thinking", ".Content", ".Role"):
        assert needle in template, needle
    assert template.endswith("<|start|>assistant{{ end }}")  # the generation prompt
    assert _template_blocks_balanced(template)
    assert "PARAMETER temperature 1.0" in modelfile and "PARAMETER top_p 1.0" in modelfile


@pytest.mark.parametrize("quant,expert_type,cos_mean_min", [("q8_0", "Q8_0", 0.99), ("mxfp4", "MXFP4", 0.95)])
def test_quantized_exports(run_dir, llama_cpp_dir, quant, expert_type, cos_mean_min):
    report = _export(run_dir, quant, llama_cpp_dir)
    v = report["verification"]
    assert v["header"]["expert_types"] == [expert_type]
    assert v["cos_mean"] >= cos_mean_min
    if quant == "mxfp4":
        assert report["quantize"]["tool"]  # llama-quantize or llama_cpp.llama_model_quantize
        # the other matrices of an MXFP4_MOE file are q8_0
        assert v["header"]["tensor_types"].get("Q8_0", 0) >= 2 * 4 + 2


def test_wrong_model_is_caught(f16_export, run_dir):
    """The check is not a rubber stamp: the merged model's GGUF checked against the base (the adapter's effect
    missing, as when an export silently drops the LoRA) fails the quantized limits, and is far outside the lossless
    ones."""
    from swft_lite.gguf_export import verify_gguf

    base = Path(json.loads((run_dir / "run.json").read_text())["model"])
    v = verify_gguf(Path(f16_export["gguf"]), base, "q4_k_m")  # a "low" family quant: judged by cosine only
    print(f"adapter missing: cosine mean {v['cos_mean']:.4f} p10 {v['cos_p10']:.4f}, max |dlogit| "
          f"{v['max_abs_logit_diff']:.3g}")
    assert not v["passed"] and any("cosine" in f for f in v["failures"])
    assert v["max_abs_logit_diff"] > 100 * f16_export["verification"]["max_abs_logit_diff_limit"]
    # and the lossless check's fallback (no worse than transformers' own bf16 run) does not let it through either
    exact = verify_gguf(Path(f16_export["gguf"]), base, "f16")
    assert not exact["passed"] and any("bf16 control" in f for f in exact["failures"])


def test_failed_check_renames_the_file(run_dir, llama_cpp_dir, monkeypatch, f16_export):
    """A file that fails its check never keeps the name asked for. (The conversion is replaced by a copy of the f16
    file and the check by one that fails: test_wrong_model_is_caught shows the real check failing.)"""
    import shutil

    import swft_lite.gguf_export as ge

    monkeypatch.setattr(ge, "convert_hf_to_gguf", lambda model_dir, out_file, *a: shutil.copy(f16_export["gguf"],
                                                                                              out_file))
    failing = dict(f16_export["verification"], passed=False, failures=["planted by the test"])
    monkeypatch.setattr(ge, "verify_gguf", lambda *a, **k: failing)
    out = run_dir / "gguf" / "strict.gguf"
    result = _invoke(["save-gguf", str(run_dir / "merged"), "--quant", "f16", "--out", str(out),
                      "--llama-cpp", str(llama_cpp_dir), "--no-modelfile"])
    assert result.exit_code == 1 and "FAILED" in result.output and "planted by the test" in result.output
    assert "strict.gguf.failed" in result.output
    assert not out.exists() and out.with_name("strict.gguf.failed").exists()


def test_no_converter_explains_every_way(run_dir, tmp_path, monkeypatch):
    import swft_lite.gguf_export as ge

    for var in ("SWFT_LLAMA_CPP", "UNSLOTH_LLAMA_CPP_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(ge, "CACHE_DIR", tmp_path / "cache")
    result = _invoke(["save-gguf", str(run_dir), "--quant", "q4_k_m"])
    assert result.exit_code == 1
    out = result.output
    # k-quants are accepted with a warning about gpt-oss's widths
    assert "Warning" in out and "multiple of 256" in out and "q5_0/q8_0" in out
    for way in ("--fetch-converter", "--llama-cpp", "SWFT_LLAMA_CPP", "UNSLOTH_LLAMA_CPP_PATH", "~/.unsloth/llama.cpp",
                "pip download llama-cpp-python"):
        assert way in out, way
    assert not list((run_dir / "gguf").glob("*q4_k_m*")) if (run_dir / "gguf").exists() else True


@pytest.mark.slow
def test_train_merge_and_export_end_to_end(tmp_path, gpt_oss_files, llama_cpp_dir):
    """The whole way a user goes, through the real commands: train (hf backend, attention + expert LoRA) with its
    verified merge at the end, then save-gguf at f16, q8_0 and mxfp4 - each file read back, run with llama.cpp
    against the merged model, and generating."""
    from conftest import TINY_SIZE
    from test_train import CPU_FLAGS, ROWS, write_jsonl

    from swft_lite.random_model import save_random_gpt_oss

    base = save_random_gpt_oss(tmp_path / "base", gpt_oss_files, seed=2, initializer_range=0.1, **TINY_SIZE)
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    flags = [f for f in CPU_FLAGS if f != "--no-merge"]
    result = _invoke(["train", *flags, "--model", str(base), "--data", str(data), "--output-root",
                      str(tmp_path / "runs"), "--run-name", "e2e", "--max-steps", "6"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "runs" / "e2e"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "completed"
    check = record["merge"]["verification"]
    assert check["passed"] and not check["adapter_is_noop"]
    assert record["merge"]["lora_tensors_merged"] == 2 * (4 + 2)  # every attention module and expert tensor
    assert (run / "merged" / "config.json").exists()
    # the merge was also held against what the trained model computed before train exited (fp32: gated)
    assert check["vs_trained_gated"] and check["vs_trained"]["top1_agreement_tol"] >= check["top1_limit"]
    assert check["vs_trained"]["kl_topk_mean_trimmed"] <= check["kl_limit"]

    for quant in ("f16", "q8_0", "mxfp4"):
        result = _invoke(["save-gguf", str(run), "--quant", quant, "--llama-cpp", str(llama_cpp_dir), "--json"])
        assert result.exit_code == 0, result.output
        gguf = run / "gguf" / f"e2e-{quant}.gguf"
        assert gguf.exists() and gguf.stat().st_size > 0
        report = json.loads((run / "gguf" / f"e2e-{quant}.gguf.report.json").read_text())
        assert report["verification"]["passed"] and report["verification"]["generated"]
    assert "<|start|>" in (run / "gguf" / "Modelfile").read_text()

    # An adapter file that no longer says what was trained - here the experts' lora_B rows rolled, as a packing
    # that PEFT reads differently would - still agrees with PEFT's own reading of it, and only the record of the
    # trained model catches it.
    from safetensors.torch import load_file, save_file

    weights_file = run / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(weights_file))
    rolled = [k for k in tensors if "experts" in k and "lora_B" in k]
    assert rolled
    for k in rolled:
        tensors[k] = tensors[k].roll(shifts=tensors[k].shape[0] // 4, dims=0).contiguous()
    save_file(tensors, str(weights_file))
    result = _invoke(["merge", str(run), "--out", str(tmp_path / "remerged"), "--json"])
    assert result.exit_code == 1, result.output
    assert "differs from the model as trained" in result.output
    assert not (tmp_path / "remerged").exists()
