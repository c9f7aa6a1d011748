"""The README stays true: every file it links exists, and every `mesa-tui` command it shows names
a real command with options that command has (checked against the click tree, then `--help`)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from mesa_tui.cli import app

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")


def links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if "://" not in t and not t.startswith("#")]


@pytest.mark.parametrize("page", DOCS, ids=lambda p: p.name)
def test_every_linked_file_exists(page):
    missing = [t for t in links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.name} links to missing files: {missing}"


def readme_commands() -> list[str]:
    """Each `mesa-tui ...` command in the README's code blocks (`;` separates several)."""
    blocks = re.findall(r"```\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    out = []
    for line in "\n".join(blocks).splitlines():
        for part in line.split("#")[0].split(";"):
            part = part.strip()
            if part.startswith("mesa-tui"):
                out.append(part)
    return out


def resolve(words: list[str]) -> tuple[Any, list[str], list[str]]:
    """(the command the words name, the path to it, the words left for it)."""
    command = typer.main.get_command(app)  # typer's own click classes, hence no isinstance
    path: list[str] = []
    while words and words[0] in getattr(command, "commands", {}):
        path.append(words[0])
        command = command.commands[words.pop(0)]
    return command, path, words


def test_the_readme_shows_commands():
    assert len(readme_commands()) >= 15


def passed_through_to_stages(command: Any, words: list[str]) -> set[str]:
    """The pipeline's stage settings (--train-placement, --steps ...) among ``words``: the
    options it does not declare, each routed to a stage's spec or refused as the command does."""
    from engine.pipelines import split_overrides
    from mesa_tui.commands.submit import parse_extra

    declared = {opt: p for p in command.params for opt in p.opts + p.secondary_opts}
    extra, takes_value = [], False
    for w in words:
        if takes_value:
            takes_value = False
        elif w.split("=")[0] in declared:
            takes_value = "=" not in w and not getattr(declared[w], "is_flag", False)
        else:
            extra.append(w)
    split_overrides(parse_extra(extra))  # raises UserError on a setting no stage has
    return {w.split("=")[0] for w in extra if w.startswith("--")}


@pytest.mark.parametrize("line", readme_commands())
def test_every_readme_command_exists_with_its_options(line):
    words = [w for w in shlex.split(line.replace("[", " ").replace("]", " "))[1:] if w != "..."]
    command, path, rest = resolve(words)
    known = {opt for p in command.params for opt in p.opts + p.secondary_opts}
    options = {w.split("=")[0] for w in rest if w.startswith("--")}
    if path == ["submit", "pipeline"]:
        options -= passed_through_to_stages(command, rest)
    assert options <= known | {"--help"}, f"{line}: unknown {sorted(options - known)}"
    if not path:  # the app itself: only its own options and their values, no unknown command
        loose = [
            w for i, w in enumerate(rest) if w[:2] != "--" and (i == 0 or rest[i - 1] not in known)
        ]
        assert not loose, f"{line}: no such command {loose[0]!r}"
    result = CliRunner().invoke(app, [*path, "--help"])
    assert result.exit_code == 0, result.output


def test_the_settings_page_is_the_specs():
    from engine.settings_doc import PAGE, settings_markdown

    assert PAGE.read_text() == settings_markdown(), (
        "docs/settings.md differs from the specs; run python -m engine.settings_doc --write"
    )


def test_every_setting_has_help():
    from engine.daemon import EngineFlags
    from engine.spec_fields import setting_fields
    from engine.specs import SPEC_CLASSES

    for model in (*SPEC_CLASSES.values(), EngineFlags):
        bare = [name for name, info in setting_fields(model).items() if not info.description]
        assert not bare, f"{model.__name__}: give these fields a description: {bare}"
