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
"""

from __future__ import annotations

import json
from pathlib import Path

RUN_JSON = "run.json"
TRAINED_PROBE_FILE = "trained_probe.safetensors"


class RunRecord(dict):
    """run.json, as written: a JSON object whose keys keep the order they were first set in (the file reads top to
    bottom as the run went). The keys other code reads have typed accessors here; `swft-lite train` writes, in order:

    swft_lite_version, status (running, then one of completed | failed | interrupted | out_of_memory, with `reason`),
    started, resumed (list of times), fingerprint, fingerprint_parts, model, backend, profile, options, packages, data,
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
