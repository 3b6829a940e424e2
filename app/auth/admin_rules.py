"""Rules that keep the admin API reachable, checked inside the store's transactions.

- The configured admin key (`auth.admin_key` / `auth.admin_key_file`) is owned by the
  settings: it cannot be rotated, revoked, demoted or given validity dates through the API or
  the CLI (a rotation would be undone at the next start, which recreates the configured
  secret). To change it, change the setting and restart; the old key then remains an ordinary
  admin key that may be rotated or revoked.
- The last active admin key cannot be revoked, demoted or made invalid: that would lock
  everyone out of the admin API.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import func, select, text, update
from sqlalchemy.orm import Session

from app.auth.keys import now
from app.auth.models import ApiKey
from backends.errors import InvalidRequest

_ADMIN_CHANGES_LOCK = 0x11A_AD1  # Postgres advisory lock id of changes that affect admins
OWNED_BY_SETTINGS = ("role", "valid_from", "expires_at")  # fields of a configured key
CONFIGURED_PREFIX = "(settings)"  # the configured key's display prefix: none of its secret


def serialise(session: Session) -> None:
    """Take the store's write lock before reading, so that two concurrent changes cannot
    each see the other's admin as the one left (and both go through)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": _ADMIN_CHANGES_LOCK})
    else:  # SQLite: a write, even of no row, takes the database's write lock
        session.execute(update(ApiKey).where(ApiKey.id == -1).values(name=ApiKey.name)
                        .execution_options(synchronize_session=False))


def refuse_if_configured(row: ApiKey, configured_hash: str | None, action: str) -> None:
    if configured_hash is not None and row.secret_hash == configured_hash:
        raise InvalidRequest(
            f"Key {row.id} is the admin key configured in the settings (auth.admin_key or "
            f"auth.admin_key_file), so it cannot be {action} here: the next start would undo "
            "it. To replace it, set a new auth.admin_key and restart; the old key then stays "
            "an ordinary admin key that can be rotated or revoked.", param="id")


def is_active_admin(row: ApiKey, moment: datetime) -> bool:
    return (row.role == "admin" and row.revoked_at is None
            and (row.valid_from is None or row.valid_from <= moment)
            and (row.expires_at is None or moment < row.expires_at))


def keep_an_admin(session: Session, row: ApiKey, was_active: bool, action: str) -> None:
    """Refuse the (flushed) change of `row` when it removed the last active admin key."""
    moment = now()
    if not was_active or is_active_admin(row, moment):
        return
    active = session.scalar(select(func.count()).select_from(ApiKey).where(
        ApiKey.role == "admin", ApiKey.revoked_at.is_(None),
        ApiKey.valid_from.is_(None) | (ApiKey.valid_from <= moment),
        ApiKey.expires_at.is_(None) | (ApiKey.expires_at > moment)))
    if not active:
        raise InvalidRequest(
            f"Key {row.id} is the last active admin key: {action} it would lock everyone out "
            "of the admin API. Create another admin key first (or rotate this one to replace "
            "its secret).", param="id")
