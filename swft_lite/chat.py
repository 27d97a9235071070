"""`swft-lite chat`: talk to a run folder or a GGUF, in harmony, with the reply's channels shown apart.

Each turn the whole conversation is rendered by openai-harmony for completion (system block with the reasoning
effort, developer instructions from --system, the earlier turns), the engine streams tokens, and harmony's own parser
splits them into channels as they arrive: the reasoning (analysis) is shown dimmed, or not at all with
--no-reasoning, and the answer (final) plain. No raw harmony markup is printed. The history keeps each earlier turn's
final answer only, harmony's rule for what the model sees of past turns (earlier reasoning dropped).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Callable

import click

from swft_lite.inference import ChatError, Engine, Reply, render_prompt

__all__ = ["ChatSession", "ChatError", "StreamPrinter", "run_chat"]


@dataclass
class ChatSession:
    engine: Engine
    instructions: str | None = None
    reasoning_effort: str = "medium"
    max_new_tokens: int = 1024
    temperature: float = 0.0
    seed: int = 0
    history: list[tuple[str, str]] = field(default_factory=list)

    def prompt_tokens(self, text: str) -> list[int]:
        return render_prompt(self.history + [("user", text)], instructions=self.instructions,
                             reasoning_effort=self.reasoning_effort)

    def ask(self, text: str, on_delta: Callable[[str, str], None] | None = None) -> Reply:
        prompt = self.prompt_tokens(text)
        reply = self.engine.generate(prompt, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                     seed=self.seed, on_delta=on_delta)
        self.history.append(("user", text))
        self.history.append(("assistant", reply.final or ""))  # its reasoning is not kept (harmony's rule)
        return reply


class StreamPrinter:
    """Prints channel deltas: reasoning dimmed under a label, the answer plain."""

    def __init__(self, show_reasoning: bool = True, out=None):
        self.show_reasoning = show_reasoning
        self.channel: str | None = None
        self.printed = False
        self.out = out

    def _echo(self, text, **style):
        click.echo(click.style(text, **style) if style else text, nl=False, file=self.out)
        sys.stdout.flush()

    def __call__(self, channel: str, delta: str) -> None:
        if channel == "analysis" and not self.show_reasoning:
            return
        if channel != self.channel:
            if self.printed:
                self._echo("\n\n")
            if channel == "analysis":
                self._echo("reasoning: ", dim=True, italic=True)
            elif channel != "final":
                self._echo(f"[{channel or 'no channel'}] ", dim=True)
            self.channel = channel
        self._echo(delta, dim=True) if channel != "final" else self._echo(delta)
        self.printed = True

    def end(self, reply: Reply) -> None:
        if self.printed:
            self._echo("\n")
        if reply.final is None:
            why = f"the output is not valid harmony ({reply.parse_error})" if reply.parse_error else \
                f"stopped at {reply.stopped}"
            click.secho(f"(no final answer: {why}; {len(reply.tokens)} tokens generated)", fg="yellow", err=True)
        rate = f", {reply.tokens_per_s:.1f} tokens/s" if reply.tokens_per_s else ""
        click.secho(f"[{len(reply.tokens)} tokens{rate}, stopped at {reply.stopped}]", dim=True, err=True)
        self.channel, self.printed = None, False


def run_chat(session: ChatSession, *, prompt: str | None, as_json: bool, show_reasoning: bool) -> None:
    def one(text: str):
        if as_json:
            reply = session.ask(text)
            d = reply.to_dict()
            d.pop("messages")
            click.echo(json.dumps({"engine": session.engine.description, "prompt": text, **d}, ensure_ascii=False))
            return
        printer = StreamPrinter(show_reasoning)
        reply = session.ask(text, printer)
        printer.end(reply)

    if prompt is not None:
        one(prompt)
        return
    interactive = sys.stdin.isatty()
    if interactive:
        click.secho("Type a message; /reset clears the history, /exit or Ctrl-D ends.", dim=True, err=True)
    while True:
        try:
            text = input("> " if interactive else "")
        except EOFError:
            break
        text = text.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            session.history.clear()
            click.secho("(history cleared)", dim=True, err=True)
            continue
        one(text)
