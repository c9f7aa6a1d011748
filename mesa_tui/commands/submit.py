"""``mesa-tui submit ...``: queue jobs for the engine (it need not be running).

The options of each kind are its spec's fields, as in ``run`` (``model_options``); the spec is
validated before anything is written, so a bad value exits 2 with one line and no job. A path
setting can name a job instead (``--model job:12``): the engine passes that job's artifact at
launch, once the job has succeeded.
"""

from __future__ import annotations

from typing import Any

import typer

from mesa_tui.commands.common import cli_errors, print_json
from mesa_tui.commands.model_options import Given, spec_command

app = typer.Typer(
    help="Queue jobs for the engine (see `mesa-tui engine start`).", no_args_is_help=True
)

EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
REFERENCE_FIELDS = ("model", "search", "init_from")


def parse_extra(args: list[str]) -> dict[str, Any]:
    """``--epochs 2 --no-augment --lr=0.1`` -> {"epochs": "2", "augment": False, "lr": "0.1"}."""
    from engine.errors import UserError

    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or len(token) < 3:
            raise UserError(f"unexpected argument '{token}'; give settings as --name value")
        name, eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if eq:
            values[key] = value
        elif key.startswith("no_") and (i + 1 >= len(args) or args[i + 1].startswith("--")):
            values[key[3:]] = False
        elif i + 1 < len(args) and not args[i + 1].startswith("--"):
            values[key] = args[i + 1]
            i += 1
        else:
            values[key] = True
        i += 1
    return values


def submit_one(
    kind: str, given: Given, priority: int, max_attempts: int, json_output: bool
) -> None:
    from engine.pipelines import reference_hash, resolve_reference
    from engine.spec_fields import option_name
    from engine.specs import build_spec
    from mesa_tui.commands.jobs import open_store
    from store.entities import NewJob

    values = given.values
    references = {
        k: v
        for k, v in values.items()
        if k in REFERENCE_FIELDS and isinstance(v, str) and resolve_reference(v)
    }
    placeholders = {k: "job" for k in references}
    spec = build_spec(kind, given.preset, given.config, {**values, **placeholders})
    if kind == "train":
        from engine.specs import check_against_dataset

        check_against_dataset(spec)
    if kind == "defend":
        from engine.specs import check_method_settings

        check_method_settings([spec.method], {k: option_name(k) for k in values})
    data = spec.to_json()
    data.update(references)
    store = open_store()
    depends = []
    for field, ref in references.items():
        upstream, _ = resolve_reference(ref)
        if upstream.startswith("#"):
            from engine.errors import UserError

            raise UserError(
                f"invalid --{field.replace('_', '-')} {ref!r}: give job:ID with a job id"
            )
        store.job(int(upstream))
        depends.append((int(upstream), field))
    label = " ".join(
        f"{k}={data[k]}" for k in ("trigger", "method", "target") if data.get(k) is not None
    )
    (job_id,) = store.submit(
        [
            NewJob(
                kind=kind,
                spec=data,
                spec_hash=reference_hash(data),
                label=label,
                depends_on=tuple(depends),
                priority=priority,
                max_attempts=max_attempts,
            )
        ]
    )
    if json_output:
        print_json({"jobs": [job_id]})
    else:
        typer.echo(f"job {job_id} queued ({kind}){_engine_hint(store)}")


def _engine_hint(store: Any) -> str:
    return (
        ""
        if store.engines(alive_only=True)
        else "; no engine is running: start one with `mesa-tui engine start --detach`"
    )


def _kind_command(kind: str, doc: str) -> None:
    @spec_command(app, kind, help=doc)
    def command(
        given: Given,
        priority: int = typer.Option(0, help="higher runs first"),
        max_attempts: int = typer.Option(
            3, "--max-attempts", help="attempts before a lost job gives up"
        ),
        json_output: bool = typer.Option(False, "--json", help='print {"jobs": ids}'),
    ) -> None:
        submit_one(kind, given, priority, max_attempts, json_output)


_kind_command("train", "Queue a training (the attack, or clean).")
_kind_command("mesa", "Queue a MESA search (--model PATH or job:ID).")
_kind_command("detect", "Queue a target-class detection (--model PATH or job:ID).")
_kind_command("defend", "Queue a defense (--method ...; --model PATH or job:ID).")


@app.command("pipeline", context_settings=EXTRA)
@cli_errors
def pipeline(
    ctx: typer.Context,
    preset: str | None = typer.Option(
        "cpu-quick", help="preset applied to every stage that has it"
    ),
    trigger: str = typer.Option("bw:170", help="bw:ID, color:SEED, square:white or file:PATH"),
    target: str = typer.Option(
        "auto",
        help="auto: detect the attacked class first (a real defender); N: tell the search (oracle)",
    ),
    methods: str | None = typer.Option(
        None,
        help="comma list of mesa, mesa-0.9, mesa-ensemble, ideal, point, neural-cleanse, finetune, random-patch, anp, i-bau, clp, ft-sam, or all",
    ),
    seed: int = typer.Option(0, help="seed of every stage"),
    priority: int = typer.Option(0, help="higher runs first"),
    reuse: bool = typer.Option(True, "--reuse/--no-reuse", help="reuse identical finished jobs"),
    follow: bool = typer.Option(False, "--follow", help="follow the jobs to the results table"),
    json_output: bool = typer.Option(False, "--json", help='print {"jobs": ids, "reused": ids}'),
) -> None:
    """Queue train (attack) -> detect (with --target auto) -> mesa -> defend per method,
    passing artifacts by reference. Stage settings pass through: --epochs, --steps, --stamp-rate ... go to every
    stage that has them; --train-epochs, --defend-epochs ... to one stage."""
    import dataclasses

    from engine.pipelines import apply_reuse, build_pipeline, parse_methods
    from mesa_tui.commands.jobs import open_store

    overrides = parse_extra(list(ctx.args))
    built = build_pipeline(
        preset=preset,
        trigger=trigger,
        target=target,
        methods=parse_methods(methods),
        overrides=overrides,
        seed=seed,
    )
    jobs = [dataclasses.replace(j, priority=priority) for j in built.jobs]
    store = open_store()
    if reuse:
        jobs = apply_reuse(store, jobs)
    ids = store.submit(jobs)
    reused = [i for i, j in zip(ids, jobs, strict=True) if j.reuse_of is not None]
    if json_output:
        print_json({"jobs": ids, "reused": reused})
        return
    typer.echo(
        f"pipeline queued: jobs {', '.join(map(str, ids))}"
        + (f" (reused {', '.join(map(str, reused))})" if reused else "")
    )
    from engine.pipelines import routing_notes

    for note in routing_notes(overrides):
        typer.echo(note)
    if target != "auto":
        typer.echo(
            f"note: --target {target} is the oracle shortcut (the search is told the attacked class); --target auto detects it"
        )
    hint = _engine_hint(store)
    if hint:
        typer.echo(hint.lstrip("; "))
    if follow:
        from mesa_tui.commands.jobs import follow_jobs

        jobs_now = follow_jobs(store, list(dict.fromkeys(ids)))
        if any(j.status in ("failed", "lost") for j in jobs_now):
            raise typer.Exit(1)
