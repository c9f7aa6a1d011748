"""The new-job form: a kind, a preset, one input per spec field, validated by the CLI's specs.

Every change is checked with the same pydantic model the CLI uses (``engine.specs``); each error
is shown under its own field, and submit is refused until the spec is valid.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Button, Footer, Input, Label, Select, Static

from engine.spec_fields import allows_none, choices, is_bool, setting_fields, value_text
from mesa_tui.messages import RequestDone
from mesa_tui.screens.base import SourceScreen

NO_PRESET = "(defaults)"
NONE_WORDS = ("", "none", "null")


def field_text(value: Any) -> str:
    """How a spec value appears in its input box."""
    return value_text(value, separator=", ")


def parse_field(text: str, annotation: Any) -> Any:
    """The value handed to pydantic: None words for optional fields; the rest as typed (the
    spec reads list text such as ``0.9, 0.8`` itself)."""
    text = text.strip()
    if allows_none(annotation) and text.lower() in NONE_WORDS:
        return None
    return text


def field_errors(exc: ValidationError) -> dict[str, str]:
    """First message per top-level field."""
    out: dict[str, str] = {}
    for err in exc.errors():
        loc = err.get("loc", ())
        name = str(loc[0]) if loc else "spec"
        out.setdefault(name, err.get("msg", "invalid").removeprefix("Value error, "))
    return out


class PipelineForm(BaseModel):
    """The form of a pipeline (train -> [detect] -> mesa -> defend per method); each stage's spec
    is then built and validated by ``engine.pipelines.build_pipeline`` with the CLI's specs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pipeline"] = "pipeline"
    trigger: str = Field("bw:170", description="bw:ID, color:SEED, square:white or file:PATH")
    target: str = Field(
        "auto", description="auto: detect the attacked class first; N: tell the search (oracle)"
    )
    methods: str = Field(
        "mesa,ideal,point,finetune",
        description="comma list: mesa, mesa-0.9, mesa-ensemble, ideal, point, neural-cleanse, finetune, random-patch, anp, i-bau, clp, ft-sam, all",
    )
    seed: int = Field(0, ge=0)
    epochs: int | None = Field(
        None, ge=1, description="train and defend epochs (none: the preset's)"
    )
    steps: int | None = Field(None, ge=1, description="search steps (none: the preset's)")

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, v: str) -> str:
        from engine.triggerspec import check_trigger_syntax

        return check_trigger_syntax(v)

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        if v != "auto" and not (v.isascii() and v.isdigit()):
            raise ValueError(f"target '{v}' is not auto or a class number")
        return v

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: str) -> str:
        from engine.errors import UserError
        from engine.pipelines import parse_methods

        try:
            return ",".join(parse_methods(v))
        except UserError as exc:
            raise ValueError(str(exc)) from None

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def pipeline_presets(presets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """A pipeline preset applies to every stage that has it; offer every stage's preset names."""
    return {
        name: {}
        for stage in ("train", "detect", "mesa", "defend")
        for name in presets.get(stage, {})
    }


def check_pipeline(form: PipelineForm, preset: str | None) -> tuple[str, str] | None:
    """Build the stages with the CLI's pipeline builder; (field, message) when one is refused."""
    from engine.errors import UserError
    from engine.pipelines import build_pipeline, parse_methods

    overrides = {k: v for k, v in (("epochs", form.epochs), ("steps", form.steps)) if v is not None}
    try:
        build_pipeline(
            preset=preset,
            trigger=form.trigger,
            target=form.target,
            methods=parse_methods(form.methods),
            overrides=overrides,
            seed=form.seed,
        )
    except UserError as exc:
        message = str(exc)
        field = next((f for f in PipelineForm.model_fields if f"--{f}" in message), "spec")
        return field, message
    return None


class NewJobScreen(SourceScreen):
    BINDINGS = [
        Binding("escape", "back", "back"),
        Binding("ctrl+s", "submit", "submit"),
    ]

    def __init__(self, kind: str | None = None) -> None:
        super().__init__(classes="new")
        from engine.specs import PRESETS, SPEC_CLASSES

        self.spec_classes: dict[str, type[BaseModel]] = {**SPEC_CLASSES, "pipeline": PipelineForm}
        self.presets = {**PRESETS, "pipeline": pipeline_presets(PRESETS)}
        self.kind = kind if kind in self.spec_classes else next(iter(self.spec_classes))
        self.preset = NO_PRESET
        self.errors: dict[str, str] = {}
        self.submitting = False
        self.editors: dict[str, Input | Select] = {}
        self.error_labels: dict[str, Static] = {}
        self.validation_pending = False

    def compose(self) -> ComposeResult:
        yield Static("new job · ctrl+s submits · escape goes back", classes="title")
        with Horizontal(id="form-head"):
            yield Select(
                [(k, k) for k in self.spec_classes],
                value=self.kind,
                allow_blank=False,
                id="kind",
                compact=True,
            )
            yield Select(
                self._preset_options(),
                value=NO_PRESET,
                allow_blank=False,
                id="preset",
                compact=True,
            )
            yield Input(placeholder="study (optional)", id="study", compact=True)
        yield VerticalScroll(id="form-fields")
        with Horizontal(id="form-foot"):
            yield Static("", id="form-status")
            yield Button("Submit", id="submit", variant="primary", compact=True)
        yield Footer()

    def _preset_options(self) -> list[tuple[str, str]]:
        return [(NO_PRESET, NO_PRESET)] + [(p, p) for p in self.presets.get(self.kind, {})]

    async def on_mount(self) -> None:
        await self.build_fields()

    async def build_fields(self) -> None:
        """One row per spec field, filled from the preset over the defaults."""
        container = self.query_one("#form-fields", VerticalScroll)
        await container.remove_children()
        cls = self.spec_classes[self.kind]
        preset = self.presets.get(self.kind, {}).get(self.preset, {})
        rows = []
        self.editors, self.error_labels = {}, {}
        for name, info in setting_fields(cls).items():
            default = "" if info.is_required() else info.get_default(call_default_factory=True)
            value = preset.get(name, default)
            options = choices(info.annotation) or (
                ("true", "false") if is_bool(info.annotation) else None
            )
            if options and allows_none(info.annotation):
                options = ("none", *options)
            if options:
                editor = Select(
                    [(c, c) for c in options],
                    value=field_text(value),
                    allow_blank=False,
                    id=f"f-{name}",
                    compact=True,
                )
            else:
                editor = Input(
                    field_text(value),
                    id=f"f-{name}",
                    placeholder=info.description or "",
                    compact=True,
                )
            editor.tooltip = info.description
            error = Static("", id=f"e-{name}", classes="field-error")
            self.editors[name], self.error_labels[name] = editor, error
            rows.append(
                Vertical(
                    Horizontal(
                        Label(name.replace("_", " "), classes="field-name"),
                        editor,
                        classes="field-row",
                    ),
                    error,
                    classes="field",
                )
            )
        await container.mount_all(rows)
        self.validate_form()

    def values(self) -> dict[str, Any]:
        fields = self.spec_classes[self.kind].model_fields
        out: dict[str, Any] = {}
        for name, widget in self.editors.items():
            out[name] = parse_field(str(widget.value), fields[name].annotation)
        return out

    def validate_form(self):  # noqa: ANN201
        """Check with the spec class; show each error under its field. Returns the spec or None."""
        cls = self.spec_classes[self.kind]
        try:
            spec = cls(**self.values())
            self.errors = {}
        except ValidationError as exc:
            spec = None
            self.errors = field_errors(exc)
        if isinstance(spec, PipelineForm):
            refused = check_pipeline(spec, None if self.preset == NO_PRESET else self.preset)
            if refused is not None:
                spec = None
                self.errors = {refused[0]: refused[1]}
        for name, label in self.error_labels.items():
            message = self.errors.get(name, "")
            label.update(message)
            label.set_class(bool(message), "shown")
            self.editors[name].set_class(name in self.errors, "invalid")
        status = self.query_one("#form-status", Static)
        unplaced = [m for n, m in self.errors.items() if n not in self.editors]
        if unplaced:
            status.update(unplaced[0])
        elif self.errors:
            status.update(f"{len(self.errors)} field(s) need a fix: {', '.join(self.errors)}")
        else:
            status.update(f"valid {self.kind} spec")
        status.set_class(bool(self.errors), "invalid")
        return spec

    @on(Select.Changed, "#kind")
    async def _kind_changed(self, event: Select.Changed) -> None:
        if event.value != self.kind:
            self.kind = str(event.value)
            self.preset = NO_PRESET
            preset = self.query_one("#preset", Select)
            preset.set_options(self._preset_options())
            preset.value = NO_PRESET
            await self.build_fields()

    @on(Select.Changed, "#preset")
    def _preset_changed(self, event: Select.Changed) -> None:
        if event.value is not Select.NULL and event.value != self.preset:
            self.preset = str(event.value)
            self.fill_from_preset()

    def fill_from_preset(self) -> None:
        """Put the preset's values (over the defaults) into the existing inputs."""
        fields = self.spec_classes[self.kind].model_fields
        preset = self.presets.get(self.kind, {}).get(self.preset, {})
        for name, editor in self.editors.items():
            editor.value = field_text(
                preset.get(name, fields[name].get_default(call_default_factory=True))
            )
        self._validate_soon()

    def _validate_soon(self) -> None:
        """Coalesce a burst of changes (mounting a form posts one per field) into one check."""
        if not self.validation_pending:
            self.validation_pending = True
            self.call_after_refresh(self._validate_now)

    def _validate_now(self) -> None:
        self.validation_pending = False
        self.validate_form()

    @on(Input.Changed)
    def _input_changed(self, event: Input.Changed) -> None:
        if self.editors.get(str(event.input.id)[2:]) is event.input:
            self._validate_soon()

    @on(Select.Changed)
    def _choice_changed(self, event: Select.Changed) -> None:
        if self.editors.get(str(event.select.id)[2:]) is event.select:
            self._validate_soon()

    @on(Button.Pressed, "#submit")
    def _submit_pressed(self) -> None:
        self.action_submit()

    def action_submit(self) -> None:
        spec = self.validate_form()
        if spec is None:
            first = next(iter(self.errors))
            self.notify(
                f"{first}: {self.errors[first]}", title="fix the form first", severity="error"
            )
            if first in self.editors:
                self.editors[first].focus()
            return
        if self.submitting:
            return
        self.submitting = True
        study = self.query_one("#study", Input).value.strip() or None
        self.mesa.send_request(
            self, "submit", None, kind=self.kind, spec=spec.to_json(), study=study
        )

    def on_request_done(self, message: RequestDone) -> None:
        self.submitting = False
        self.notify(message.detail)
        self.app.pop_screen()

    def on_worker_state_changed(self, event) -> None:  # noqa: ANN001
        super().on_worker_state_changed(event)
        if event.state.name in ("ERROR", "CANCELLED"):
            self.submitting = False

    def action_back(self) -> None:
        self.app.pop_screen()
