"""Several GPUs: one training process per GPU, started by torch.distributed's own launcher (torchrun), with Hugging
Face's Trainer (accelerate) doing data parallelism (DDP). Nothing here is a home-made engine; this module owns:

- who this process is: `world_size`, `rank`, `local_rank`, `is_main_process` (read from the variables torchrun
  sets: WORLD_SIZE, RANK, LOCAL_RANK), and `under_launcher` (already started by torchrun or `accelerate launch`);
- `--gpus N|auto`: `resolve_gpus` turns it into a number of processes, refusing before anything is launched what
  cannot work (more GPUs than visible, cards of different sizes, a profile that does not fit one of them);
- `launch_command`: the torchrun command line (an argument list, never a shell string) that runs the same
  `swft-lite train` arguments once per GPU, and `relaunch`, which runs it;
- `check_resume_world`: a run resumes with the number of processes it was started with (run.json's world_size);
- `ddp_settings`: the Trainer's DDP arguments, and why.

Only rank 0 writes (run.json, TensorBoard, the adapter, the probe, the merge; the Trainer's checkpoints are the
Trainer's, written by rank 0 and with one RNG file per rank); the other ranks train and stay silent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Sequence

from swft_lite.errors import SwftError

LAUNCHER_VARS = ("LOCAL_RANK", "WORLD_SIZE")


class DistributedError(SwftError):
    """--gpus asks for something this machine cannot do, or a resume changes the number of processes."""


# --- who this process is -------------------------------------------------------------------------------------------


def _env_int(name: str, default: int, env=None) -> int:
    value = (os.environ if env is None else env).get(name)
    try:
        return int(value) if value not in (None, "") else default
    except ValueError:
        return default


def world_size(env=None) -> int:
    return _env_int("WORLD_SIZE", 1, env)


def rank(env=None) -> int:
    return _env_int("RANK", 0, env)


def local_rank(env=None) -> int:
    return _env_int("LOCAL_RANK", 0, env)


def under_launcher(env=None) -> bool:
    """True in a process started by torchrun (or accelerate launch): it must not launch again."""
    env = os.environ if env is None else env
    return any(v in env for v in LAUNCHER_VARS)


def is_main_process(env=None) -> bool:
    return rank(env) == 0


def _state():
    """accelerate's state, which starts the process group the Trainer then reuses (gloo on CPU, nccl on GPUs).
    cpu=True on a machine without CUDA: accelerate's default there is a single process (DistributedType.NO, its
    barrier a no-op - measured under torchrun); the Trainer's use_cpu asks for the same state."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait for every rank (a no-op in a single process)."""
    if world_size() > 1:
        _state().wait_for_everyone()


def from_rank_zero(value):
    """Rank 0's `value` on every rank (a picklable object; itself in a single process)."""
    if world_size() <= 1:
        return value
    import torch.distributed as dist

    _state()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def echo_for_rank(echo):
    """Rank 0 speaks for the run; the others' copies of the same lines would only interleave with it."""
    return echo if is_main_process() else (lambda *a, **k: None)


class SilentWriter:
    """TensorBoard on ranks other than 0: one event file per run, written by rank 0."""

    def add_scalar(self, *a, **k):
        pass

    def flush(self):
        pass

    def close(self):
        pass


# --- --gpus --------------------------------------------------------------------------------------------------------

# Cards whose memory differs by more than this are "different cards": DDP runs the same profile on each, so the
# smaller one decides; swft-lite refuses rather than silently sizing a 24 GB card's run for 12 GB.
SAME_CARD_TOLERANCE = 0.05


def parse_gpus(text: str | int) -> int | str:
    """'auto' or a positive number (the --gpus value)."""
    if isinstance(text, int):
        value = text
    elif str(text).strip().lower() == "auto":
        return "auto"
    else:
        try:
            value = int(str(text).strip())
        except ValueError:
            raise DistributedError(f"--gpus {text}: expected a number of GPUs (1, 2, ...) or 'auto'") from None
    if value < 1:
        raise DistributedError(f"--gpus {text}: expected 1 or more GPUs, or 'auto'")
    return value


def _card(g) -> str:
    return f"cuda:{g.index} {g.name} ({g.total_gib:.2f} GiB)"


def resolve_gpus(spec: int | str, gpus: list, profile) -> tuple[int, str]:
    """(number of training processes, a sentence saying why) for --gpus `spec` on these visible GPUs (GpuInfo
    list, as `swft-lite detect` sees them) with this profile; DistributedError, with the numbers, when it cannot
    work. 1 needs no check here (the single-GPU path says what it needs)."""
    from swft_lite.profiles import card_fits

    spec = parse_gpus(spec)
    fitting = [g for g in gpus if card_fits(profile.vram_budget_gib, g.total_gib)]
    if spec == "auto":
        # Every visible GPU that fits, from cuda:0 on: the processes take cuda:0..N-1 (LOCAL_RANK).
        n = next((i for i, g in enumerate(gpus) if g not in fitting), len(gpus))
        if n == 0 and fitting:
            raise DistributedError(
                f"--gpus auto: {_card(gpus[0])} does not fit profile {profile.name} ({profile.vram_budget_gib:g} "
                f"GiB) and {', '.join(_card(g) for g in fitting)} does; make those the visible ones with "
                f"CUDA_VISIBLE_DEVICES={','.join(str(g.index) for g in fitting)}, or use a smaller profile")
        if n <= 1:
            return 1, (f"--gpus auto: {len(fitting)} of {len(gpus)} visible GPU(s) fit profile {profile.name} "
                       f"({profile.vram_budget_gib:g} GiB): one process")
        spec = n
    n = spec
    if n == 1:
        return 1, "one GPU"
    if n > len(gpus):
        seen = ", ".join(_card(g) for g in gpus) or "none"
        raise DistributedError(f"--gpus {n}: this machine has {len(gpus)} visible GPU(s) ({seen}); ask for at most "
                               f"{len(gpus)}" + (" or check CUDA_VISIBLE_DEVICES" if gpus else ""))
    used = gpus[:n]
    small, large = min(used, key=lambda g: g.total_gib), max(used, key=lambda g: g.total_gib)
    if small.total_gib < large.total_gib * (1 - SAME_CARD_TOLERANCE):
        raise DistributedError(
            f"--gpus {n}: the cards differ: {_card(large)} and {_card(small)}. Data parallel trains the same profile "
            f"on every card, so each would be sized for {small.total_gib:.2f} GiB; pick cards of one size with "
            f"CUDA_VISIBLE_DEVICES, or train on one (--gpus 1)")
    misfit = [g for g in used if not card_fits(profile.vram_budget_gib, g.total_gib)]
    if misfit:
        raise DistributedError(
            f"--gpus {n}: profile {profile.name} needs a {profile.vram_budget_gib:g} GiB card on every GPU, and "
            f"{', '.join(_card(g) for g in misfit)} is smaller. `swft-lite detect` names the profile that fits")
    return n, f"{n} x {used[0].name}, profile {profile.name} on each"


def launch_command(n: int, argv: Sequence[str], python: str | None = None) -> list[str]:
    """torchrun (as `python -m torch.distributed.run`, so the same interpreter and environment) running
    `swft-lite train ARGV` once per GPU on this machine (--standalone: a local rendezvous on a free port)."""
    return [python or sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--standalone",
            "-m", "swft_lite.cli", *[str(a) for a in argv]]


def relaunch(n: int, argv: Sequence[str]) -> int:
    """Run the N-process command and wait; its exit status. Each process reads WORLD_SIZE/RANK/LOCAL_RANK."""
    return subprocess.run(launch_command(n, argv), check=False).returncode


# --- resume and DDP settings ---------------------------------------------------------------------------------------


def check_resume_world(recorded: int | None, now: int, force: bool, run_path) -> None:
    """A run resumes with the number of processes it was started with: the Trainer's checkpoint holds one RNG
    state per rank and the global batch (per-device x accumulation x processes) is part of what was trained."""
    before = recorded or 1
    if before != now and not force:
        raise DistributedError(
            f"--resume: {run_path} was trained on {before} process(es) (run.json world_size {before}) and this "
            f"run has {now}; resume with --gpus {before}, or --force-resume to continue with {now} (the global batch "
            f"changes)")


@dataclass(frozen=True)
class Layout:
    world_size: int
    per_device_batch: int
    accumulation: int

    @property
    def global_batch(self) -> int:
        return self.per_device_batch * self.accumulation * self.world_size

    def describe(self, unit: str = "rows") -> str:
        return (f"global batch {self.per_device_batch} x {self.accumulation} x {self.world_size} GPU(s) = "
                f"{self.global_batch} {unit} an optimizer step")


def ddp_settings() -> dict:
    """The Trainer's DDP arguments (an empty dict in a single process).

    find_unused_parameters=True, on purpose. A gpt-oss router sends each token to 4 of 32 experts; a parameter that
    takes no part in a rank's backward (an expert no token of that micro-batch reached, where experts are separate
    modules) makes DDP without it stop with "Expected to have finished reduction in the prior iteration". DDP tracks
    only what trains - the LoRA tensors. Measured on CPU (tiny gpt-oss, hf backend, 2 processes over gloo, LoRA on
    attention + experts): DDP found no unused parameter (its warning says so), and with False the run trained the
    same adapter (relative difference 0): PEFT's expert LoRA spans the fused expert tensor, which some expert always
    uses. Under Unsloth (its own gpt-oss MoE paths) this was not measured - no multi-GPU machine was lent - so the
    flag stays on for both backends; its cost is one walk of the autograd graph a step. The Trainer's own default
    (False whenever gradient checkpointing is on) guards reentrant checkpointing, which find_unused_parameters
    breaks; the hf backend checkpoints non-reentrantly (backends.load_hf, use_reentrant=False), which works with it
    (the measurement above ran with it on). Unsloth's checkpointing is its own autograd function; whether it and
    find_unused_parameters agree under DDP is the first thing scripts/bench_gpus.py shows on two GPUs.
    """
    if world_size() <= 1:
        return {}
    return {"ddp_find_unused_parameters": True, "ddp_timeout": 3600}


# --- rank 0 first, rank 0 writes -----------------------------------------------------------------------------------


def main_first(fn, others=None):
    """`fn()` on rank 0, then (after a barrier) `others()` - or `fn()` again - on the other ranks: rank 0 renders
    the data and writes run.json before the others read them. If rank 0 fails, torchrun stops the other ranks."""
    if world_size() <= 1:
        return fn()
    if is_main_process():
        result = fn()
        barrier()
        return result
    barrier()
    return (others or fn)()


def rank_zero_writes(run) -> None:
    """On ranks other than 0 the run folder's record is not written (rank 0 writes run.json for the run)."""
    if not is_main_process():
        run.write_record = lambda *a, **k: None


def plan_launch(profile, options, probe_gpus: Callable[[], list]) -> tuple[int, str]:
    """What `swft-lite train` does with --gpus before anything is loaded: (processes to launch, why); 0 means train
    in this process (one GPU, or already one of torchrun's processes). Every refusal is a DistributedError naming
    the numbers. `probe_gpus()`: the visible GPUs, asked for only when --gpus needs them (the caller passes
    hardware's probe: hardware imports this module for detect's several-GPU line, so this one does not import it)."""
    spec = parse_gpus(options.gpus)
    if under_launcher():
        n = world_size()
        if spec not in ("auto", 1, n):
            raise DistributedError(f"--gpus {spec}: this process was started by a launcher with WORLD_SIZE={n}; "
                                   f"leave --gpus out (or give --gpus {n}) under torchrun")
        return 0, f"process {rank()} of {n} (started by torchrun)"
    if spec == 1:
        return 0, "one GPU"
    n, why = resolve_gpus(spec, probe_gpus(), profile)
    if options.resume and options.run_name:
        from swft_lite.run_folder import RunFolder

        run = RunFolder(options.run_dir(profile))
        check_resume_world(run.record_or_empty().get("world_size"), n, options.force_resume, run.path)
    return (n if n > 1 else 0), why


def finish() -> None:
    """Close the process group before the process exits: a rank leaving with gloo's threads still up aborts
    ("terminate called without an active exception", SIGABRT, measured on CPU), and torchrun calls that a failure."""
    if world_size() <= 1:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def adjust_training_args(args):
    """The Trainer's arguments for this process. On CPU (the multi-process tests) accelerate names rank r's device
    "cpu:r", and the Trainer resumes its optimizer with torch.load(map_location=args.device), which cannot place a
    tensor on "cpu:1" (measured: "don't know how to restore data location ... cpu:0"); there is one CPU, so every
    rank's device is "cpu". On GPUs nothing changes (cuda:LOCAL_RANK)."""
    import torch

    if world_size() > 1 and args.device.type == "cpu":
        args.__dict__["_setup_devices"] = torch.device("cpu")  # the cached value `args.device` returns
    return args


def gpus_plan(gpus: list, profile) -> dict:
    """What `--gpus auto` would do on these GPUs with this profile, for `swft-lite detect`: {"gpus": N or None,
    "sentence": ...}."""
    if len(gpus) <= 1:
        return {"gpus": 1 if gpus else None, "sentence": "one GPU: training uses cuda:0"}
    if profile is None:
        return {"gpus": None, "sentence": f"{len(gpus)} GPUs, but no profile fits cuda:0"}
    try:
        n, _ = resolve_gpus("auto", gpus, profile)
    except DistributedError as exc:
        return {"gpus": None, "sentence": str(exc)}
    if n == 1:
        return {"gpus": 1, "sentence": f"--gpus auto trains on cuda:0 alone: the other GPUs do not fit profile "
                                       f"{profile.name}"}
    layout = Layout(n, profile.per_device_batch_size, profile.gradient_accumulation_steps)
    return {"gpus": n, "sentence": f"--gpus {n} (or auto) trains on cuda:0-{n - 1}, one process each, profile "
                                   f"{profile.name} on every GPU: {layout.describe()}"}
