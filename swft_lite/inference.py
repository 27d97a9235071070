"""Generation for `swft-lite chat` and `swft-lite eval`: harmony prompts in, parsed channels out, on two engines.

* Prompts are rendered by openai-harmony for completion (`render_conversation_for_completion(..., Role.ASSISTANT)`):
  the system block (reasoning effort, swft-lite's fixed training date), developer instructions, the history, and
  `<|start|>assistant` to continue. Text is always text: harmony markup typed by a user (`<|channel|>`) is encoded
  as ordinary characters, never as the special tokens.
* Replies are parsed by harmony's own `StreamableParser` token by token, so a caller sees the content of each channel
  as it grows (analysis = reasoning, final = answer) and never the markup between them. Generation stops at
  <|return|> or <|call|> (harmony's stop tokens for the assistant), or after max_new_tokens.
* Engines: a GGUF through llama-cpp-python (`n_gpu_layers` for GPU offload), and a run folder (RUN/merged when
  present, else the base in run.json + RUN/adapter through PEFT) or any model folder through Unsloth's inference
  mode (on a CUDA GPU with unsloth installed: `engine="auto"` picks it there) or plain transformers.
"""

from __future__ import annotations

from swft_lite.errors import SwftError

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RETURN, CALL = 200002, 200012
STOP_TOKENS = (RETURN, CALL)


class ChatError(SwftError, RuntimeError):
    """A chat or generation problem the user can fix (missing file, unknown model folder). The message is for a
    person."""


def encoding():
    from swft_lite import data as data_mod

    try:
        return data_mod._encoding()
    except data_mod.DataError as exc:
        raise ChatError(str(exc)) from None


def _effort(name: str):
    from openai_harmony import ReasoningEffort

    return {"low": ReasoningEffort.LOW, "medium": ReasoningEffort.MEDIUM, "high": ReasoningEffort.HIGH}[name]


def render_prompt(history: list[tuple[str, str]], *, instructions: str | None = None, reasoning_effort: str = "medium",
                  date: str | None = None) -> list[int]:
    """Prompt tokens for the assistant's next message. history: (role, text) with role user or assistant; an
    assistant entry is an earlier final answer (harmony drops earlier reasoning, so none is kept)."""
    from openai_harmony import Conversation, DeveloperContent, Message, Role, SystemContent

    from swft_lite.data import DEFAULT_DATE

    sc = SystemContent.new().with_reasoning_effort(_effort(reasoning_effort)).with_conversation_start_date(
        date or DEFAULT_DATE)
    msgs = [Message.from_role_and_content(Role.SYSTEM, sc)]
    if instructions:
        msgs.append(Message.from_role_and_content(Role.DEVELOPER, DeveloperContent.new().with_instructions(
            instructions)))
    for role, text in history:
        if role == "user":
            msgs.append(Message.from_role_and_content(Role.USER, text))
        else:
            msgs.append(Message.from_role_and_content(Role.ASSISTANT, text).with_channel("final"))
    return list(encoding().render_conversation_for_completion(Conversation.from_messages(msgs), Role.ASSISTANT))


@dataclass
class Reply:
    """A parsed reply. final None: the model wrote no final channel."""
    final: str | None = None
    reasoning: str | None = None
    reasoning_tokens: int = 0
    tokens: list[int] = field(default_factory=list)
    stopped: str = "max_new_tokens"  # "return", "call" or "max_new_tokens"
    parse_error: str | None = None
    seconds: float = 0.0
    messages: list[dict] = field(default_factory=list)  # [{"channel", "recipient", "text"}]

    @property
    def tokens_per_s(self) -> float | None:
        return len(self.tokens) / self.seconds if self.seconds > 0 else None

    def to_dict(self) -> dict:
        return {"final": self.final, "reasoning": self.reasoning, "reasoning_tokens": self.reasoning_tokens,
                "generated_tokens": len(self.tokens), "stopped": self.stopped, "parse_error": self.parse_error,
                "seconds": round(self.seconds, 3), "tokens_per_s": self.tokens_per_s, "messages": self.messages}


class ReplyParser:
    """Feeds generated tokens to harmony's StreamableParser; on_delta(channel, text) sees content as it grows."""

    def __init__(self, on_delta: Callable[[str, str], None] | None = None):
        from openai_harmony import Role, StreamableParser

        self.enc = encoding()
        self.parser = StreamableParser(self.enc, Role.ASSISTANT)
        self.on_delta = on_delta
        self.error: str | None = None
        self.reasoning_tokens = 0
        self.tokens: list[int] = []

    def feed(self, token: int) -> None:
        self.tokens.append(token)
        if self.error is not None:
            return
        try:
            self.parser.process(token)
        except Exception as exc:  # noqa: BLE001 - harmony raises HarmonyError on malformed output
            self.error = str(exc) or type(exc).__name__
            return
        delta = self.parser.last_content_delta
        channel = self.parser.current_channel
        if delta:
            if channel == "analysis":
                self.reasoning_tokens += 1
            if self.on_delta:
                self.on_delta(channel or "", delta)

    def finish(self) -> Reply:
        messages = []
        if self.error is None:
            try:
                self.parser.process_eos()
            except Exception as exc:  # noqa: BLE001 - an unfinished message at the end
                if self.parser.current_content:
                    pass
                else:
                    self.error = str(exc) or type(exc).__name__
        for m in self.parser.messages:
            text = "".join(getattr(c, "text", "") for c in m.content)
            messages.append({"channel": m.channel, "recipient": m.recipient, "text": text})
        if self.parser.current_content and not any(m["text"] == self.parser.current_content for m in messages[-1:]):
            messages.append({"channel": self.parser.current_channel, "recipient": self.parser.current_recipient,
                             "text": self.parser.current_content, "unfinished": True})
        finals = [m["text"] for m in messages if m["channel"] == "final"]
        analysis = [m["text"] for m in messages if m["channel"] == "analysis"]
        stopped = {RETURN: "return", CALL: "call"}.get(self.tokens[-1] if self.tokens else None, "max_new_tokens")
        return Reply(final="".join(finals) if finals else None, reasoning="\n".join(analysis) if analysis else None,
                     reasoning_tokens=self.reasoning_tokens, tokens=list(self.tokens), stopped=stopped,
                     parse_error=self.error, messages=messages)


# --- engines --------------------------------------------------------------------------------------------------------


class Engine:
    name = "engine"
    description = ""

    def stream(self, prompt: list[int], max_new_tokens: int, temperature: float, seed: int):
        """Yield generated token ids, stopping after a stop token."""
        raise NotImplementedError

    def generate(self, prompt: list[int], *, max_new_tokens: int = 512, temperature: float = 0.0, seed: int = 0,
                 on_delta: Callable[[str, str], None] | None = None) -> Reply:
        parser = ReplyParser(on_delta)
        t0 = time.perf_counter()
        for tok in self.stream(prompt, max_new_tokens, temperature, seed):
            parser.feed(int(tok))
        reply = parser.finish()
        reply.seconds = time.perf_counter() - t0
        return reply

    def close(self) -> None:
        pass


class HFEngine(Engine):
    """transformers (+ PEFT): a model folder, RUN/merged, or base + RUN/adapter."""

    name = "transformers"

    def __init__(self, model, device: str, description: str):
        self.model, self.device, self.description = model, device, description

    def stream(self, prompt, max_new_tokens, temperature, seed):
        import queue
        import threading

        import torch
        from transformers.generation.streamers import BaseStreamer

        q: queue.Queue = queue.Queue()

        class _Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # the prompt
                    self.first = False
                    return
                for t in value.reshape(-1).tolist():
                    q.put(t)

            def end(self):
                q.put(None)

        kwargs = dict(max_new_tokens=max_new_tokens, eos_token_id=list(STOP_TOKENS), pad_token_id=199999,
                      streamer=_Streamer())
        if temperature > 0:
            torch.manual_seed(seed)
            kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        ids = torch.tensor([prompt], device=self.device)
        errors: list[BaseException] = []

        def run():
            try:
                with torch.no_grad():
                    self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors.append(exc)
                q.put(None)

        th = threading.Thread(target=run, daemon=True)
        th.start()
        while (tok := q.get()) is not None:
            yield tok
        th.join()
        if errors:
            raise errors[0]

    def token_logprobs(self, ids: list[int]):
        """Log-probabilities of ids[1:] given the prefix (teacher forcing): a 1-D float tensor."""
        import torch

        with torch.no_grad():
            x = torch.tensor([ids], device=self.device)
            logits = self.model(input_ids=x).logits[0, :-1].float()
            return torch.log_softmax(logits, -1).gather(1, x[0, 1:, None]).squeeze(1).cpu()


class UnslothEngine(HFEngine):
    """The same generate loop on a model Unsloth loaded and switched to inference mode (backends)."""

    name = "unsloth"


ENGINES = ("auto", "unsloth", "transformers")


def _folder_engine(engine: str, device: str) -> str:
    """Which engine loads a model folder: auto = Unsloth on a CUDA GPU where it is installed, else transformers."""
    from swft_lite.backends import unsloth_importable

    if engine not in ENGINES:
        raise ChatError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    usable = device.startswith("cuda") and unsloth_importable()
    if engine == "auto":
        return "unsloth" if usable else "transformers"
    if engine == "unsloth" and not usable:
        why = "unsloth is not installed (pip install 'swft-lite[unsloth]')" if device.startswith("cuda") else \
            f"it runs on a CUDA GPU, and the device is {device}"
        raise ChatError(f"--engine unsloth: {why}; use --engine transformers")
    return engine


def _load_folder(engine: str, model_dir: Path, adapter_dir: Path | None, device: str, torch_dtype, n_ctx: int,
                 what: str) -> Engine:
    dtype_name = str(torch_dtype).replace("torch.", "")
    if engine == "unsloth":
        from swft_lite.backends import load_unsloth_for_inference, training_dtype

        model = load_unsloth_for_inference(str(model_dir), adapter_dir and str(adapter_dir), device=device,
                                           max_seq_length=n_ctx)
        return UnslothEngine(model, device, f"unsloth (inference mode): {what} on {device}, "
                                            f"{str(training_dtype()).replace('torch.', '')}")
    from swft_lite.probes import load_causal_lm

    model = load_causal_lm(model_dir, device, torch_dtype)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        return HFEngine(model, device, f"transformers + PEFT: {what} on {device}, {dtype_name}")
    return HFEngine(model, device, f"transformers: {what} on {device}, {dtype_name}")


class GGUFEngine(Engine):
    """A GGUF through llama-cpp-python."""

    name = "llama.cpp"

    def __init__(self, path: Path, n_ctx: int = 8192, n_gpu_layers: int = 0):
        try:
            from llama_cpp import Llama
        except ImportError:
            raise ChatError("llama-cpp-python is not installed: pip install 'swft-lite[gguf]'") from None
        import os

        try:
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_gpu_layers=n_gpu_layers, verbose=False,
                             n_threads=os.cpu_count() or 1, seed=0)
        except Exception as exc:  # noqa: BLE001 - llama.cpp says little more than "failed to load"
            raise ChatError(f"{path}: llama.cpp could not load this GGUF ({exc}); is it a complete gpt-oss GGUF "
                            "(swft-lite save-gguf writes one)?") from None
        self.n_ctx = n_ctx
        where = f"{n_gpu_layers} layers on the GPU" if n_gpu_layers else "CPU"
        self.description = f"llama-cpp-python: {path} ({where}, context {n_ctx})"

    def stream(self, prompt, max_new_tokens, temperature, seed):
        if len(prompt) + max_new_tokens > self.n_ctx:
            max_new_tokens = max(0, self.n_ctx - len(prompt))
        self.llm.reset()
        n = 0
        if max_new_tokens == 0:
            return
        if temperature > 0:
            self.llm.set_seed(seed)
            gen = self.llm.generate(prompt, temp=temperature, top_k=0, top_p=1.0, repeat_penalty=1.0)
        else:
            gen = self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, repeat_penalty=1.0)
        for tok in gen:
            yield int(tok)
            n += 1
            if tok in STOP_TOKENS or n >= max_new_tokens:
                break

    def close(self):
        self.llm.close()


def _device(device: str) -> str:
    if device == "auto":
        from swft_lite.backends import cuda_available

        return "cuda" if cuda_available() else "cpu"
    return device


def load_engine(ref: str | Path, *, device: str = "auto", dtype: str | None = None, n_gpu_layers: int = 0,
                n_ctx: int = 8192, base: str | None = None, engine: str = "auto",
                log: Callable[[str], None] = lambda s: None) -> Engine:
    """An engine for a GGUF file (llama.cpp), or a run folder (merged/ or base + adapter/) or model folder / cached
    hub id through `engine` (auto, unsloth, transformers)."""
    p = Path(ref).expanduser()
    if p.suffix == ".gguf" or p.is_file():
        if not p.is_file():
            raise ChatError(f"{p}: no such GGUF file")
        return GGUFEngine(p, n_ctx=n_ctx, n_gpu_layers=n_gpu_layers)
    from swft_lite import merge as merge_mod
    from swft_lite.probes import default_dtype
    from swft_lite.run_folder import RunFolder, find_adapter

    device = _device(device)
    kind = _folder_engine(engine, device)
    torch_dtype = default_dtype(device, dtype)
    merged = RunFolder(p).merged
    if p.is_dir() and (merged / "config.json").exists() and base is None:
        log(f"loading {merged} ({kind}) ...")
        return _load_folder(kind, merged, None, device, torch_dtype, n_ctx, f"{merged} (merged)")
    if p.is_dir() and find_adapter(p) is not None:
        try:
            inputs = merge_mod.resolve_inputs(p, base=base)
        except merge_mod.MergeError as exc:
            raise ChatError(str(exc)) from None
        log(f"loading {inputs.base_dir} + {inputs.adapter_dir} ({kind}) ...")
        return _load_folder(kind, inputs.base_dir, inputs.adapter_dir, device, torch_dtype, n_ctx,
                            f"base {inputs.base_dir} + adapter {inputs.adapter_dir}")
    if p.is_dir() and (p / "config.json").exists():
        log(f"loading {p} ({kind}) ...")
        return _load_folder(kind, p, None, device, torch_dtype, n_ctx, str(p))
    if p.is_dir():
        raise ChatError(f"{p} is neither a run folder (merged/ or adapter/ inside), a model folder (config.json) nor "
                        "a .gguf file")
    try:
        d = merge_mod.resolve_model_dir(str(ref))
    except merge_mod.MergeError:
        raise ChatError(f"{ref}: no such file or folder (expected a run folder written by `swft-lite train`, a model "
                        "folder with config.json, a .gguf file, or a hub id in the local Hugging Face cache)") from None
    return load_engine(d, device=device, dtype=dtype, n_ctx=n_ctx, engine=engine, log=log)


def run_base(ref: str | Path) -> str | None:
    """The base model a run folder was trained from (run.json's model, else the adapter's base), or None."""
    from swft_lite.run_folder import RunFolder

    run = RunFolder(ref)
    for f, key in ((run.run_json, "model"), (run.adapter / "adapter_config.json", "base_model_name_or_path")):
        if f.exists():
            try:
                value = json.loads(f.read_text()).get(key)
            except ValueError:
                continue
            if value:
                return str(value)
    return None
