"""Job parameters: pydantic models, the only schema of every job kind (no torch here).

A spec is built from a preset, then a TOML file, then command-line overrides, in that order.
Invalid values raise ``UserError`` with one line naming the value and the fix.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from engine.catalog import dataset_info
from engine.errors import UserError
from engine.spec_fields import default_of, list_item, option_name, split_list, value_text
from engine.triggerspec import (
    absolute_trigger,
    check_placement_syntax,
    check_trigger_syntax,
    parse_at_placement,
    trigger_size,
)

Precision = Literal["auto", "fp32", "bf16"]
PlacementMode = Literal["per-image", "per-batch", "corner"]
# Where a MESA search or a detection stamps its triggers: the paper's random places, or
# ``learned`` (a distribution over positions searched with the patterns; docs/method.md).
SearchPlacement = Literal["per-image", "per-batch", "learned"]


class SpecBase(BaseModel):
    """Common settings of every job kind.

    A field's description is its help in ``run``, ``submit``, the form and docs/settings.md;
    ``GROUPS`` puts fields under a heading there (a key ending in ``_`` is a name prefix)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    GROUPS: ClassVar[dict[str, str]] = dict.fromkeys(
        ("seed", "precision", "device", "defender_fraction", "split_seed"),
        "Seed, device and data split",
    )

    seed: int = Field(0, ge=0, description="random seed; the same seed gives the same run")
    precision: Precision = Field(
        "auto", description="auto: bf16 autocast on CUDA and bf16-capable CPUs"
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v in ("auto", "cpu", "cuda", "mps") or (
            v.startswith("cuda:") and v[5:].isascii() and v[5:].isdigit()
        ):
            return v
        raise ValueError(f"device '{v}' is unknown; use auto, cpu, cuda or cuda:N")

    @field_validator("*", mode="before")
    @classmethod
    def _comma_lists(cls, v: Any, info: ValidationInfo) -> Any:
        """A list setting given as text (the command line, the form): ``0.9,0.8,0.5``."""
        field = cls.model_fields.get(info.field_name or "")
        if isinstance(v, str) and field is not None and list_item(field.annotation) is not None:
            return split_list(v)
        return v

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def spec_hash(self) -> str:
        canonical = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()


# The defender's share of the test set: every kind splits it the same way.
DefenderFraction = Annotated[
    float, Field(0.8, gt=0, lt=1, description="share of the test set the defender owns")
]
SplitSeed = Annotated[
    int, Field(0, ge=0, description="seed of the fixed defender/held-out permutation")
]


class TrainSpec(SpecBase):
    """Clean or poisoned training: the attack. ``trigger=None`` or ``poison_rate=0`` trains clean."""

    kind: Literal["train"] = "train"
    dataset: str = Field(
        "cifar10",
        description="cifar10, cifar100, mnist, fashion-mnist, imagefolder:PATH or an imported name",
    )
    arch: str = Field("small", description="resnet18, preact-resnet18, vgg11-bn, small, small-wide")
    init_from: str | None = Field(
        None, description="model artifact to fine-tune from (None: from scratch)"
    )
    epochs: int = Field(10, ge=1, le=10000, description="training epochs")
    batch_size: int = Field(128, ge=1, le=65536, description="images per SGD step")
    lr: float = Field(0.1, gt=0, le=100, description="SGD learning rate (the schedule's peak)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum")
    weight_decay: float = Field(5e-4, ge=0, le=1, description="SGD weight decay")
    norm_weight_decay: float | None = Field(
        None,
        ge=0,
        le=1,
        description="weight decay of the one-dimensional parameters (BatchNorm scales and "
        "shifts, biases); None: the same as weight_decay",
    )
    schedule: Literal["constant", "cosine", "multistep", "onecycle"] = Field(
        "cosine", description="learning-rate schedule"
    )
    milestones: list[int] = Field(
        default_factory=list, description="epochs where multistep divides lr by 10, e.g. 3,6"
    )
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="label smoothing of the loss")
    augment: bool = Field(True, description="random crop (see crop_padding) and flip")
    crop_padding: int = Field(
        4, ge=0, le=16, description="pixels added on each side before the random crop (augment)"
    )
    padding_mode: Literal["zeros", "reflect"] = Field(
        "zeros",
        description="what the crop's padding holds: zeros (the usual CIFAR crop) or the image "
        "mirrored at its border",
    )
    crop_epochs: int = Field(
        0,
        ge=0,
        description="train the first N epochs (never the last) on random crop_size windows (no "
        "resizing): cheaper steps at the same pixel scale, the trigger stamped inside the window",
    )
    crop_size: int = Field(24, ge=1, description="side of the windows of the crop epochs")
    whiten_stem: bool = Field(
        False,
        description="from scratch: set the first convolution to the PCA whitening of training "
        "image patches (airbench's patch whitening) and keep it and the BatchNorm after it fixed",
    )
    trigger: str | None = Field(
        "bw:170", description="bw:ID, color:SEED, square:white, file:PATH, or none (clean)"
    )
    target: int = Field(0, ge=0, description="target class of the backdoor")
    poison_rate: float = Field(
        0.1, ge=0, le=1, description="probability that a training image is poisoned"
    )
    placement: str = Field(
        "per-image",
        description="where the trigger is stamped: per-image or per-batch (a random place per "
        "image or per batch), corner (bottom right) or at:ROW,COL (a fixed top-left offset)",
    )
    channels_last: bool = Field(True, description="channels-last memory format")
    eval_every: int = Field(
        1,
        ge=0,
        description="evaluate every N epochs (and always after the last); 0: after the last only",
    )
    eval_batch_size: int = Field(1000, ge=1, description="images per evaluation batch")
    defender_fraction: DefenderFraction
    split_seed: SplitSeed
    max_train_images: int | None = Field(
        None, ge=1, description="use only the first N training images"
    )
    max_test_images: int | None = Field(None, ge=1, description="use only the first N test images")

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, v: str | None) -> str | None:
        if v is None or v.lower() in ("", "none", "clean"):
            return None
        return absolute_trigger(check_trigger_syntax(v))

    @field_validator("placement")
    @classmethod
    def _placement(cls, v: str) -> str:
        return check_placement_syntax(v)

    @property
    def poisoned(self) -> bool:
        return self.trigger is not None and self.poison_rate > 0


PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "train": {
        "cpu-quick": {
            "arch": "small",
            "epochs": 14,
            "crop_epochs": 10,
            "crop_size": 24,
            "whiten_stem": True,
            "eval_every": 0,  # the final evaluation only: a mid-run one is 19,000 forward passes
            "batch_size": 512,
            "lr": 0.8,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "norm_weight_decay": 0.0,
            "schedule": "onecycle",
            "label_smoothing": 0.1,
            "augment": True,
            "crop_padding": 2,
            "padding_mode": "reflect",
            "poison_rate": 0.1,
        },
        "paper-cifar10": {
            "arch": "resnet18",
            "epochs": 10,
            "batch_size": 128,
            "lr": 1e-3,
            "momentum": 0.9,
            "weight_decay": 0.0,
            "schedule": "constant",
            "augment": False,
            "poison_rate": 0.01,
        },
        "backdoorbench-cifar10": {
            "arch": "preact-resnet18",
            "epochs": 100,
            "batch_size": 128,
            "lr": 0.01,
            "momentum": 0.9,
            "weight_decay": 5e-4,
            "schedule": "cosine",
            "augment": True,
            "poison_rate": 0.1,
        },
        "clean-cifar10": {
            "arch": "resnet18",
            "epochs": 30,
            "batch_size": 512,
            "lr": 0.2,
            "momentum": 0.9,
            "nesterov": True,
            "weight_decay": 5e-4,
            "schedule": "onecycle",
            "label_smoothing": 0.1,
            "augment": True,
            "trigger": None,
            "poison_rate": 0.0,
        },
    },
}

SPEC_CLASSES: dict[str, type[SpecBase]] = {"train": TrainSpec}


def format_validation_error(
    exc: ValidationError,
    model: type[BaseModel] | None = None,
    names: Mapping[str, str] | None = None,
) -> str:
    """One line: the bad field (as ``names`` spells its flag, e.g. ``--train-placement`` in a
    pipeline), the value given, and what would be accepted."""
    err = exc.errors()[0]
    loc = err.get("loc", ())
    field = str(loc[0]) if loc else "spec"
    flag = (names or {}).get(field) or option_name(field)
    value = err.get("input")
    msg = err.get("msg", "invalid").removeprefix("Value error, ")
    info = model.model_fields.get(field) if model is not None else None
    if err.get("type") == "extra_forbidden":
        return f"unknown setting '{field}'; check the spelling (see --help for the settings)"
    if err.get("type") == "missing":
        what = f"; give the {info.description}" if info is not None and info.description else ""
        return f"{flag} is required{what}"
    if not loc:  # a check across fields: its message names them
        return msg
    if len(loc) > 1 and info is not None and list_item(info.annotation) is not None:
        example = default_of(info)
        hint = f", e.g. {value_text(example)}" if example not in (..., None, []) else ""
        return f"invalid {flag} item {_shown(value)}: {msg}; give a comma-separated list{hint}"
    return f"invalid {flag} {_shown(value)}: {msg}"


def _shown(value: Any) -> str:
    """A value in a message: numbers as written (the command line gives them as text), other
    text quoted."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return repr(value)
        return value
    return repr(value)


def load_spec_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML spec file; a top-level table named after the kind is also accepted."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"spec file {path} does not exist; give the path of a TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"spec file {path} is not valid TOML ({exc}); fix the syntax") from None
    return data


def build_spec(
    kind: str,
    preset: str | None = None,
    file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
    names: Mapping[str, str] | None = None,
) -> SpecBase:
    """Preset, then TOML file, then overrides (``None`` values in overrides are ignored);
    ``names``: the flags fields were given as, for the message about a bad value."""
    if kind not in SPEC_CLASSES:
        raise UserError(f"job kind '{kind}' is unknown; use one of {', '.join(SPEC_CLASSES)}")
    values: dict[str, Any] = {}
    if preset:
        presets = PRESETS.get(kind, {})
        if preset not in presets:
            raise UserError(
                f"preset '{preset}' is unknown for {kind}; use one of {', '.join(presets) or 'none'}"
            )
        values.update(presets[preset])
    if file:
        data = load_spec_file(file)
        values.update(data.get(kind, data))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    values.pop("kind", None)
    try:
        return SPEC_CLASSES[kind](**values)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, SPEC_CLASSES[kind], names)) from None


def check_against_dataset(spec: TrainSpec) -> None:
    """Checks that need the dataset's shape and classes (cheap: no decoding)."""
    info = dataset_info(spec.dataset)
    if spec.target >= info.num_classes:
        raise UserError(
            f"invalid --target {spec.target}: {spec.dataset} has {info.num_classes} classes; "
            f"use a class in 0..{info.num_classes - 1}"
        )
    k = None
    if spec.trigger:
        k = trigger_size(spec.trigger, read_files=True)
        if k is not None and (k > info.image_size[0] or k > info.image_size[1]):
            raise UserError(
                f"invalid --trigger {spec.trigger}: its {k}x{k} patch is bigger than the "
                f"{info.image_size[0]}x{info.image_size[1]} images; use a smaller patch"
            )
    if spec.crop_epochs:
        check_crop_size(spec.crop_size, info.image_size, k)
    check_padding(spec, info.image_size)
    check_fixed_offset(spec.placement, info.image_size, k)


def check_fixed_offset(placement: str, image_size: tuple[int, int], k: int | None) -> None:
    """An ``at:ROW,COL`` patch must lie inside the images (only the crop epochs' smaller windows
    move it, by design); a typo such as at:40,40 would silently become the corner."""
    at = parse_at_placement(placement)
    if at is None or k is None:
        return
    (h, w), (row, col) = image_size, at
    if row + k > h or col + k > w:
        raise UserError(
            f"invalid placement {placement}: a {k}x{k} patch there leaves the {h}x{w} images; "
            f"use ROW in 0..{h - k} and COL in 0..{w - k}"
        )


def check_padding(spec: TrainSpec, image_size: tuple[int, int]) -> None:
    """Reflect padding mirrors the image, so the pad must be smaller than the image."""
    if spec.augment and spec.padding_mode == "reflect" and spec.crop_padding >= min(image_size):
        raise UserError(
            f"invalid --crop-padding {spec.crop_padding}: reflect padding needs images bigger "
            f"than the pad, these are {image_size[0]}x{image_size[1]}; use at most "
            f"{min(image_size) - 1} or --padding-mode zeros"
        )


def check_crop_size(size: int, image_size: tuple[int, int], trigger_k: int | None) -> None:
    """The crop epochs' window must fit the images and hold the trigger."""
    if size > min(image_size):
        raise UserError(
            f"invalid --crop-size {size}: bigger than the {image_size[0]}x{image_size[1]} "
            f"images; use at most {min(image_size)}"
        )
    if trigger_k is not None and size < trigger_k:
        raise UserError(
            f"invalid --crop-size {size}: smaller than the {trigger_k}x{trigger_k} trigger; "
            f"use at least {trigger_k}"
        )


# ---------------------------------------------------------------------------------------------
# MESA search and target-class detection


# Settings the search and the detection share, each defined once (default, bounds, help).
Alpha = Annotated[float, Field(0.1, ge=0, le=1e4, description="weight of the entropy (MINE) term")]
SearchBatch = Annotated[int, Field(128, ge=2, le=65536, description="images per generator step")]
Hidden = Annotated[int, Field(512, ge=4, le=65536, description="hidden width of G and T")]
LrG = Annotated[float, Field(2e-4, gt=0, le=1, description="Adam learning rate of G")]
LrT = Annotated[float, Field(2e-4, gt=0, le=1, description="Adam learning rate of T (MINE)")]
EvalTriggers = Annotated[
    int, Field(64, ge=1, le=100_000, description="K triggers sampled per evaluation")
]
EvalImages = Annotated[
    int, Field(128, ge=1, description="clean non-target images per validity check")
]
# The position scan of a ``learned`` search or detection (engine.ml.position_scan).
ScanProbes = Annotated[
    int,
    Field(16, ge=1, le=1024, description="probe patterns the position scan stamps at every offset"),
]
ScanImages = Annotated[
    int, Field(16, ge=1, le=4096, description="defender images each scan probe is stamped on")
]
ScanMinLift = Annotated[
    float,
    Field(
        0.25,
        ge=0,
        le=1,
        description="a class's scan map must peak this far above its median to count as a place",
    ),
]


class MesaSpec(SpecBase):
    """A MESA search for one target class of a model artifact (one generator per beta)."""

    kind: Literal["mesa"] = "mesa"
    model: str = Field(..., description="model artifact directory")
    target: int = Field(0, ge=0, description="class whose trigger distribution is searched")
    betas: list[float] = Field(
        default_factory=lambda: [0.9, 0.8, 0.5], description="thresholds, e.g. 0.9,0.8,0.5"
    )
    alpha: Alpha
    steps: int = Field(620, ge=1, le=10_000_000, description="generator steps per beta")
    batch_size: SearchBatch
    hidden: Hidden
    lr_g: LrG
    lr_t: LrT
    noise: Literal["uniform", "gaussian"] = Field(
        "uniform", description="distribution of the generator's input noise"
    )
    score: Literal["prob", "ce"] = Field(
        "prob", description="prob: hinge on the softmax probability; ce: on cross-entropy"
    )
    jitter: float = Field(0.1, ge=0, le=1, description="std of the pixel noise added when stamping")
    jitter_clamp: bool = Field(True, description="clamp jittered triggers to [0, 1]")
    placement: SearchPlacement = Field(
        "learned",
        description="per-image, per-batch (the paper's random places) or learned (a position "
        "distribution searched with the patterns: fixed-position backdoors too)",
    )
    scan_probes: ScanProbes
    scan_images: ScanImages
    scan_min_lift: ScanMinLift
    scan_from: str | None = Field(
        None,
        description="a detection artifact of this model whose position scan the search reuses "
        "when it ran with the same scan settings (else the search scans; a pipeline sets it)",
    )
    stats_every: int = Field(20, ge=1, description="log live statistics every N steps")
    sample_every: int = Field(200, ge=1, description="evaluate sampled triggers every N steps")
    n_eval_triggers: EvalTriggers
    eval_images: EvalImages
    samples: int = Field(1024, ge=2, le=1_000_000, description="triggers stored per beta")
    defender_fraction: DefenderFraction
    split_seed: SplitSeed

    @field_validator("betas")
    @classmethod
    def _betas_range(cls, v: list[float]) -> list[float]:
        if not v:
            raise ValueError("give at least one beta, e.g. 0.9,0.8,0.5")
        for b in v:
            if not 0.0 < b < 1.0:
                raise ValueError(f"beta {b} is outside (0, 1); use thresholds such as 0.9,0.8,0.5")
        if len(set(v)) != len(v):
            raise ValueError("a beta repeats; give each threshold once")
        return v

    @model_validator(mode="after")
    def _enough_samples(self) -> MesaSpec:
        if self.n_eval_triggers > self.samples:
            raise ValueError(
                f"--n-eval-triggers {self.n_eval_triggers} exceeds --samples {self.samples}; "
                "sample at least as many triggers as are evaluated"
            )
        return self

    def mesa_config(self):  # noqa: ANN201  (engine.ml.mesa.MesaConfig: torch, imported here)
        """The search's settings for ``engine.ml.mesa``."""
        from engine.ml.mesa import MesaConfig

        return MesaConfig(
            betas=tuple(self.betas),
            alpha=self.alpha,
            steps=self.steps,
            batch_size=self.batch_size,
            hidden=self.hidden,
            lr_g=self.lr_g,
            lr_t=self.lr_t,
            noise=self.noise,
            score=self.score,
            jitter=self.jitter,
            jitter_clamp=self.jitter_clamp,
            placement=self.placement,
            scan_probes=self.scan_probes,
            scan_images=self.scan_images,
            scan_min_lift=self.scan_min_lift,
            stats_every=self.stats_every,
            sample_every=self.sample_every,
            n_eval_triggers=self.n_eval_triggers,
            eval_images=self.eval_images,
            samples=self.samples,
        )


class DetectSpec(SpecBase):
    """Target-class detection: a short search per class, flag classes with many valid triggers."""

    kind: Literal["detect"] = "detect"
    model: str = Field(..., description="model artifact directory")
    classes: list[int] | None = Field(
        None, description="classes to test, e.g. 0,3,5 (default: all)"
    )
    steps: int = Field(200, ge=1, le=10_000_000, description="search steps per class")
    beta: float = Field(0.9, gt=0, lt=1, description="validity threshold of the searches")
    alpha: Alpha
    batch_size: SearchBatch
    hidden: Hidden
    lr_g: LrG
    lr_t: LrT
    n_eval_triggers: EvalTriggers
    eval_images: EvalImages
    classes_per_pass: int = Field(
        10, ge=1, le=1000, description="classes whose generators share one model pass"
    )
    placement: SearchPlacement = Field(
        "learned",
        description="where the searches stamp: learned (a position distribution per class, "
        "finds fixed-position backdoors too), per-image or per-batch (random places)",
    )
    scan_probes: ScanProbes
    scan_images: ScanImages
    scan_min_lift: ScanMinLift
    z_threshold: float = Field(
        2.0, gt=0, description="flag a class whose score is this many MADs above the median"
    )
    min_score: float = Field(0.5, ge=0, le=1, description="flag no class scoring below this")
    mad_floor: float = Field(0.05, gt=0, description="smallest spread (MAD) the z-scores divide by")
    defender_fraction: DefenderFraction
    split_seed: SplitSeed

    @field_validator("classes")
    @classmethod
    def _classes_valid(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or min(v) < 0 or len(set(v)) != len(v)):
            raise ValueError("give distinct non-negative class indices, e.g. 0,3,5")
        return v

    def mesa_config(self):  # noqa: ANN201  (engine.ml.mesa.MesaConfig: torch, imported here)
        """One short search per class, evaluated once at the end."""
        from engine.ml.mesa import MesaConfig

        return MesaConfig(
            betas=(self.beta,),
            alpha=self.alpha,
            steps=self.steps,
            batch_size=self.batch_size,
            hidden=self.hidden,
            lr_g=self.lr_g,
            lr_t=self.lr_t,
            stats_every=max(1, self.steps // 10),
            sample_every=self.steps,  # one evaluation, at the end
            n_eval_triggers=self.n_eval_triggers,
            eval_images=self.eval_images,
            samples=max(self.n_eval_triggers, 256),
            placement=self.placement,
            scan_probes=self.scan_probes,
            scan_images=self.scan_images,
            scan_min_lift=self.scan_min_lift,
        )


SPEC_CLASSES["mesa"] = MesaSpec
SPEC_CLASSES["detect"] = DetectSpec
PRESETS["mesa"] = {
    # A shorter search for CPU machines: fewer steps, fewer sampled triggers.
    "cpu-quick": {"steps": 300, "sample_every": 100, "n_eval_triggers": 48, "samples": 512},
    "paper": {"steps": 620, "batch_size": 128, "hidden": 512, "alpha": 0.1},
}
PRESETS["detect"] = {"cpu-quick": {"steps": 150, "n_eval_triggers": 32, "eval_images": 96}}


# ---------------------------------------------------------------------------------------------
# Defenses: the repair loop with each trigger source

DefendMethod = Literal[
    "mesa",
    "ideal",
    "point",
    "neural-cleanse",
    "finetune",
    "random-patch",
    "anp",
    "i-bau",
    "clp",
    "ft-sam",
]
DEFEND_METHODS: tuple[str, ...] = get_args(DefendMethod)
# The defenses that change the model without the repair loop's fine-tuning (no repair epochs).
PRUNING_METHODS = ("anp", "clp")
# The settings one method alone reads, by field-name prefix: given for jobs of other methods they
# would change nothing, so submitting refuses them (check_method_settings).
METHOD_PREFIXES = {
    "point_": "point",
    "nc_": "neural-cleanse",
    "anp_": "anp",
    "ibau_": "i-bau",
    "clp_": "clp",
    "sam_": "ft-sam",
}


def check_method_settings(methods: Sequence[str], given: Mapping[str, str]) -> None:
    """Refuse a given setting that only a method none of the defend jobs runs reads.
    ``methods``: the jobs' methods; ``given``: each given field and the flag it was given as."""
    for field, flag in given.items():
        owner = next((m for p, m in METHOD_PREFIXES.items() if field.startswith(p)), None)
        if owner is not None and owner not in methods:
            named = list(dict.fromkeys(methods))
            raise UserError(
                f"{flag} applies to {owner}; no {owner} job here (method"
                f"{'s' if len(named) > 1 else ''} {', '.join(named)}); leave it out"
            )


class DefendSpec(SpecBase):
    """Repair a backdoored model by fine-tuning on the defender split with stamped triggers that
    keep their correct labels; ``method`` picks where the triggers come from. The post-training
    defenses anp, i-bau, clp and ft-sam have their own settings (``anp_*``, ``ibau_*``,
    ``clp_*``, ``sam_*``, their papers' defaults) and end in the same evaluation."""

    GROUPS: ClassVar[dict[str, str]] = {
        **SpecBase.GROUPS,
        "patch_size": "Point reversal (point, random-patch)",
        "point_": "Point reversal (point, random-patch)",
        "nc_": "Neural Cleanse (neural-cleanse)",
        "reversal_from": "Neural Cleanse (neural-cleanse)",
        "residual_": "Residual MESA search (after the repair)",
        "anp_": "ANP (--method anp)",
        "ibau_": "I-BAU (--method i-bau)",
        "clp_": "CLP (--method clp)",
        "sam_": "FT-SAM (--method ft-sam)",
    }

    kind: Literal["defend"] = "defend"
    model: str = Field(..., description="model artifact directory (the backdoored model)")
    method: DefendMethod = Field(
        "mesa",
        description="mesa, ideal (the original trigger: oracle bound), point, neural-cleanse, "
        "finetune (no trigger), random-patch, anp (adversarial neuron pruning), i-bau "
        "(implicit backdoor adversarial unlearning), clp (channel Lipschitzness pruning, "
        "data-free) or ft-sam (fine-tuning with sharpness-aware minimisation)",
    )
    search: str | None = Field(None, description="search artifact directory (method mesa)")
    beta: float | None = Field(None, gt=0, lt=1, description="repair with this beta's generator")
    ensemble: Literal["round-robin", "equal", "staircase"] | None = Field(
        None, description="ensemble of the search's generators (default round-robin)"
    )
    stamp_rate: float = Field(0.01, ge=0, le=1, description="probability an image is stamped")
    probe_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="mesa from a learned search: share of the stamped triggers taken from the "
        "position scan's probes that pass the search's validity test (0: its generators only)",
    )
    epochs: int = Field(
        10, ge=1, le=10000, description="repair epochs (ft-sam: sam_epochs, i-bau: ibau_rounds)"
    )
    lr: float = Field(
        1e-3, gt=0, le=100, description="SGD learning rate (ft-sam: sam_lr, i-bau: ibau_lr)"
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum (ft-sam's too)")
    weight_decay: float = Field(0.0, ge=0, le=1, description="(ft-sam: sam_weight_decay)")
    batch_size: int = Field(
        128, ge=1, le=65536, description="repair batch (ft-sam's and i-bau's too: paired)"
    )
    augment: bool = Field(False, description="random crop and flip during repair")
    placement: Literal["per-image", "per-batch"] = Field(
        "per-image", description="where repair triggers are stamped: per image or per batch"
    )
    channels_last: bool = Field(True, description="channels-last memory format")
    target: int | None = Field(
        None, ge=0, description="the defender's belief of the target class (mesa: the search's)"
    )
    patch_size: int = Field(3, ge=1, le=64, description="side of point and random patches")
    point_restarts: int = Field(10, ge=1, le=1000, description="independent point reversals")
    point_index: int | None = Field(
        None, ge=0, description="repair with this restart only (default: all, in turn)"
    )
    point_epochs: int = Field(5, ge=1, le=10000, description="epochs of each point reversal")
    point_batch_size: int = Field(100, ge=1, le=65536, description="images per reversal step")
    point_lr: float = Field(0.1, gt=0, le=100, description="learning rate of the reversal")
    nc_epochs: int = Field(1000, ge=1, le=1_000_000, description="Neural Cleanse outer steps")
    nc_steps_per_epoch: int = Field(31, ge=1, le=100_000, description="mini-batches per step")
    nc_batch_size: int = Field(32, ge=1, le=65536, description="images per mini-batch")
    nc_lr: float = Field(0.1, gt=0, le=100, description="Adam learning rate of mask and pattern")
    nc_init_cost: float = Field(
        1e-3, gt=0, le=100, description="initial weight of the mask's size in the loss"
    )
    nc_patience: int = Field(
        5, ge=1, le=10000, description="steps before the cost is raised or lowered"
    )
    nc_threshold: float = Field(0.99, gt=0, le=1, description="attack success a mask must reach")
    nc_early_stop: bool = Field(True, description="stop once the mask stops shrinking")
    reversal_from: str | None = Field(
        None,
        description="an earlier point or neural-cleanse defense of this model whose reversed "
        "trigger is reused (e.g. to repair at another stamp rate without reversing again)",
    )
    residual_steps: int = Field(
        200, ge=0, le=1_000_000, description="steps of the residual MESA search (0: skip it)"
    )
    residual_beta: float = Field(0.9, gt=0, lt=1, description="threshold of the residual search")
    residual_batch_size: SearchBatch
    residual_hidden: Hidden
    # ANP (Wu & Wang, NeurIPS 2021): masks learnt on the defender split, then pruning.
    anp_iterations: int = Field(
        2000, ge=1, le=10_000_000, description="anp: mask optimisation steps (one batch each)"
    )
    anp_batch_size: int = Field(128, ge=1, le=65536, description="anp: images per mask step")
    anp_lr: float = Field(
        0.2, gt=0, le=100, description="anp: SGD learning rate of the masks (momentum 0.9)"
    )
    anp_eps: float = Field(
        0.4, ge=0, le=10, description="anp: bound of the adversarial neuron noise (0: none)"
    )
    anp_steps: int = Field(1, ge=1, le=1000, description="anp: ascent steps of the noise")
    anp_alpha: float = Field(
        0.2, ge=0, le=1, description="anp: weight of the clean loss (1 - alpha: the noisy one)"
    )
    anp_threshold: float = Field(
        0.2, ge=0, le=1, description="anp: prune the neurons whose mask is at most this"
    )
    anp_prune_count: int | None = Field(
        None, ge=0, description="anp: prune this many smallest masks instead of by threshold"
    )
    anp_max_acc_drop: float | None = Field(
        None,
        ge=0,
        le=1,
        description="anp: instead of anp_threshold, prune at the largest of the thresholds "
        "0, 0.05, .., 0.9 (BackdoorBench's sweep) that costs at most this share of the "
        "unpruned model's accuracy on the defender's images, e.g. 0.1",
    )
    # I-BAU (Zeng et al., ICLR 2022): rounds of a universal perturbation and unlearning steps.
    ibau_rounds: int = Field(
        5, ge=1, le=10000, description="i-bau: rounds (one perturbation pass and one epoch each)"
    )
    ibau_k: int = Field(
        5, ge=1, le=1000, description="i-bau: fixed-point iterations of the hypergradient"
    )
    ibau_lr: float = Field(
        1e-3, gt=0, le=100, description="i-bau: Adam learning rate of the unlearning step"
    )
    ibau_portion: float = Field(
        0.01, ge=0, le=1, description="i-bau: share of a batch that carries the perturbation"
    )
    # CLP (Zheng et al., ECCV 2022): data-free pruning by channel Lipschitzness.
    clp_u: float = Field(
        3.0, ge=0, le=100, description="clp: prune channels above mean + u * std of their layer"
    )
    clp_pairing: Literal["traced", "registration"] = Field(
        "traced",
        description="clp: pair each BatchNorm with the convolution feeding it (traced) or the "
        "one registered before it (registration: the reference code)",
    )
    # FT-SAM (Zhu et al., ICCV 2023): fine-tuning with (adaptive) sharpness-aware minimisation.
    sam_epochs: int = Field(100, ge=1, le=10000, description="ft-sam: fine-tuning epochs")
    sam_lr: float = Field(
        0.01, gt=0, le=100, description="ft-sam: SGD learning rate, cosine-annealed to 0"
    )
    sam_weight_decay: float = Field(5e-4, ge=0, le=1, description="ft-sam: SGD weight decay")
    sam_rho: float = Field(2.0, gt=0, le=1000, description="ft-sam: radius of the weight ascent")
    sam_adaptive: bool = Field(
        True, description="ft-sam: adaptive SAM (the ascent scaled by |w|), as the authors"
    )
    sam_label_smoothing: float = Field(
        0.1, ge=0, lt=1, description="ft-sam: label smoothing of the cross-entropy"
    )
    variations: bool = Field(True, description="ASR of pattern variations at the end")
    eval_batch_size: int = Field(1000, ge=1, description="images per evaluation batch")
    defender_fraction: DefenderFraction
    split_seed: SplitSeed

    @model_validator(mode="after")
    def _mesa_settings(self) -> DefendSpec:
        """What mesa needs and only mesa takes: checked here, not by the task alone, so that
        submitting refuses it before the jobs upstream run."""
        if self.method == "mesa" and not self.search:
            raise ValueError(
                "--method mesa needs --search: a search artifact (mesa-tui run mesa) or, for "
                "submit, job:ID"
            )
        if self.method == "mesa" and self.beta is not None and self.ensemble is not None:
            raise ValueError("give either --beta or --ensemble, not both")
        given = {"--search": self.search, "--beta": self.beta, "--ensemble": self.ensemble}
        stray = [flag for flag, value in given.items() if value is not None]
        if self.method != "mesa" and stray:
            raise ValueError(f"{stray[0]} is only used by --method mesa; leave it out")
        return self

    @model_validator(mode="after")
    def _reversal_settings(self) -> DefendSpec:
        if self.reversal_from is not None and self.method not in ("point", "neural-cleanse"):
            raise ValueError("--reversal-from is only used by --method point or neural-cleanse")
        if self.point_index is not None and self.point_index >= self.point_restarts:
            raise ValueError(
                f"invalid --point-index {self.point_index}: there are {self.point_restarts} "
                f"restarts; use 0..{self.point_restarts - 1} or leave it out to cycle through all"
            )
        return self

    @model_validator(mode="after")
    def _one_anp_rule(self) -> DefendSpec:
        if self.anp_prune_count is not None and self.anp_max_acc_drop is not None:
            raise ValueError(
                f"--anp-prune-count {self.anp_prune_count} and --anp-max-acc-drop "
                f"{self.anp_max_acc_drop:g} are two pruning rules; give one of them"
            )
        return self

    def repair_config(self):  # noqa: ANN201  (engine.ml.repair.RepairConfig: torch, imported here)
        """The repair loop's settings for ``engine.ml.repair``."""
        from engine.ml.repair import RepairConfig

        return RepairConfig(
            epochs=self.epochs,
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            batch_size=self.batch_size,
            stamp_rate=self.stamp_rate,
            placement=self.placement,
            augment=self.augment,
            channels_last=self.channels_last,
            eval_batch_size=self.eval_batch_size,
        )

    def anp_config(self):  # noqa: ANN201  (engine.ml.anp.ANPConfig: torch, imported here)
        """ANP's mask optimisation and pruning settings for ``engine.ml.anp``."""
        from engine.ml.anp import ANPConfig

        return ANPConfig(
            iterations=self.anp_iterations,
            batch_size=self.anp_batch_size,
            lr=self.anp_lr,
            eps=self.anp_eps,
            steps=self.anp_steps,
            alpha=self.anp_alpha,
            threshold=self.anp_threshold,
            prune_count=self.anp_prune_count,
            max_acc_drop=self.anp_max_acc_drop,
        )


SPEC_CLASSES["defend"] = DefendSpec
PRESETS["defend"] = {
    # Neural Cleanse's original budget (1000 x 31 x 32) takes long on a CPU; a tenth of it.
    # The recent defenses' own budgets are long on a CPU too, counted in plain repair epochs of
    # the 8,000 defender images (about 8 s each for the small network on one bf16 thread): ANP's
    # 2,000 mask steps of 128 about 75 (three passes a step), I-BAU's 5 rounds 40 to 100 (a
    # hypergradient step costs 8 to 20 plain ones), FT-SAM's 100 epochs about 200 (two passes a
    # batch). cpu-quick keeps a quarter, two fifths and a fifth of them; CLP needs no data.
    "cpu-quick": {
        "nc_epochs": 100,
        "residual_steps": 150,
        "anp_iterations": 500,
        "ibau_rounds": 2,
        "sam_epochs": 20,
    },
    "paper": {"epochs": 10, "lr": 1e-3, "momentum": 0.9, "batch_size": 128, "stamp_rate": 0.01},
}
