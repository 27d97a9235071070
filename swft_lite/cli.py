"""The `swft-lite` command line.

Each command is small: it parses what the person typed, resolves it into config objects, and hands them to the
module that does the work. Nothing heavy (torch, transformers, unsloth) is imported at module level, so `--help`
and `profiles` answer at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import sys

import click

from swft_lite import __version__
from swft_lite import profiles as profiles_mod
from swft_lite.data.options import DataOptions
from swft_lite.errors import SwftError
from swft_lite.inference import ENGINES
from swft_lite.profiles import PROFILE_FIELDS, Profile
from swft_lite.train import TrainOptions


def fail(message: str, code: int = 2) -> None:
    """Print a one-paragraph error for a person and exit; no traceback for mistakes the user can fix."""
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(code)


@contextlib.contextmanager
def usage_stage():
    """A SwftError raised in here is about what was typed (a profile, a file that can't be read): exit 2. One raised
    by work that has started exits 1 (`SwftError.exit_code`)."""
    try:
        yield
    except SwftError as exc:
        exc.exit_code = 2
        raise


class SwftGroup(click.Group):
    """The one place where a user-fixable error (every `SwftError`, of any command) becomes one `Error:` line."""

    def parse_args(self, ctx, args):
        # The arguments as typed, for `train --gpus N`, which starts itself again under torchrun with them.
        ctx.meta["swft_argv"] = list(args)
        return super().parse_args(ctx, args)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except SwftError as exc:
            fail(str(exc), code=exc.exit_code)


# --- flags from dataclasses ---------------------------------------------------------------------------------------
# A flag whose value lands in an options dataclass takes its default, choices and help from that dataclass's field
# (swft_lite.data.options.option), so they are typed once.


def field_option(cls, name: str, *, help: str | None = None):  # noqa: A002 - click's word
    """The click option --NAME for field `name` of dataclass `cls`: its default (shown), its choices, its type and
    its help (`help` replaces the field's where a command words it for its own use)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    meta = f.metadata or {}
    kwargs = {"default": f.default, "show_default": True, "help": help or meta.get("help")}
    if meta.get("choices"):
        kwargs["type"] = click.Choice(list(meta["choices"]))
    elif meta.get("min") is not None:
        kind = meta.get("type") or type(f.default)
        kwargs["type"] = (click.FloatRange if kind is float else click.IntRange)(meta["min"])
    elif meta.get("type"):
        kwargs["type"] = meta["type"]
    return click.option("--" + name.replace("_", "-"), **kwargs)


# --- profile overrides ---------------------------------------------------------------------------------------------
# One option per Profile field, generated from the dataclass so that the flags, the TOML keys and `profiles show`
# can never disagree. The options default to None: "not given, keep the profile's value".

_OVERRIDE_SKIP = {"name", "description", "source", "vram_budget_gib"}


# chat's and eval's engine for run and model folders (inference.load_engine).
engine_option = click.option(
    "--engine", type=click.Choice(ENGINES), default="auto", show_default=True,
    help="Run and model folders: auto = Unsloth's inference mode on a CUDA GPU where unsloth is installed, else "
    "transformers. A .gguf always runs on llama.cpp.")


def _override_option(f: dataclasses.Field):
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    type_name = f.type if isinstance(f.type, str) else f.type.__name__
    help_text = meta["help"]
    if type_name == "bool":
        return click.option(flag + "/--no-" + f.name.replace("_", "-"), f.name, default=None, help=help_text)
    click_type = {"int": int, "float": float, "str": str}[type_name]
    if meta["choices"]:
        click_type = click.Choice(meta["choices"])
    return click.option(flag, f.name, type=click_type, default=None, help=help_text)


def profile_options(func):
    """Add one override flag per profile key (--lora-rank 8, --load-in-4bit/--no-load-in-4bit, ...) and --set."""
    for f in reversed([f for f in dataclasses.fields(Profile) if f.name not in _OVERRIDE_SKIP]):
        func = _override_option(f)(func)
    func = click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
                        help="Override any profile key, e.g. --set lora_rank=8 (repeatable).")(func)
    return func


def resolve_profile(profile_ref: str, set_values: tuple[str, ...], flag_values: dict) -> Profile:
    overrides: dict = {}
    with usage_stage():
        for text in set_values:
            key, value = profiles_mod.parse_override(text)
            overrides[key] = value
        overrides.update({k: v for k, v in flag_values.items() if k in PROFILE_FIELDS and v is not None})
        return profiles_mod.load_profile(profile_ref, overrides)


def pop_profile_flags(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in PROFILE_FIELDS}


# --- the group -----------------------------------------------------------------------------------------------------


@click.group(cls=SwftGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="swft-lite")
def main():
    """Fine-tune openai/gpt-oss-20b with LoRA on your own GPU, and take it home as merged weights and a GGUF.

    \b
    Start here:
      swft-lite detect                     what GPU you have and which profile fits it
      swft-lite profiles                   the shipped VRAM profiles
      swft-lite data check train.jsonl     find data problems before a GPU hour is spent
      swft-lite train --profile rtx4090 --data train.jsonl
      swft-lite save-gguf output/RUN       a GGUF for llama.cpp / Ollama, checked against the trained model
      swft-lite verify output/RUN          re-check merged/ and the GGUFs later
      swft-lite chat output/RUN            talk to it (or to a .gguf)
      swft-lite eval output/RUN --data val.jsonl --compare   did fine-tuning help? (wiki-agent metrics)
    """


# --- profiles ------------------------------------------------------------------------------------------------------


@main.group("profiles", invoke_without_command=True)
@click.pass_context
def profiles_group(ctx):
    """List the shipped VRAM profiles (budget and the settings that matter).

    A profile sets sequence length, LoRA rank and targets, batch size, gradient checkpointing, 4-bit loading and the
    optimizer schedule for one class of GPU. Use `swft-lite profiles show NAME` for every value; copy that output
    into a file to make your own (`inherit = "rtx4090"` at its top keeps the rest).
    """
    if ctx.invoked_subcommand is not None:
        return
    with usage_stage():
        rows = profiles_mod.all_profiles()
    header = ("profile", "VRAM", "seq len", "batch x accum", "LoRA", "targets", "4-bit", "grad ckpt", "optimizer")
    table = [header]
    for p in rows:
        table.append((p.name, f"{p.vram_budget_gib:g} GiB", str(p.max_seq_length),
                      f"{p.per_device_batch_size} x {p.gradient_accumulation_steps}",
                      f"r{p.lora_rank}/a{p.lora_alpha}", p.lora_targets, "yes" if p.load_in_4bit else "no (bf16)",
                      p.gradient_checkpointing, p.optimizer))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        click.echo(click.style(line, bold=True) if i == 0 else line)
    click.echo()
    for p in rows:
        click.echo(f"{p.name}: {p.description}")


@profiles_group.command("show")
@click.argument("profile_ref", metavar="NAME_OR_FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of TOML.")
@profile_options
def profiles_show(profile_ref, as_json, set_values, **flags):
    """Print the fully resolved profile NAME_OR_FILE (inheritance and overrides applied).

    The TOML printed is a complete profile: save it to a file, edit it, and pass the file to --profile.
    """
    p = resolve_profile(profile_ref, set_values, flags)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        click.echo(profiles_mod.profile_to_toml(p), nl=False)


# --- train ---------------------------------------------------------------------------------------------------------


@main.command("train")
@click.option("--profile", "profile_ref", default=None, metavar="NAME_OR_FILE",
              help="VRAM profile (rtx4070, rtx3090, rtx4090, h100) or a .toml file. Default: what `detect` "
                   "recommends for this GPU.")
@click.option("--data", default=None, metavar="PATH|sample",
              help="Training data: .jsonl/.json/.parquet/.csv or a save_to_disk folder; 'sample' for the shipped "
                   "sample set. Default: data/processed/train.jsonl.")
@click.option("--eval-data", default=None, metavar="PATH", help="Evaluation data (default: validation.jsonl beside "
              "the default training file, if present).")
@click.option("--eval-fraction", default=0.0, type=click.FloatRange(0, 0.5),
              help="Split this fraction off the training data for evaluation (fixed seed) when no --eval-data.")
@click.option("--model", default="openai/gpt-oss-20b", show_default=True,
              help="Base model: a hub id, or a local folder (loaded from local files only).")
@click.option("--backend", type=click.Choice(["auto", "unsloth", "hf"]), default="auto", show_default=True,
              help="unsloth: Unsloth's fast path (needs a CUDA GPU). hf: plain transformers + PEFT (+ bitsandbytes); "
                   "also runs on CPU for tiny test models. auto: unsloth when it can run.")
@click.option("--output-root", default="output", show_default=True, help="Folder that holds run folders.")
@click.option("--run-name", default=None, help="Run folder name under --output-root (default: PROFILE-DATE-TIME).")
@click.option("--max-steps", type=click.IntRange(1), default=None, help="Stop after this many optimizer steps "
              "(overrides the profile's epochs).")
@click.option("--logging-steps", type=click.IntRange(1), default=1, show_default=True)
@click.option("--eval-steps", type=click.IntRange(1), default=50, show_default=True)
@click.option("--save-steps", type=click.IntRange(1), default=100, show_default=True,
              help="Checkpoint every N steps (and always when stopped with Ctrl-C).")
@click.option("--save-total-limit", type=click.IntRange(1), default=3, show_default=True,
              help="Keep the last K checkpoints.")
@field_option(TrainOptions, "eval_generate")
@field_option(TrainOptions, "eval_max_new_tokens")
@field_option(TrainOptions, "early_stopping_metric")
@field_option(TrainOptions, "early_stopping_patience")
@field_option(TrainOptions, "mask")
@field_option(TrainOptions, "overlong")
@field_option(TrainOptions, "reasoning_effort")
@field_option(TrainOptions, "date")
@field_option(TrainOptions, "seed")
@field_option(TrainOptions, "gpus")
@click.option("--resume", is_flag=True, help="Continue --run-name from its last checkpoint (refused if the data or "
              "settings changed).")
@click.option("--force-resume", is_flag=True, help="Resume even though data or settings changed.")
@click.option("--overwrite", is_flag=True, help="Replace an existing run folder of the same name.")
@click.option("--merge/--no-merge", default=True, show_default=True,
              help="Write verified merged bf16 weights to RUN/merged at the end.")
@click.option("--wandb", is_flag=True, help="Also log to Weights & Biases (needs `wandb login`).")
@click.option("--num-proc", type=click.IntRange(1), default=None, help="Processes for rendering the data.")
@click.option("--dry-run", is_flag=True, help="Check and render the data, print the plan (rows, tokens, passes, "
              "optimizer steps, padding, memory estimate, time at this profile's measured speed) and stop: no model "
              "is loaded and Unsloth is not imported, so it runs on a machine without a GPU.")
@profile_options
def train_cmd(profile_ref, set_values, **kwargs):
    """Fine-tune gpt-oss with LoRA: data in, adapter and merged weights out.

    \b
    Everything lands in one run folder (default output/PROFILE-DATE-TIME/):
      adapter/      the LoRA adapter, tokenizer and chat template
      merged/       base + adapter as bf16 safetensors, checked against the trained model
      checkpoints/  the last --save-total-limit checkpoints
      tensorboard/  loss, learning rate, grad norm, tokens/s, memory, eval loss and --eval-generate metrics
                    (tensorboard --logdir output)
      run.json      settings, versions, GPU, data hashes, losses, memory, speed

    \b
    Every row of the data is checked before the model loads. An existing run folder is never replaced without
    --overwrite. Ctrl-C saves a checkpoint and stops; --resume --run-name NAME continues it. Any profile value can
    be overridden: --lora-rank 8, --max-seq-length 2048, or --set key=value.
    """
    from swft_lite.train import train

    flags = pop_profile_flags(kwargs)
    if profile_ref is None:
        profile_ref = _recommended_profile_name()
    profile = resolve_profile(profile_ref, set_values, flags)
    options = TrainOptions(output_root=kwargs.pop("output_root"), **kwargs)
    _launch_if_several_gpus(profile, options)
    try:
        run_dir = train(profile, options, echo=click.echo)
    except KeyboardInterrupt:
        # Before the run folder exists (the data step); once it does, train() turns Ctrl-C into TrainInterrupted.
        fail("interrupted before training started; nothing was trained", code=130)
    from swft_lite import distributed

    distributed.finish()
    if run_dir is not None and distributed.is_main_process():
        click.secho(f"done: {run_dir}", fg="green")


def _launch_if_several_gpus(profile: Profile, options: TrainOptions) -> None:
    """--gpus N > 1: checked here (GPUs, cards, profile, resume), then the same arguments run under torchrun, one
    process per GPU; this process waits and exits with its status."""
    from swft_lite import distributed, hardware

    with usage_stage():
        n, why = distributed.plan_launch(profile, options, lambda: hardware.probe_gpus().gpus)
    if n == 0:
        return
    argv = click.get_current_context().meta["swft_argv"]
    click.echo(f"gpus: {why}; starting {n} processes: torchrun --nproc-per-node {n} --standalone "
               f"-m swft_lite.cli {' '.join(argv)}")
    try:
        code = distributed.relaunch(n, argv)
    except KeyboardInterrupt:
        fail("aborted; the run folder keeps the last saved checkpoint", code=130)
    sys.exit(code)


def _recommended_profile_name() -> str:
    """The profile `detect` would recommend; a clear error where no GPU fits one."""
    try:
        from swft_lite import hardware
    except ImportError:  # pragma: no cover
        fail("no --profile given; pass one of: " + ", ".join(profiles_mod.shipped_profile_names()))
    name, reason = hardware.recommended_profile_name()
    if name is None:
        fail(f"no --profile given and none fits this machine: {reason}. Pass --profile explicitly "
             "(for CPU test runs: --profile rtx4070 --backend hf --no-load-in-4bit).")
    click.echo(f"profile: {name} (recommended: {reason})")
    return name


# --- detect --------------------------------------------------------------------------------------------------------


@main.command("detect")
@click.option("--output-dir", default="output", show_default=True, metavar="DIR",
              help="Where runs will be written: its free disk space is checked (a merged gpt-oss-20b is ~42 GB).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for scripts).")
def detect_cmd(output_dir, as_json):
    """Report GPUs, driver, RAM, disk and package versions, and recommend a profile.

    Needs no GPU: without one it says so and exits 0. Does not import unsloth.
    """
    from swft_lite import hardware

    report = hardware.gather(output_dir)
    with usage_stage():
        profiles = profiles_mod.all_profiles()
    profile, reason = hardware.recommend_profile(report.gpu.gpus, profiles)
    tailored = hardware.tailored_plan(report.gpu.gpus[0], profile) if report.gpu.gpus else None
    render = hardware.to_json if as_json else hardware.format_report
    click.echo(render(report, profile, reason, tailored))


# --- data ----------------------------------------------------------------------------------------------------------


@main.group("data")
def data_group():
    """Check training data before a GPU hour is spent on it.

    Reads JSONL, JSON, Parquet, CSV or a `datasets.save_to_disk` folder, in chat ({"messages": [...]}),
    prompt/completion, Alpaca or harmony-text format. `sample` names the small set shipped with swft-lite.
    """


@data_group.command("check")
@click.argument("path", metavar="FILE")
@click.option("--profile", "profile_ref", default=None,
              help="Profile whose max_seq_length rows are measured against (default: the one `train` would use "
                   "here, the profile `detect` recommends; rtx4090 where no GPU is visible).")
@click.option("--max-seq-length", type=int, default=None, help="Override the profile's max_seq_length.")
@field_option(DataOptions, "mask")
@field_option(DataOptions, "overlong", help="What training does with rows longer than max_seq_length.")
@click.option("--format", "fmt", type=click.Choice(["chat", "prompt_completion", "alpaca", "text"]), default=None,
              help="Force the row format (default: detected from the first row).")
@field_option(DataOptions, "reasoning_effort", help="Reasoning effort in the system block for rows that set none.")
@click.option("--show", type=int, default=0, metavar="N", help="Print N rendered rows with untrained text «marked».")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document.")
def data_check(path, profile_ref, max_seq_length, mask, overlong, fmt, reasoning_effort, show, as_json):
    """Validate every row of FILE, then summarise what training would see.

    Exit 0 when every row is valid, 1 when any is not (one `FILE:LINE: what is wrong` line each; `row N` for
    JSON arrays, Parquet, CSV and save_to_disk folders), 2 when FILE can't be read at all. The summary gives
    token lengths rendered exactly as training renders them (harmony), rows over max_seq_length and trained tokens.
    """
    from swft_lite import data as data_mod

    source = "profile {}"
    if profile_ref is None:  # what `train` without --profile would use: the same max_seq_length
        from swft_lite import hardware

        profile_ref, _ = hardware.recommended_profile_name()
        source = "profile {} (recommended for this machine, as `train` would use)"
        if profile_ref is None:
            profile_ref, source = "rtx4090", "profile {} (no GPU visible to pick one; pass --profile)"
    profile = resolve_profile(profile_ref, (), {"max_seq_length": max_seq_length})
    options = data_mod.DataOptions(max_seq_length=profile.max_seq_length, mask=mask, overlong=overlong, format=fmt,
                                   reasoning_effort=reasoning_effort)
    with usage_stage():  # FILE can't be read at all: exit 2 (bad rows are reported and exit 1 below)
        result = data_mod.check_file(path, options, show=max(0, show), length_source=(
            source.format(profile.name) if max_seq_length is None else "--max-seq-length"))
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        click.echo(data_mod.format_check(result, color=sys.stdout.isatty()), nl=False)
    sys.exit(0 if result.ok else 1)


# --- estimate ------------------------------------------------------------------------------------------------------


@main.command("estimate")
@click.option("--profile", "profile_ref", default=None, metavar="NAME_OR_FILE",
              help="Profile to estimate in detail (default: every shipped profile, one line each).")
@click.option("--model", default=None, metavar="CONFIG_JSON|DIR",
              help="A model's config.json or its folder (default: openai/gpt-oss-20b's shape, built in).")
@click.option("--seq", type=click.IntRange(1), default=None, help="Tokens per row (same as --max-seq-length).")
@click.option("--batch", type=click.IntRange(1), default=None, help="Rows per pass (same as --per-device-batch-size).")
@click.option("--rank", type=click.IntRange(1), default=None, help="LoRA rank (same as --lora-rank).")
@click.option("--stack", type=click.Choice(["unsloth", "hf"]), default="unsloth", show_default=True,
              help="Training stack: unsloth (the default backend) or hf (transformers + PEFT + bitsandbytes).")
@click.option("--gpu-gib", type=click.FloatRange(1), default=None, metavar="GIB",
              help="Check against a card of this many GiB instead of the profile's vram_budget_gib.")
@click.option("--plan", "plan_gib", type=click.FloatRange(1), default=None, metavar="GIB",
              help="Tailor a profile to a card of this many GiB (longest rows, then largest batch that fit) and "
                   "estimate it.")
@click.option("--gpus", type=click.IntRange(1), default=1, show_default=True,
              help="GPUs of data parallel training (--gpus of train): the estimate is per GPU (the profile on each); "
                   "the global batch is printed too.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@profile_options
def estimate_cmd(profile_ref, model, seq, batch, rank, stack, gpu_gib, plan_gib, gpus, as_json, set_values,
                 **flags):
    """Predict peak GPU memory of training a profile, part by part, and whether it fits the card.

    \b
    Parts: base weights (4-bit NF4 or bf16), LoRA adapters, optimizer state + gradients, activations (the loss
    head's logits or one recomputed layer, whichever is larger), fixed overhead; then the reserved memory the card
    must hold, against the card minus headroom (16 GiB -> 14.5, 24 -> 22.5, 80 -> 76). The free coefficients are
    fitted to measured runs (benchmarks/results.json). Exit status 1 when a single profile does not fit.
    """
    from swft_lite import estimate as est

    flags.update({k: v for k, v in (("max_seq_length", seq), ("per_device_batch_size", batch),
                                     ("lora_rank", rank)) if v is not None})
    with usage_stage():
        shape = est.load_shape(model)
    if plan_gib is not None:
        with usage_stage():
            planned = est.plan_for_card(plan_gib, stack=stack, shape=shape)
        overrides = {k: v for k, v in flags.items() if v is not None}
        profiles = [dataclasses.replace(planned, **overrides)]
        gpu_gib = plan_gib if gpu_gib is None else gpu_gib
    elif profile_ref is not None:
        profiles = [resolve_profile(profile_ref, set_values, flags)]
    else:
        profiles = [resolve_profile(name, set_values, flags) for name in profiles_mod.shipped_profile_names()]
        profiles.sort(key=lambda p: (p.vram_budget_gib, p.name))
    with usage_stage():
        results = [est.estimate(p, shape, stack=stack, card_gib=gpu_gib) for p in profiles]
    single = len(profiles) == 1
    from swft_lite.distributed import Layout

    def per_gpu(p) -> dict:
        layout = Layout(gpus, p.per_device_batch_size, p.gradient_accumulation_steps)
        return {"gpus": gpus, "per_gpu": True, "global_batch": layout.global_batch,
                "global_tokens_per_step": p.tokens_per_step * gpus}

    if as_json:
        if single:
            click.echo(json.dumps({**results[0].to_dict(), **per_gpu(profiles[0]), "settings": profiles[0].to_dict()},
                                  indent=2))
        else:
            click.echo(json.dumps({"estimates": [{**e.to_dict(), "settings": p.to_dict()}
                                                 for e, p in zip(results, profiles)]}, indent=2))
    elif single:
        if plan_gib is not None:
            click.echo(f"plan: {profiles[0].description}")
        click.echo(est.format_estimate(results[0], profiles[0]))
        if gpus > 1:
            p = profiles[0]
            click.echo(f"{gpus} GPUs, data parallel: the estimate above is per GPU (every GPU holds the model and the "
                       f"profile); {Layout(gpus, p.per_device_batch_size, p.gradient_accumulation_steps).describe()}, "
                       f"{p.tokens_per_step * gpus:,} tokens a step at full rows")
    else:
        header = ("profile", "card", "rows x seq", "LoRA", "weights", "allocated", "reserved", "limit", "verdict")
        table = [header]
        for e, p in zip(results, profiles):
            table.append((p.name, f"{e.budget_gib:g} GiB", f"{p.per_device_batch_size} x {p.max_seq_length}",
                          f"r{p.lora_rank} {p.lora_targets}", "4-bit" if p.load_in_4bit else "bf16",
                          f"{e.total_gib:.1f} GiB", f"{e.reserved_gib:.1f} GiB", f"{e.limit_gib:g} GiB",
                          "fits" if e.fits else "does not fit"))
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        for i, r in enumerate(table):
            line = "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
            click.echo(click.style(line, bold=True) if i == 0 else line)
        click.echo(f"\n{stack} stack, model: {results[0].model}. `swft-lite estimate --profile NAME` for the parts.")
    sys.exit(1 if single and not results[0].fits else 0)


# --- merge / save-gguf ---------------------------------------------------------------------------------------------


@main.command("merge")
@click.argument("source", metavar="RUN_DIR|ADAPTER", type=click.Path(exists=True, file_okay=False))
@click.option("--base", help="The base model (folder or hub id). Default: run.json's model, else the adapter's "
                             "base_model_name_or_path. bf16 or the original MXFP4 checkpoint, not a 4-bit one.")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder. Default: RUN_DIR/merged.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out (only after the new merge verified).")
@click.option("--no-verify", is_flag=True, help="Skip the check against base + adapter (not recommended).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest output safetensors file.")
@click.option("--device", default="auto", show_default=True, help="Where the verification runs (cpu, cuda, cuda:1). "
              "auto: the GPU in bf16 when the model fits its free memory, else the CPU in fp32, else in bf16; "
              "refused, with the numbers, when free RAM fits none.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Verification dtype; auto = float32 on CPU, bfloat16 on a GPU.")
@click.option("--force-base", is_flag=True, help="Merge even when --base is not the model the adapter was trained "
              "on (its fingerprint in adapter/swft_base.json differs).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON at the end.")
def merge_cmd(source, base, out, overwrite, no_verify, max_shard_size, device, dtype, force_base, as_json):
    """Fold the LoRA adapter into the base weights: bf16 safetensors shards, config, tokenizer, chat template.

    \b
    Every LoRA delta (attention q/k/v/o and each expert's gate_up/down) is computed by PEFT's own layer code and
    added shard by shard (memory: about one output shard); an MXFP4 base has its experts dequantized to bf16.
    The result is then loaded and compared with base + adapter on fixed harmony probe tokens: mean KL <= 1e-3
    over the best 98% of positions and top-1 agreement >= 0.90, near-ties forgiven (1e-2 in bf16), or no worse
    than PEFT's own merge of the same model stored in bf16; in fp32 it must also match that merge (KL <= 1e-4).
    A merge that fails is left at OUT.failed, never at OUT, and the command exits 1.
    We do not use Unsloth's save_pretrained_merged: on a multi-file gpt-oss base it could not tell the expert
    layout apart (expert width == hidden size) and wrote a wrong model.
    """
    from swft_lite.merge import merge_adapter

    report = merge_adapter(source, base=base, out=out, overwrite=overwrite, verify=not no_verify,
                           max_shard_size=max_shard_size, device=device,
                           dtype=None if dtype == "auto" else dtype, log=click.echo, force_base=force_base)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))


@main.command("save-gguf")
@click.argument("source", metavar="RUN_DIR|MERGED_DIR", required=False, type=click.Path(exists=True, file_okay=False))
@click.option("--quant", default="q8_0", show_default=True, type=click.Choice(
    ["q8_0", "mxfp4", "bf16", "f16", "f32", "q6_k", "q5_k_m", "q5_k_s", "q5_0", "q5_1", "q4_k_m", "q4_k_s", "q4_0",
     "q4_1", "iq4_nl", "iq4_xs", "q3_k_m", "q3_k_l", "q3_k_s", "q2_k"], case_sensitive=False),
    help="q8_0 (default) keeps the fine-tuning: gpt-oss ships its experts in MXFP4, the merge adds the LoRA delta "
         "to them, and mxfp4 re-quantizes them onto MXFP4's coarse grid, which snaps a delta of a few % of the "
         "weights back to the base (measured on a base with MXFP4-exact experts: mxfp4 kept 59% of the fine-tuning "
         "by KL and is refused, q8_0 98%). mxfp4 = experts in MXFP4, the rest q8_0. k-quants fall back to q5_0/q8_0 on gpt-oss's "
         "2880-wide tensors.")
@click.option("--out", type=click.Path(dir_okay=False), help="Output file. Default: RUN_DIR/gguf/RUN-QUANT.gguf.")
@click.option("--llama-cpp", "llama_cpp", type=click.Path(file_okay=False),
              help="A llama.cpp folder with convert_hf_to_gguf.py (default: $SWFT_LLAMA_CPP, "
                   "$UNSLOTH_LLAMA_CPP_PATH, ~/.unsloth/llama.cpp, or the one --fetch-converter keeps).")
@click.option("--fetch-converter", is_flag=True, help="Download llama.cpp's converter (inside the llama-cpp-python "
                                                      "source package) from PyPI into ~/.cache/swft-lite first.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file (and a Modelfile you changed).")
@click.option("--no-verify", is_flag=True, help="Skip every check: merged/ against the run, and the file's header, "
                                                "bytes and logits (not recommended).")
@click.option("--no-modelfile", is_flag=True, help="Do not write an Ollama Modelfile beside the GGUF.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON at the end.")
def save_gguf_cmd(source, quant, out, llama_cpp, fetch_converter, overwrite, no_verify, no_modelfile, as_json):
    """Convert merged weights (RUN_DIR/merged, merged first if missing) to a GGUF for llama.cpp and Ollama.

    \b
    First merged/ is re-checked against base + adapter and the record of the model as trained; one that does not
    match is refused and nothing is exported. Conversion is llama.cpp's convert_hf_to_gguf.py; quantization
    llama-quantize, else llama-cpp-python. The file is then read back (architecture, tensors, vocabulary, chat
    template, special tokens), every tensor compared with the merged weights quantized the same way, and run with
    llama-cpp-python against the merged model on the probe tokens (f32/f16/bf16: logits within a strict bound at
    every position; quantized: logit cosine), and against the base: it must keep >= 90% of the fine-tuning by KL
    and >= 80% of the adapter's top-1 changes. A file that fails is renamed FILE.failed and the command exits 1.
    A Modelfile per GGUF (FILE.Modelfile, harmony template with tools) is written beside it.
    """
    from swft_lite.gguf_export import export_gguf, fetch_converter as fetch

    if fetch_converter:
        fetch(log=click.echo)
    if source is None:
        if fetch_converter:
            return
        fail("give RUN_DIR or MERGED_DIR")
    report = export_gguf(source, quant=quant.lower(), out=out, llama_cpp=llama_cpp, verify=not no_verify,
                         overwrite=overwrite, modelfile=not no_modelfile, log=click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))


@main.command("verify")
@click.argument("run", metavar="RUN_DIR", type=click.Path(exists=True, file_okay=False))
@click.argument("artefact", metavar="[ARTEFACT]", required=False, type=click.Path(exists=True))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON at the end.")
def verify_cmd(run, artefact, as_json):
    """Re-check a run's merged/ or a GGUF, at any time: exit 1 when anything fails.

    \b
    merged/ against base + adapter and the trained-model record (as the merge checks it); a GGUF (ARTEFACT, or
    every RUN_DIR/gguf/*.gguf) after merged/: header, every tensor's bytes, llama.cpp's logits against the merged
    model, and how much of the fine-tuning it keeps - the same figures save-gguf prints.
    """
    from swft_lite.verify import verify_artefacts

    report = verify_artefacts(run, artefact, log=click.echo)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    if not report["passed"]:
        sys.exit(1)

# --- eval ----------------------------------------------------------------------------------------------------------


@main.command("eval")
@click.argument("run", metavar="RUN|MODEL|FILE.gguf", required=False)
@click.option("--data", "data_path", metavar="VAL.jsonl", help="Conversations in the training chat format: the "
              "model answers each one's last user turn; the last assistant message is the reference answer.")
@click.option("--predictions", metavar="FILE.jsonl", help="Score answers generated elsewhere instead (same chat "
              "format; the last assistant message of each row is the answer). No model is loaded.")
@click.option("--compare", metavar="BASE", is_flag=False, flag_value="", default=None,
              help="Also run the base model and print both columns. Without a value: the base in RUN/run.json.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document (for scripts).")
@click.option("--rows-out", metavar="FILE.jsonl", help="Write per-row answers and scores here.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Sampling seed (with --temperature > 0).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the first N rows.")
@click.option("--mask", type=click.Choice(["assistant", "final", "all"]), default="assistant", show_default=True,
              help="Which reference tokens the eval loss counts (the training masks).")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium",
              show_default=True, help="Reasoning level in the system block for rows that set none.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1; auto = cuda when available.")
@engine_option
@click.option("--mermaid-checker", type=click.Choice(["auto", "mermaid", "subset"]), default="auto",
              show_default=True, help="auto: Mermaid's own parser (node + npm mermaid) when installed, else the subset "
              "check of flowchart/sequence/class syntax.")
@click.option("--fetch-mermaid", is_flag=True, help="npm install mermaid and jsdom into ~/.cache/swft-lite/mermaid "
              "first (needs node 18+).")
def eval_cmd(run, data_path, predictions, compare, as_json, rows_out, max_new_tokens, temperature, seed, limit, mask,
             reasoning_effort, device, engine, mermaid_checker, fetch_mermaid):
    """Score answers with the wiki-agent metrics; fine-tuned vs base side by side with --compare.

    \b
      swft-lite eval output/RUN --data val.jsonl --compare     generate (greedy), score, eval loss, both models
      swft-lite eval --predictions answers.jsonl               score answers generated elsewhere
      swft-lite eval --fetch-mermaid                           install Mermaid's own parser (npm) and exit
    \b
    source_refs     cited claims / claims: a claim (list item, sentence, table row) cites PATH:LINE(-LINE) of a
                    file shown in the prompt (fenced block with a path label, <file path=...>), line within it
    markdown_valid  markdown-it-py parse: not empty, fences closed, no heading level skipped going down
    mermaid_valid   ```mermaid blocks that parse (Mermaid itself, or the stated subset check)
    format_ok       a final channel, no harmony markup leaked; reasoning length
    eval loss       teacher-forced on the reference answers with the training masks (--mask)
    """
    from swft_lite import evaluate as ev
    from swft_lite import metrics as M
    from swft_lite.data import DataOptions
    from swft_lite.inference import run_base

    log = (lambda s: click.echo(s, err=True))
    try:
        if fetch_mermaid:
            try:
                where = M.install_mermaid(log=log)
            except RuntimeError as exc:
                raise ev.EvalError(f"--fetch-mermaid: {exc}; without it eval uses --mermaid-checker subset") from None
            if not (run or data_path or predictions):
                click.echo(f"Mermaid's own parser is installed in {where}; eval checks diagrams with it from now on.")
                return
        try:
            checker, why = M.mermaid_checker(mermaid_checker)
        except RuntimeError as exc:
            raise ev.EvalError(f"{exc}; run with --fetch-mermaid, or --mermaid-checker subset") from None
        checker_note = checker.description + (f" ({why})" if why and mermaid_checker == "auto" else "")
        options = DataOptions(mask=mask, reasoning_effort=reasoning_effort)
        results = []
        if predictions:
            if compare is not None:
                raise ev.EvalError("--compare needs generation: give RUN and --data instead of --predictions")
            rows = ev.read_predictions(predictions)[:limit]
            results.append(ev.score("predictions", f"answers from {predictions}", rows, [r.answer for r in rows],
                                    checker))
        else:
            if not run or not data_path:
                raise ev.EvalError("give RUN and --data VAL.jsonl to generate answers, or --predictions FILE.jsonl to "
                                   "score answers generated elsewhere")
            rows = ev.read_data(data_path)[:limit]
            for r in rows:  # every row is checked before a model loads
                ev._prompt_tokens(r, options)
            kw = dict(device=device, engine=engine, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                      log=log)
            results.append(ev.evaluate_model("fine-tuned" if compare is not None else "model", run, rows, options,
                                             checker, **kw))
            if compare is not None:
                base = compare or run_base(run)
                if not base:
                    raise ev.EvalError(f"{run}: no run.json or adapter config names the base model; pass --compare "
                                       "BASE")
                results.append(ev.evaluate_model("base", base, rows, options, checker, **kw))
    except KeyboardInterrupt:
        fail("aborted", code=130)
    if rows_out:
        ev.write_rows(rows_out, rows, results)
    if as_json:
        click.echo(json.dumps({"mermaid_checker": checker.name, "mermaid_checker_description": checker_note,
                               "models": {r.label: {"engine": r.engine, **r.summary} for r in results},
                               "rows_out": rows_out}, indent=2))
    else:
        click.echo(ev.format_table(results, checker_note))
        if rows_out:
            click.echo(f"per-row results: {rows_out}")

# --- chat ----------------------------------------------------------------------------------------------------------


@main.command("chat")
@click.argument("model_ref", metavar="RUN|MODEL|FILE.gguf")
@click.option("--prompt", default=None, help="One message, one reply, then exit (default: interactive).")
@click.option("--system", default=None, help="Developer instructions (gpt-oss's '# Instructions').")
@click.option("--reasoning-effort", type=click.Choice(["low", "medium", "high"]), default="medium", show_default=True)
@click.option("--no-reasoning", is_flag=True, help="Do not show the reasoning (analysis channel).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per reply (final, reasoning, tokens/s), no "
              "streaming.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=1024, show_default=True)
@click.option("--temperature", type=click.FloatRange(0), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="Run folders: cpu, cuda, cuda:1; auto = cuda "
              "when available.")
@engine_option
@click.option("--base", default=None, help="Run folders: use base + adapter/ with this base (skips merged/).")
@click.option("--n-gpu-layers", type=int, default=0, show_default=True, help="GGUF: layers offloaded to the GPU "
              "(-1 = all).")
@click.option("--n-ctx", type=click.IntRange(256), default=8192, show_default=True, help="GGUF: context length.")
def chat_cmd(model_ref, prompt, system, reasoning_effort, no_reasoning, as_json, max_new_tokens, temperature, seed,
             device, engine, base, n_gpu_layers, n_ctx):
    """Chat with a run folder (merged/, or base + adapter/) or a GGUF, in harmony.

    \b
    The reply streams as it is generated, parsed by openai-harmony into its channels: reasoning dimmed (hidden with
    --no-reasoning), the answer plain; raw harmony markup is never printed. Earlier turns keep only their answers.
    Engines: a .gguf through llama-cpp-python; a run or model folder through Unsloth's inference mode on a CUDA GPU
    where it is installed, else transformers (+ PEFT for an adapter); --engine chooses.
    """
    from swft_lite.chat import ChatSession, run_chat
    from swft_lite.inference import load_engine

    log = (lambda s: click.echo(s, err=True))
    try:
        model = load_engine(model_ref, device=device, base=base, n_gpu_layers=n_gpu_layers, n_ctx=n_ctx,
                            engine=engine, log=log)
        click.secho(f"engine: {model.description}", dim=True, err=True)
        session = ChatSession(model, instructions=system, reasoning_effort=reasoning_effort,
                              max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
        run_chat(session, prompt=prompt, as_json=as_json, show_reasoning=not no_reasoning)
        model.close()
    except KeyboardInterrupt:
        fail("interrupted", code=130)


if __name__ == "__main__":  # pragma: no cover
    main()
