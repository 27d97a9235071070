"""Several GPUs (`swft-lite train --gpus N`, or torchrun started by the user): data parallel through the Trainer.

The engine runs for real on CPU: torchrun (`python -m torch.distributed.run`, the entry point the `torchrun` script
calls) starts two processes that train a tiny gpt-oss over gloo, fp32, hf backend. Only GPU identity is faked, for
the checks `--gpus` makes before it launches (the recorded torch device properties of tests/test_detect.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite import distributed, hardware
from swft_lite.batching import EpochBatchSampler, budget_batches
from swft_lite.cli import main
from swft_lite.profiles import load_profile

REPO = Path(__file__).resolve().parent.parent
DETECT = Path(__file__).resolve().parent / "data" / "detect"
GIB = 1024**3


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    """The tests themselves are not under a launcher (a CI runner might be)."""
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)


# --- the GPUs --gpus is checked against (identity faked: torch.cuda's device properties) ---------------------------


def card(name: str, gib: float, uuid: str) -> dict:
    return {"name": name, "total_memory": int(gib * GIB), "major": 8, "minor": 9, "uuid": uuid,
            "mem_get_info": [int(gib * GIB * 0.97), int(gib * GIB)]}


def use_gpus(monkeypatch, devices: list[dict]) -> None:
    from test_detect import fake_torch

    monkeypatch.setattr(hardware, "_import_torch", lambda: fake_torch({"devices": devices, "torch_cuda": "12.8"}))
    monkeypatch.setattr(hardware, "_import_pynvml", lambda: None)
    monkeypatch.setattr(hardware, "run_command", lambda argv, timeout: (_ for _ in ()).throw(FileNotFoundError()))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


H200S = json.loads((DETECT / "2x_h200" / "torch.json").read_text())["devices"]
RTX4090 = card("NVIDIA GeForce RTX 4090", 23.99, "GPU-aaaa")
RTX3060 = card("NVIDIA GeForce RTX 3060", 11.76, "GPU-bbbb")
RTX4080S = [card("NVIDIA GeForce RTX 4080", 15.99, "GPU-cccc"), card("NVIDIA GeForce RTX 4080", 15.99, "GPU-dddd")]


@pytest.fixture
def refused(tmp_path):
    """`swft-lite train ARGS` refused before anything is launched: exit 2, one Error: line, no run folder made."""

    def run(args) -> str:
        result = CliRunner().invoke(main, ["train", "--data", "sample", "--output-root", str(tmp_path / "out"),
                                           *args])
        assert result.exit_code == 2, result.output
        errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert not (tmp_path / "out").exists() and "data:" not in result.output
        return errors[0]

    return run


def test_more_gpus_than_the_machine_has_is_refused_with_the_count(monkeypatch, refused):
    use_gpus(monkeypatch, H200S)
    line = refused(["--profile", "h100", "--gpus", "3"])
    assert "--gpus 3: this machine has 2 visible GPU(s)" in line and "at most 2" in line
    assert "cuda:0 NVIDIA H200 (139.80 GiB)" in line


def test_mismatched_cards_are_refused_naming_both(monkeypatch, refused):
    use_gpus(monkeypatch, [RTX4090, RTX3060])
    line = refused(["--profile", "rtx4070", "--gpus", "2"])
    assert "the cards differ" in line
    assert "cuda:0 NVIDIA GeForce RTX 4090 (23.99 GiB)" in line and "cuda:1 NVIDIA GeForce RTX 3060 (11.76 GiB)" in line
    assert "CUDA_VISIBLE_DEVICES" in line


def test_a_profile_that_does_not_fit_the_cards_is_refused(monkeypatch, refused):
    use_gpus(monkeypatch, RTX4080S)
    line = refused(["--profile", "rtx4090", "--gpus", "2"])
    assert "profile rtx4090 needs a 24 GiB card on every GPU" in line
    assert "cuda:0 NVIDIA GeForce RTX 4080 (15.99 GiB), cuda:1 NVIDIA GeForce RTX 4080 (15.99 GiB)" in line


def test_auto_refuses_when_cuda0_does_not_fit_and_another_does(monkeypatch, refused):
    use_gpus(monkeypatch, [RTX3060, RTX4090])
    line = refused(["--profile", "rtx4090", "--gpus", "auto"])
    assert "cuda:0 NVIDIA GeForce RTX 3060 (11.76 GiB) does not fit profile rtx4090 (24 GiB)" in line
    assert "CUDA_VISIBLE_DEVICES=1" in line


def test_no_gpu_at_all_is_refused(monkeypatch, refused):
    use_gpus(monkeypatch, [])
    assert "--gpus 2: this machine has 0 visible GPU(s) (none)" in refused(["--profile", "h100", "--gpus", "2"])


def test_not_a_number_is_refused(monkeypatch, refused):
    use_gpus(monkeypatch, H200S)
    assert "--gpus two: expected a number of GPUs" in refused(["--profile", "h100", "--gpus", "two"])


def test_auto_and_n_resolve_to_one_process_per_fitting_gpu():
    h200 = [hardware.gpu_from_torch(i, type("P", (), d), None) for i, d in enumerate(H200S)]
    h100 = load_profile("h100")
    assert distributed.resolve_gpus("auto", h200, h100)[0] == 2
    assert distributed.resolve_gpus("2", h200, h100)[0] == 2
    assert distributed.resolve_gpus("1", h200, h100)[0] == 1
    assert distributed.resolve_gpus("auto", h200[:1], h100)[0] == 1
    small = hardware.gpu_from_torch(1, type("P", (), RTX3060), None)
    assert distributed.resolve_gpus("auto", [h200[0], small], h100)[0] == 1  # the one that fits is cuda:0


def test_launch_command_is_torchrun_with_the_same_arguments():
    argv = ["train", "--profile", "h100", "--data", "my data; rm -rf ~.jsonl", "--gpus", "2"]
    cmd = distributed.launch_command(2, argv)
    assert cmd[:7] == [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m"]
    assert cmd[7:] == ["swft_lite.cli", *argv]  # an argument list: the odd file name stays one argument


def test_under_torchrun_the_launcher_decides_and_gpus_must_agree(monkeypatch):
    h100 = load_profile("h100")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    options = type("O", (), {"gpus": "1", "resume": False})()
    not_probed = lambda: pytest.fail("under torchrun the launcher's WORLD_SIZE decides; no GPU is probed")  # noqa: E731
    assert distributed.plan_launch(h100, options, not_probed)[0] == 0  # train here, as process 1 of 4
    assert not distributed.is_main_process() and distributed.world_size() == 4
    options.gpus = "2"
    with pytest.raises(distributed.DistributedError, match="WORLD_SIZE=4"):
        distributed.plan_launch(h100, options, not_probed)


def test_detect_says_what_gpus_would_do_for_mismatched_cards(monkeypatch):
    use_gpus(monkeypatch, [RTX4090, RTX3060])
    result = CliRunner().invoke(main, ["detect"])
    assert result.exit_code == 0, result.output
    assert "cuda:0  NVIDIA GeForce RTX 4090: 23.99 GiB total" in result.output
    assert "cuda:1  NVIDIA GeForce RTX 3060: 11.76 GiB total" in result.output
    assert "Without --gpus, training uses one GPU: cuda:0 (NVIDIA GeForce RTX 4090). Several: --gpus auto trains " \
           "on cuda:0 alone: the other GPUs do not fit profile rtx4090" in result.output
    doc = json.loads(CliRunner().invoke(main, ["detect", "--json"]).output)
    assert doc["several_gpus"]["gpus"] == 1


def test_estimate_per_gpu_with_the_global_batch():
    result = CliRunner().invoke(main, ["estimate", "--profile", "rtx4090", "--gpus", "2"])
    assert result.exit_code == 0, result.output
    assert "2 GPUs, data parallel: the estimate above is per GPU" in result.output
    assert "global batch 2 x 4 x 2 GPU(s) = 16 rows an optimizer step, 131,072 tokens a step" in result.output
    one = json.loads(CliRunner().invoke(main, ["estimate", "--profile", "rtx4090", "--json"]).output)
    two = json.loads(CliRunner().invoke(main, ["estimate", "--profile", "rtx4090", "--gpus", "2", "--json"]).output)
    assert two["reserved_gib"] == one["reserved_gib"] and two["global_batch"] == 2 * one["global_batch"] == 16


# --- token-budget batches through the Trainer's accelerator.prepare -------------------------------------------------


def test_budget_batches_are_sharded_per_rank_as_one_process_would_take_them():
    """with_batch_sampler's DataLoader goes through the Trainer's accelerator.prepare, which wraps any batch sampler
    in accelerate's BatchSamplerShard; alone, that shards whole batches round-robin and repeats the epoch's first
    batches on the ranks left short. Through the real prepare (accelerate's prepare_data_loader for 2 ranks): each
    optimizer step's passes are disjoint across ranks and together are the passes one process with twice the
    accumulation takes in that step; nothing is trained twice - the short rank's last pass is a filler with no
    trained token; the per-epoch shuffle (set_epoch, reached as the Trainer reaches it) is the same on every rank."""
    import random

    import datasets
    from accelerate.data_loader import prepare_data_loader

    from swft_lite.batching import IGNORE, prepare_batch_loader

    rng = random.Random(7)
    lengths = [rng.randint(20, 400) for _ in range(205)]
    rows = datasets.Dataset.from_dict({"input_ids": [[5] * n for n in lengths], "labels": [[5] * n for n in lengths]})
    batches = budget_batches(lengths, 1024, seed=3)
    assert len(set(map(len, batches))) > 1 and len(batches) % 2 == 1  # sizes vary; the last round is short
    world, accum = 2, 2

    def rank_batches(rank: int, epoch: int) -> list[list[dict]]:
        sampler = EpochBatchSampler(batches, seed=3)
        loader = prepare_batch_loader(lambda dl: prepare_data_loader(dl, num_processes=world, process_index=rank),
                                      rows, sampler, lambda features: features, world, rank)
        loader.set_epoch(epoch)
        loader.batch_sampler.batch_sampler.set_epoch(epoch)  # what transformers' Trainer does for a wrapped one
        return list(loader)

    def ids(features) -> tuple:  # rows are told apart by length here
        return tuple(sorted(len(f["input_ids"]) for f in features))

    for epoch in (0, 1):
        single = [[{"input_ids": [5] * lengths[i]} for i in batches[b]]
                  for b in EpochBatchSampler(batches, seed=3).order(epoch)]
        ranks = [rank_batches(r, epoch) for r in range(world)]
        assert len(ranks[0]) == len(ranks[1]) == -(-len(batches) // world)  # same number of passes: DDP in step
        steps = -(-len(ranks[0]) // accum)
        for step in range(steps):
            together = [b for r in ranks for b in r[step * accum:(step + 1) * accum]]
            trained = [b for b in together if any(label != IGNORE for f in b for label in f["labels"])]
            expected = single[step * accum * world:(step + 1) * accum * world]
            assert sorted(map(ids, trained)) == sorted(map(ids, expected))
        fillers = [b for r in ranks for b in r if all(label == IGNORE for f in b for label in f["labels"])]
        assert len(fillers) == (-len(batches)) % world == 1 and len(fillers[0]) == 1
        assert len(fillers[0][0]["input_ids"]) == min(lengths)  # the cheapest pass
    assert [ids(b) for b in rank_batches(0, 0)] != [ids(b) for b in rank_batches(0, 1)]


# --- the engine: 2 processes vs 1, the same global batch -------------------------------------------------------------

FLAGS = ["--profile", "rtx4070", "--backend", "hf", "--no-load-in-4bit", "--lora-targets", "attention+experts",
         "--per-device-batch-size", "1", "--learning-rate", "1e-2", "--warmup-ratio", "0", "--lr-scheduler",
         "constant", "--max-seq-length", "256", "--no-merge", "--save-steps", "1"]


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["OMP_NUM_THREADS"] = "1"  # two processes on a small CI machine; and the same thread count for both runs
    for name in ("LOCAL_RANK", "WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def _run(cmd: list[str]) -> str:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout + proc.stderr


def _adapter(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def _relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in a)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, gpt_oss_files):
    from conftest import TINY_SIZE
    from swft_lite.random_model import save_random_gpt_oss
    from test_train import ROWS, write_jsonl

    root = tmp_path_factory.mktemp("ddp")
    model = save_random_gpt_oss(root / "model", gpt_oss_files, seed=1, initializer_range=0.1, **TINY_SIZE)
    data = write_jsonl(root / "train.jsonl", ROWS)  # 4 rows of different lengths: the token normalisation matters
    common = [*FLAGS, "--model", str(model), "--data", str(data), "--output-root", str(root), "--max-steps", "2"]
    cli = [sys.executable, "-m", "swft_lite.cli", "train"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                "-m", "swft_lite.cli", "train"]
    budget = ["--token-budget", "180", "--max-seq-length", "128"]  # 3 passes of 1-2 rows: the last round is short
    outputs = {
        "budget-two": _run([*torchrun, *common, *budget, "--gradient-accumulation-steps", "1",
                            "--run-name", "budget-two"]),
        "budget-one": _run([*cli, *common, *budget, "--gradient-accumulation-steps", "2", "--run-name", "budget-one"]),
        # no --run-name: the folder is named by the time, and both processes must take rank 0's
        "two": _run([*torchrun, *common, "--gradient-accumulation-steps", "1"]),
        "one": _run([*cli, *common, "--gradient-accumulation-steps", "2", "--run-name", "one"]),
        "half": _run([*cli, *common, "--gradient-accumulation-steps", "1", "--run-name", "half"]),
    }
    made = list(root.glob("rtx4070-*"))
    assert len(made) == 1, made  # one run folder for the two processes
    made[0].rename(root / "two")
    return root, model, data, outputs


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_two_processes_train_the_adapter_one_process_trains_on_the_same_global_batch(runs):
    root, _, _, out = runs
    two, one, half = (_adapter(root / n) for n in ("two", "one", "half"))
    difference = _relative_difference(two, one)
    print(f"2 processes x 1 x accum 1 vs 1 process x 1 x accum 2: max relative adapter difference {difference:.3g}")
    assert difference <= 1e-4
    # and the comparison can tell: one process on half the global batch trains a different adapter
    assert _relative_difference(half, one) > 1e-2
    # token-budget batches, 3 passes on 2 processes: the second step is one real pass and one filler pass
    assert "3 passes an epoch" in out["budget-two"]
    budget_difference = _relative_difference(_adapter(root / "budget-two"), _adapter(root / "budget-one"))
    print(f"token budget, 3 passes: 2 processes vs 1 process x accum 2: max relative difference {budget_difference:.3g}")
    assert budget_difference <= 1e-4
    record = json.loads((root / "two" / "run.json").read_text())
    assert record["world_size"] == 2 and record["status"] == "completed" and record["global_step"] == 2
    assert record["plan"]["global_batch"] == 2
    assert "global batch 1 x 1 x 2 GPU(s) = 2 rows an optimizer step" in out["two"]
    assert out["two"].count("done: ") == 1 and out["two"].count("adapter: saved") == 1  # rank 0 speaks
    # rank 0 wrote one TensorBoard file; the Trainer's checkpoint holds both ranks' RNG states
    assert len(list((root / "two" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert {p.name for p in (root / "two" / "checkpoints" / "checkpoint-2").glob("rng_state_*.pth")} == {
        "rng_state_0.pth", "rng_state_1.pth"}


@pytest.mark.slow
@pytest.mark.usefixtures("o200k_vocab")
def test_resume_needs_the_same_number_of_processes_and_gpus_2_relaunches_under_torchrun(runs, monkeypatch,
                                                                                       capfd):
    root, model, data, _ = runs
    import shutil

    shutil.copytree(root / "two", root / "two-resumed")
    common = [*FLAGS, "--model", str(model), "--data", str(data), "--output-root", str(root), "--max-steps", "3",
              "--gradient-accumulation-steps", "1", "--run-name", "two-resumed", "--resume"]
    result = CliRunner().invoke(main, ["train", *common])  # one process
    assert result.exit_code == 1, result.output
    assert "was trained on 2 process(es) (run.json world_size 2) and this run has 1" in result.output
    assert "--gpus 2" in result.output and "--force-resume" in result.output
    # `--gpus 2` checks the (faked) GPUs, then really starts torchrun with the same arguments: 2 CPU processes
    use_gpus(monkeypatch, H200S)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])
    result = CliRunner().invoke(main, ["train", *common, "--gpus", "2"])
    assert result.exit_code == 0, result.output + capfd.readouterr().err[-4000:]
    assert "starting 2 processes: torchrun --nproc-per-node 2 --standalone" in result.output
    record = json.loads((root / "two-resumed" / "run.json").read_text())
    assert record["global_step"] == 3 and record["world_size"] == 2 and len(record["resumed"]) == 1
    assert [e["step"] for e in record["losses"]] == [1, 2, 3]


def test_bench_gpus_plans_one_and_two_gpus_and_computes_the_scaling(capsys):
    sys.path.insert(0, str(REPO / "scripts"))
    import bench_gpus

    assert bench_gpus.main(["--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rtx4090 on 2 GPU(s), cap 22.5 GiB each:" in out and "h100 on 1 GPU(s), cap 76 GiB each:" in out
    cmd = bench_gpus.train_command("h100", 2, "m", "d", "r", 6)
    assert cmd[cmd.index("--gpus") + 1] == "2" and "--no-merge" in cmd
    rows = bench_gpus.summarise([
        {"profile": "h100", "gpus": 1, "tokens_per_second": 16000.0, "peak_reserved_gib": [45.3]},
        {"profile": "h100", "gpus": 2, "tokens_per_second": 30400.0, "peak_reserved_gib": [45.3, 45.1]}])
    assert rows[0]["scaling"] == 1.9 and rows[0]["efficiency"] == 0.95 and rows[0]["meets_1_8x"] is True
