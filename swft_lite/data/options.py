"""What the data step is asked to do (DataOptions), what it reports (Problem, DataError, PreparedData)."""

from __future__ import annotations

import re
import dataclasses
from dataclasses import dataclass
from typing import Any

from swft_lite.errors import SwftError


DEFAULT_TRAIN = "data/processed/train.jsonl"
DEFAULT_EVAL_NAME = "validation.jsonl"
DEFAULT_DATE = "2025-06-28"
SAMPLE = "sample"
MASKS = ("assistant", "final", "all")
OVERLONG = ("drop", "truncate")
EFFORTS = ("low", "medium", "high")
FORMATS = ("chat", "prompt_completion", "alpaca", "text")
MAX_SHOWN = 20  # problems listed in a DataError message
MAX_KEPT_PROBLEMS = 1000  # problems kept in memory by check_file (the count goes on)


@dataclass
class Problem:
    source: str
    line: int | None  # 1-based line (JSONL) or row number (other sources); None for the whole file
    message: str
    unit: str = "line"  # "line" or "row"

    def __str__(self) -> str:
        if self.line is None:
            return f"{self.source}: {self.message}"
        where = str(self.line) if self.unit == "line" else f"row {self.line}"
        return f"{self.source}:{where}: {self.message}"


def format_dropped_thinking(display: str, info: dict | None) -> str | None:
    """The warning for rows whose `thinking` on an assistant turn before the last user turn is not trained (harmony
    keeps reasoning only after the last user turn), naming how many rows and the first; None when there are none."""
    if not info or not info.get("rows"):
        return None
    first = Problem(display, info["first_line"], f"message {info['first_message']}", info.get("unit", "line"))
    return (f"warning: {info['rows']} row(s) have `thinking` on an assistant turn before the last user turn; "
            f"gpt-oss's format drops that reasoning, so it is not trained (first: {first}). Split such "
            "conversations into one row per answer to train their reasoning")


class DataError(SwftError, ValueError):
    """The data can't be used; the message lists the problems as `FILE:LINE: what is wrong`."""

    def __init__(self, message: str, problems: list[Problem] | None = None, total: int | None = None):
        self.problems = list(problems or [])
        self.total = total if total is not None else len(self.problems)
        if self.problems:
            lines = [str(p) for p in self.problems[:MAX_SHOWN]]
            more = self.total - len(lines)
            if more > 0:
                lines.append(f"... and {more} more")
            message = message + "\n" + "\n".join("  " + ln for ln in lines)
        super().__init__(message)


def option(default, help: str | None = None, *, choices: tuple | None = None,  # noqa: A002 - click's word
           type: type | None = None, min: float | None = None):  # noqa: A002
    """A dataclass field that is also a command-line flag: its default, choices, type (needed where the default is
    None), lowest value and help are typed here once, and `swft_lite.cli.field_option` builds the click option from
    them (TRL's dataclass-as-flags style)."""
    return dataclasses.field(default=default, metadata={"help": help, "choices": choices, "type": type, "min": min})


def same_as(cls, name: str):
    """The field `name` of dataclass `cls` again (default, choices and help), for an options class that hands the
    value on - TrainOptions' data flags are DataOptions'."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return dataclasses.field(default=f.default, metadata=f.metadata)


@dataclass
class DataOptions:
    max_seq_length: int = 2048
    # "assistant" (analysis+final of every assistant turn) | "final" | "all"
    mask: str = option("assistant", choices=MASKS, help=(
        "Which tokens are trained. 'assistant': every assistant message (reasoning, tool calls, answer, with their "
        "channel headers and terminators). 'final': the answers only - that teaches a reasoning model to answer "
        "without the reasoning that led there. 'all': every token."))
    overlong: str = option("drop", choices=OVERLONG, help="Rows longer than max_seq_length are dropped, or cut at "
                                                          "the end.")
    # default when a row has none
    reasoning_effort: str = option("medium", choices=EFFORTS, help="Reasoning level in the harmony system block for "
                                                                   "rows that set none.")
    # fixed "Current date" in the system block; never today's date
    date: str = option(DEFAULT_DATE, help="'Current date' in the system block: fixed, so the same data trains the "
                                          "same way every day.")
    model_identity: str | None = None  # None: harmony's default identity
    eval_fraction: float = 0.0        # split off train with a fixed seed when there is no eval file
    seed: int = option(3407)
    num_proc: int | None = None       # datasets.map processes; None: all CPUs for big inputs, 1 for small ones
    cache_dir: str | None = None      # default $SWFT_LITE_CACHE or ~/.cache/swft-lite/data
    format: str | None = None         # force chat|prompt_completion|alpaca|text; None = detect per file

    def validate(self) -> None:
        errors = []
        if not isinstance(self.max_seq_length, int) or self.max_seq_length < 16:
            errors.append(f"max_seq_length must be an integer >= 16, got {self.max_seq_length!r}")
        for name, allowed in (("mask", MASKS), ("overlong", OVERLONG), ("reasoning_effort", EFFORTS)):
            if getattr(self, name) not in allowed:
                errors.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.format is not None and self.format not in FORMATS:
            errors.append(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if not isinstance(self.date, str) or not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            errors.append(f"date must be YYYY-MM-DD, got {self.date!r}")
        if not (0.0 <= float(self.eval_fraction) < 1.0):
            errors.append(f"eval_fraction must be in [0, 1), got {self.eval_fraction!r}")
        if self.num_proc is not None and self.num_proc < 1:
            errors.append(f"num_proc must be >= 1, got {self.num_proc!r}")
        if errors:
            raise DataError("invalid data options: " + "; ".join(errors))

    def render_key(self) -> dict:
        """The options that change the rendered tokens (part of the cache key)."""
        return {k: getattr(self, k) for k in ("max_seq_length", "mask", "overlong", "reasoning_effort", "date",
                                              "model_identity", "eval_fraction", "seed", "format")}


@dataclass
class PreparedData:
    train: Any  # datasets.Dataset: input_ids (list[int]), labels (list[int], -100 = not trained)
    eval: Any   # datasets.Dataset | None
    report: dict
