"""Alembic migrations of the key and usage store, applied at startup (app.auth.store)."""
