"""The `swft-lite` command line.

Each command is small: it parses what the person typed, resolves it into config objects, and hands them to the
module that does the work. Nothing heavy (torch, transformers, unsloth) is imported at module level, so `--help`
and `profiles` answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from swft_lite import __version__
from swft_lite import profiles as profiles_mod
from swft_lite.profiles import PROFILE_FIELDS, Profile, ProfileError


def fail(message: str, code: int = 2) -> None:
    """Print a one-paragraph error for a person and exit; no traceback for mistakes the user can fix."""
    click.secho(f"Error: {message}", fg="red", err=True)
    sys.exit(code)


# --- profile overrides ---------------------------------------------------------------------------------------------
# One option per Profile field, generated from the dataclass so that the flags, the TOML keys and `profiles show`
# can never disagree. The options default to None: "not given, keep the profile's value".

_OVERRIDE_SKIP = {"name", "description", "source", "vram_budget_gib"}


def _override_option(f: dataclasses.Field):
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    type_name = f.type if isinstance(f.type, str) else f.type.__name__
    help_text = meta["help"]
    if type_name == "bool":
        return click.option(flag + "/--no-" + f.name.replace("_", "-"), f.name, default=None, help=help_text)
    click_type = {"int": int, "float": float, "str": str}[type_name]
    if meta["choices"]:
        click_type = click.Choice(meta["choices"])
    return click.option(flag, f.name, type=click_type, default=None, help=help_text)


def profile_options(func):
    """Add --profile, one override flag per profile key, and --set KEY=VALUE."""
    for f in reversed([f for f in dataclasses.fields(Profile) if f.name not in _OVERRIDE_SKIP]):
        func = _override_option(f)(func)
    func = click.option("--set", "set_values", multiple=True, metavar="KEY=VALUE",
                        help="Override any profile key, e.g. --set lora_rank=8 (repeatable).")(func)
    return func


def resolve_profile(profile_ref: str, set_values: tuple[str, ...], flag_values: dict) -> Profile:
    overrides: dict = {}
    try:
        for text in set_values:
            key, value = profiles_mod.parse_override(text)
            overrides[key] = value
        overrides.update({k: v for k, v in flag_values.items() if k in PROFILE_FIELDS and v is not None})
        return profiles_mod.load_profile(profile_ref, overrides)
    except ProfileError as exc:
        fail(str(exc))


def pop_profile_flags(kwargs: dict) -> dict:
    return {k: kwargs.pop(k) for k in list(kwargs) if k in PROFILE_FIELDS}


# --- the group -----------------------------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, "--version", prog_name="swft-lite")
def main():
    """Fine-tune openai/gpt-oss-20b with LoRA on your own GPU, and take it home as merged weights and a GGUF.

    \b
    Start here:
      swft-lite detect                     what GPU you have and which profile fits it
      swft-lite profiles                   the shipped VRAM profiles
      swft-lite data check train.jsonl     find data problems before a GPU hour is spent
      swft-lite train --profile rtx4090 --data train.jsonl
      swft-lite save-gguf output/RUN       a GGUF for llama.cpp / Ollama, checked against the trained model
    """


# --- profiles ------------------------------------------------------------------------------------------------------


@main.group("profiles", invoke_without_command=True)
@click.pass_context
def profiles_group(ctx):
    """List the shipped VRAM profiles (budget and the settings that matter).

    A profile sets sequence length, LoRA rank and targets, batch size, gradient checkpointing, 4-bit loading and the
    optimizer schedule for one class of GPU. Use `swft-lite profiles show NAME` for every value; copy that output
    into a file to make your own (`inherit = "rtx4090"` at its top keeps the rest).
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        rows = profiles_mod.all_profiles()
    except ProfileError as exc:
        fail(str(exc))
    header = ("profile", "VRAM", "seq len", "batch x accum", "LoRA", "targets", "4-bit", "grad ckpt", "optimizer")
    table = [header]
    for p in rows:
        table.append((p.name, f"{p.vram_budget_gib:g} GiB", str(p.max_seq_length),
                      f"{p.per_device_batch_size} x {p.gradient_accumulation_steps}",
                      f"r{p.lora_rank}/a{p.lora_alpha}", p.lora_targets, "yes" if p.load_in_4bit else "no (bf16)",
                      p.gradient_checkpointing, p.optimizer))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        line = "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
        click.echo(click.style(line, bold=True) if i == 0 else line)
    click.echo()
    for p in rows:
        click.echo(f"{p.name}: {p.description}")


@profiles_group.command("show")
@click.argument("profile_ref", metavar="NAME_OR_FILE")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of TOML.")
@profile_options
def profiles_show(profile_ref, as_json, set_values, **flags):
    """Print the fully resolved profile NAME_OR_FILE (inheritance and overrides applied).

    The TOML printed is a complete profile: save it to a file, edit it, and pass the file to --profile.
    """
    p = resolve_profile(profile_ref, set_values, flags)
    if as_json:
        click.echo(json.dumps(p.to_dict(), indent=2))
    else:
        click.echo(profiles_mod.profile_to_toml(p), nl=False)


if __name__ == "__main__":  # pragma: no cover
    main()
