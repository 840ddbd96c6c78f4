"""The README's promises that code can check: the two commands and the configuration table."""

from __future__ import annotations

import re
from pathlib import Path

from mekd_fl.config import settings_table

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_first_screen_gives_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    assert README.index("```bash") < 400


def test_configuration_table_matches_the_code() -> None:
    assert settings_table() in README
