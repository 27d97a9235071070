"""The run folder: its layout, its record (run.json) and "which folder is this?" - in one place.

    output/<run-name>/
        run.json                    the RunRecord: resolved config and profile, versions, GPU, data hashes, the plan,
                                    times, losses, memory, tokens/s, the merge report
        checkpoints/                checkpoint-N folders (the last K kept); --resume continues from the newest
        tensorboard/                loss, eval loss, learning rate, grad norm, tokens/s, memory, eval metrics
        eval_generations/           step-N.jsonl: the answers --eval-generate scored at each evaluation
        trained_probe.safetensors   the trained model's top-K log-probs on the probe tokens (swft_lite.probes)
        adapter/                    the LoRA adapter with tokenizer and chat template
        merged/                     base + adapter folded into bf16 safetensors
        gguf/                       save-gguf's files: RUN-QUANT.gguf, its .report.json and .Modelfile

`swft-lite train` writes it; merge, save-gguf and the scripts read it through `RunFolder` and `find_adapter` /
`find_merged`. Imports nothing of swft-lite.

While a run says `running`, run.json's `owner` names the process that runs it (pid, host, boot id and the process's
start time from /proc/PID/stat). A `kill -9` leaves `running` behind with nobody to correct it; `RunRecord.liveness`
tells such a record apart (the pid is gone on this host, or now belongs to a process that started later) from one
still running, or one from another host (which cannot be told from here).
"""

from __future__ import annotations

import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path

RUN_JSON = "run.json"
TRAINED_PROBE_FILE = "trained_probe.safetensors"


class RunRecord(dict):
    """run.json, as written: a JSON object whose keys keep the order they were first set in (the file reads top to
    bottom as the run went). The keys other code reads have typed accessors here; `swft-lite train` writes, in order:

    swft_lite_version, status (running, then one of completed | failed | interrupted | out_of_memory, with `reason`),
    owner (the process that runs it: `process_identity`), started, resumed (list of times), interruptions (kills
    that --resume found), fingerprint, fingerprint_parts, model, backend, profile, options, packages, data,
    plan, padding_fraction, gpu, adapters, load_seconds, train_seconds, global_step, train_loss, best_checkpoint,
    best_eval_loss, losses, eval_losses, tokens_per_second, eval_metrics, early_stopping, eval_generate, best_metric
    (swft_lite.train_eval), interrupted_at_step, tokens_per_second_median, peak_memory_gib,
    peak_reserved_gib, trained_probe, adapter_dir, merge, finished.
    """

    @property
    def status(self) -> str | None:
        return self.get("status")

    @property
    def model(self) -> str | None:
        """The base model the run trained on (a folder or a hub id)."""
        return self.get("model")

    @property
    def fingerprint(self) -> str | None:
        return self.get("fingerprint")

    @property
    def fingerprint_parts(self) -> dict:
        return self.get("fingerprint_parts", {})

    @property
    def profile(self) -> dict:
        return self.get("profile", {})

    @property
    def trained_in_4bit(self) -> bool:
        return bool(self.profile.get("load_in_4bit", False))

    def history(self, key: str) -> list:
        """A logged series (losses, eval_losses, tokens_per_second), empty when absent."""
        return list(self.get(key, []))

    def liveness(self) -> Liveness | None:
        """For a record that says running: whether its process still runs (see `owner_liveness`). None otherwise."""
        if self.status != "running":
            return None
        owner = self.get("owner")
        if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
            return Liveness("unknown", "run.json says running but does not name the process that runs it (written "
                                       "by an older swft-lite), so whether it still runs cannot be told")
        return owner_liveness(owner)

    def unfinished(self) -> str | None:
        """Why this run has not finished, in words for merge and save-gguf ("the run did not finish: ..."); None for
        a completed run, a folder without a record, and the run this very process is training."""
        status = self.status
        if status in (None, "completed"):
            return None
        if status != "running":
            reason = self.get("reason")
            return f"the run did not finish (status {status}{': ' + reason if reason else ''})"
        live = self.liveness()
        if live.state == "alive":
            if live.is_this_process:
                return None
            return f"the run has not finished: {live.message}"
        if live.state == "gone":
            return f"the run did not finish (run.json still says running, but {live.message})"
        return f"the run has not finished as far as run.json tells ({live.message})"


# --- who runs a run ------------------------------------------------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def _proc_stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields from the state on (field 3 = index 0), or None where there is no /proc or no pid.
    The command name (field 2) is skipped: it is in parentheses and may hold spaces."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split() if ")" in text else None


def process_start_ticks(pid: int) -> int | None:
    """When process `pid` started, in clock ticks after boot (/proc/PID/stat field 22); None where unknown. Two
    processes that had the same pid one after the other started at different times."""
    fields = _proc_stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (IndexError, ValueError):
        return None


def process_identity(pid: int | None = None) -> dict:
    """run.json's `owner`: pid, host name, boot id and the process's start time (ticks after boot)."""
    pid = os.getpid() if pid is None else pid
    return {"pid": pid, "host": socket.gethostname(), "boot_id": _boot_id(),
            "process_start_ticks": process_start_ticks(pid)}


@dataclass(frozen=True)
class Liveness:
    """Whether the process a `running` record names still runs: alive, gone (it does not: killed, crashed, the
    machine restarted), elsewhere (another host: cannot be told from here) or unknown (no owner recorded)."""

    state: str
    message: str
    is_this_process: bool = False


def owner_liveness(owner: dict) -> Liveness:
    pid, host = owner.get("pid"), owner.get("host")
    here = socket.gethostname()
    who = f"pid {pid} on {host}"
    if host != here:
        return Liveness("elsewhere", f"run.json says running, in the process {who}; this is {here}, so whether it "
                                     "still runs cannot be told from here (left as it is)")
    gone = Liveness("gone", f"the process ({who}) stopped without a word (killed?)")
    boot = _boot_id()
    if owner.get("boot_id") and boot and owner["boot_id"] != boot:
        return gone  # the machine restarted since
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return gone
    except PermissionError:
        pass  # a process of another user has that pid: compared by start time below
    except OSError:
        return Liveness("unknown", f"run.json says running, in the process {who}, which cannot be asked")
    fields = _proc_stat(pid)
    if fields and fields[0] in ("Z", "X"):  # dead, not yet reaped by its parent
        return gone
    recorded, now = owner.get("process_start_ticks"), process_start_ticks(pid)
    if recorded is not None and now is not None and recorded != now:
        return gone  # the pid was given to another process since
    return Liveness("alive", f"it is still running ({who})", is_this_process=pid == os.getpid())


class RunFolder:
    """One run's folder and the paths inside it."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def run_json(self) -> Path:
        return self.path / RUN_JSON

    @property
    def adapter(self) -> Path:
        return self.path / "adapter"

    @property
    def merged(self) -> Path:
        return self.path / "merged"

    @property
    def gguf(self) -> Path:
        return self.path / "gguf"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def tensorboard(self) -> Path:
        return self.path / "tensorboard"

    @property
    def eval_generations(self) -> Path:
        return self.path / "eval_generations"

    @property
    def trained_probe(self) -> Path:
        return self.path / TRAINED_PROBE_FILE

    def has_record(self) -> bool:
        return self.run_json.exists()

    def read_record(self) -> RunRecord:
        """run.json (FileNotFoundError / JSONDecodeError when it is missing or unreadable)."""
        return RunRecord(json.loads(self.run_json.read_text()))

    def record_or_empty(self) -> RunRecord:
        """run.json, or an empty record when there is none or it can't be read."""
        try:
            return self.read_record()
        except (OSError, json.JSONDecodeError):
            return RunRecord()

    def write_record(self, record: dict) -> None:
        """Write run.json atomically (a reader never sees half a file)."""
        tmp = self.path / (RUN_JSON + ".tmp")
        tmp.write_text(json.dumps(record, indent=2, default=str))
        tmp.replace(self.run_json)


# --- "which folder is this?" ---------------------------------------------------------------------------------------


def find_adapter(source: Path) -> tuple[Path, RunFolder | None] | None:
    """(adapter folder, its run folder or None) for a run folder or a PEFT adapter folder; None for anything else.
    An adapter folder counts as a run's when it is that run's adapter/."""
    if (source / "adapter_config.json").exists():
        run = RunFolder(source.parent)
        return source, (run if source.name == "adapter" and run.has_record() else None)
    run = RunFolder(source)
    if (run.adapter / "adapter_config.json").exists():
        return run.adapter, run
    return None


def find_merged(source: Path) -> tuple[Path | None, RunFolder | None] | None:
    """For a merged model folder: (it, the run folder beside it or None). For a run folder: (its merged/, it), or
    (None, it) when it has an adapter but no merged/ yet. None for anything else."""
    if (source / "config.json").exists() and any(source.glob("*.safetensors")):
        run = RunFolder(source.parent)
        return source, (run if run.has_record() else None)
    run = RunFolder(source)
    if (run.merged / "config.json").exists():
        return run.merged, run
    if (run.adapter / "adapter_config.json").exists():
        return None, run
    return None
