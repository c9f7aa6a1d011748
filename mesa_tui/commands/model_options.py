"""Commands whose options are the fields of a pydantic model: a job spec (``run``, ``submit``)
or the engine's flags (``engine start``).

The options are made from the model's fields (``engine.spec_fields``: name, help, type, default,
group) when the command first needs them (parsing its arguments, its ``--help``), so a field
added to ``engine.specs`` is an option of ``run`` and ``submit`` with no edit here, and the
other commands never import the models (``mesa-tui ls`` stays quick).

Every value reaches the model as given (switches as booleans), so the model is the one place
that checks it: a bad value is one line naming it and the fix (``engine.specs``), and so is a
usage mistake such as an unknown option.
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typer
from typer.core import TyperCommand

from mesa_tui.commands.common import cli_errors

PRESETS_PANEL = "Presets and files"
KEYWORD = inspect.Parameter.KEYWORD_ONLY
GIVEN = "mesa_tui.given"  # where the command keeps the model's options for the callback
# The click typer runs on (its own copy in recent typer, click itself in older ones).
UsageError = typer.BadParameter.__mro__[1]


@dataclass(frozen=True)
class Given:
    """What the command line gave: the model's options that were given (others are absent),
    and for a job spec its ``--preset`` and ``--config``."""

    values: dict[str, Any]
    preset: str | None = None
    config: Path | None = None

    def spec(self, kind: str):  # noqa: ANN201  (engine.specs.SpecBase)
        """The spec for ``run``: preset, then the TOML file, then the options given. ``run``
        reads its artifacts now, so a job reference (``submit``'s ``job:ID``) is refused."""
        from engine.errors import UserError
        from engine.pipelines import resolve_reference
        from engine.spec_fields import option_name
        from engine.specs import build_spec

        for field, value in self.values.items():
            if reference := resolve_reference(value):
                raise UserError(
                    f"{option_name(field)} {value}: run takes artifact directories, not job "
                    f"references; queue it with `mesa-tui submit {kind}`, or give the job's "
                    f"artifact (`mesa-tui show {reference[0]}` prints it)"
                )
        return build_spec(kind, self.preset, self.config, self.values)


class ModelOptionsCommand(TyperCommand):
    """A typer command with the model's options added when first needed, and usage mistakes as
    one line on stderr and exit 2. ``model_parameters`` is set by ``model_command``."""

    model_parameters: Callable[[], list[inspect.Parameter]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._params: list[Any] | None = None
        self._own_params: list[Any] = []
        self._model_names: set[str] = set()
        super().__init__(*args, **kwargs)

    @property
    def params(self) -> list[Any]:  # type: ignore[override]
        # One list, kept: click appends its help option to it and takes it back.
        if self._params is None:
            made = click_parameters(type(self).model_parameters())
            self._model_names = {p.name for p in made}
            self._params = [*made, *self._own_params]
        return self._params

    @params.setter
    def params(self, value: list[Any]) -> None:
        self._own_params, self._params = list(value), None

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except UsageError as exc:
            typer.echo(f"error: {usage_message(exc)}", err=True)
            raise typer.Exit(2) from None

    def invoke(self, ctx: Any) -> Any:
        names = self._model_names
        ctx.meta[GIVEN] = {k: ctx.params.pop(k) for k in list(ctx.params) if k in names}
        return super().invoke(ctx)


def usage_message(exc: Exception) -> str:
    """One line for click's usage error: an unknown option names the closest one."""
    if type(exc).__name__ == "NoSuchOption":
        near = list(getattr(exc, "possibilities", None) or ())  # closest first
        hint = f"did you mean {near[0]}?" if near else "see --help for the settings"
        return f"unknown option {getattr(exc, 'option_name', '')}; {hint}"
    return f"{exc.format_message().rstrip('.')}; see --help"  # type: ignore[attr-defined]


def click_parameters(parameters: list[inspect.Parameter]) -> list[Any]:
    """The click options typer makes of these keyword parameters (through its public API, so
    flags, panels and types behave as in any typer command)."""

    def probe(**_: Any) -> None: ...

    probe.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    app = typer.Typer(add_completion=False)
    app.command()(probe)
    return list(typer.main.get_command(app).params)


def field_parameters(model: type) -> list[inspect.Parameter]:
    """One keyword parameter with a ``typer.Option`` per field of ``model``. An absent option
    is None, so the preset, the file or the model's default applies (the help says which)."""
    from engine.spec_fields import (
        field_group,
        help_text,
        is_bool,
        option_name,
        setting_fields,
        type_label,
    )

    params = []
    for name, info in setting_fields(model).items():
        flag = option_name(name)
        switch = is_bool(info.annotation)
        option = typer.Option(
            None,
            f"{flag}/--no-{flag[2:]}" if switch else flag,
            help=_with_default(help_text(info), info, flag, switch),
            metavar=None if switch else type_label(info.annotation),
            show_default=False,
            rich_help_panel=field_group(model, name),
        )
        annotation = bool | None if switch else str | None
        params.append(inspect.Parameter(name, KEYWORD, default=option, annotation=annotation))
    return params


def _with_default(text: str, info: Any, flag: str, switch: bool) -> str:
    """The help with the model's default (a switch's default as the flag that gives it)."""
    from engine.spec_fields import default_of, value_text

    default = default_of(info)
    if default in (..., None, []):
        return text
    shown = (flag if default else f"--no-{flag[2:]}") if switch else value_text(default)
    return f"{text} (default: {shown})" if text else f"(default: {shown})"


def source_parameters(kind: str) -> list[inspect.Parameter]:
    """``--preset`` (the kind's presets, listed) and ``--config`` (a TOML file)."""
    from engine.specs import PRESETS

    names = ", ".join(PRESETS.get(kind, {})) or "none"
    preset = typer.Option(
        None, metavar="NAME", help=f"preset values: {names}", rich_help_panel=PRESETS_PANEL
    )
    config = typer.Option(
        None,
        "--config",
        metavar="FILE",
        help="TOML file with spec values (over the preset, under the options)",
        rich_help_panel=PRESETS_PANEL,
    )
    return [
        inspect.Parameter("preset", KEYWORD, default=preset, annotation=str | None),
        inspect.Parameter("config", KEYWORD, default=config, annotation=Path | None),
    ]


def model_command(
    app: typer.Typer,
    name: str,
    parameters: Callable[[], list[inspect.Parameter]],
    **settings: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register the decorated ``body(given, **own_options)`` as ``name``: the options are
    ``parameters()`` (made when first needed), then ``body``'s own after its first parameter.
    ``body`` runs with ``cli_errors`` (one-line errors, exit 2)."""

    def register(body: Callable[..., Any]) -> Callable[..., Any]:
        command_class = type(
            f"{body.__name__.title()}Command",
            (ModelOptionsCommand,),
            {"model_parameters": staticmethod(parameters)},
        )
        app.command(name, cls=command_class, **settings)(_callback(body))
        return body

    return register


def _callback(body: Callable[..., Any]) -> Callable[..., Any]:
    """What typer calls: the context (which holds the model's options) and ``body``'s own
    options; it hands ``body`` the ``Given``."""
    checked = cli_errors(body)

    def callback(ctx: typer.Context, **own_values: Any) -> Any:
        values = ctx.meta.pop(GIVEN, {})
        preset, config = values.pop("preset", None), values.pop("config", None)
        given = {k: v for k, v in values.items() if v is not None}
        return checked(Given(given, preset=preset, config=config), **own_values)

    hints = typing.get_type_hints(body)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation), kind=KEYWORD)
        for p in list(inspect.signature(body).parameters.values())[1:]
    ]
    context = inspect.Parameter("ctx", KEYWORD, annotation=typer.Context)
    callback.__signature__ = inspect.Signature([context, *own])  # type: ignore[attr-defined]
    callback.__annotations__ = {}  # the signature's annotations are resolved already
    callback.__doc__ = body.__doc__
    return callback


def spec_command(
    app: typer.Typer, kind: str, name: str | None = None, **settings: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``model_command`` for a job kind: one option per field of its spec, then ``--preset``
    and ``--config``; the body builds the spec with ``given.spec(kind)``."""
    return model_command(app, name or kind, functools.partial(_spec_parameters, kind), **settings)


def _spec_parameters(kind: str) -> list[inspect.Parameter]:
    from engine.specs import SPEC_CLASSES

    return [*field_parameters(SPEC_CLASSES[kind]), *source_parameters(kind)]
