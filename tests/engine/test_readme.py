"""The README's promises that code can check: its config reference and its two commands."""

from __future__ import annotations

import re
from pathlib import Path

from engine.config_reference import embedded_reference, reference_markdown

README = Path(__file__).resolve().parents[2] / "README.md"


def test_config_reference_matches_code():
    assert embedded_reference(README.read_text()) == reference_markdown().strip(), (
        "README config reference is stale: run `python -m engine config --update-readme README.md`"
    )


def test_two_commands_at_top_and_ci_uses_the_test_command():
    first_block = re.search(r"```bash\n(.*?)```", README.read_text(), re.S).group(1)
    commands = [line.split("#")[0].strip() for line in first_block.strip().splitlines()]
    assert commands == ["bash examples/quickstart.sh", "bash tests/run.sh"]
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash tests/run.sh" in ci
