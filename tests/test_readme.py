"""The README's promises that code can check: the two commands on its first screen, its length, and
the configuration table that the documentation generates from the settings schema."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mekd_fl.config import settings_table

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_first_screen_gives_the_two_commands() -> None:
    first_block = re.search(r"```bash\n(.*?)```", README, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.splitlines() if line.strip()]
    assert commands == ["make run", "make test"]
    assert README.index("```bash") < 400


def test_readme_stays_short() -> None:
    """Everything else lives in docs/; the README is what a visitor reads first."""
    assert len(README.splitlines()) <= 250


def test_readme_links_to_docs_exist() -> None:
    """Relative links (docs/*.md, CHANGELOG.md, pictures) point at files of the repository."""
    for target in re.findall(r"\]\(([^)#\s]+)\)", README):
        if not target.startswith(("http://", "https://")):
            assert (ROOT / target).exists(), f"README.md links to a missing file: {target}"


def test_configuration_table_is_generated_into_the_docs() -> None:
    """docs/running.md holds the marker, and the build hook replaces it with settings_table()."""
    sys.path.insert(0, str(ROOT / "docs"))
    try:
        import hooks
    finally:
        sys.path.remove(str(ROOT / "docs"))
    page = (ROOT / "docs" / "running.md").read_text()
    assert hooks.TABLE_MARKER in page
    assert "| `seed` |" not in page, "the settings table is generated at build time, never kept by hand"
    assert settings_table() in hooks.on_page_markdown(page, None, None, None)
