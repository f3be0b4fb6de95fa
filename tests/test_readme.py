"""The README's commands are real: its scripts exist and each `runrelay` line parses."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from runrelay.daemon.cli import build_parser

ROOT = Path(__file__).parent.parent
README = (ROOT / "README.md").read_text()


def test_the_two_commands_are_the_scripts_ci_runs():
    assert "bash scripts/demo.sh" in README and "bash scripts/test.sh" in README
    assert "scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
    assert "runrelay demo" in (ROOT / "scripts" / "demo.sh").read_text()


@pytest.mark.parametrize("line", re.findall(r"^runrelay [^#\n]*", README, flags=re.MULTILINE))
def test_each_documented_command_parses(line):
    args = build_parser().parse_args(shlex.split(line)[1:])
    assert callable(args.func)
