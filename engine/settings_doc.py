"""``docs/settings.md``: every setting of every job kind and of the engine, and the presets,
written from the models themselves (``engine.specs``, ``engine.daemon.EngineFlags``).

Regenerate the page with ``python -m engine.settings_doc --write``; a test keeps the committed
page equal to this output, so the table cannot drift from the options.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from engine.spec_fields import (
    choices,
    default_of,
    field_group,
    list_item,
    option_name,
    setting_fields,
    type_label,
    value_text,
)

PAGE = Path(__file__).resolve().parents[1] / "docs" / "settings.md"
HEADER = """\
# Settings

Every setting of every job kind, as `mesa-tui run KIND` and `mesa-tui submit KIND` take it
(`--option value`; a switch as `--name` / `--no-name`; a list as `0.9,0.8,0.5`), as a key of a
`--config` TOML file (the name with underscores, `stamp_rate = 0.1`; top level, or under a table
named after the kind), and as a field of the new-job form. Values come from the defaults, then
`--preset`, then `--config`, then the options.

This page is written by `python -m engine.settings_doc --write` from the specs in
`engine/specs.py`; a test fails when it differs from them.
"""


def settings_markdown() -> str:
    from engine.daemon import EngineFlags
    from engine.specs import PRESETS, SPEC_CLASSES

    parts = [HEADER]
    for kind, model in SPEC_CLASSES.items():
        usage = f"`mesa-tui run {kind}`, `mesa-tui submit {kind}`"
        parts.append(_section(kind, model, usage))
        parts.append(_presets(PRESETS.get(kind, {})))
    parts.append(_section("engine start", EngineFlags, "`mesa-tui engine start`"))
    return "\n".join(p for p in parts if p)


def _section(title: str, model: type[BaseModel], usage: str) -> str:
    summary = " ".join((model.__doc__ or "").strip().split("\n\n")[0].split())
    lines = [f"## {title}", "", f"{summary} Taken by {usage}.", ""]
    groups: dict[str | None, list[str]] = {None: []}
    for name in setting_fields(model):
        groups.setdefault(field_group(model, name), []).append(name)
    for group, names in groups.items():
        if not names:
            continue
        if group is not None:
            lines += [f"### {group}", ""]
        lines += ["| option | type | default | description |", "|---|---|---|---|"]
        for name in names:
            lines.append(_row(model, name))
        lines.append("")
    return "\n".join(lines)


def _row(model: type[BaseModel], name: str) -> str:
    info = model.model_fields[name]
    options = choices(info.annotation)
    if options:
        kind = "one of " + ", ".join(f"`{o}`" for o in options)
    elif list_item(info.annotation) is not None:
        kind = "comma-separated " + type_label(list_item(info.annotation)).lower() + "s"
    else:
        kind = type_label(info.annotation).lower()
    shown = _value(name, default_of(info))
    text = (info.description or "").replace("|", "\\|")
    return f"| `{option_name(name)}` | {kind} | {shown} | {text} |"


def _value(name: str, value: Any, with_name: bool = False) -> str:
    """A default or preset value as typed: a switch as its flag, an empty list as empty."""
    if value is ...:
        return "required"
    flag = option_name(name)
    if isinstance(value, bool):
        return f"`{flag if value else '--no-' + flag[2:]}`"
    if value == []:
        return f"`{flag} ''`" if with_name else "empty"
    return f"`{flag} {value_text(value)}`" if with_name else f"`{value_text(value)}`"


def _presets(presets: dict[str, dict[str, Any]]) -> str:
    if not presets:
        return ""
    lines = ["### Presets", "", "| preset | settings |", "|---|---|"]
    for name, values in presets.items():
        shown = ", ".join(_value(k, v, with_name=True) for k, v in values.items())
        lines.append(f"| `{name}` | {shown} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = settings_markdown()
    if args == ["--write"]:
        PAGE.write_text(text)
        print(f"wrote {PAGE}")
    elif not args:
        sys.stdout.write(text)
    else:
        print("usage: python -m engine.settings_doc [--write]", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
