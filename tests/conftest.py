"""Shared test fixtures: the o200k vocabulary, gpt-oss-20b's files (tokenizer built from that vocabulary) and tiny
random gpt-oss models. Nothing outside the repository is needed beyond the vocabulary (see swft_lite/tokenizer.py
for where it is looked for); without one, the tests that need it skip and say why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from swft_lite import tokenizer as _tok

REPO = Path(__file__).resolve().parent.parent

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# openai-harmony fetches its vocabulary from the internet unless told where a copy lies: point it at one found
# without the network now (TIKTOKEN_ENCODINGS_BASE, ../shared/tiktoken, the cache); o200k_vocab may download one.
try:
    _VOCAB: Path | None = _tok.use_vocab(download=False)
    _VOCAB_PROBLEM = ""
except _tok.VocabularyNotFound as exc:
    _VOCAB, _VOCAB_PROBLEM = None, str(exc)

# A 2-layer gpt-oss, width 64, 4 experts (top 2), the real 201,088-token vocabulary: ~26 M parameters, trains on CPU.
TINY_SIZE = dict(num_layers=2, hidden_size=64, num_experts=4, experts_per_token=2, num_heads=4, num_kv_heads=2,
                 head_dim=16)


@pytest.fixture(scope="session")
def o200k_vocab() -> Path:
    """o200k_base.tiktoken, with TIKTOKEN_ENCODINGS_BASE pointing at its folder; downloaded once when online."""
    global _VOCAB, _VOCAB_PROBLEM
    if _VOCAB is None and _VOCAB_PROBLEM and not _VOCAB_PROBLEM.startswith("!"):
        try:
            _VOCAB = _tok.use_vocab(download=True)
        except _tok.VocabularyNotFound as exc:
            _VOCAB_PROBLEM = f"!{exc}"  # "!": the download was tried (once per session)
    if _VOCAB is None:
        pytest.skip(f"needs the o200k vocabulary: {_VOCAB_PROBLEM.lstrip('!')}")
    os.environ["TIKTOKEN_ENCODINGS_BASE"] = str(_VOCAB.parent)
    return _VOCAB


@pytest.fixture(scope="session")
def gpt_oss_files(o200k_vocab) -> Path:
    """gpt-oss-20b's config.json, tokenizer files and chat template (no weights), the tokenizer built from the
    vocabulary and cached under ~/.cache/swft-lite/tokenizer. Read-only by convention."""
    return _tok.gpt_oss_files(o200k_vocab)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, gpt_oss_files) -> Path:
    """A saved tiny random gpt-oss with the gpt-oss tokenizer, like a local hub download. Read-only by convention."""
    from swft_lite.random_model import save_random_gpt_oss

    return save_random_gpt_oss(tmp_path_factory.mktemp("tiny-gpt-oss"), gpt_oss_files, seed=0, **TINY_SIZE)


@pytest.fixture(scope="session")
def tokenizer(gpt_oss_files):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gpt_oss_files)


@pytest.fixture(scope="session")
def shared_model_dir(gpt_oss_files) -> Path:
    """The old name of gpt_oss_files (the files no longer come from ../shared)."""
    return gpt_oss_files


# --- one trained run and one export per quant, shared by test_gguf.py and test_verify.py -----------------------------
# The run: the tiny model with lm_head x10 ("sharp", see test_merge.py) whose experts were put through MXFP4 and back,
# so they lie exactly on MXFP4's grid as openai/gpt-oss-20b's do; an adapter on the experts (lora_B std 0.015:
# deltas ~20 % of the weights, seed 1), the record of that model as trained (trained_probe.safetensors, written from
# the PEFT model itself as `swft-lite train` does), and merged/. Everything seeded.
GGUF_RUN_EXPERT_STD = 0.015


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


def save_grid_base(src: Path, dst: Path) -> Path:
    """A copy of the model at src whose expert tensors went through MXFP4 and back (bf16, exactly on the grid)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from swft_lite.merge import dequantize_mxfp4
    from test_merge import quantize_mxfp4_reference

    shutil.copytree(src, dst)
    f = dst / "model.safetensors"
    sd = load_file(str(f))
    for k, v in sd.items():
        if k.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            sd[k] = dequantize_mxfp4(*quantize_mxfp4_reference(v), dtype=torch.float32).to(v.dtype)
    save_file(sd, str(f), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="session")
def gguf_run(tiny_model_dir, tmp_path_factory, o200k_vocab) -> Path:
    """RUN with adapter/, run.json, trained_probe.safetensors and a verified merged/ (see above). Read-only by
    convention: tests that plant faults copy it (`copy_run`)."""
    import json

    from swft_lite.merge import merge_adapter
    from swft_lite.probes import capture_trained_probe, load_tokenizer
    from test_merge import TOKENIZER_FILES, make_adapter, save_sharp_base

    root = tmp_path_factory.mktemp("gguf-run")
    base = save_grid_base(save_sharp_base(tiny_model_dir, root / "sharp"), root / "base")
    run = root / "run"
    run.mkdir()
    peft_model = make_adapter(base, run / "adapter", std=GGUF_RUN_EXPERT_STD, attn_std=0.0, seed=1)
    capture_trained_probe(peft_model, load_tokenizer(base), run / "trained_probe.safetensors")
    del peft_model
    (run / "run.json").write_text(json.dumps({"model": str(base), "status": "completed"}))
    # not verified here: the first save-gguf re-checks merged/ against base + adapter and the record (the same
    # check, merge.verify_merge), and test_gguf asserts that it passed
    merge_adapter(run, verify=False, log=lambda s: None)
    return run


def copy_run(run: Path, dst: Path) -> Path:
    """A copy of a run folder (adapter, record, merged/; not its GGUFs) to plant a fault in."""
    import shutil

    dst.mkdir(parents=True)
    for name in ("adapter", "merged"):
        shutil.copytree(run / name, dst / name)
    for name in ("run.json", "trained_probe.safetensors"):
        shutil.copy(run / name, dst / name)
    return dst


def invoke_cli(args):
    from click.testing import CliRunner

    from swft_lite.cli import main

    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    print(result.output)
    return result


@pytest.fixture(scope="session")
def gguf_exports(gguf_run, llama_cpp_dir):
    """export(quant) -> (exit code, output, report): `swft-lite save-gguf RUN --quant QUANT`, run once per quant for
    the session. The report is RUN/gguf/RUN-QUANT.gguf.report.json, or .failed.report.json when it was refused."""
    import json

    done: dict = {}

    def export(quant: str):
        if quant not in done:
            result = invoke_cli(["save-gguf", gguf_run, "--quant", quant, "--llama-cpp", llama_cpp_dir])
            f = gguf_run / "gguf" / f"{gguf_run.name}-{quant}.gguf"
            rep = f.with_name(f.name + (".report.json" if result.exit_code == 0 else ".failed.report.json"))
            done[quant] = (result.exit_code, result.output, json.loads(rep.read_text()) if rep.exists() else None)
        return done[quant]

    return export
