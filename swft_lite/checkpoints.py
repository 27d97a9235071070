"""Checkpoints that are complete or absent, and a run.json that always ends with a final status.

The Hugging Face Trainer writes checkpoint-N file by file (adapter, optimizer, scheduler, RNG state, and
trainer_state.json last). A kill or a full disk in the middle leaves a folder that looks like a checkpoint and is
not one; `Trainer.train(resume_from_checkpoint=...)` then dies on the missing file. So:

- after the Trainer's own save, `CompletionMarker.on_save` writes `swft_complete.json` into the folder, listing every
  file and its size; it is written to a temporary name and renamed, so it exists whole or not at all;
- a checkpoint is complete when that marker exists and every file it lists has that size (`is_complete`);
- `--resume` takes the newest complete checkpoint (`checkpoint_for_resume`) and says which; incomplete ones are
  renamed `incomplete-checkpoint-N` (never deleted: they may hold what someone wants to look at) so neither the
  Trainer's resume nor its rotation of old checkpoints picks them up.

`RunGuard` gives every way a run can end a final status in run.json (completed, failed, interrupted, out_of_memory)
with the reason, turns the failures a user can fix (no space left, no hub access) into one `Error:` line, and removes
the run folder of a run that failed before anything was trained (one folder per failed try is clutter, not a record).
A kill -9 gives no run a last word: `settle_before_resume` records such a run `interrupted` when --resume finds its
process gone (swft_lite.run_folder's `owner`), and refuses one whose process still runs.
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

from swft_lite.errors import SwftError, TrainError
from swft_lite.run_folder import RunFolder, RunRecord

MARKER = "swft_complete.json"
PREFIX = "checkpoint-"
INCOMPLETE_PREFIX = "incomplete-"


class TrainInterrupted(TrainError):
    """Ctrl-C: the run stopped before its end. Exit 130, the shell's code for an interrupted command."""

    exit_code = 130


def _step(path: Path) -> int | None:
    tail = path.name[len(PREFIX):] if path.name.startswith(PREFIX) else ""
    return int(tail) if tail.isdigit() else None


def write_marker(ckpt: Path) -> None:
    """Record that the Trainer finished writing `ckpt`: every file under it with its size."""
    files = {str(p.relative_to(ckpt)): p.stat().st_size for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.endswith(".tmp")}
    tmp = ckpt / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(ckpt / MARKER)


def is_complete(ckpt: Path) -> bool:
    """The marker is there and every file it lists is there with the size it had when the save finished."""
    try:
        files = json.loads((ckpt / MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if "trainer_state.json" not in files:
        return False
    for name, size in files.items():
        p = ckpt / name
        if not p.is_file() or p.stat().st_size != size:
            return False
    return True


def complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The complete checkpoint-N folders, oldest first."""
    found = [p for p in checkpoints.glob(PREFIX + "*") if p.is_dir() and _step(p) is not None and is_complete(p)]
    return sorted(found, key=_step)


def checkpoint_for_resume(checkpoints: Path, echo=print) -> Path | None:
    """The newest complete checkpoint, after renaming every incomplete one `incomplete-checkpoint-N` (said, with why
    it counts as incomplete). None when no complete one is left."""
    for p in sorted(checkpoints.glob(PREFIX + "*"), key=lambda p: _step(p) or -1):
        if not p.is_dir() or _step(p) is None or is_complete(p):
            continue
        target = p.with_name(INCOMPLETE_PREFIX + p.name)
        n = 1
        while target.exists():
            n += 1
            target = p.with_name(f"{INCOMPLETE_PREFIX}{p.name}.{n}")
        p.rename(target)
        echo(f"resume: {p.name} is incomplete (its save was cut short: no {MARKER}, or a file it lists is missing or "
             f"has another size); kept as {target.name}, not used")
    done = complete_checkpoints(checkpoints)
    return done[-1] if done else None


def history_until(ckpt: Path) -> dict[str, list]:
    """The loss and eval-loss history logged up to `ckpt`, from its trainer_state.json: run.json keeps the steps
    trained before a kill (it is only written at the end of training) when the run resumes from this checkpoint."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    losses, eval_losses = [], []
    for entry in state.get("log_history", []):
        if "loss" in entry and "step" in entry:
            losses.append({"step": entry["step"], "loss": entry["loss"]})
        if "eval_loss" in entry and "step" in entry:
            eval_losses.append({"step": entry["step"], "eval_loss": entry["eval_loss"]})
    return {"losses": losses, "eval_losses": eval_losses}


def completion_marker_callback():
    """A TrainerCallback that marks each checkpoint complete once the Trainer's own save of it has returned."""
    from transformers import TrainerCallback

    class CompletionMarker(TrainerCallback):
        def on_save(self, args, state, control, **kw):
            ckpt = Path(args.output_dir) / f"{PREFIX}{state.global_step}"
            if ckpt.is_dir() and state.is_world_process_zero:  # under DDP rank 0 marks (and writes) checkpoints
                write_marker(ckpt)

    return CompletionMarker()


def settle_before_resume(run: RunFolder, record: RunRecord, now, echo=print) -> None:
    """--resume of a run whose run.json still says running. Its process gone from this host (a kill -9 has no last
    word): run.json is rewritten `interrupted`, with the reason, before the run continues. Its process still alive
    here: refused (two trainers in one folder would overwrite each other's checkpoints). Another host, or no process
    recorded: said, and left as it is."""
    live = record.liveness()
    if live is None:
        return
    if live.state == "alive" and not live.is_this_process:
        raise TrainError(f"--resume: {run.path} is still being trained: {live.message}. Stop that process first, "
                         "or wait for it to end")
    if live.state == "gone":
        found = now()
        record.update(status="interrupted", reason=live.message, finished=found)
        record.setdefault("interruptions", []).append({"found": found, "reason": live.message})  # kept after resume
        run.write_record(record)
        echo(f"resume: {run.name} said running, but {live.message}; run.json now says interrupted")
    elif live.state != "alive":
        echo(f"resume: note: {live.message}")


# --- failures a user can fix -----------------------------------------------------------------------------------------


def _is_disk_full(exc: BaseException) -> bool:
    # OSError from Python's own writes; safetensors' Rust writer raises a bare Exception "No space left on device (os
    # error 28)"; torch.save a RuntimeError "... file write failed" (its message carries no errno).
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return True
    text = str(exc)
    return "os error 28" in text or "No space left on device" in text or "file write failed" in text


def _is_hub_unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return isinstance(exc, OSError) and any(s in text for s in (
        "couldn't connect to", "offline mode", "OfflineModeIsEnabled", "cannot find the requested files in the "
        "local cache", "outgoing traffic has been disabled", "Cannot find an appropriate cached snapshot"))


def explain(exc: BaseException, run: RunFolder, model: str) -> TrainError | None:
    """The one-line error for a failure a user can fix, or None for anything else (a bug keeps its traceback)."""
    if _is_disk_full(exc):
        where = getattr(exc, "filename", None) or run.path
        free = shutil.disk_usage(run.path if run.path.exists() else Path.cwd()).free / 2**30
        return TrainError(f"no space left on the device while writing {where} ({free:.2f} GiB free now). Free some "
                          f"space there (old runs under {run.path.parent}, checkpoints you no longer need), then "
                          f"continue with --resume --run-name {run.name}: it takes the newest complete checkpoint")
    if _is_hub_unreachable(exc):
        return TrainError(f"--model {model}: the model is not in the local Hugging Face cache and the hub cannot be "
                          "reached (offline, or no access). Download it where there is internet (`hf download "
                          f"{model}`) and copy the cache (~/.cache/huggingface), or pass a local folder with "
                          "--model PATH")
    return None


class RunGuard:
    """Wraps a run from the moment its folder exists: whatever ends it, run.json ends with a final status.

    `training_started()` marks the point after which a failure keeps the folder (it may hold checkpoints); before
    it, a new run's folder is removed when it fails (a resumed run keeps its folder and gets status failed)."""

    def __init__(self, run: RunFolder, record: RunRecord, model: str, resumed: bool, now):
        self.run, self.record, self.model, self.resumed, self.now = run, record, model, resumed, now
        self.started = False
        self.closed = False
        self.record_error: OSError | None = None  # run.json could not be written at the end

    def training_started(self) -> None:
        self.started = True

    def finish(self, status: str, reason: str | None = None, **extra) -> None:
        self.record.update(status=status, finished=self.now(), **extra)
        if reason is not None:
            self.record["reason"] = reason
        elif "reason" in self.record:
            del self.record["reason"]
        self.run.write_record(self.record)
        self.closed = True

    def _finish_failed(self, status: str, reason: str) -> None:
        """The final status of a failed run; a disk too full to take run.json either must not hide the failure
        (measured on a full tmpfs: the write of run.json raised ENOSPC too, over the checkpoint's error)."""
        try:
            self.finish(status, reason)
        except OSError as exc:
            self.closed = True
            self.record_error = exc

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc is None or self.closed:  # no failure, or one raised after the final status was written
            return False
        if not self.started and not self.resumed:
            from swft_lite.distributed import is_main_process

            if is_main_process():  # under several processes the folder is rank 0's to remove
                shutil.rmtree(self.run.path, ignore_errors=True)
            if isinstance(exc, KeyboardInterrupt):
                raise TrainInterrupted(f"interrupted before training started; nothing was trained, {self.run.path} "
                                       "was removed") from None
            return self._reraise(exc, kept=False)
        if isinstance(exc, KeyboardInterrupt):
            last = complete_checkpoints(self.run.checkpoints)
            saved = (f"the newest complete checkpoint is {last[-1].name}; continue with --resume --run-name "
                     f"{self.run.name}" if last else "no checkpoint was saved, so --resume has nothing to continue "
                     "from; start again (with --overwrite)")
            self._finish_failed("interrupted", "Ctrl-C twice: stopped at once, without saving")
            raise TrainInterrupted(f"interrupted (Ctrl-C twice); {saved}{self._record_note()}") from None
        if self.record.get("status") not in ("out_of_memory",):  # OOM is already recorded with its advice
            self._finish_failed("failed", f"{type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0] if str(exc) else ''}".strip())
        else:
            self._finish_failed("out_of_memory", str(exc))
        return self._reraise(exc, kept=True)

    def _record_note(self) -> str:
        if self.record_error is None:
            return ""
        return (f" ({self.run.run_json} could not be updated either: {self.record_error.strerror or self.record_error}"
                "; it still says running, which --resume does not mind)")

    def _reraise(self, exc: BaseException, kept: bool) -> bool:
        friendly = explain(exc, self.run, self.model)
        if friendly is not None:
            if not kept:
                friendly.args = (friendly.args[0] + f". Nothing was trained; {self.run.path} was removed",)
            friendly.args = (friendly.args[0] + self._record_note(),)
            raise friendly from None
        if not kept and isinstance(exc, SwftError):  # say where the folder went; the error stays what it is
            exc.args = (f"{exc}. Nothing was trained; {self.run.path} was removed",)
        return False  # re-raise
