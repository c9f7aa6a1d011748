"""Settings are named MESA_TUI_*; the five documented under MESA_* before still work, warned."""

import pytest

from store import environment, paths


def test_the_old_name_still_works_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.delenv("MESA_TUI_DB", raising=False)
    monkeypatch.setenv("MESA_DB", f"sqlite:///{tmp_path}/old.db")
    monkeypatch.setattr(environment, "_warned", set())
    with pytest.warns(FutureWarning, match="MESA_DB is renamed MESA_TUI_DB"):
        assert paths.default_db_url() == f"sqlite:///{tmp_path}/old.db"


def test_the_new_name_wins_without_a_warning(monkeypatch, recwarn):
    monkeypatch.setenv("MESA_TUI_HOME", "/new")
    monkeypatch.setenv("MESA_HOME", "/old")
    assert str(paths.data_home()) == "/new/data"
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]
