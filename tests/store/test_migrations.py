"""The migrations produce exactly the models; old databases are refused, then upgraded."""

from __future__ import annotations

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
