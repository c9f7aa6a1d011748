"""What differs between SQLite and PostgreSQL sits behind store.db's helpers; bad URLs are one
line naming the URL and the fix."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite

from engine.errors import UserError
from store import db as dbmod
from store.repository import Store, jobs_t


class _Dialect:
    def __init__(self, dialect):
        self.dialect = dialect


def test_claim_locking_is_skip_locked_on_postgresql_only():
    stmt = select(jobs_t.c.id).where(jobs_t.c.status == "queued").limit(3)
    pg = postgresql.dialect()
    locked = dbmod.claim_lock_clause(stmt, _Dialect(pg))
    assert "FOR UPDATE SKIP LOCKED" in str(locked.compile(dialect=pg))
    lite = sqlite.dialect()
    assert "FOR UPDATE" not in str(
        dbmod.claim_lock_clause(stmt, _Dialect(lite)).compile(dialect=lite)
    )


def test_postgresql_urls_mean_psycopg_and_json_refuses_nan_there():
    assert dbmod.check_url("postgresql://u:pw@h/db") == "postgresql+psycopg://u:pw@h/db"
    assert dbmod.safe_url("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"
    assert dbmod.json_dumps({"a": [1.0, float("nan")], "b": float("inf")}) == (
        '{"a": [1.0, null], "b": null}'
    )


@pytest.mark.parametrize(
    "url, message",
    [
        ("mysql://u@h/db", "the mysql database is not supported"),
        ("postgresql+psycopg2://u@h/db", "driver psycopg2 is not supported"),
        ("nonsense", "is not a database URL"),
        ("postgresql+psycopg://u:secret@127.0.0.1:1/db", "cannot open the store"),
    ],
)
def test_bad_store_urls_are_one_line_user_errors(url, message):
    if "127.0.0.1" in url:
        pytest.importorskip("psycopg", reason="psycopg is not installed (the postgres extra)")
    with pytest.raises(UserError, match=message) as info:
        Store(url)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)
