"""A job's trigger and target class as columns (the backdoor it plants or works against), so the
app and the engine stop reading them from the job's free-text label.

Existing jobs are backfilled in id order (an upstream job always has the smaller id): a spec with
a ``trigger`` field (train) gives its trigger and target, none for a clean one; any other job
takes the trigger of the job its ``model``, ``search`` or ``init_from`` dependency names (its
attack), else its study's trigger, and its spec's target, else the upstream one. Labels are not
read: a job with none of these (a repair of a model given by path, or whose upstream job was
deleted) keeps NULL. The rule is ``store.entities.backdoor_of``'s, copied here so this revision
stays what it is when that code changes.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-20 09:00:00
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import context, op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UPSTREAM_FIELDS = ("model", "search", "init_from")
NO_TRIGGER = ("", "none", "clean")

jobs = sa.table(
    "jobs",
    sa.column("id", sa.Integer()),
    sa.column("spec", sa.JSON()),
    sa.column("trigger", sa.Text()),
    sa.column("target", sa.Integer()),
)
deps = sa.table(
    "job_dependencies",
    sa.column("job_id", sa.Integer()),
    sa.column("depends_on_id", sa.Integer()),
    sa.column("input_field", sa.String()),
)
study_jobs = sa.table(
    "study_jobs",
    sa.column("job_id", sa.Integer()),
    sa.column("study_id", sa.Integer()),
    sa.column("trigger", sa.String()),
)


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trigger", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("target", sa.Integer(), nullable=True))
    if not context.is_offline_mode():  # SQL scripts have no rows to read
        backfill(op.get_bind())


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("target")
        batch_op.drop_column("trigger")


def _target(spec: dict[str, Any]) -> int | None:
    value = spec.get("target")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _backdoor(
    spec: dict[str, Any], upstream: tuple[str | None, int | None] | None, study: str | None
) -> tuple[str | None, int | None]:
    target = _target(spec)
    if "trigger" in spec:
        value = spec["trigger"]
        trigger = value if isinstance(value, str) and value.lower() not in NO_TRIGGER else None
        return trigger, (target if trigger is not None else None)
    up_trigger, up_target = upstream or (None, None)
    return up_trigger or study, (target if target is not None else up_target)


def backfill(conn: sa.Connection) -> None:
    """Set every job's trigger and target from its spec, its upstream job or its study."""
    upstream: dict[int, dict[str, int]] = {}
    for d in conn.execute(
        sa.select(deps.c.job_id, deps.c.depends_on_id, deps.c.input_field).where(
            deps.c.input_field.in_(UPSTREAM_FIELDS)
        )
    ):
        upstream.setdefault(d.job_id, {})[d.input_field] = d.depends_on_id
    study: dict[int, str] = {}
    for s in conn.execute(
        sa.select(study_jobs.c.job_id, study_jobs.c.trigger)
        .where(study_jobs.c.trigger.is_not(None))
        .order_by(study_jobs.c.study_id)
    ):
        study.setdefault(s.job_id, s.trigger)
    found: dict[int, tuple[str | None, int | None]] = {}
    rows = conn.execute(sa.select(jobs.c.id, jobs.c.spec).order_by(jobs.c.id)).all()
    for row in rows:
        spec = row.spec if isinstance(row.spec, dict) else {}
        links = upstream.get(row.id, {})
        up = next((links[f] for f in UPSTREAM_FIELDS if f in links), None)
        found[row.id] = _backdoor(
            spec, found.get(up) if up is not None else None, study.get(row.id)
        )
    changed = [
        {"job": job_id, "trigger": trigger, "target": target}
        for job_id, (trigger, target) in found.items()
        if trigger is not None or target is not None
    ]
    if changed:
        conn.execute(
            jobs.update()
            .where(jobs.c.id == sa.bindparam("job"))
            .values(trigger=sa.bindparam("trigger"), target=sa.bindparam("target")),
            changed,
        )
