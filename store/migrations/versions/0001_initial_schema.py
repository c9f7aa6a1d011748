"""Initial schema: jobs, runs, metrics, artifacts, studies, engines and their links.

Revision ID: 0001
Revises:
Create Date: 2026-11-28 03:23:15.847109
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

import store.models

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "engines",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=100), nullable=False),
        sa.Column("executor", sa.String(length=40), nullable=False),
        sa.Column("slots", sa.Integer(), nullable=False),
        sa.Column("slots_used", sa.Integer(), nullable=False),
        sa.Column("gpus", sa.JSON(), nullable=False),
        sa.Column("log_path", sa.Text(), nullable=True),
        sa.Column("started_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("heartbeat_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("stop_requested_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("stopped_at", store.models.UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_engines")),
    )
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_engines_heartbeat_at"), ["heartbeat_at"], unique=False)

    op.create_table(
        "studies",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("template", sa.String(length=100), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("created_at", store.models.UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_studies")),
        sa.UniqueConstraint("name", name=op.f("uq_studies_name")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("label", sa.String(length=200), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(length=64), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("executor", sa.String(length=40), nullable=False),
        sa.Column("engine_id", sa.Integer(), nullable=True),
        sa.Column("workdir", sa.Text(), nullable=True),
        sa.Column("code_version", sa.String(length=100), nullable=True),
        sa.Column("dataset_hash", sa.String(length=64), nullable=True),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("reused_from", sa.Integer(), nullable=True),
        sa.Column("cancel_requested_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("created_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("updated_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("started_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("ended_at", store.models.UTCDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["engine_id"],
            ["engines.id"],
            name=op.f("fk_jobs_engine_id_engines"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_kind_spec_hash", ["kind", "spec_hash"], unique=False)
        batch_op.create_index(
            "ix_jobs_status_priority_id", ["status", "priority", "id"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_jobs_updated_at"), ["updated_at"], unique=False)

    op.create_table(
        "job_dependencies",
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("depends_on_id", sa.Integer(), nullable=False),
        sa.Column("input_field", sa.String(length=60), nullable=True),
        sa.ForeignKeyConstraint(
            ["depends_on_id"],
            ["jobs.id"],
            name=op.f("fk_job_dependencies_depends_on_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_job_dependencies_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "depends_on_id", name=op.f("pk_job_dependencies")),
    )
    with op.batch_alter_table("job_dependencies", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_job_dependencies_depends_on_id"), ["depends_on_id"], unique=False
        )

    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=20), nullable=False),
        sa.Column("executor", sa.String(length=40), nullable=False),
        sa.Column("engine_id", sa.Integer(), nullable=True),
        sa.Column("external_id", sa.String(length=100), nullable=True),
        sa.Column("host", sa.String(length=255), nullable=True),
        sa.Column("gpu", sa.String(length=40), nullable=True),
        sa.Column("resumed", sa.Boolean(), nullable=False),
        sa.Column("start_step", sa.Integer(), nullable=True),
        sa.Column("started_at", store.models.UTCDateTime(), nullable=False),
        sa.Column("ended_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("heartbeat_at", store.models.UTCDateTime(), nullable=True),
        sa.Column("expect_next_by", store.models.UTCDateTime(), nullable=True),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.Column("code_version", sa.String(length=100), nullable=True),
        sa.Column("spec_hash", sa.String(length=64), nullable=True),
        sa.Column("dataset_hash", sa.String(length=64), nullable=True),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(
            ["engine_id"],
            ["engines.id"],
            name=op.f("fk_runs_engine_id_engines"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_runs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
    )
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_runs_engine_id"), ["engine_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_runs_job_id"), ["job_id"], unique=False)
        batch_op.create_index(
            "ix_runs_status_expect_next_by", ["status", "expect_next_by"], unique=False
        )

    op.create_table(
        "study_jobs",
        sa.Column("study_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=40), nullable=False),
        sa.Column("trigger", sa.String(length=100), nullable=True),
        sa.Column("method", sa.String(length=100), nullable=True),
        sa.Column("seed", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_study_jobs_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["study_id"],
            ["studies.id"],
            name=op.f("fk_study_jobs_study_id_studies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("study_id", "job_id", name=op.f("pk_study_jobs")),
    )
    with op.batch_alter_table("study_jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_study_jobs_job_id"), ["job_id"], unique=False)

    op.create_table(
        "artifacts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("job_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=40), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("bytes", sa.Integer(), nullable=True),
        sa.Column("created_at", store.models.UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_artifacts_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_artifacts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_artifacts")),
    )
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_artifacts_job_id"), ["job_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_artifacts_run_id"), ["run_id"], unique=False)

    op.create_table(
        "latest_metrics",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("wall_time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_latest_metrics_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "key", name=op.f("pk_latest_metrics")),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("wall_time", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_metrics_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
    )
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.create_index("ix_metrics_run_id_id", ["run_id", "id"], unique=False)
        batch_op.create_index("ix_metrics_run_id_key_step", ["run_id", "key", "step"], unique=True)

    op.create_table(
        "params",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_params_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", "key", name=op.f("pk_params")),
    )


def downgrade() -> None:
    op.drop_table("params")
    with op.batch_alter_table("metrics", schema=None) as batch_op:
        batch_op.drop_index("ix_metrics_run_id_key_step")
        batch_op.drop_index("ix_metrics_run_id_id")

    op.drop_table("metrics")
    op.drop_table("latest_metrics")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_artifacts_run_id"))
        batch_op.drop_index(batch_op.f("ix_artifacts_job_id"))

    op.drop_table("artifacts")
    with op.batch_alter_table("study_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_study_jobs_job_id"))

    op.drop_table("study_jobs")
    with op.batch_alter_table("runs", schema=None) as batch_op:
        batch_op.drop_index("ix_runs_status_expect_next_by")
        batch_op.drop_index(batch_op.f("ix_runs_job_id"))
        batch_op.drop_index(batch_op.f("ix_runs_engine_id"))

    op.drop_table("runs")
    with op.batch_alter_table("job_dependencies", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_job_dependencies_depends_on_id"))

    op.drop_table("job_dependencies")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_updated_at"))
        batch_op.drop_index("ix_jobs_status_priority_id")
        batch_op.drop_index("ix_jobs_kind_spec_hash")

    op.drop_table("jobs")
    op.drop_table("studies")
    with op.batch_alter_table("engines", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_engines_heartbeat_at"))

    op.drop_table("engines")
