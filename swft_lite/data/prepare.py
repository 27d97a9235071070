"""prepare_data: validate every row, render in parallel (datasets.map), cache by content hash."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path

from swft_lite import __version__
from swft_lite.data.harmony import _harmony_version
from swft_lite.data.normalize import RowScan
from swft_lite.data.options import (DEFAULT_EVAL_NAME, DEFAULT_TRAIN, MAX_SHOWN, DataError, DataOptions, PreparedData,
                                    Problem)
from swft_lite.data.render import (RENDER_VERSION, STATUS_DROPPED, STATUS_EMPTY, STATUS_KEPT, STATUS_TRUNC_EMPTY,
                                   STATUS_TRUNCATED, _render_batch)
from swft_lite.data.sources import Source, _sha256, resolve_source


# --- prepare_data: validate everything, render in parallel, cache -----------------------------------------------------


def default_cache_dir() -> Path:
    env = os.environ.get("SWFT_LITE_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/swft-lite/data").expanduser()


def _features():
    import datasets

    seq = datasets.List if hasattr(datasets, "List") else datasets.Sequence
    return datasets.Features({
        "input_ids": seq(datasets.Value("int32")), "labels": seq(datasets.Value("int32")),
        "n_tokens": datasets.Value("int32"), "n_kept": datasets.Value("int32"), "n_trained": datasets.Value("int32"),
        "status": datasets.Value("int8"),
        "src": datasets.Value("int8"), "line": datasets.Value("int64")})


def _validate_to_arrow(sources: list[Source], options: DataOptions, arrow_path: Path) -> tuple[list[dict], int]:
    """Pass 1: validate every row of every source (streaming); write the normalized rows to an Arrow stream.

    Returns per-source info and the number of rows. Raises DataError listing the problems if any row is invalid.
    """
    import pyarrow as pa

    schema = pa.schema([("conv", pa.string()), ("src", pa.int8()), ("line", pa.int64())])
    problems: list[Problem] = []
    count = 0
    infos = []
    n_rows = 0
    with pa.OSFile(str(arrow_path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        buf: dict[str, list] = {"conv": [], "src": [], "line": []}

        def flush():
            if buf["conv"]:
                writer.write_batch(pa.record_batch([pa.array(buf[k], type=schema.field(k).type) for k in buf],
                                                   schema=schema))
                for v in buf.values():
                    v.clear()

        for si, src in enumerate(sources):

            def problem(line, msg, src=src):
                nonlocal count
                count += 1
                if len(problems) < MAX_SHOWN:
                    problems.append(Problem(src.display, line, msg, src.unit))

            scan = RowScan(src, options, problem)
            for line, _fmt, conv in scan:
                conv.pop("_toks", None)
                buf["conv"].append(json.dumps(conv, ensure_ascii=False, separators=(",", ":")))
                buf["src"].append(si)
                buf["line"].append(line if line is not None else 0)
                n_rows += 1
                if len(buf["conv"]) >= 1000:
                    flush()
            infos.append({"rows": scan.records, "format": scan.format, "dropped_thinking": scan.dropped_thinking})
        flush()
    if count:
        raise DataError(f"{count} problem{'s' if count != 1 else ''} in the data; nothing was rendered. Run "
                        "`swft-lite data check FILE` for the full list and a summary:", problems, count)
    return infos, n_rows


def _overlong_rows(rendered, status, sources) -> list[dict]:
    """Where the rows longer than max_seq_length are (the first MAX_SHOWN): file, line or row, tokens, and what
    --overlong did with them."""
    import numpy as np

    action = {STATUS_DROPPED: "dropped", STATUS_TRUNCATED: "truncated", STATUS_TRUNC_EMPTY: "dropped"}
    idx = np.nonzero(np.isin(status, list(action)))[0][:MAX_SHOWN]
    if not len(idx):
        return []
    src = rendered.data.column("src").to_numpy()
    lines = rendered.data.column("line").to_numpy()
    tokens = rendered.data.column("n_tokens").to_numpy()
    return [{"src": int(src[i]), "line": int(lines[i]), "unit": sources[int(src[i])].unit,
             "tokens": int(tokens[i]), "action": action[int(status[i])]} for i in idx]


def format_overlong(report: dict, limit: int) -> str | None:
    """One line naming where the rows longer than `limit` tokens are, or None when there are none."""
    rows = report.get("overlong_rows") or []
    total = report.get("dropped_overlong", 0) + report.get("truncated", 0) + report.get("dropped_truncated_untrained", 0)
    if not total:
        return None
    where = ", ".join(str(Problem(r["file"], r["line"], f"{r['tokens']:,} tokens {r['action']}", r["unit"]))
                      for r in rows)
    more = f" and {total - len(rows)} more" if total > len(rows) else ""
    return f"data: {total} row(s) longer than {limit:,} tokens: {where}{more}"


def _split_stats(status, n_kept, n_trained, sel) -> dict:
    """Counts for one split; tokens are those of the kept rows after truncation."""
    st = status[sel]
    return {"rows": int(sel.sum()), "kept": int(((st == STATUS_KEPT) | (st == STATUS_TRUNCATED)).sum()),
            "dropped_overlong": int((st == STATUS_DROPPED).sum()),
            "truncated": int((st == STATUS_TRUNCATED).sum()),
            "dropped_truncated_untrained": int((st == STATUS_TRUNC_EMPTY).sum()),
            "tokens_total": int(n_kept[sel].sum()),
            "tokens_trained": int(n_trained[sel].sum())}


def prepare_data(train: str | None, eval: str | None, options: DataOptions | None = None) -> PreparedData:  # noqa: A002
    """Validate, render and mask the training (and eval) data; cached by content hash.

    train None: data/processed/train.jsonl, with validation.jsonl beside it as eval data when it exists (and no
    eval_fraction is asked for). train "sample": the sample set shipped inside the package. Every row of every file
    is validated (streaming) before anything is rendered; any invalid row raises DataError listing them.
    """
    import datasets
    import numpy as np

    options = options or DataOptions()
    options.validate()
    t0 = time.perf_counter()
    if train is None:
        train = DEFAULT_TRAIN
        beside = Path(DEFAULT_TRAIN).parent / DEFAULT_EVAL_NAME
        if eval is None and options.eval_fraction == 0 and beside.exists():
            eval = str(beside)
        if not Path(train).exists():
            raise DataError(f"{train}: no such file. Pass --data FILE (JSONL, JSON, Parquet, CSV or a save_to_disk "
                            "folder), or --data sample for the shipped sample set")
    if eval is not None and options.eval_fraction > 0:
        raise DataError(f"both an eval file ({eval}) and eval_fraction={options.eval_fraction}; give one of them")
    sources = [resolve_source(train)] + ([resolve_source(eval)] if eval is not None else [])
    hashes = [_sha256(s.path) for s in sources]

    key_doc = {"files": hashes, "options": options.render_key(), "swft_lite": __version__,
               "harmony": _harmony_version(), "render_version": RENDER_VERSION}
    key = hashlib.sha256(json.dumps(key_doc, sort_keys=True).encode()).hexdigest()[:32]
    cache_root = Path(options.cache_dir).expanduser() if options.cache_dir else default_cache_dir()
    entry = cache_root / key

    def name_overlong(report):
        # The cache entry is keyed by content: name the files as this call gave them.
        report["overlong_rows"] = [{**r, "file": sources[r["src"]].display} for r in report.get("overlong_rows", [])]

    def files_report(infos):
        return {s.display: {"sha256": h, "rows": i["rows"], "format": i["format"], "role": r,
                            "dropped_thinking": i.get("dropped_thinking")}
                for s, h, i, r in zip(sources, hashes, infos, ("train", "eval"))}

    if (entry / "report.json").exists():
        try:
            report = json.loads((entry / "report.json").read_text())
            tr = datasets.load_from_disk(str(entry / "train"))
            ev = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").exists() else None
            report["files"] = files_report(report["file_infos"])
            name_overlong(report)
            report["cache"] = {"hit": True, "path": str(entry), "key": key}
            report["seconds"] = round(time.perf_counter() - t0, 3)
            return PreparedData(tr, ev, report)
        except Exception:  # noqa: BLE001 - a broken entry is rebuilt
            shutil.rmtree(entry, ignore_errors=True)

    cache_root.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_root))
    try:
        infos, n_rows = _validate_to_arrow(sources, options, work / "rows.arrow")
        t_valid = time.perf_counter() - t0
        rows = datasets.Dataset.from_file(str(work / "rows.arrow"))
        num_proc = options.num_proc
        if num_proc is None:
            num_proc = max(1, min(os.cpu_count() or 1, 8)) if n_rows >= 2000 else 1
        num_proc = max(1, min(num_proc, n_rows // 50 or 1))
        rendered = rows.map(_render_batch, batched=True, batch_size=200, num_proc=num_proc if num_proc > 1 else None,
                            fn_kwargs={"options": dataclasses.asdict(options)}, remove_columns=rows.column_names,
                            features=_features(), cache_file_name=str(work / "rendered.arrow"),
                            desc="rendering (harmony)")
        t_render = time.perf_counter() - t0 - t_valid
        col = {c: np.asarray(rendered.data.column(c).to_numpy()) for c in ("status", "src", "n_kept", "n_trained")}
        status, src = col["status"], col["src"]
        if (status == STATUS_EMPTY).any():
            lines = rendered.data.column("line").to_numpy()[status == STATUS_EMPTY]
            raise DataError("rows with nothing to train after rendering (a bug: the checks should have caught them)",
                            [Problem(sources[0].display, int(ln), "nothing to train") for ln in lines[:MAX_SHOWN]],
                            int(len(lines)))
        if eval is not None:
            is_eval = src == 1
            eval_source = "file"
        elif options.eval_fraction > 0:
            n_eval = max(1, round(n_rows * options.eval_fraction))
            if n_eval >= n_rows:
                raise DataError(f"eval_fraction={options.eval_fraction} of {n_rows} rows leaves no training rows")
            is_eval = np.zeros(n_rows, dtype=bool)
            is_eval[random.Random(options.seed).sample(range(n_rows), n_eval)] = True
            eval_source = "fraction"
        else:
            is_eval = np.zeros(n_rows, dtype=bool)
            eval_source = None
        keep = (status == STATUS_KEPT) | (status == STATUS_TRUNCATED)
        overlong = _overlong_rows(rendered, status, sources)
        splits = {"train": _split_stats(status, col["n_kept"], col["n_trained"], ~is_eval)}
        if eval_source:
            splits["eval"] = _split_stats(status, col["n_kept"], col["n_trained"], is_eval)
        if splits["train"]["kept"] == 0:
            raise DataError(f"no training rows left: all {splits['train']['rows']} are longer than max_seq_length "
                            f"{options.max_seq_length} tokens ({options.overlong}); raise max_seq_length or use "
                            "overlong='truncate'")
        if eval_source and splits["eval"]["kept"] == 0:
            raise DataError(f"no eval rows left: all {splits['eval']['rows']} are longer than max_seq_length "
                            f"{options.max_seq_length} tokens")

        staging = work / "entry"
        staging.mkdir()
        cols = ["input_ids", "labels"]
        rendered.select(np.nonzero(keep & ~is_eval)[0]).select_columns(cols).save_to_disk(str(staging / "train"))
        if eval_source:
            rendered.select(np.nonzero(keep & is_eval)[0]).select_columns(cols).save_to_disk(str(staging / "eval"))
        totals = {k: sum(s[k] for s in splits.values()) for k in splits["train"]}
        report = {
            **totals,
            "splits": splits,
            "eval_source": eval_source,
            "overlong_rows": overlong,
            "file_infos": infos,
            "options": dataclasses.asdict(options),
            "render": {"renderer": "openai-harmony render_conversation_for_training", "harmony": _harmony_version(),
                       "swft_lite": __version__, "render_version": RENDER_VERSION, "num_proc": num_proc},
            "timing": {"validate_s": round(t_valid, 3), "render_s": round(t_render, 3)},
        }
        (staging / "report.json").write_text(json.dumps(report, indent=2))
        try:
            os.replace(staging, entry)  # atomic: a concurrent run may have won the race; then use its entry
        except OSError:
            if not (entry / "report.json").exists():
                raise
        del rendered, rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    tr = datasets.load_from_disk(str(entry / "train"))
    ev = datasets.load_from_disk(str(entry / "eval")) if (entry / "eval").exists() else None
    report = json.loads((entry / "report.json").read_text())
    report["files"] = files_report(infos)
    name_overlong(report)
    report["cache"] = {"hit": False, "path": str(entry), "key": key}
    report["seconds"] = round(time.perf_counter() - t0, 3)
    return PreparedData(tr, ev, report)
