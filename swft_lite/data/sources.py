"""Reading a data source: JSONL, JSON, Parquet, CSV or a save_to_disk folder, streamed row by row, each row with
its line (JSONL) or row number (the rest); unreadable rows come as `_Bad` with the reason."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from swft_lite.data.options import SAMPLE, DataError


# --- sources --------------------------------------------------------------------------------------------------------


def sample_path() -> Path:
    return Path(__file__).resolve().parent.parent / "sample_data" / "architecture_docs.jsonl"


@dataclass
class Source:
    path: Path
    display: str
    kind: str  # jsonl | json | parquet | csv | arrow

    @property
    def unit(self) -> str:
        return "line" if self.kind == "jsonl" else "row"


def resolve_source(spec: str | os.PathLike) -> Source:
    """A data argument ("sample", a file or a save_to_disk folder) as a readable source; DataError if it isn't."""
    text = str(spec)
    if text == SAMPLE:
        p = sample_path()
        return Source(p, str(p), "jsonl")
    p = Path(text).expanduser()
    if not p.exists():
        raise DataError(f"{text}: no such file or folder")
    if p.is_dir():
        if any((p / n).exists() for n in ("dataset_info.json", "state.json", "dataset_dict.json")):
            return Source(p, text, "arrow")
        raise DataError(f"{text}: a folder, but not one written by datasets' save_to_disk (no dataset_info.json, "
                        "state.json or dataset_dict.json)")
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return Source(p, text, "jsonl")
    if suffix == ".json":
        return Source(p, text, "jsonl" if _json_file_is_lines(p) else "json")
    if suffix in (".parquet", ".pq"):
        return Source(p, text, "parquet")
    if suffix == ".csv":
        return Source(p, text, "csv")
    raise DataError(f"{text}: unsupported file type '{suffix or '(none)'}'; use .jsonl, .json, .parquet, .csv or a "
                    "datasets.save_to_disk folder")


def _json_file_is_lines(p: Path) -> bool:
    """A .json file holding one object per line (JSONL under another name) rather than one JSON document."""
    with p.open("rb") as fh:
        first = next((raw for raw in fh if raw.strip()), b"")
    try:
        obj = json.loads(first)
    except ValueError:
        return False  # a pretty-printed document, or not JSON at all (reported when read)
    return isinstance(obj, dict) and not isinstance(obj.get("data"), list)


def _sha256(p: Path) -> str:
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode() + b"\0")
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


class _Bad:
    """A record that could not be read (invalid JSON etc.)."""

    def __init__(self, message: str):
        self.message = message


def _progress(total: int | None, desc: str, unit: str):
    from tqdm.auto import tqdm

    scale = unit == "B"
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=scale, unit_divisor=1024 if scale else 1000,
                file=sys.stderr, disable=not sys.stderr.isatty(), leave=False, dynamic_ncols=True)


def _iter_records(src: Source, progress: bool = True) -> Iterator[tuple[int | None, Any]]:
    """(line or row number, record or _Bad) for every record of a source, streaming where the format allows."""
    if src.kind == "jsonl":
        size = src.path.stat().st_size
        with _progress(size if progress else 0, f"reading {src.path.name}", "B") as bar, src.path.open("rb") as fh:
            first = True
            for lineno, raw in enumerate(fh, 1):
                bar.update(len(raw))
                if not raw.strip():
                    continue
                if first and raw.lstrip()[:1] == b"[":
                    first = False
                    if _is_json_array(src.path):  # a .json file saved as .jsonl: one sentence, not one per line
                        yield None, _Bad(f"this is a JSON array, not JSON Lines (one object per line): rename it "
                                         f"{src.path.with_suffix('.json').name}, or write one row per line")
                        return
                first = False
                try:
                    yield lineno, json.loads(raw.rstrip(b"\r\n"))
                except UnicodeDecodeError as exc:
                    yield lineno, _Bad(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                except ValueError as exc:
                    msg = getattr(exc, "msg", str(exc))
                    col = getattr(exc, "colno", None)
                    yield lineno, _Bad(f"invalid JSON: {msg}" + (f" (column {col})" if col else ""))
        return
    if src.kind == "json":
        try:
            with src.path.open("rb") as fh:
                doc = json.load(fh)
        except UnicodeDecodeError as exc:
            yield None, _Bad(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
            return
        except ValueError as exc:
            yield None, _Bad(f"invalid JSON at line {getattr(exc, 'lineno', '?')} column "
                             f"{getattr(exc, 'colno', '?')}: {getattr(exc, 'msg', exc)}")
            return
        if isinstance(doc, dict) and isinstance(doc.get("data"), list):
            doc = doc["data"]
        if not isinstance(doc, list):
            keys = f" with keys {sorted(doc)[:8]}" if isinstance(doc, dict) else ""
            yield None, _Bad('a .json file must hold a list of rows or {"data": [rows]}; '
                             f"got {type(doc).__name__}{keys}")
            return
        yield from enumerate(doc, 1)
        return
    if src.kind == "parquet":
        import pyarrow.parquet as pq

        # A file that can't be read at all is a DataError (`data check` exits 2, as its help says), not a bad row.
        try:
            pf = pq.ParquetFile(src.path)
        except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a damaged file
            raise DataError(f"{src.display}: not a readable Parquet file ({exc}); write it again or convert it to "
                            "JSONL") from None
        row = 0
        with _progress(pf.metadata.num_rows if progress else 0, f"reading {src.path.name}", "rows") as bar:
            try:
                for batch in pf.iter_batches(batch_size=1024):
                    for rec in batch.to_pylist():
                        row += 1
                        yield row, rec
                    bar.update(batch.num_rows)
            except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid / ArrowIOError are these
                raise DataError(f"{src.display}: the Parquet file is damaged after row {row} ({exc}); write it "
                                "again") from None
        return
    if src.kind == "csv":
        csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
        with src.path.open("r", encoding="utf-8", newline="") as fh:
            try:
                reader = csv.DictReader(fh)
                for row, rec in enumerate(reader, 1):
                    if None in rec:
                        yield row, _Bad(f"{len(rec[None])} more field(s) than the header has columns")
                        continue
                    yield row, _csv_record(rec)
            except UnicodeDecodeError as exc:
                yield None, _Bad(f"not valid UTF-8 ({exc.reason})")
            except csv.Error as exc:
                yield None, _Bad(f"CSV error: {exc}")
        return
    if src.kind == "arrow":
        ds = _load_arrow(src)
        row = 0
        with _progress(len(ds) if progress else 0, f"reading {src.path.name}", "rows") as bar:
            for batch in ds.iter(batch_size=1024):
                keys = list(batch)
                n = len(batch[keys[0]]) if keys else 0
                for i in range(n):
                    row += 1
                    yield row, {k: batch[k][i] for k in keys}
                bar.update(n)
        return
    raise AssertionError(src.kind)


def _is_json_array(path) -> bool:
    """Whether a whole file parses as one JSON array (a pretty-printed .json saved under a .jsonl name)."""
    try:
        with open(path, "rb") as fh:
            return isinstance(json.load(fh), list)
    except (ValueError, OSError):
        return False


def _load_arrow(src: Source):
    import datasets

    try:
        ds = datasets.load_from_disk(str(src.path))
    except Exception as exc:  # noqa: BLE001
        raise DataError(f"{src.display}: could not load with datasets.load_from_disk: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" in ds:
            return ds["train"]
        if len(ds) == 1:
            return next(iter(ds.values()))
        raise DataError(f"{src.display}: a DatasetDict with splits {sorted(ds)} and no 'train' split; save the split "
                        "you mean with save_to_disk on its own")
    return ds


_CSV_JSON_COLUMNS = ("messages", "tools", "prompt", "completion")


def _csv_record(rec: dict) -> Any:
    """CSV cells are strings: JSON-encoded columns (messages, tools, conversational prompt/completion) are parsed."""
    out: dict[str, Any] = {}
    for k, v in rec.items():
        if v is None or v == "":
            continue
        if k in _CSV_JSON_COLUMNS and v.lstrip()[:1] in ("[", "{"):
            try:
                parsed = json.loads(v)
            except ValueError as exc:
                if k in ("messages", "tools"):
                    return _Bad(f"column '{k}' is not valid JSON: {getattr(exc, 'msg', exc)}")
                parsed = v
            # prompt/completion cells are text unless they hold a list of messages (TRL's conversational form)
            if k in ("messages", "tools") or (isinstance(parsed, list) and all(isinstance(m, dict) and "role" in m
                                                                               for m in parsed)):
                v = parsed
        out[k] = v
    return out
