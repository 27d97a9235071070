"""`swft-lite verify RUN [ARTEFACT]`: re-check a run's merged/ or any of its GGUFs, at any time after the export.

The same checks as the merge and save-gguf, with the same figures:

* merged/ against base + adapter (PEFT, unmerged) and the record of the model as it was trained
  (`trained_probe.safetensors`): `merge.recheck_merged`;
* a GGUF: merged/ first (a GGUF is compared with merged/, so merged/ must be right), then the file's header, every
  tensor's bytes against the merged weights quantized the same way (`gguf_bytes`), llama.cpp's logits against the
  merged model at every probe position, and how much of the fine-tuning it keeps against the base
  (`gguf_export.verify_gguf`).

Without ARTEFACT: merged/ and every RUN/gguf/*.gguf. Exit 1 when anything fails.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from swft_lite.errors import GGUFError
from swft_lite.run_folder import RunFolder, find_merged


def _run_of(source: Path) -> RunFolder:
    found = find_merged(source)
    if found is None or found[1] is None:
        raise GGUFError(f"{source} is not a run folder written by `swft-lite train` (run.json with adapter/ or "
                        "merged/): verify needs the run to know the base, the adapter and the trained-model record")
    return found[1]


def verify_artefacts(run: str | Path, artefact: str | Path | None = None,
                     log: Callable[[str], None] = print) -> dict:
    """Returns {"run", "passed", "merged": recheck_merged(...) or None (no adapter/ to compare with),
    "ggufs": [{"gguf", "quant", "passed", "verification"}], "failures": [str]}."""
    from swft_lite.gguf_export import (GGUFVerificationError, check_chain, format_gguf_verification, quant_of_file,
                                       verify_gguf)

    run_path = Path(run).expanduser().resolve()
    rf = _run_of(run_path)
    targets: list[Path] = []
    if artefact is not None:
        a = Path(artefact).expanduser().resolve()
        if not a.exists():
            raise GGUFError(f"{a} does not exist")
        if a.is_file() and a.suffix != ".gguf":
            raise GGUFError(f"{a} is neither merged/ nor a .gguf file")
        if a.is_file():
            targets.append(a)
        elif a.resolve() != rf.merged.resolve():
            raise GGUFError(f"{a} is not {rf.merged}: verify checks the run's own merged/ (or a GGUF)")
    else:
        targets = sorted(rf.gguf.glob("*.gguf")) if rf.gguf.is_dir() else []
    if not (rf.merged / "config.json").exists():
        raise GGUFError(f"{rf.path} has no merged/ to check (swft-lite merge {rf.path} writes it)")

    report = {"run": str(rf.path), "passed": True, "merged": None, "ggufs": [], "failures": []}
    try:
        chain = check_chain(rf.merged, rf.path, log=log)
    except GGUFVerificationError as exc:
        chain = exc.report["chain"]
        report["failures"].append("merged/: " + "; ".join(chain["failures"]))
    report["merged"] = chain
    if chain is None or not chain["passed"]:
        report["passed"] = False
        if targets:
            log(f"  not checking {len(targets)} GGUF(s): they are compared with merged/, which is not the trained "
                "model")
        return report
    for g in targets:
        quant = quant_of_file(g)
        log(f"Checking {g.name} ({quant}) ...")
        v = verify_gguf(g, rf.merged, quant, base_dir=chain["base_dir"])
        log(format_gguf_verification(v))
        report["ggufs"].append({"gguf": str(g), "quant": quant, "passed": v["passed"], "verification": v})
        if not v["passed"]:
            report["failures"].append(f"{g.name}: " + "; ".join(v["failures"]))
    if artefact is None and not targets:
        log(f"  (no GGUF in {rf.gguf})")
    report["passed"] = not report["failures"]
    log("verify: " + ("PASSED" if report["passed"] else "FAILED: " + " | ".join(report["failures"])))
    return report
