"""What the faces read off a pydantic model's fields: option names, types, defaults as text and
help groups. The ``run`` and ``submit`` options, the new-job form, the engine's flags and
``docs/settings.md`` are all made from these, so a field added to a spec needs no other edit.

No torch and no mesa_tui here; nothing imports the specs, so ``engine.specs`` can use it.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo

# Enumerations longer than this read badly as a metavar: the type says CHOICE instead.
CHOICES_WIDTH = 18


def option_name(field: str) -> str:
    """The command-line spelling of a field: ``stamp_rate`` -> ``--stamp-rate``."""
    return "--" + field.replace("_", "-")


def without_none(annotation: Any) -> Any:
    """``int | None`` -> ``int``; anything else unchanged."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def allows_none(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    return (origin is typing.Union or origin is types.UnionType) and type(None) in typing.get_args(
        annotation
    )


def is_bool(annotation: Any) -> bool:
    return without_none(annotation) is bool


def list_item(annotation: Any) -> Any | None:
    """The item type of a list field (``list[float]`` -> ``float``), None for other fields."""
    bare = without_none(annotation)
    if typing.get_origin(bare) is list:
        (item,) = typing.get_args(bare) or (str,)
        return item
    return None


def choices(annotation: Any) -> tuple[str, ...] | None:
    """The values of a ``Literal`` field (optional or not), None for other fields."""
    bare = without_none(annotation)
    if typing.get_origin(bare) is Literal:
        return tuple(str(a) for a in typing.get_args(bare))
    return None


def split_list(text: str) -> list[str]:
    """Command-line and form text of a list setting: ``0.9,0.8,0.5``."""
    return [part.strip() for part in text.split(",") if part.strip()]


TYPE_WORDS = {int: "INTEGER", float: "NUMBER", str: "TEXT", bool: "SWITCH"}


def type_label(annotation: Any) -> str:
    """A short type for help and docs: INTEGER, NUMBER, TEXT, [a|b] (CHOICE when long), LIST,
    SWITCH."""
    options = choices(annotation)
    if options:
        joined = "[" + "|".join(options) + "]"
        return joined if len(joined) <= CHOICES_WIDTH else "CHOICE"
    if list_item(annotation) is not None:
        return "LIST"  # of what: the help's example (0.9,0.8,0.5)
    return TYPE_WORDS.get(without_none(annotation), "TEXT")


def value_text(value: Any, separator: str = ",") -> str:
    """A value as a person types it: lists comma-separated, None as none, switches as words."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return separator.join(value_text(v) for v in value)
    return str(value)


def default_of(info: FieldInfo) -> Any:
    """The field's default (its factory called); ``...`` for a required field."""
    return ... if info.is_required() else info.get_default(call_default_factory=True)


def help_text(info: FieldInfo) -> str:
    """The field's description, with its choices when the type column cannot show them."""
    text = info.description or ""
    options = choices(info.annotation)
    if options and type_label(info.annotation) == "CHOICE":
        missing = [o for o in options if o not in text]
        if missing:
            text = (
                f"{text}; one of {', '.join(options)}" if text else f"one of {', '.join(options)}"
            )
    return text


def field_group(model: type[BaseModel], name: str) -> str | None:
    """The help group of a field, from the model's ``GROUPS`` (a key ending in ``_`` is a
    prefix of field names, any other key one field's name); None: the main options."""
    for key, title in getattr(model, "GROUPS", {}).items():
        if name == key or (key.endswith("_") and name.startswith(key)):
            return title
    return None


def setting_fields(model: type[BaseModel]) -> dict[str, FieldInfo]:
    """The fields a person sets (``kind`` names the model and is not one)."""
    return {name: info for name, info in model.model_fields.items() if name != "kind"}
