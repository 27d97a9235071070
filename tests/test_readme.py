"""The README's test commands are what CI runs: .ci/run carries them line for line."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def readme_test_commands() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = text.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def ci_commands() -> list[str]:
    text = (REPO / ".ci" / "run").read_text()
    block = text.split("# --- the README's \"Tests\" commands", 1)[1].split("\n", 1)[1].split("# --- end ---", 1)[0]
    return [line for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_ci_runs_the_readme_test_commands():
    readme = readme_test_commands()
    assert readme[-1] == "python -m pytest -q" and any("venv" in line for line in readme)
    assert ci_commands() == readme


def test_readme_says_how_to_install_on_a_fresh_machine():
    section = (REPO / "README.md").read_text().split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    for needle in ("https://download.pytorch.org/whl/cpu", "CMake", "compiler", "TIKTOKEN_ENCODINGS_BASE"):
        assert needle in section, needle
