"""`swft-lite data check`: every row of one source checked and measured (streaming), and the report."""

from __future__ import annotations

import io
import math
import os
import statistics
import time
from dataclasses import dataclass, field

from swft_lite.data.harmony import _encoding
from swft_lite.data.normalize import RowScan
from swft_lite.data.options import MAX_KEPT_PROBLEMS, MAX_SHOWN, DataOptions, Problem, format_dropped_thinking
from swft_lite.data.render import _labels, _render_tokens
from swft_lite.data.sources import resolve_source


# --- check_file: the streaming check behind `swft-lite data check` --------------------------------------------------


@dataclass
class CheckResult:
    path: str
    format: str | None
    rows: int = 0
    valid_rows: int = 0
    problems: list[Problem] = field(default_factory=list)  # the first MAX_KEPT_PROBLEMS
    problem_count: int = 0
    lengths: list[int] = field(default_factory=list)  # rendered tokens per valid row
    tokens_total: int = 0
    tokens_trained: int = 0
    rows_with_reasoning: int = 0
    over_length: int = 0
    would_truncate: int = 0
    would_drop: int = 0
    options: DataOptions = field(default_factory=DataOptions)
    samples: list[tuple[int, list[int], list[int]]] = field(default_factory=list)  # (line, ids, labels)
    unit: str = "line"
    seconds: float = 0.0
    length_source: str | None = None  # where max_seq_length came from, e.g. "profile rtx4090"
    overlong_rows: list[dict] = field(default_factory=list)  # the first MAX_SHOWN: line, tokens, action
    dropped_thinking: dict | None = None  # rows whose earlier-turn thinking is not trained (RowScan)

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def length_stats(self) -> dict:
        if not self.lengths:
            return {}
        s = sorted(self.lengths)
        p95 = s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]
        return {"min": s[0], "median": int(statistics.median(s)), "p95": p95,
                "max": s[-1], "mean": round(sum(s) / len(s), 1)}

    def to_dict(self) -> dict:
        o = self.options
        d = {
            "path": self.path, "ok": self.ok, "format": self.format, "rows": self.rows, "valid_rows": self.valid_rows,
            "problem_count": self.problem_count, "problems": [str(p) for p in self.problems],
            "max_seq_length": o.max_seq_length, "max_seq_length_from": self.length_source,
            "mask": o.mask, "overlong": o.overlong,
            "reasoning_effort": o.reasoning_effort, "date": o.date,
            "tokens": self.length_stats(), "histogram": _histogram_bins(self.lengths),
            "tokens_total": self.tokens_total, "tokens_trained": self.tokens_trained,
            "trained_fraction": round(self.tokens_trained / self.tokens_total, 4) if self.tokens_total else 0.0,
            "rows_with_reasoning": self.rows_with_reasoning,
            "over_length": self.over_length, "would_truncate": self.would_truncate, "would_drop": self.would_drop,
            "overlong_rows": self.overlong_rows, "dropped_thinking": self.dropped_thinking,
            "seconds": round(self.seconds, 3),
        }
        if self.samples:
            d["samples"] = [{"line": ln, "input_ids": ids, "labels": lab, "rendered": format_rendered(ids, lab)}
                            for ln, ids, lab in self.samples]
        return d


def check_file(path: str | os.PathLike, options: DataOptions | None = None, *, show: int = 0,
               progress: bool = True, length_source: str | None = None) -> CheckResult:
    """Read every row of one source, report each problem with its line, and measure what training would see.

    Memory stays bounded: rows are streamed (JSONL line by line), only token counts are kept per row, and at most
    MAX_KEPT_PROBLEMS problems are kept (all are counted). A source that can't be opened raises DataError.
    """
    options = options or DataOptions()
    options.validate()
    t0 = time.perf_counter()
    src = resolve_source(path)
    res = CheckResult(path=src.display, format=options.format, options=options, unit=src.unit,
                      length_source=length_source)

    def problem(line, msg):
        res.problem_count += 1
        if len(res.problems) < MAX_KEPT_PROBLEMS:
            res.problems.append(Problem(src.display, line, msg, src.unit))

    scan = RowScan(src, options, problem, progress=progress)
    for line, fmt_row, conv in scan:
        res.format = scan.format
        toks, meta = _render_tokens(conv, options)
        labels = _labels(toks, meta, options.mask)
        trained = sum(1 for x in labels if x != -100)
        if trained == 0:  # the structural check should have caught it; never let an all -100 row through
            scan.problem(line, "nothing to train: every token would be masked")
            continue
        res.valid_rows += 1
        res.lengths.append(len(toks))
        if any(m[0] == "assistant" and m[1] == "analysis" for m in meta):
            res.rows_with_reasoning += 1
        if len(toks) > options.max_seq_length:
            # Counted as training counts it: a dropped row trains nothing, a truncated one its first tokens.
            res.over_length += 1
            kept = labels[:options.max_seq_length]
            if options.overlong == "truncate" and any(x != -100 for x in kept):
                res.would_truncate += 1
                res.tokens_total += len(kept)
                res.tokens_trained += sum(1 for x in kept if x != -100)
                action = "truncated"
            else:
                res.would_drop += 1
                action = "dropped"
            if len(res.overlong_rows) < MAX_SHOWN:
                res.overlong_rows.append({"file": src.display, "line": line, "unit": src.unit,
                                          "tokens": len(toks), "action": action})
        else:
            res.tokens_total += len(toks)
            res.tokens_trained += trained
        if len(res.samples) < show:
            res.samples.append((line, list(toks), labels))
    res.rows, res.format = scan.records, scan.format
    res.dropped_thinking = scan.dropped_thinking
    res.seconds = time.perf_counter() - t0
    return res


# --- human-readable output ------------------------------------------------------------------------------------------


def _histogram_bins(lengths: list[int], bins: int = 10) -> list[dict]:
    if not lengths:
        return []
    lo, hi = min(lengths), max(lengths)
    if lo == hi:
        return [{"from": lo, "to": hi, "rows": len(lengths)}]
    width = max(1, math.ceil((hi - lo + 1) / bins))
    bins = math.ceil((hi - lo + 1) / width)  # no empty bins past the longest row (they printed as `75-74 | 0`)
    counts = [0] * bins
    for n in lengths:
        counts[min(bins - 1, (n - lo) // width)] += 1
    return [{"from": lo + i * width, "to": min(hi, lo + (i + 1) * width - 1), "rows": c} for i, c in enumerate(counts)]


def format_rendered(ids: list[int], labels: list[int], color: bool = False) -> str:
    """The decoded row with every untrained span wrapped in «...» (and dimmed when color is on)."""
    enc = _encoding()
    parts = []
    i = 0
    while i < len(ids):
        trained = labels[i] != -100
        j = i
        while j < len(ids) and (labels[j] != -100) == trained:
            j += 1
        text = enc.decode(ids[i:j])
        if trained:
            parts.append(_style(text, bold=True) if color else text)
        else:
            parts.append(_style("«" + text + "»", dim=True) if color else "«" + text + "»")
        i = j
    return "".join(parts)


def _style(text: str, **kw) -> str:
    import click

    return click.style(text, **kw)


def format_check(res: CheckResult, color: bool = False) -> str:
    """The report `swft-lite data check` prints: problems one per line, then a summary."""
    o = res.options
    out = io.StringIO()
    w = out.write
    for p in res.problems:
        w(str(p) + "\n")
    if res.problem_count > len(res.problems):
        w(f"... and {res.problem_count - len(res.problems)} more problems\n")
    if res.problems:
        w("\n")
    for ln, ids, labels in res.samples:
        w(f"--- {res.path}:{ln if res.unit == 'line' else f'row {ln}'} ({len(ids)} tokens, "
          f"{sum(1 for x in labels if x != -100)} trained) ---\n")
        w(format_rendered(ids, labels, color) + "\n")
    if res.samples:
        w("legend: «...» = context, not trained (label -100); everything else is trained "
          f"(mask {o.mask!r})\n\n")
    verdict = "OK" if res.ok else f"{res.problem_count} problem{'s' if res.problem_count != 1 else ''}"
    w(f"{res.path}: {verdict}\n")
    w(f"  rows            {res.rows} ({res.valid_rows} valid)\n")
    w(f"  format          {res.format or 'unknown'}\n")
    stats = res.length_stats()
    if stats:
        w(f"  tokens per row  min {stats['min']} / median {stats['median']} / p95 {stats['p95']} / max {stats['max']}"
          f"  (harmony, reasoning effort {o.reasoning_effort} unless a row sets it)\n")
        bins = _histogram_bins(res.lengths)
        top = max(b["rows"] for b in bins)
        wd = len(str(bins[-1]["to"]))
        for b in bins:
            bar = "#" * (math.ceil(30 * b["rows"] / top) if b["rows"] else 0)
            over = "  > max_seq_length" if b["from"] > o.max_seq_length else ""
            w(f"    {b['from']:>{wd}}-{b['to']:<{wd}} |{bar:<30} {b['rows']}{over}\n")
    policy = {"drop": "dropped", "truncate": "truncated"}[o.overlong]
    src = f", {res.length_source}" if res.length_source else ""
    w(f"  over {o.max_seq_length} tokens  {res.over_length} row(s), would be {policy} (--overlong {o.overlong}{src})")
    if o.overlong == "truncate" and res.would_drop:
        w(f"; {res.would_drop} would lose every trained token and be dropped")
    w("\n")
    if res.overlong_rows:
        where = ", ".join(str(Problem(r["file"], r["line"], f"{r['tokens']:,} tokens", r["unit"]))
                          for r in res.overlong_rows)
        more = f" and {res.over_length - len(res.overlong_rows)} more" if res.over_length > len(res.overlong_rows) else ""
        w(f"    at {where}{more}\n")
    warning = format_dropped_thinking(res.path, res.dropped_thinking)
    if warning:
        w(f"  {warning}\n")
    if res.tokens_total:
        pct = 100 * res.tokens_trained / res.tokens_total
        w(f"  trained tokens  {res.tokens_trained} of {res.tokens_total} ({pct:.1f}%,"
          f" mask {o.mask!r})\n")
        w(f"  with reasoning  {res.rows_with_reasoning} of {res.valid_rows} rows have an analysis (thinking) message\n")
    return out.getvalue()
