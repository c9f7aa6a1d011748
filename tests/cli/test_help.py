"""Every command's --help shows its text as written: typer's rich help reads ``[word]`` as
console markup and drops it, so help text must not hold one (rephrase it)."""

from __future__ import annotations

import re

import click
import pytest
import typer
from typer.testing import CliRunner

from mesa_tui.cli import app


def commands(group: click.Command, path: tuple[str, ...] = ()):
    yield path, group
    for name, sub in getattr(group, "commands", {}).items():
        yield from commands(sub, (*path, name))


ALL = list(commands(typer.main.get_command(app)))


def flat(text: str) -> str:
    """Words only: the panels' borders and the wrapping gone."""
    return " ".join(re.sub(r"[│╭╮╰╯─]", " ", text).split())


@pytest.mark.parametrize("path,command", ALL, ids=[" ".join(p) or "mesa-tui" for p, _ in ALL])
def test_help_keeps_every_bracket_of_its_text(path, command):
    texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
    brackets = {b for t in texts for b in re.findall(r"\[[^\]\n]+\]", t)}
    shown = CliRunner().invoke(app, [*path, "--help"], terminal_width=200)
    assert shown.exit_code == 0, shown.output
    missing = [b for b in brackets if flat(b) not in flat(shown.output)]
    assert not missing, f"{' '.join(path)} --help drops {missing}"
