"""Training data: read it, check every row, render it to gpt-oss harmony tokens with loss masks, cache the result.

Sources: JSONL, JSON (a list of rows or {"data": [...]}), Parquet, CSV and folders written by
`datasets.save_to_disk`. Row formats, detected per file (or forced with `format=`):

    chat               {"messages": [{"role": "system"|"developer"|"user"|"assistant"|"tool", "content": ...,
                         "thinking" | "reasoning_content": ..., "tool_calls": [...]}, ...],
                        "reasoning_effort": "low"|"medium"|"high", "tools": [...]}      (the last two optional)
    prompt_completion  {"prompt": str, "completion": str, "system"?, "thinking"?, "reasoning_effort"?}
                        (or TRL's conversational form: prompt and completion are lists of messages)
    alpaca             {"instruction": str, "input"?: str, "output": str, "system"?, "reasoning_effort"?}
    text               {"text": "<|start|>system<|message|>...<|return|>"}  already in harmony; checked, then
                        trained exactly as written

Rendering (chat, prompt_completion, alpaca) follows gpt-oss's own chat template
(swft_lite/assets/gpt-oss-20b/chat_template.jinja) message for message, and the token ids come from openai-harmony's
renderer (`render_conversation_for_training`), so they are the ids the HF tokenizer + template produce (tested):

  * a system block with the model identity, knowledge cutoff (harmony's default), a FIXED current date
    (DataOptions.date, default 2025-06-28 - never today's date, so a rerun renders the same tokens) and the reasoning
    effort (the row's, else DataOptions.reasoning_effort);
  * the row's leading system and/or developer messages become the developer message's "# Instructions" (gpt-oss's
    convention; several are joined with a blank line). A system/developer message after the first user turn is an
    error, since the template would silently drop it;
  * the assistant's reasoning (`thinking` or `reasoning_content`) is the analysis channel, the answer the final
    channel. Multi-turn: like the template (and gpt-oss at inference), earlier turns keep only their final answer,
    ended by <|end|>; their reasoning is dropped. The last assistant turn keeps its reasoning and ends with
    <|return|>. Tool calls render as `<|start|>assistant to=functions.NAME<|channel|>commentary json<|message|>
    ARGS<|call|>`, tool results as `<|start|>functions.NAME to=assistant<|channel|>commentary<|message|>...<|end|>`.

Loss masks (labels are -100 where a token is not trained); decided per harmony message:

  * mask="assistant" (default): every assistant message. For a message the model writes itself at inference, all
    of it after the `<|start|>assistant` that the prompt supplies is trained: the channel header
    (`<|channel|>analysis<|message|>`, ` to=functions.x<|channel|>commentary json<|message|>`), the text and the
    terminator (<|end|> after analysis, <|call|> after a tool call, <|return|> after the answer). When an assistant
    message directly follows another one (analysis -> final) the model also writes that `<|start|>assistant`, so
    it is trained too. Earlier turns' answers (final channel, ended by <|end|>) are history as the template rewrites
    it: their text is trained, but not their header or their <|end|> (the model really wrote its analysis first and
    ended with <|return|>; teaching "final right after <|start|>assistant" or "<|end|> after an answer" would
    teach it what it never does).
  * mask="final": the same, for final-channel messages only (no reasoning, no tool calls). Training on the answers
    alone teaches a reasoning model to answer without the reasoning that led there - hence not the default.
  * mask="all": every token, system and user text included.

A row in which nothing would be trained is an error, never a silent all -100 row. Rows longer than
max_seq_length are dropped (default) or truncated; both are counted, and a truncated row that keeps no trained
token is dropped and counted.

Every row is validated (streaming, bounded memory) before any rendering; problems are reported as
`FILE:LINE: what is wrong` (`FILE:row N: ...` for JSON arrays, Parquet, CSV and save_to_disk folders, 1-based).
Rendering runs in `datasets.map(num_proc=...)` and the result is cached under a hash of the files' contents, the
options that change tokens and the swft-lite / openai-harmony versions, so a second run starts at once.

The stages, one module each, in the order a row meets them:

    options    DataOptions (what is asked), Problem / DataError / PreparedData (what comes back)
    sources    reading JSONL, JSON, Parquet, CSV, save_to_disk folders row by row, with line / row numbers
    harmony    openai-harmony's gpt-oss encoding and its special tokens
    normalize  every row format -> harmony messages; RowScan, the one loop over a source's rows
    render     messages -> tokens and loss masks; the batched render step
    check      `swft-lite data check`: every row checked and measured, and the report
    prepare    prepare_data: validate everything, render in parallel, cache by content hash
"""

from swft_lite.data.check import CheckResult, check_file, format_check, format_rendered
from swft_lite.data.harmony import _encoding  # noqa: F401 - tests and scripts/bench_data.py load the vocabulary with it
from swft_lite.data.options import (DEFAULT_DATE, DEFAULT_TRAIN, EFFORTS, FORMATS, MASKS, OVERLONG, DataError,
                                    DataOptions, PreparedData, Problem)
from swft_lite.data.options import format_dropped_thinking
from swft_lite.data.prepare import format_overlong, prepare_data
from swft_lite.data.render import render_conversation
from swft_lite.data.sources import resolve_source, sample_path

__all__ = [
    "format_dropped_thinking",
    "DataError", "DataOptions", "PreparedData", "CheckResult", "Problem", "prepare_data", "format_overlong", "check_file",
    "render_conversation", "format_check", "format_rendered", "resolve_source", "sample_path",
    "MASKS", "OVERLONG", "EFFORTS", "FORMATS", "DEFAULT_TRAIN", "DEFAULT_DATE",
]
