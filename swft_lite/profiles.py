"""VRAM profiles: one TOML file per class of GPU, resolved into a validated `Profile`.

The `Profile` dataclass is the single source of truth: its fields are the keys a profile file may set, the
command-line overrides (`--lora-rank 8`) are generated from the same fields, and `profiles show` prints them.
A profile file may start from another with `inherit = "rtx4090"` (a shipped name or a path) and change a few keys.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from swft_lite.errors import ProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


def _f(default, help: str, *, choices: tuple | None = None, min: float | None = None,
       max: float | None = None, min_exclusive: bool = False, max_exclusive: bool = False):
    meta = {"help": help, "choices": choices, "min": min, "max": max,
            "min_exclusive": min_exclusive, "max_exclusive": max_exclusive}
    return field(default=default, metadata=meta)


@dataclass
class Profile:
    # What the profile is for.
    name: str = _f("custom", "Short name shown in tables.")
    description: str = _f("", "One line saying which cards this is for.")
    vram_budget_gib: float = _f(16.0, "GPU memory the profile is sized for, in GiB (the card's total).", min=4, max=1024)
    source: str = _f("", "Where the numbers come from (measurements, estimates).")

    # Model loading.
    max_seq_length: int = _f(2048, "Longest training row in tokens; longer rows are dropped or truncated.",
                             min=128, max=131072)
    load_in_4bit: bool = _f(True, "Load the base weights in 4 bits (QLoRA). Off means bf16 weights (~42 GB).")

    # LoRA.
    lora_rank: int = _f(16, "LoRA rank r.", min=1, max=1024)
    lora_alpha: int = _f(32, "LoRA alpha (the update is scaled by alpha / r).", min=1, max=4096)
    lora_dropout: float = _f(0.0, "Dropout on the LoRA input; Unsloth is fastest at 0.", min=0.0, max=1.0,
                             max_exclusive=True)
    lora_targets: str = _f("attention+experts",
                           "Which weights get adapters: 'attention' (q,k,v,o) or 'attention+experts' "
                           "(also every MoE expert's gate_up and down projections).",
                           choices=("attention", "attention+experts"))

    # Batching and memory.
    per_device_batch_size: int = _f(1, "Rows per forward pass.", min=1, max=4096)
    gradient_accumulation_steps: int = _f(8, "Forward passes per optimizer step.", min=1, max=4096)
    token_budget: int = _f(0, "Tokens per forward pass: rows of similar length are grouped and each pass holds as "
                           "many as fit (rows x longest row <= token_budget, or their sum with packing). 0 = off: "
                           "per_device_batch_size rows per pass, as many tokens as they happen to have.",
                           min=0, max=1048576)
    packing: bool = _f(False, "Pack rows into sequences of max_seq_length tokens (no padding), token_budget // "
                       "max_seq_length of them per pass, with position ids restarting per row and attention kept "
                       "within each row. Needs token_budget.")
    gradient_checkpointing: str = _f("unsloth", "Activation recomputation: 'unsloth' (offloads to CPU RAM), "
                                     "'true' (plain recomputation) or 'false' (fastest, most memory).",
                                     choices=("unsloth", "true", "false"))

    # Optimizer and schedule.
    optimizer: str = _f("adamw_8bit", "Optimizer (a transformers `optim` name).",
                        choices=("adamw_8bit", "paged_adamw_8bit", "adamw_torch", "adamw_torch_fused"))
    learning_rate: float = _f(2e-4, "Peak learning rate.", min=0.0, max=1.0, min_exclusive=True)
    lr_scheduler: str = _f("cosine_with_min_lr", "Learning-rate schedule after warmup.",
                           choices=("cosine_with_min_lr", "cosine", "linear", "constant"))
    min_learning_rate: float = _f(1e-5, "Floor of the cosine schedule (cosine_with_min_lr only).", min=0.0, max=1.0)
    warmup_ratio: float = _f(0.03, "Fraction of the steps spent warming up.", min=0.0, max=1.0,
                             max_exclusive=True)
    weight_decay: float = _f(0.01, "AdamW weight decay.", min=0.0, max=1.0)
    max_grad_norm: float = _f(1.0, "Gradient-norm clip (0 turns clipping off).", min=0.0, max=1e6)
    num_epochs: float = _f(3.0, "Passes over the training data (ignored when --max-steps is given).",
                           min=0.0, max=1000.0, min_exclusive=True)
    # gpt-oss's config sets router_aux_loss_coef 0.9 and TRL >= 1.14 adds that load-balancing loss when the config
    # asks for router logits. With LoRA the router itself is frozen, so the only way that loss can fall is by bending
    # the attention adapters to re-balance the experts - away from what the data asks. Off unless a user wants it.
    router_aux_loss_coef: float = _f(0.0, "Weight of the MoE load-balancing loss (0 = off; the router stays "
                                     "frozen under LoRA, so this only pulls the adapters away from the data).",
                                     min=0.0, max=10.0)

    @property
    def effective_batch_size(self) -> int:
        return self.per_device_batch_size * self.gradient_accumulation_steps

    @property
    def tokens_per_pass(self) -> int:
        """Upper bound on the tokens of one forward pass (a micro-batch), padding included."""
        return self.token_budget or self.per_device_batch_size * self.max_seq_length

    @property
    def tokens_per_step(self) -> int:
        """Upper bound on the tokens one optimizer step trains."""
        return self.tokens_per_pass * self.gradient_accumulation_steps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PROFILE_FIELDS = {f.name: f for f in dataclasses.fields(Profile)}
_TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string"}
PROFILE_SUFFIX = ".toml"


def profiles_dir() -> Path:
    """The shipped profiles: inside the wheel as swft_lite/profiles, in a checkout at the repository top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "profiles", here.parent / "profiles"):
        if candidate.is_dir():
            return candidate
    raise ProfileError(f"no profiles folder found next to {here} (broken install?)")


def shipped_profile_names() -> list[str]:
    return sorted(p.stem for p in profiles_dir().glob("*" + PROFILE_SUFFIX))


def _did_you_mean(key: str) -> str:
    norm = key.replace("-", "_")
    close = ([k for k in PROFILE_FIELDS if norm == k] or difflib.get_close_matches(norm, list(PROFILE_FIELDS), n=1)
             or [k for k in PROFILE_FIELDS if norm in k])
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_value(key: str, value: Any, where: str) -> Any:
    f = PROFILE_FIELDS[key]
    meta = f.metadata
    type_name = f.type if isinstance(f.type, str) else f.type.__name__
    expected = _TYPE_NAMES[type_name]
    # TOML distinguishes int/float/bool; a float key accepts an integer, nothing else is coerced.
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }[type_name]
    if not ok:
        raise ProfileError(f"{where}: key '{key}' must be {expected}, got {value!r} ({type(value).__name__})")
    if type_name == "float":
        value = float(value)
        if math.isnan(value):
            raise ProfileError(f"{where}: key '{key}' must be {expected}, got nan")
    if meta["choices"] and value not in meta["choices"]:
        allowed = ", ".join(repr(c) for c in meta["choices"])
        raise ProfileError(f"{where}: key '{key}' must be one of {allowed}, got {value!r}")
    lo, hi = meta["min"], meta["max"]
    if lo is not None and (value < lo or (meta["min_exclusive"] and value == lo)):
        op = ">" if meta["min_exclusive"] else ">="
        raise ProfileError(f"{where}: key '{key}' must be {op} {lo:g}, got {value!r}")
    if hi is not None and (value > hi or (meta["max_exclusive"] and value == hi)):
        op = "<" if meta["max_exclusive"] else "<="
        raise ProfileError(f"{where}: key '{key}' must be {op} {hi:g}, got {value!r}")
    return value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ProfileError(f"{path}: no such profile file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML: {exc}") from None


def _resolve_ref(ref: str, relative_to: Path | None = None) -> Path:
    """A profile reference is a shipped name ('rtx4090') or a path to a .toml file."""
    looks_like_path = ref.endswith(PROFILE_SUFFIX) or "/" in ref or "\\" in ref
    if looks_like_path:
        p = Path(ref).expanduser()
        if not p.is_absolute() and relative_to is not None:
            p = relative_to / p
        return p
    p = profiles_dir() / (ref + PROFILE_SUFFIX)
    if not p.exists():
        names = ", ".join(shipped_profile_names())
        raise ProfileError(f"unknown profile '{ref}': the shipped profiles are {names} (or pass a path to a .toml file)")
    return p


def _load_layers(path: Path, seen: tuple[Path, ...] = (), problems: list[str] | None = None
                 ) -> dict[str, tuple[Any, str]]:
    """Keys of a profile and everything it inherits, each with the file that set it. Unknown keys go to `problems`
    (when given) so a file's mistakes are reported together."""
    path = path.resolve()
    if path in seen:
        chain = " -> ".join(str(p) for p in (*seen, path))
        raise ProfileError(f"{path}: profile inheritance loops: {chain}")
    raw = _read_toml(path)
    merged: dict[str, tuple[Any, str]] = {}
    parent = raw.pop("inherit", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ProfileError(f"{path}: key 'inherit' must be a string (a profile name or path), got {parent!r}")
        try:
            parent_path = _resolve_ref(parent, path.parent)
            if not parent_path.exists():
                raise ProfileError(f"{parent_path}: no such profile file")
        except ProfileError as exc:  # name the file that asked for it
            raise ProfileError(f"{path}: key 'inherit' = {parent!r}: {exc}") from None
        merged.update(_load_layers(parent_path, (*seen, path), problems))
        merged.pop("name", None)  # a derived profile is not its parent: named by its own `name` or file name
    for key, value in raw.items():
        if key not in PROFILE_FIELDS:
            msg = f"{path}: unknown key '{key}'{_did_you_mean(key)}; known keys: {', '.join(PROFILE_FIELDS)}"
            if problems is None:
                raise ProfileError(msg)
            problems.append(msg)
            continue
        merged[key] = (value, str(path))
    return merged


def _raise_all(problems: list[str]) -> None:
    """Every mistake found in a profile, in one error (a person fixes them in one go, not one per run)."""
    if len(problems) == 1:
        raise ProfileError(problems[0])
    if problems:
        raise ProfileError(f"{len(problems)} problems: " + "; ".join(problems))


def parse_override(text: str) -> tuple[str, Any]:
    """Parse `key=value` from the command line, with the value typed by the Profile field."""
    if "=" not in text:
        raise ProfileError(f"override '{text}': expected KEY=VALUE")
    key, raw = (s.strip() for s in text.split("=", 1))
    key = key.replace("-", "_")
    if key not in PROFILE_FIELDS:
        raise ProfileError(f"override '{text}': unknown key '{key}'{_did_you_mean(key)}; "
                           f"known keys: {', '.join(PROFILE_FIELDS)}")
    return key, coerce_cli_value(key, raw)


def coerce_cli_value(key: str, raw: str) -> Any:
    f = PROFILE_FIELDS[key]
    type_name = f.type if isinstance(f.type, str) else f.type.__name__
    try:
        if type_name == "int":
            return int(raw)
        if type_name == "float":
            return float(raw)
        if type_name == "bool":
            low = raw.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError
    except ValueError:
        raise ProfileError(f"command line: key '{key}' must be {_TYPE_NAMES[type_name]}, got {raw!r}") from None
    return raw


def load_profile(ref: str, overrides: dict[str, Any] | None = None) -> Profile:
    """Resolve a profile name or file, its inheritance chain and command-line overrides into a checked Profile."""
    path = _resolve_ref(ref)
    problems: list[str] = []
    layers = _load_layers(path, problems=problems)
    values: dict[str, Any] = {}
    checks = [(key, value, where) for key, (value, where) in layers.items()]
    checks += [(key, value, "command line") for key, value in (overrides or {}).items() if value is not None]
    for key, value, where in checks:
        try:
            values[key] = _check_value(key, value, where)
        except ProfileError as exc:
            problems.append(str(exc))
    _raise_all(problems)
    if "name" not in values:
        values["name"] = path.stem
    profile = Profile(**values)
    sources = {key: where for key, (_, where) in layers.items()}
    sources.update({key: "command line" for key, value in (overrides or {}).items() if value is not None})
    _check_consistency(profile, str(path), sources)
    return profile


def _check_consistency(p: Profile, where: str, sources: dict[str, str] | None = None) -> None:
    src = sources or {}
    if p.packing and p.token_budget == 0:
        raise ProfileError(f"{where}: key 'packing' (from {src.get('packing', 'the defaults')}) needs a "
                           "'token_budget' (the tokens of a packed pass), but token_budget is 0; set it, e.g. "
                           f"token_budget = {p.max_seq_length}")
    if p.token_budget and p.token_budget < 128:
        raise ProfileError(f"{where}: key 'token_budget' must be 0 (off) or >= 128, got {p.token_budget}")
    if p.token_budget and p.token_budget < p.max_seq_length:
        raise ProfileError(f"{where}: key 'token_budget' ({p.token_budget}, from {src.get('token_budget', 'the defaults')})"
                           f" is smaller than max_seq_length ({p.max_seq_length}, from "
                           f"{src.get('max_seq_length', 'the defaults')}): a row of up to max_seq_length tokens must "
                           f"fit one pass. Set token_budget >= {p.max_seq_length}, or lower max_seq_length to "
                           f"{p.token_budget}")
    if p.lr_scheduler == "cosine_with_min_lr" and p.min_learning_rate >= p.learning_rate:
        raise ProfileError(f"{where}: key 'min_learning_rate' ({p.min_learning_rate:g}, from "
                           f"{src.get('min_learning_rate', 'the defaults')}) must be below 'learning_rate' "
                           f"({p.learning_rate:g}, from {src.get('learning_rate', 'the defaults')})")


def all_profiles() -> list[Profile]:
    return sorted((load_profile(n) for n in shipped_profile_names()), key=lambda p: p.vram_budget_gib)


def profile_to_toml(p: Profile) -> str:
    """A resolved profile as a flat TOML file a user can copy and edit."""
    lines = []
    for key, f in PROFILE_FIELDS.items():
        value = getattr(p, key)
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, str):
            text = json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
        else:
            text = repr(value)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"


# --- which profile fits a card -------------------------------------------------------------------------------------
# The one rule, used by `swft-lite detect` (swft_lite.hardware) and by the planner for cards between profiles
# (swft_lite.estimate.plan_for_card).
#
# A card of total memory T fits a profile of budget B when T >= B * FIT_FRACTION. Cards report less than their
# marketing size, and how much less depends on who asks: a 16 GB card is ~15.6-16.0 GiB (torch / nvidia-smi), a 24 GB
# RTX 4090 ~23.6-24.0, an H100 80GB ~79.1-79.6. Cards with ECC on lose another 1/16: an L4 or A10(G) - both named in the
# 24 GB profiles - report 22.5 GiB in nvidia-smi and ~22.2 GiB in torch, a T4 ~14.7 GiB. 0.9 keeps those in their
# class while a 12 GB card (11.7-12.0 GiB) stays far below the 16 GiB profile (needs >= 14.4).
FIT_FRACTION = 0.90

# Profiles that share a budget are told apart by GPU generation: the lowest compute capability each is meant for.
# Among profiles of the same budget the one with the highest entry <= the card's compute capability wins (8.0/8.6
# Ampere -> rtx3090, 8.9 Ada and newer -> rtx4090); a card older than all of them, or of unknown compute capability,
# gets the lowest. Profiles missing here count as (0, 0).
PROFILE_MIN_COMPUTE_CAPABILITY: dict[str, tuple[int, int]] = {
    "rtx3090": (8, 0),
    "rtx4090": (8, 9),
    "h100": (8, 0),
}


def card_fits(budget_gib: float, card_gib: float) -> bool:
    """A card of `card_gib` GiB (as torch or nvidia-smi reports it) is in the class of a profile of `budget_gib`."""
    return card_gib >= budget_gib * FIT_FRACTION


def by_generation(candidates: list, capability: tuple[int, int] | None):
    """Among profiles of one budget, the one meant for a card of this compute capability."""
    def key(p):
        return PROFILE_MIN_COMPUTE_CAPABILITY.get(p.name, (0, 0))

    ordered = sorted(candidates, key=lambda p: (key(p), p.name))
    if capability is None:
        return ordered[0]
    eligible = [p for p in ordered if key(p) <= tuple(capability)]
    return eligible[-1] if eligible else ordered[0]


def largest_fitting(profiles: list, card_gib: float, capability: tuple[int, int] | None, *, estimator) -> list:
    """The profiles of the largest budget that a card of `card_gib` fits (empty when none fits).

    A profile fits when the card is in its budget class (`card_fits`) AND `swft-lite estimate` says its reserved
    memory stays within the card's headroom limit: `estimator` is `swft_lite.estimate.estimate` (passed in, since
    the memory model itself builds on profiles; required, so no caller can skip the second half of the rule). The estimate is what rules out, measured: a Tesla T4 (14.74 GiB,
    cc 7.5) or a V100 16 GB (cc 7.0) for rtx4070 - no bf16, so activations and 16-bit weights count in fp32: 18.99
    GiB estimated against a 13.5 / 14.5 GiB limit - and an L4 / A10G with ECC on (22.2 GiB) for the 24 GiB
    profiles (22.23 GiB against 20.7), which get rtx4070 instead."""
    fitting = [p for p in profiles if card_fits(p.vram_budget_gib, card_gib)
               and estimator(p, card_gib=card_gib, capability=capability).fits]
    if not fitting:
        return []
    top = max(p.vram_budget_gib for p in fitting)
    return [p for p in fitting if p.vram_budget_gib == top]


def profile_for_card(profiles: list, card_gib: float, capability: tuple[int, int] | None, *, estimator):
    """The profile to train with on a card: the largest budget it fits, then its GPU generation; None if none fits."""
    same = largest_fitting(profiles, card_gib, capability, estimator=estimator)
    return by_generation(same, capability) if same else None


def why_none_fits(profiles: list, card_gib: float, capability: tuple[int, int] | None, *, estimator) -> str:
    """Why no profile fits a card, with the estimate's numbers for the smallest profile and what to do."""
    if not profiles:
        return "no profiles are installed"
    smallest = min(profiles, key=lambda p: p.vram_budget_gib)
    e = estimator(smallest, card_gib=card_gib, capability=capability)
    text = (f"the smallest profile, {smallest.name} ({smallest.vram_budget_gib:g} GiB budget), is estimated at "
            f"{e.reserved_gib:.2f} GiB reserved against this card's {e.limit_gib:g} GiB limit")
    if capability is not None and tuple(capability) < (8, 0):
        text += (f"; the card has no bf16 (compute capability {capability[0]}.{capability[1]} < 8.0), so activations "
                 "and 16-bit weights count in fp32")
    return (text + ". Train on a card with bf16 (compute capability 8.0 or newer) and 16 GB or more: RTX 4070 Ti "
            "SUPER / 4080, 3090, 4090, L4, A10G, A100, H100")
