"""VRAM profiles through the command line: listing, `profiles show`, inheritance, overrides and every error a user
can make in a profile file (each must name the file, the key and what was expected)."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from swft_lite.cli import main
from swft_lite.profiles import PROFILE_FIELDS, Profile, load_profile

REPO = Path(__file__).resolve().parent.parent
SHIPPED = {"rtx4070": 16, "rtx3090": 24, "rtx4090": 24, "h100": 80}


def run(*args: str):
    return CliRunner().invoke(main, list(args))


def ok(*args: str) -> str:
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result.stdout


def show_json(ref: str, *args: str) -> dict:
    return json.loads(ok("profiles", "show", "--json", ref, *args))


def error(*args: str) -> str:
    """The one-line error of a command that must fail as a user mistake (exit 2, no traceback)."""
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    assert result.stderr.startswith("Error: ")
    return result.stderr


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- listing and show -----------------------------------------------------------------------------------------------


def test_profiles_lists_the_four_shipped_profiles_with_budgets():
    out = ok("profiles")
    rows = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in SHIPPED}
    assert set(rows) == set(SHIPPED)
    for name, gib in SHIPPED.items():
        assert rows[name].split()[1:3] == [str(gib), "GiB"], rows[name]
    # sorted by budget, smallest first, and each has its description under the table
    order = [line.split()[0] for line in out.splitlines() if line.split() and line.split()[0] in rows]
    assert order[:4] == sorted(SHIPPED, key=lambda n: (SHIPPED[n], order.index(n)))
    for name in SHIPPED:
        assert f"\n{name}: " in out


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_show_prints_toml_that_round_trips(name, tmp_path):
    text = ok("profiles", "show", name)
    saved = write(tmp_path / f"copy-of-{name}.toml", text)
    assert show_json(str(saved)) == show_json(name)
    assert load_profile(str(saved)) == load_profile(name)
    assert show_json(name)["vram_budget_gib"] == SHIPPED[name]


def test_show_round_trips_awkward_strings(tmp_path):
    src = write(tmp_path / "odd.toml", 'inherit = "rtx4090"\n'
                'description = "line one\\nline \\"two\\"\\tand a back\\\\slash, ünïcode"\n')
    saved = write(tmp_path / "saved.toml", ok("profiles", "show", str(src)))
    assert show_json(str(saved)) == show_json(str(src))
    assert show_json(str(saved))["description"] == 'line one\nline "two"\tand a back\\slash, ünïcode'


# --- inheritance ----------------------------------------------------------------------------------------------------


def test_inherit_a_shipped_profile_and_change_one_key(tmp_path):
    mine = write(tmp_path / "mine.toml", 'inherit = "rtx4090"\nlora_rank = 8\n')
    got, base = show_json(str(mine)), show_json("rtx4090")
    assert got["lora_rank"] == 8
    assert got["name"] == "mine"  # named by its own file, not the parent it copies
    assert {k: v for k, v in got.items() if k not in ("lora_rank", "name")} == \
        {k: v for k, v in base.items() if k not in ("lora_rank", "name")}


def test_inherit_a_relative_path_resolves_next_to_the_file(tmp_path, monkeypatch):
    write(tmp_path / "team" / "base.toml", 'inherit = "rtx3090"\nname = "team-base"\nlora_rank = 8\n')
    child = write(tmp_path / "team" / "runs" / "child.toml", 'inherit = "../base.toml"\nlora_alpha = 16\n')
    monkeypatch.chdir(tmp_path)  # not the folder of either file
    got = show_json("team/runs/child.toml")
    assert (got["lora_rank"], got["lora_alpha"]) == (8, 16)
    assert got["max_seq_length"] == load_profile("rtx3090").max_seq_length  # the rest comes from rtx3090
    assert got["name"] == "child"
    assert show_json(str(child)) == got


def test_inheritance_loop_is_an_error_naming_the_files(tmp_path):
    a = write(tmp_path / "a.toml", 'inherit = "b.toml"\n')
    b = write(tmp_path / "b.toml", 'inherit = "a.toml"\n')
    msg = error("profiles", "show", str(a))
    assert "inheritance loops" in msg
    assert str(a.resolve()) in msg and str(b.resolve()) in msg


# --- command-line overrides -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("args", [("--lora-rank", "8"), ("--set", "lora_rank=8"), ("--set", "lora-rank=8")])
def test_command_line_overrides(args):
    got = show_json("rtx4090", *args)
    assert got["lora_rank"] == 8
    assert {k: v for k, v in got.items() if k != "lora_rank"} == \
        {k: v for k, v in show_json("rtx4090").items() if k != "lora_rank"}


def test_command_line_overrides_of_each_type():
    got = show_json("h100", "--load-in-4bit", "--lora-dropout", "0.05", "--lora-targets", "attention",
                    "--set", "learning_rate=1e-4", "--set", "gradient_checkpointing=true")
    assert (got["load_in_4bit"], got["lora_dropout"], got["lora_targets"], got["learning_rate"],
            got["gradient_checkpointing"]) == (True, 0.05, "attention", 1e-4, "true")
    assert show_json("rtx4090", "--no-load-in-4bit")["load_in_4bit"] is False
    # a flag beats --set for the same key
    assert show_json("rtx4090", "--set", "lora_rank=4", "--lora-rank", "32")["lora_rank"] == 32


@pytest.mark.parametrize("args,expected", [
    (("--set", "lora_rank=eight"), "command line: key 'lora_rank' must be an integer, got 'eight'"),
    (("--set", "lora_rnak=8"), "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
    (("--set", "lora_rank"), "override 'lora_rank': expected KEY=VALUE"),
    (("--lora-dropout", "1.0"), "command line: key 'lora_dropout' must be < 1, got 1.0"),
    (("--learning-rate", "nan"), "command line: key 'learning_rate' must be a number, got nan"),
    (("--set", "load_in_4bit=maybe"), "command line: key 'load_in_4bit' must be true or false, got 'maybe'"),
])
def test_bad_command_line_overrides(args, expected):
    assert expected in error("profiles", "show", "rtx4090", *args)


def test_learning_rate_conflict_from_the_command_line_is_blamed_on_it():
    msg = error("profiles", "show", "rtx4090", "--learning-rate", "5e-6")
    assert "key 'min_learning_rate' (1e-05, from " in msg and "rtx4090.toml" in msg
    assert "must be below 'learning_rate' (5e-06, from command line)" in msg


# --- errors in profile files ----------------------------------------------------------------------------------------

BASE = 'inherit = "rtx4090"\n'


@pytest.mark.parametrize("body,expected", [
    ("lora_rnak = 8", "unknown key 'lora_rnak' (did you mean 'lora_rank'?)"),
    ("lerning_rate = 1e-4", "unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
    ("lora-rank = 8", "unknown key 'lora-rank' (did you mean 'lora_rank'?)"),
    ('lora_rank = "8"', "key 'lora_rank' must be an integer, got '8' (str)"),
    ("lora_rank = 8.0", "key 'lora_rank' must be an integer, got 8.0 (float)"),
    ("load_in_4bit = 1", "key 'load_in_4bit' must be true or false, got 1 (int)"),
    ("learning_rate = true", "key 'learning_rate' must be a number, got True (bool)"),
    ("lora_dropout = 1.0", "key 'lora_dropout' must be < 1, got 1.0"),
    ("learning_rate = 0", "key 'learning_rate' must be > 0, got 0.0"),
    ("learning_rate = nan", "key 'learning_rate' must be a number, got nan"),
    ("max_seq_length = 64", "key 'max_seq_length' must be >= 128, got 64"),
    ('lora_targets = "mlp"', "key 'lora_targets' must be one of 'attention', 'attention+experts', got 'mlp'"),
    ("inherit = 3", "key 'inherit' must be a string (a profile name or path), got 3"),
])
def test_file_errors_name_the_file_the_key_and_what_was_expected(tmp_path, body, expected):
    bad = write(tmp_path / "bad.toml", ("" if body.startswith("inherit") else BASE) + body + "\n")
    msg = error("profiles", "show", str(bad))
    assert msg.startswith(f"Error: {bad.resolve()}: ") or msg.startswith(f"Error: {bad}: "), msg
    assert expected in msg


def test_error_in_a_parent_file_names_the_parent(tmp_path):
    parent = write(tmp_path / "parent.toml", BASE + "lora_rank = 0\n")
    child = write(tmp_path / "child.toml", 'inherit = "parent.toml"\nlora_alpha = 8\n')
    msg = error("profiles", "show", str(child))
    assert f"{parent.resolve()}: key 'lora_rank' must be >= 1, got 0" in msg


def test_invalid_toml_names_the_file_and_line(tmp_path):
    bad = write(tmp_path / "broken.toml", BASE + "lora_rank = = 8\n")
    msg = error("profiles", "show", str(bad))
    assert f"{bad.resolve()}: not valid TOML" in msg and "line 2" in msg


def test_missing_file_and_unknown_profile_name(tmp_path):
    missing = tmp_path / "nope.toml"
    assert f"{missing}: no such profile file" in error("profiles", "show", str(missing))
    msg = error("profiles", "show", "rtx5090")
    assert "unknown profile 'rtx5090': the shipped profiles are h100, rtx3090, rtx4070, rtx4090" in msg
    assert "no such profile file" in error("profiles", "show", str(write(tmp_path / "c.toml", 'inherit = "gone.toml"\n')))


def test_min_learning_rate_must_be_below_learning_rate(tmp_path):
    bad = write(tmp_path / "lr.toml", BASE + "learning_rate = 1e-5\nmin_learning_rate = 1e-4\n")
    msg = error("profiles", "show", str(bad))
    assert f"{bad.resolve()}: key 'min_learning_rate' (0.0001, from {bad.resolve()}) must be below 'learning_rate' " \
           f"(1e-05, from {bad.resolve()})" in msg
    # only for the schedule that has a floor
    fine = write(tmp_path / "lr2.toml", BASE + 'learning_rate = 1e-5\nmin_learning_rate = 1e-4\nlr_scheduler = "cosine"\n')
    assert show_json(str(fine))["min_learning_rate"] == 1e-4


def test_every_profile_key_has_a_flag_and_help():
    help_text = ok("profiles", "show", "--help")
    for key, f in PROFILE_FIELDS.items():
        if key in ("name", "description", "source", "vram_budget_gib"):
            continue
        assert "--" + key.replace("_", "-") in help_text, key
        assert f.metadata["help"]
    assert set(show_json("rtx4070")) == {f for f in Profile.__dataclass_fields__}


# --- packaging ------------------------------------------------------------------------------------------------------


def test_built_wheel_ships_the_profiles(tmp_path):
    """The wheel carries profiles/*.toml as swft_lite/profiles and finds them there (not in a checkout)."""
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (wheel,) = tmp_path.glob("swft_lite-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name in SHIPPED:
            assert f"swft_lite/profiles/{name}.toml" in names
            assert zf.read(f"swft_lite/profiles/{name}.toml") == (REPO / "profiles" / f"{name}.toml").read_bytes()
        for name in ("config.json", "chat_template.jinja"):  # gpt-oss-20b's small files (swft_lite.tokenizer)
            asset = f"swft_lite/assets/gpt-oss-20b/{name}"
            assert zf.read(asset) == (REPO / asset).read_bytes()
        zf.extractall(tmp_path / "unpacked")
    probe = ("import json, swft_lite.profiles as p; "
             "print(json.dumps([str(p.profiles_dir()), [x.name for x in p.all_profiles()]]))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60,
                         cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "unpacked"), "PATH": ""})
    assert out.returncode == 0, out.stderr
    where, names = json.loads(out.stdout)
    assert Path(where) == tmp_path / "unpacked" / "swft_lite" / "profiles"
    assert sorted(names) == sorted(SHIPPED)
