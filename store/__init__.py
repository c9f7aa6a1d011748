"""The store: tables (models), value objects (entities), every query (repository), migrations.

No torch and no textual here; open it with ``store.repository.Store()``.
"""
