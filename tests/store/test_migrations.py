"""The migrations produce exactly the models; old databases are refused, then upgraded."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory

from engine.errors import UserError
from store import db as dbmod
from store.migrations import HEAD, alembic_config, known_revisions
from store.models import Base
from store.repository import Store, upgrade


def test_head_constant_matches_the_scripts(tmp_path):
    script = ScriptDirectory.from_config(alembic_config(f"sqlite:///{tmp_path}/x.db"))
    assert script.get_current_head() == HEAD
    assert {r.revision for r in script.walk_revisions()} == known_revisions()


def test_migrations_produce_exactly_the_models(store_url):
    url = store_url
    command.upgrade(alembic_config(url), "head")
    engine = dbmod.make_engine(url)
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(ctx, Base.metadata)
    engine.dispose()
    assert diff == []


def test_fresh_database_is_created_at_head(tmp_path):
    url = f"sqlite:///{tmp_path}/fresh.db"
    store = Store(url)
    assert dbmod.current_revision(store.engine) == HEAD
    with store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000
    store.close()


def test_older_schema_is_refused_then_upgraded(store_url):
    url = store_url
    command.upgrade(alembic_config(url), "0001")
    with pytest.raises(UserError, match=r"run `mesa-tui db upgrade`"):
        Store(url)
    before, after = upgrade(url)
    assert (before, after) == ("0001", HEAD)
    store = Store(url)
    assert store.list_jobs() == []
    store.close()


def test_upgrade_backfills_trigger_and_target_from_specs_and_upstream_jobs(store_url):
    """A store at 0003 (no trigger or target columns) upgraded: an attack's come from its spec,
    a clean model has none, a detection, search or repair takes its attack's trigger (and target,
    where its spec names none or a reference), a job outside any pipeline its study's trigger;
    a label is never read, so a repair of a model given by path keeps none."""
    import sqlalchemy as sa

    url = store_url
    command.upgrade(alembic_config(url), "0003")
    when = datetime(2026, 12, 1, tzinfo=UTC).replace(tzinfo=None)
    jobs = sa.table(
        "jobs",
        *(sa.column(c) for c in ("id", "kind", "label", "spec_hash", "status", "executor")),
        *(sa.column(c) for c in ("priority", "max_attempts", "attempts", "created_at")),
        sa.column("updated_at"),
        sa.column("spec", sa.JSON()),
    )
    deps = sa.table(
        "job_dependencies",
        sa.column("job_id"),
        sa.column("depends_on_id"),
        sa.column("input_field"),
    )
    old = [
        (1, "train", "clean cifar10", {"trigger": None, "target": 0}),
        (2, "train", "attack bw:85 -> 3", {"trigger": "bw:85", "target": 3, "init_from": "job:1"}),
        (3, "detect", "detect bw:85 -> 3", {"model": "job:2"}),
        (4, "mesa", "mesa bw:85 -> 3", {"model": "job:2", "target": "job:3:flagged"}),
        (5, "defend", "mesa bw:85 -> 3", {"model": "job:2", "search": "job:4", "target": None}),
        (6, "defend", "point bw:85 -> 3", {"model": "job:2", "method": "point", "target": 5}),
        (7, "defend", "point bw:7 -> 0", {"model": "/models/m", "method": "point"}),
        (8, "defend", "finetune", {"model": "/models/m", "method": "finetune"}),
    ]
    links = [(2, 1, "init_from"), (3, 2, "model"), (4, 2, "model"), (4, 3, "target:flagged")]
    links += [(5, 2, "model"), (5, 4, "search"), (6, 2, "model")]
    engine = dbmod.make_engine(url)
    with engine.begin() as conn:
        conn.execute(
            sa.insert(jobs),
            [
                {"id": i, "kind": kind, "label": label, "spec": spec, "spec_hash": f"h{i}"}
                | {"status": "succeeded", "executor": "engine", "priority": 0}
                | {"max_attempts": 3, "attempts": 1, "created_at": when, "updated_at": when}
                for i, kind, label, spec in old
            ],
        )
        conn.execute(
            sa.insert(deps),
            [dict(zip(("job_id", "depends_on_id", "input_field"), d, strict=True)) for d in links],
        )
        conn.exec_driver_sql(
            "INSERT INTO studies (id, name, template, params, created_at) "
            "VALUES (1, 'mini', 'cpu-mini', '{}', '2026-12-01 00:00:00')"
        )
        conn.exec_driver_sql(
            "INSERT INTO study_jobs (study_id, job_id, role, trigger) "
            "VALUES (1, 8, 'defend', 'color:3')"
        )
    engine.dispose()
    assert upgrade(url) == ("0003", HEAD)
    store = Store(url)
    found = {s.id: (s.trigger, s.target) for s in store.list_jobs()}
    store.close()
    assert found == {
        1: (None, None),
        2: ("bw:85", 3),
        3: ("bw:85", 3),
        4: ("bw:85", 3),
        5: ("bw:85", 3),
        6: ("bw:85", 5),
        7: (None, None),
        8: ("color:3", None),
    }
