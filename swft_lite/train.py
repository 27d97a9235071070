"""The training recipe: one run, top to bottom.

    resolved profile + options  ->  run folder  ->  data (validated, rendered)  ->  model + LoRA  ->  SFTTrainer
    ->  adapter  ->  merged 16-bit weights (verified)  ->  run.json

`train()` reads as those steps: setup_run, prepare_data, the plan, start_record, load_model, build_trainer,
run_training, record_probe, save_adapter, merge_run. Everything a run makes lands in one run folder
(swft_lite.run_folder: run.json, checkpoints/, tensorboard/, adapter/, merged/ - skipped with --no-merge).

Nothing a user made is overwritten: an existing run folder is refused unless --overwrite or --resume is given.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from swft_lite import __version__
from swft_lite import distributed
from swft_lite.base_identity import write_record as _write_base_identity
from swft_lite.checkpoints import (RunGuard, TrainInterrupted, checkpoint_for_resume, completion_marker_callback,
                                   history_until, settle_before_resume)
from swft_lite.data.options import DataOptions, option, same_as
from swft_lite.errors import TrainError
from swft_lite.profiles import Profile
from swft_lite.run_folder import RUN_JSON, RunFolder, RunRecord, process_identity
from swft_lite import train_eval

@dataclass
class TrainOptions:
    model: str = "openai/gpt-oss-20b"
    data: str | None = None               # None: data/processed/train.jsonl; "sample": the shipped sample set
    eval_data: str | None = None
    eval_fraction: float = 0.0
    output_root: str = "output"
    run_name: str | None = None
    backend: str = "auto"                 # auto | unsloth | hf
    max_steps: int | None = None
    logging_steps: int = 1
    eval_steps: int = 50
    save_steps: int = 100
    save_total_limit: int = 3
    early_stopping_patience: int | None = option(None, type=int, min=1, help=(
        "Stop when --early-stopping-metric has not improved for N evaluations (needs eval data, and --save-steps a "
        "multiple of --eval-steps)."))
    early_stopping_metric: str = option("eval_loss", choices=tuple(train_eval.EARLY_STOPPING_METRICS), help=(
        "What early stopping and the best checkpoint (adapter/) watch: eval_loss (lower is better) or a share "
        "measured on --eval-generate answers (higher is better)."))
    eval_generate: int = option(0, min=0, help=(
        "At each evaluation, answer the first N conversations of --eval-data (greedy) and log source_refs, "
        "markdown_valid, mermaid_valid, format_ok (as `swft-lite eval` scores them). 0: eval loss only."))
    eval_max_new_tokens: int = option(256, min=1, help="Most tokens generated per --eval-generate answer.")
    seed: int = same_as(DataOptions, "seed")
    resume: bool = False
    force_resume: bool = False
    overwrite: bool = False
    merge: bool = True
    wandb: bool = False
    mask: str = same_as(DataOptions, "mask")
    overlong: str = same_as(DataOptions, "overlong")
    reasoning_effort: str = same_as(DataOptions, "reasoning_effort")
    date: str = same_as(DataOptions, "date")
    num_proc: int | None = None
    dry_run: bool = False                 # print the plan (data, batches, steps, memory, time) and stop
    gpus: str = option("1", help="GPUs to train on, one process each (data parallel, the profile on every GPU): a "
                                 "number, or 'auto' for every visible GPU that fits the profile. More than 1 starts "
                                 "the run under torchrun; under your own torchrun its world size is used.")

    def run_dir(self, profile: Profile) -> Path:
        name = self.run_name or f"{profile.name}-{datetime.now():%Y%m%d-%H%M%S}"
        return Path(self.output_root) / name


# Options that change what is trained; anything else (step counts for logging or saving, merge) may differ on resume.
# Every profile key is part of the fingerprint too (token_budget and packing among them: they change the batches).
_FINGERPRINT_OPTIONS = ("model", "eval_fraction", "seed", "mask", "overlong", "reasoning_effort", "date")


def fingerprint_parts(profile: Profile, options: TrainOptions, data_report: dict) -> dict:
    """Everything that decides what a run trains, flat, so a changed value can be named."""
    parts = {f"profile.{k}": v for k, v in profile.to_dict().items() if k not in ("description", "source")}
    parts.update({f"option.{k}": getattr(options, k) for k in _FINGERPRINT_OPTIONS})
    # The data by what it holds, not where it lies: the same file given by another path is the same run.
    parts["data.sha256"] = sorted(f.get("sha256") for f in data_report.get("files", {}).values())
    return parts


def content_parts(parts: dict) -> dict:
    """A recorded fingerprint with its data keyed by content: runs started before swft-lite keyed it by path
    (`data.<path>: sha256`); those keys become the one `data.sha256` list."""
    out = {k: v for k, v in parts.items() if not k.startswith("data.")}
    if "data.sha256" in parts:
        out["data.sha256"] = parts["data.sha256"]
    else:
        out["data.sha256"] = sorted(v for k, v in parts.items() if k.startswith("data."))
    return out


def fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def describe_changes(before: dict, now: dict) -> str:
    keys = sorted(set(before) | set(now))
    changed = [f"{k}: {before.get(k, '(absent)')!r} -> {now.get(k, '(absent)')!r}" for k in keys
               if before.get(k) != now.get(k)]
    return "; ".join(changed[:8]) + (f"; and {len(changed) - 8} more" if len(changed) > 8 else "")


# openai/gpt-oss-20b on the hub stores its experts in MXFP4, which neither PEFT nor Unsloth trains through without
# extra kernels; asked for it in 4 bits, Unsloth swaps in its pre-quantized bnb-4bit repo, whose experts are
# per-expert Linear layers - a layout the fused base cannot take back in a merge, and one swft-lite's adapter check
# rejects. The same weights in bf16 (Unsloth's own advice in unsloth_zoo) load as fused experts, quantize to NF4 when
# asked, and are the base the merge folds the adapter into.
BF16_EQUIVALENT = {"openai/gpt-oss-20b": "unsloth/gpt-oss-20b-BF16"}


def resolve_model(model: str, echo=print) -> str:
    """A local folder becomes an absolute path (loaded with local files only); anything else is a hub id."""
    if model in BF16_EQUIVALENT:
        echo(f"model: {model} stores its experts in MXFP4; training starts from the same weights in bf16, "
             f"{BF16_EQUIVALENT[model]} (also the base of the merge)")
        return BF16_EQUIVALENT[model]
    p = Path(model).expanduser()
    if p.exists():
        if not (p / "config.json").exists():
            raise TrainError(f"--model {model}: the folder has no config.json (expected a Hugging Face model folder)")
        return str(p.resolve())
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise TrainError(f"--model {model}: no such folder, and not a hub id of the form owner/name")
    return model


def prepare_run_dir(run_dir: Path, options: TrainOptions) -> None:
    """Refuse to clobber a run. --overwrite deletes it, but train() calls this only after the new data checked out."""
    if options.resume:
        if not RunFolder(run_dir).has_record():
            raise TrainError(f"--resume: {run_dir} holds no run (no {RUN_JSON}); start it without --resume")
        return
    if run_dir.exists() and any(run_dir.iterdir()):
        if not options.overwrite:
            raise TrainError(f"{run_dir} already exists and is not empty. Nothing was changed. Use --resume to "
                             "continue that run, --overwrite to replace it, or --run-name for a new one.")
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)


def package_versions() -> dict[str, str | None]:
    from swft_lite.hardware import installed_version

    return {name: installed_version(name) for name in (
        "swft-lite", "torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "unsloth",
        "unsloth_zoo", "openai-harmony")}


def gpu_description() -> dict | None:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return {"name": props.name, "total_gib": round(props.total_memory / 2**30, 2),
            "capability": f"{props.major}.{props.minor}"}


def oom_advice(profile: Profile) -> str:
    steps = [f"max_seq_length {profile.max_seq_length} -> {max(128, profile.max_seq_length // 2)} "
             f"(--max-seq-length {max(128, profile.max_seq_length // 2)})"]
    if profile.per_device_batch_size > 1:
        b = profile.per_device_batch_size // 2
        steps.append(f"per_device_batch_size {profile.per_device_batch_size} -> {b} and gradient_accumulation_steps "
                     f"{profile.gradient_accumulation_steps} -> {profile.gradient_accumulation_steps * 2} "
                     f"(--per-device-batch-size {b} --gradient-accumulation-steps "
                     f"{profile.gradient_accumulation_steps * 2}, same effective batch)")
    if profile.lora_targets == "attention+experts":
        steps.append("lora_targets attention+experts -> attention (--lora-targets attention)")
    if not profile.load_in_4bit:
        steps.append("load_in_4bit false -> true (--load-in-4bit)")
    if profile.gradient_checkpointing != "unsloth":
        steps.append(f"gradient_checkpointing {profile.gradient_checkpointing} -> unsloth")
    return (f"the GPU ran out of memory with profile '{profile.name}'. Lower, in this order: " + "; ".join(steps) +
            ". `swft-lite detect` names the profile that fits your card.")


def verification_device(model_path: str) -> str:
    """The merge check runs base + adapter and then the merged model (one at a time) in bf16: on the GPU when the
    whole model fits in its free memory with room to spare, else on the CPU."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    from swft_lite.merge import estimate_output_bytes, resolve_model_dir

    need = estimate_output_bytes(resolve_model_dir(model_path))
    free, _ = torch.cuda.mem_get_info()
    return "cuda" if free > 1.25 * need else "cpu"


class _StopRequest:
    """Ctrl-C once: finish the current step, save a checkpoint, stop. Ctrl-C twice: stop at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            print("\nCtrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to abort now).",
                  file=sys.stderr, flush=True)

        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread (e.g. under a test runner's thread): no handler
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


class TokenCounter:
    """Wraps the data collator to count the real (unpadded) tokens of every training batch. Trainers disagree on
    what they log (TRL logs `num_tokens`, Unsloth's patched trainer does not), so tokens/s is counted here.

    `eval_collator` batches evaluation when it differs: packed rows are kept apart only by the training attention
    path (Unsloth evaluates gpt-oss through its own attention, which would let packed rows see each other), so a
    packed run evaluates padded batches."""

    def __init__(self, collator, is_training, eval_collator=None):
        self.collator = collator
        self.eval_collator = eval_collator or collator
        self.is_training = is_training
        self.tokens = 0

    def __call__(self, features):
        if self.is_training():
            self.tokens += sum(len(f["input_ids"]) for f in features)
            return self.collator(features)
        return self.eval_collator(features)


def _callbacks(stop: _StopRequest, run_log: dict, counter: TokenCounter, tb_writer):
    """Progress bar with ETA, loss, tokens/s and peak memory, and the same numbers to TensorBoard.

    TensorBoard is written here rather than by transformers' TensorBoardCallback, which flushes the event file at
    every log: at logging_steps=1 and sub-second steps that file I/O alone costs a few percent of the speed."""
    import torch
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def __init__(self):
            self.bar = None
            self.post: dict[str, str] = {}  # last value of each, so an eval log does not hide the train loss
            self.last_tokens = 0
            self.last_time = None

        def on_train_begin(self, args, state, control, **kw):
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc="training", unit="step",
                            dynamic_ncols=True, disable=not distributed.is_main_process())
            self.last_time = time.perf_counter()
            self.last_tokens = 0

        def on_step_end(self, args, state, control, **kw):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)
            if stop.requested:
                control.should_save = True
                control.should_training_stop = True
                run_log["interrupted_at_step"] = state.global_step

        def on_log(self, args, state, control, logs=None, **kw):
            # Adds tokens/s and peak memory to the trainer's logs, then writes them all to TensorBoard.
            if logs is None:
                return
            now = time.perf_counter()
            tokens = counter.tokens
            if "loss" in logs:
                if tokens >= self.last_tokens and now > self.last_time:
                    if self.last_tokens:  # the first interval includes compilation / warm-up
                        logs["tokens_per_second"] = (tokens - self.last_tokens) / (now - self.last_time)
                        run_log["tokens_per_second"].append(logs["tokens_per_second"])
                self.last_tokens, self.last_time = tokens, now
            if torch.cuda.is_available():
                logs["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
                logs["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
            if "loss" in logs:
                run_log["losses"].append({"step": state.global_step, "loss": logs["loss"]})
            if "eval_loss" in logs:
                run_log["eval_losses"].append({"step": state.global_step, "eval_loss": logs["eval_loss"]})
            for key, value in logs.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    tag = f"eval/{key[5:]}" if key.startswith("eval_") else f"train/{key}"
                    tb_writer.add_scalar(tag, value, state.global_step)
            if self.bar is not None:
                post = self.post
                if "loss" in logs:
                    post["loss"] = f"{logs['loss']:.4f}"
                if "eval_loss" in logs:
                    post["eval"] = f"{logs['eval_loss']:.4f}"
                if "tokens_per_second" in logs:
                    post["tok/s"] = f"{logs['tokens_per_second']:.0f}"
                if "peak_memory_gib" in logs:
                    post["peak"] = f"{logs['peak_memory_gib']:.1f}GiB"
                if post:
                    self.bar.set_postfix(post, refresh=False)  # redrawn by the next update, at most 10 per second

        def on_train_end(self, args, state, control, **kw):
            tb_writer.flush()
            if self.bar is not None:
                self.bar.close()

    return Progress()


def _optimizer_name(profile: Profile) -> str:
    import torch

    if "8bit" in profile.optimizer and not torch.cuda.is_available():
        print(f"note: optimizer {profile.optimizer} needs bitsandbytes on a GPU; using adamw_torch on CPU",
              file=sys.stderr)
        return "adamw_torch"
    return profile.optimizer


def sft_config(profile: Profile, options: TrainOptions, run_dir: Path, has_eval: bool):
    import torch
    from trl import SFTConfig

    from swft_lite.backends import training_dtype

    scheduler_kwargs = {}
    if profile.lr_scheduler == "cosine_with_min_lr":
        scheduler_kwargs = {"min_lr": profile.min_learning_rate}
    best_at_end = has_eval and options.save_steps % options.eval_steps == 0
    # TensorBoard is attached by train() with its own writer (transformers 5 dropped `logging_dir`).
    report_to = ["wandb"] if options.wandb else []
    return distributed.adjust_training_args(SFTConfig(
        output_dir=str(RunFolder(run_dir).checkpoints),
        report_to=report_to,
        run_name=run_dir.name,
        per_device_train_batch_size=profile.per_device_batch_size,
        per_device_eval_batch_size=profile.per_device_batch_size,
        gradient_accumulation_steps=profile.gradient_accumulation_steps,
        num_train_epochs=profile.num_epochs,
        max_steps=options.max_steps if options.max_steps else -1,
        learning_rate=profile.learning_rate,
        lr_scheduler_type=profile.lr_scheduler,
        lr_scheduler_kwargs=scheduler_kwargs,
        warmup_steps=profile.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        weight_decay=profile.weight_decay,
        max_grad_norm=profile.max_grad_norm,
        optim=_optimizer_name(profile),
        bf16=training_dtype() == torch.bfloat16,
        fp16=False,
        # Gradient checkpointing is switched on by the backend when the model is built (Unsloth's own mode, or
        # transformers' non-reentrant one); asking the Trainer again would wrap it twice.
        gradient_checkpointing=False,
        max_length=profile.max_seq_length,
        packing=False,
        router_aux_loss_coef=profile.router_aux_loss_coef,
        logging_steps=options.logging_steps,
        logging_first_step=True,
        eval_strategy="steps" if has_eval else "no",
        eval_steps=options.eval_steps if has_eval else None,
        save_strategy="steps",
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        load_best_model_at_end=best_at_end,
        metric_for_best_model=train_eval.metric_key(options.early_stopping_metric) if best_at_end else None,
        greater_is_better=train_eval.greater_is_better(options.early_stopping_metric) if best_at_end else None,
        seed=options.seed,
        data_seed=options.seed,
        disable_tqdm=True,
        dataset_num_proc=options.num_proc,
        dataloader_num_workers=0,
        use_cpu=not torch.cuda.is_available(),
        **distributed.ddp_settings(),
    ))


def plan_training(profile: Profile, options: TrainOptions, train_dataset, backend: str) -> dict:
    """What the run will do, worked out from the rendered rows before any model loads: batches, steps, padding,
    peak memory (estimate) and time (the measured pass-time model of these settings, where there is one)."""
    import math

    from swft_lite import estimate as est
    from swft_lite.batching import dataset_lengths, plan_batches_for

    lengths = dataset_lengths(train_dataset)
    _, plan = plan_batches_for(profile, lengths, options.seed)
    accumulation = profile.gradient_accumulation_steps
    # Under data parallel every process takes every N-th pass (accelerate's BatchSamplerShard): passes and time
    # below are one process's, tokens the whole run's.
    world = distributed.world_size()
    rank_batches = math.ceil(plan.micro_batches / world)
    steps_per_epoch = math.ceil(rank_batches / accumulation)
    steps = options.max_steps or math.ceil(profile.num_epochs * steps_per_epoch)
    passes = min(steps * accumulation, math.ceil(rank_batches * (steps / steps_per_epoch)))
    epochs = passes / max(rank_batches, 1)
    memory = est.estimate(profile, stack="hf" if backend == "hf" else "unsloth")
    timing = est.pass_time(profile) if backend == "unsloth" else None
    return {
        "batching": plan.to_dict(),
        "longest_row": max(lengths, default=0), "mean_row": round(sum(lengths) / max(len(lengths), 1)),
        "optimizer_steps": steps, "steps_per_epoch": steps_per_epoch, "micro_batches": passes,
        "epochs": round(epochs, 3),
        "tokens": round(plan.tokens * epochs), "computed_tokens": round(plan.padded_tokens * epochs),
        "memory": {"reserved_gib": round(memory.reserved_gib, 2), "limit_gib": memory.limit_gib,
                   "fits": memory.fits, "stack": memory.stack},
        "world_size": world,
        "global_batch": distributed.Layout(world, profile.per_device_batch_size, accumulation).global_batch,
        "eta_seconds": None if timing is None else round(timing.seconds(passes, plan.padded_tokens * epochs / world)),
        "eta_source": None if timing is None else timing.source,
    }


# Passes filled below this share of their tokens get the packing advice: on real chats (~35 % full) packing measured
# 1.6x (rtx4090) to 1.9x (h100) the speed; on full rows it is no gain.
PACKING_ADVICE_BELOW = 0.6


def format_plan(profile: Profile, plan: dict, backend: str) -> str:
    b = plan["batching"]
    if b["mode"] == "fixed":
        how = f"{profile.per_device_batch_size} row(s) per pass (token_budget off)"
    elif b["mode"] == "budget":
        how = f"token budget {b['token_budget']:,}, length-bucketed: up to {b['max_rows_per_batch']} rows per pass"
    else:
        seqs = f"{b['sequences_per_pass']} sequences" if b["sequences_per_pass"] > 1 else "sequences"
        how = f"packed into {seqs} of up to {b['sequence_length']:,} tokens (up to {b['max_rows_per_batch']} rows)"
    lines = [
        f"plan: {b['rows']:,} rows, {b['tokens']:,} tokens an epoch (mean {plan['mean_row']:,}, longest "
        f"{plan['longest_row']:,})",
        f"  batching   {how}: {b['micro_batches']:,} passes an epoch, padding {100 * b['padding_fraction']:.1f} %",
        f"  steps      {plan['optimizer_steps']:,} optimizer steps of up to {profile.gradient_accumulation_steps} passes "
        f"({plan['steps_per_epoch']:,} an epoch, {plan['epochs']:g} epochs); {plan['tokens']:,} tokens trained",
    ]
    m = plan["memory"]
    lines.append(f"  memory     ~{m['reserved_gib']:.1f} GiB reserved (estimate, {m['stack']} stack) of a "
                 f"{profile.vram_budget_gib:g} GiB card's {m['limit_gib']:g} GiB limit: "
                 f"{'fits' if m['fits'] else 'does NOT fit'}")
    world = plan.get("world_size", 1)
    if world > 1:
        unit = "rows" if b["mode"] == "fixed" else "passes"
        per = profile.per_device_batch_size if b["mode"] == "fixed" else 1
        layout = distributed.Layout(world, per, profile.gradient_accumulation_steps)
        lines.append(f"  GPUs       {world} processes, data parallel, the profile on each: {layout.describe(unit)}; "
                     f"{plan['micro_batches']:,} passes each")
    if plan["eta_seconds"] is not None:
        scaled = f", {world} GPUs assumed to scale fully (not measured)" if world > 1 else ""
        lines.append(f"  time       ~{_duration(plan['eta_seconds'])} ({plan['eta_source']}{scaled})")
    else:
        lines.append(f"  time       no measured speed for these settings on the {backend} backend")
    fill = b["tokens"] / max(1, b["micro_batches"] * profile.per_device_batch_size * profile.max_seq_length)
    if b["mode"] == "fixed" and fill < PACKING_ADVICE_BELOW:
        # Each pass costs nearly the same whatever it holds (benchmarks/PROFILE_STEP.md).
        lines.append(f"  tip        these rows fill {100 * fill:.0f} % of each pass: --packing --token-budget "
                     f"{profile.max_seq_length} --per-device-batch-size 1 fills them (1.6-1.9x the speed on real "
                     "chats: benchmarks/RESULTS_LENGTHS.md)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = seconds / 60
    return f"{minutes:.0f} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def train(profile: Profile, options: TrainOptions, echo=print) -> Path | None:
    """Run one training job end to end; returns the run folder (None for a dry run, which only prints the plan)."""
    echo = distributed.echo_for_rank(echo)  # several processes (--gpus N): rank 0 speaks and writes
    model_path, backend, run = setup_run(profile, options, echo)
    distributed.rank_zero_writes(run)
    distributed.barrier()  # every rank has checked the run folder before rank 0 writes into it
    prepared = distributed.main_first(lambda: prepare_data(profile, options, echo))
    train_eval.check_options(options, prepared)  # before any model loads
    plan = plan_training(profile, options, prepared.train, backend)
    echo(format_plan(profile, plan, backend))
    if options.dry_run:
        return None
    record, resume_from = distributed.main_first(
        lambda: start_record(run, profile, options, model_path, backend, prepared.report, plan, echo),
        others=lambda: (run.read_record(), checkpoint_for_resume(run.checkpoints, echo) if options.resume else None))
    # From here the run folder exists: whatever ends the run, run.json ends with a final status (swft_lite.checkpoints).
    with RunGuard(run, record, model_path, options.resume, _now) as guard:
        if resume_from is not None:  # the history logged before the stop, up to the checkpoint resumed from
            record.update(history_until(resume_from))
        model, tokenizer = load_model(run, record, backend, model_path, profile, echo)
        with _StopRequest() as stop:
            trainer, run_log, tb_writer = build_trainer(run, record, profile, options, model, tokenizer, prepared,
                                                        stop, echo)
            trainer.add_callback(completion_marker_callback())
            guard.training_started()
            run_training(run, record, profile, trainer, run_log, tb_writer, resume_from)
        if stop.requested:
            step = trainer.state.global_step
            guard.finish("interrupted", f"Ctrl-C: stopped after step {step}, checkpoint saved")
            raise TrainInterrupted(f"interrupted at step {step}; checkpoint-{step} saved under {run.checkpoints}. "
                                   f"Continue with the same command plus --resume --run-name {run.name}")
        if not distributed.is_main_process():
            return run.path  # rank 0 records, saves and merges the (identical) trained model
        record_probe(run, record, trainer, tokenizer, echo)
        adapter_dir = save_adapter(run, record, trainer, tokenizer, echo)
        if options.merge:
            del trainer, model
            merge_run(run, record, adapter_dir, model_path, echo)
        guard.finish("completed")
    return run.path


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def setup_run(profile: Profile, options: TrainOptions, echo) -> tuple[str, str, RunFolder]:
    """The model, the backend (Unsloth imported now, before the data step imports transformers) and the run folder,
    refused at once when it exists and neither --resume nor --overwrite allows it."""
    from swft_lite.backends import choose_backend, import_unsloth

    model_path = resolve_model(options.model, echo)
    if not options.dry_run:  # a hub id not (fully) cached: refused now if its download does not fit the disk
        from swft_lite.hub import check_download_space

        check_download_space(model_path, "--model", echo=echo)
    if options.dry_run:
        # The plan is for the machine that will train: 'auto' there is Unsloth. Nothing is imported or loaded.
        backend = "unsloth" if options.backend == "auto" else options.backend
    else:
        backend = choose_backend(options.backend)
    if backend == "unsloth" and not options.dry_run:
        import_unsloth()  # before the data step imports transformers
    # Without --run-name the folder is named by the time: every process takes rank 0's name.
    run_dir = Path(distributed.from_rank_zero(str(options.run_dir(profile))))
    if options.resume and options.run_name is None:
        raise TrainError("--resume needs the run to continue: --run-name NAME (a folder under "
                         f"{options.output_root}/)")
    if (not options.dry_run and not options.resume and not options.overwrite and run_dir.exists()
            and any(run_dir.iterdir())):
        prepare_run_dir(run_dir, options)  # raises before any work is done
    return model_path, backend, RunFolder(run_dir)


def prepare_data(profile: Profile, options: TrainOptions, echo):
    """Every row is validated and rendered before a model is touched; a bad row stops the run here."""
    from swft_lite import data as data_mod

    data_opts = data_mod.DataOptions(
        max_seq_length=profile.max_seq_length, mask=options.mask, overlong=options.overlong,
        reasoning_effort=options.reasoning_effort, date=options.date, eval_fraction=options.eval_fraction,
        seed=options.seed, num_proc=options.num_proc)
    echo(f"data: checking and rendering {options.data or 'data/processed/train.jsonl'} (harmony, mask={options.mask})")
    prepared = data_mod.prepare_data(options.data, options.eval_data, data_opts)
    rep = prepared.report
    echo(f"data: {len(prepared.train)} training rows" +
         (f", {len(prepared.eval)} eval rows" if prepared.eval is not None else "") +
         f"; {rep.get('dropped_overlong', 0)} dropped as longer than {profile.max_seq_length} tokens, "
         f"{rep.get('truncated', 0)} truncated")
    overlong = data_mod.format_overlong(rep, profile.max_seq_length)
    if overlong:
        echo(overlong + f" (--overlong {options.overlong})")
    for display, info in rep.get("files", {}).items():
        warning = data_mod.format_dropped_thinking(display, info.get("dropped_thinking"))
        if warning:
            echo(warning)
    return prepared


def start_record(run: RunFolder, profile: Profile, options: TrainOptions, model_path: str, backend: str,
                 data_report: dict, plan: dict, echo) -> tuple[RunRecord, Path | None]:
    """The run folder made (or, with --resume, checked against the run it continues) and run.json written."""
    parts = fingerprint_parts(profile, options, data_report)
    fp = fingerprint(parts)
    resume_from = None
    if options.resume:
        prepare_run_dir(run.path, options)
        record = run.read_record()
        settle_before_resume(run, record, _now, echo)  # a run left "running" by a kill -9 is recorded interrupted
        before = content_parts(record.fingerprint_parts)
        if fingerprint(before) != fp and not options.force_resume:
            changes = describe_changes(before, parts)
            raise TrainError(f"--resume: the data or settings differ from the ones {run.path} was started with "
                             f"({changes}). Resuming would mix two runs. Use the same profile, flags and data, "
                             "or --force-resume to continue anyway.")
        distributed.check_resume_world(record.get("world_size"), distributed.world_size(), options.force_resume,
                                       run.path)
        resume_from = checkpoint_for_resume(run.checkpoints, echo)
        if resume_from is None:
            raise TrainError(f"--resume: {run.checkpoints} holds no complete checkpoint; start again with "
                             "--overwrite")
        echo(f"resume: continuing from {resume_from} (the newest complete checkpoint)")
    else:
        prepare_run_dir(run.path, options)
        record = RunRecord()
    now = _now()
    if options.resume:
        record.setdefault("resumed", []).append(now)
        for stale in ("reason", "finished"):  # the end it had before; it runs again now
            record.pop(stale, None)
    record.update({
        "swft_lite_version": __version__,
        "status": "running",
        "owner": process_identity(),  # who runs it: a kill -9 leaves "running" behind, this tells it apart
        "started": record.get("started", now),
        "fingerprint": fp,
        "fingerprint_parts": parts,
        "model": model_path,
        "backend": backend,
        "profile": profile.to_dict(),
        "options": dataclasses.asdict(options),
        "packages": package_versions(),
        "data": data_report,
        "plan": plan,
        "padding_fraction": plan["batching"]["padding_fraction"],
        "world_size": distributed.world_size(),
    })
    run.write_record(record)
    return record, resume_from


def load_model(run: RunFolder, record: RunRecord, backend: str, model_path: str, profile: Profile, echo):
    """Model and adapters (Unsloth is imported here, in this process only, before TRL)."""
    from swft_lite.backends import load_for_training

    echo(f"model: loading {model_path} with the {backend} backend "
         f"({'4-bit' if profile.load_in_4bit else 'bf16/fp32'} weights, LoRA r={profile.lora_rank} on "
         f"{profile.lora_targets})")
    from transformers import set_seed

    # The LoRA init comes from --seed, not from whatever the process drew before: one process and N processes
    # (whose rank 0 draws differently: torch.distributed's setup, measured) then start from the same adapter.
    set_seed(record["options"]["seed"])
    t_load = time.perf_counter()
    model, tokenizer, adapters = load_for_training(backend, model_path, profile)
    record["gpu"] = gpu_description()
    record["adapters"] = adapters.to_dict()
    record["load_seconds"] = round(time.perf_counter() - t_load, 1)
    echo(f"LoRA: {len(adapters.modules)} attention modules, {len(adapters.parameters)} expert parameter tensors; "
         f"{adapters.trainable:,} trainable of {adapters.total:,} parameters "
         f"({100 * adapters.trainable / max(adapters.total, 1):.2f} %)")
    run.write_record(record)
    return model, tokenizer


def build_trainer(run: RunFolder, record: RunRecord, profile: Profile, options: TrainOptions, model, tokenizer,
                  prepared, stop: _StopRequest, echo):
    """TRL's SFTTrainer with swft-lite's batches (token budget or packing), token counter, progress, TensorBoard
    and early stopping. Returns it with the history it logs into (starting from what a resumed run logged) and its
    TensorBoard writer."""
    from trl import SFTTrainer

    from swft_lite.batching import (EpochBatchSampler, PaddedCollator, batching_mode, collator_for_profile,
                                    dataset_lengths, plan_batches_for, with_batch_sampler)
    from torch.utils.tensorboard import SummaryWriter
    from transformers import PrinterCallback

    args = sft_config(profile, options, run.path, prepared.eval is not None)
    # A resumed run keeps the history it logged before it stopped.
    run_log: dict = {k: record.history(k) for k in ("losses", "eval_losses", "tokens_per_second")}
    tb_writer = (SummaryWriter(log_dir=str(run.tensorboard), flush_secs=10) if distributed.is_main_process()
                 else distributed.SilentWriter())
    trainer = with_batch_sampler(SFTTrainer)(model=model, args=args, train_dataset=prepared.train,
                                             eval_dataset=prepared.eval, processing_class=tokenizer)
    trainer.remove_callback(PrinterCallback)
    mode = batching_mode(profile)
    if mode != "fixed":
        batches, _ = plan_batches_for(profile, dataset_lengths(trainer.train_dataset), options.seed)
        trainer.swft_batch_sampler = EpochBatchSampler(batches, options.seed)
        trainer.data_collator = collator_for_profile(profile, tokenizer.pad_token_id)
    eval_collator = PaddedCollator(tokenizer.pad_token_id) if mode == "packed" else None
    counter = TokenCounter(trainer.data_collator, lambda: trainer.model.training, eval_collator)
    trainer.data_collator = counter
    trainer.add_callback(_callbacks(stop, run_log, counter, tb_writer))
    # eval perplexity, --eval-generate's metrics, their history in run.json, early stopping on any of them
    train_eval.attach(trainer, args, options, prepared, run, run_log, record, echo)
    return trainer, run_log, tb_writer


def run_training(run: RunFolder, record: RunRecord, profile: Profile, trainer, run_log: dict, tb_writer,
                 resume_from: Path | None) -> None:
    """trainer.train(), then its figures into the record. Out of memory: the record says so and a TrainError
    tells what to lower; Ctrl-C twice or any other failure: the record keeps the history, the RunGuard the status."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except torch.OutOfMemoryError:
        tb_writer.flush()
        record.update(status="out_of_memory", finished=_now())
        run.write_record(record)
        raise TrainError(oom_advice(profile)) from None
    except (Exception, KeyboardInterrupt):
        tb_writer.flush()
        sys.stderr.write("\n")  # end the progress bar's line, so the Error: line starts a line of its own
        record.update(run_log)  # what was logged before it stopped; the RunGuard writes the final status
        raise
    train_seconds = time.perf_counter() - t0

    state = trainer.state
    record.update({
        "train_seconds": round(train_seconds, 1),
        "global_step": state.global_step,
        "train_loss": result.training_loss,
        "best_checkpoint": state.best_model_checkpoint,
        "best_eval_loss": state.best_metric,
        **run_log,
    })
    if run_log["tokens_per_second"]:
        tps = sorted(run_log["tokens_per_second"])
        record["tokens_per_second_median"] = tps[len(tps) // 2]
    if torch.cuda.is_available():
        record["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        record["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)


def record_probe(run: RunFolder, record: RunRecord, trainer, tokenizer, echo) -> None:
    """What the trained model computes on the merge check's probe tokens, recorded while it is still in memory:
    the merge is compared with this, not only with PEFT's reading of the saved adapter."""
    from swft_lite.probes import capture_trained_probe

    try:
        record["trained_probe"] = capture_trained_probe(trainer.model, tokenizer, run.trained_probe)
    except Exception as exc:  # noqa: BLE001 - the run is not lost over it; the merge check says it is missing
        record["trained_probe"] = {"error": f"{type(exc).__name__}: {exc}"}
        echo(f"note: could not record the trained model's probe logits ({type(exc).__name__}: {exc}); the merge "
             "will be checked against base + adapter only")


def save_adapter(run: RunFolder, record: RunRecord, trainer, tokenizer, echo) -> Path:
    """The adapter (the best one when eval data chose it), with tokenizer and chat template."""
    adapter_dir = run.adapter
    trainer.model.save_pretrained(str(adapter_dir))
    tokenizer.save_pretrained(str(adapter_dir))
    write_base_record(adapter_dir, record.model)  # what `swft-lite merge --base` is compared with
    record["adapter_dir"] = str(adapter_dir)
    echo(f"adapter: saved to {adapter_dir}")
    run.write_record(record)
    return adapter_dir


def write_base_record(adapter_dir: Path, model: str) -> None:
    """adapter/swft_base.json: the base's name and content fingerprint (the model was just loaded, so a hub id is in
    the local cache)."""
    from swft_lite.merge import _local_model_dir

    _write_base_identity(adapter_dir, model, _local_model_dir(model))


def merge_run(run: RunFolder, record: RunRecord, adapter_dir: Path, model_path: str, echo) -> None:
    """Merged 16-bit weights, verified against base + adapter and the trained model before they are called done."""
    import torch

    from swft_lite.merge import merge_adapter

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    record["merge"] = merge_adapter(adapter_dir, base=model_path, out_dir=run.merged, echo=echo,
                                    device=verification_device(model_path))
