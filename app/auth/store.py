"""KeyStore: keys, atomic quota admission and settlement, usage rows (SQLite or Postgres).

Every method is blocking; the server calls them off the event loop (`anyio.to_thread`).
Quota checks are single SQL statements, so they are atomic on SQLite and Postgres alike.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import (
    Engine,
    bindparam,
    case,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from app.auth import admin_rules, keys
from app.auth.leases import LeaseKeeper, release
from app.auth.models import ApiKey, UsageRecord
from app.auth.schemas import KeyCreated, KeyInfo, KeyLimits
from app.errors import InvalidParams, KeyNotFound

log = logging.getLogger(__name__)
MIGRATIONS = Path(__file__).resolve().parent.parent / "migrations"


@dataclass(frozen=True)
class Usage:
    """One finished request, as recorded."""

    key_id: int | None
    model: str
    endpoint: str
    status: int
    prompt_tokens: int
    completion_tokens: int
    prompt_words: int
    latency_ms: float
    created_at: datetime


# The per-request statements are built once: building one costs more than running it.
_KEYS = ApiKey.__table__
_FIND = select(_KEYS).where(_KEYS.c.secret_hash == bindparam("digest"))
_RESERVE = (
    update(ApiKey)
    .where(ApiKey.id == bindparam("key_id"), ApiKey.revoked_at.is_(None),
           ApiKey.max_requests.is_(None) | (ApiKey.used_requests < ApiKey.max_requests),
           ApiKey.max_tokens.is_(None) | (ApiKey.used_tokens + ApiKey.reserved_tokens
                                          + bindparam("tokens") <= ApiKey.max_tokens))
    .values(used_requests=ApiKey.used_requests + 1,
            reserved_tokens=ApiKey.reserved_tokens + bindparam("tokens"),
            last_used_at=bindparam("now"))
    .execution_options(synchronize_session=False))
_SETTLE = (
    update(ApiKey).where(ApiKey.id == bindparam("key_id"))
    .values(used_requests=ApiKey.used_requests - bindparam("refund"),
            reserved_tokens=case(  # never below 0 (see migration 0002)
                (ApiKey.reserved_tokens > bindparam("reserved"),
                 ApiKey.reserved_tokens - bindparam("reserved")), else_=0),
            used_tokens=ApiKey.used_tokens + bindparam("used"))
    .execution_options(synchronize_session=False))
_RECORD = insert(UsageRecord)
_STARTUP_LOCK = 0x11A_A11  # the advisory lock id of llm-api's startup


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return create_engine(url, pool_size=10, max_overflow=40, pool_pre_ping=True)
    if parsed.database and parsed.database != ":memory:":
        _private_file(Path(parsed.database))
    engine = create_engine(url, connect_args={"timeout": 60, "check_same_thread": False},
                           pool_size=10, max_overflow=50)

    @event.listens_for(engine, "connect")
    def _pragmas(dbapi_connection: Any, _: Any) -> None:
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")  # readers never wait for the writer
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints, fast commits
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    return engine


def _private_file(path: Path) -> None:
    """Create the SQLite file (and its folder) readable by this user only: it holds key
    hashes and usage. SQLite gives its -wal and -shm files the database file's mode. A file
    left readable by an older version is made private."""
    if not path.parent.exists():
        path.parent.mkdir(mode=0o700, parents=True)
    try:
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        for name in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            mode = stat.S_IMODE(name.stat().st_mode) if name.exists() else 0
            if mode & 0o077:
                os.chmod(name, 0o600)
                log.info("made %s readable by its owner only (it was mode %o)", name, mode)
    except PermissionError as exc:  # another user's file: SQLite reports what it can't do
        log.warning("cannot make the store file private: %s", exc)


class KeyStore:
    """The configured store. Safe to share between threads.

    `configured_admin` is the admin key the settings configure: the store refuses to
    rotate, revoke or demote it (app.auth.admin_rules)."""

    def __init__(self, url: str, configured_admin: str | None = None) -> None:
        self.engine = make_engine(url)
        self.url = url
        self.configured_hash = keys.hash_secret(configured_admin) if configured_admin else None
        self._session = sessionmaker(self.engine, expire_on_commit=False)
        self.leases = LeaseKeeper(self.engine)  # the server opens it (app.auth.setup)

    def describe(self) -> str:
        """The URL without its password, for logs."""
        return make_url(self.url).render_as_string(hide_password=True)

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        """Serialise replicas starting together on one Postgres store (migrations and the
        admin-key bootstrap run once, not in a race)."""
        if self.engine.dialect.name != "postgresql":
            yield
            return
        with self.engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _STARTUP_LOCK})
            try:
                yield
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:id)"),
                                   {"id": _STARTUP_LOCK})
                connection.commit()

    def migrate(self) -> None:
        """Apply the Alembic migrations shipped in app/migrations (idempotent)."""
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        with self.engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "head")

    def close(self) -> None:
        self.leases.close()
        self.engine.dispose()

    # -- keys ------------------------------------------------------------------------------

    def create(self, fields: KeyLimits, secret: str | None = None,
               prefix: str | None = None) -> KeyCreated:
        """Store a new key; its secret (generated unless given) is returned only here.
        `prefix` replaces the secret's first characters as the key's display name."""
        secret = secret or keys.generate_secret()
        data = fields.model_dump()
        data["valid_from"] = keys.utc(fields.valid_from)
        data["expires_at"] = keys.utc(fields.expires_at, end_of_day=True)
        row = ApiKey(**data, secret_hash=keys.hash_secret(secret),
                     prefix=prefix or keys.display_prefix(secret), created_at=keys.now(),
                     used_requests=0, used_tokens=0, reserved_tokens=0)
        with self._session.begin() as session:
            session.add(row)
            session.flush()
            return KeyCreated(**KeyInfo.model_validate(row).model_dump(), secret=secret)

    def find(self, secret: str) -> KeyInfo | None:
        """The key with this secret, or None; the hash is compared in constant time."""
        with self.engine.connect() as connection:
            row = connection.execute(_FIND, {"digest": keys.hash_secret(secret)}).first()
        if row is None or not keys.same_hash(row.secret_hash, secret):
            return None
        return KeyInfo.model_validate(row._mapping)

    def get(self, key_id: int) -> KeyInfo:
        with self._session() as session:
            return KeyInfo.model_validate(self._row(session, key_id))

    def list(self) -> list[KeyInfo]:
        with self._session() as session:
            return [KeyInfo.model_validate(r) for r in session.scalars(
                select(ApiKey).order_by(ApiKey.id))]

    def count(self) -> int:
        with self._session() as session:
            return int(session.scalar(select(func.count()).select_from(ApiKey)) or 0)

    def update(self, key_id: int, changes: dict[str, Any]) -> KeyInfo:
        if "valid_from" in changes:
            changes["valid_from"] = keys.utc(changes["valid_from"])
        if "expires_at" in changes:
            changes["expires_at"] = keys.utc(changes["expires_at"], end_of_day=True)
        with self._session.begin() as session:
            admin_rules.serialise(session)
            row = self._row(session, key_id)
            if set(changes) & set(admin_rules.OWNED_BY_SETTINGS):
                admin_rules.refuse_if_configured(row, self.configured_hash,
                                                 "demoted or given validity dates")
            was_active = admin_rules.is_active_admin(row, keys.now())
            for name, value in changes.items():
                setattr(row, name, value)
            start, end = row.valid_from, row.expires_at
            if start is not None and end is not None and end <= start:
                raise InvalidParams("expires_at must be after valid_from.", param="expires_at")
            session.flush()
            admin_rules.keep_an_admin(session, row, was_active, "changing")
            return KeyInfo.model_validate(row)

    def revoke(self, key_id: int, reason: str | None) -> KeyInfo:
        """Revoke a key for good; never the configured admin key or the last active admin."""
        with self._session.begin() as session:
            admin_rules.serialise(session)
            row = self._row(session, key_id)
            admin_rules.refuse_if_configured(row, self.configured_hash, "revoked")
            was_active = admin_rules.is_active_admin(row, keys.now())
            if row.revoked_at is None:
                row.revoked_at, row.revoked_reason = keys.now(), reason
            session.flush()
            admin_rules.keep_an_admin(session, row, was_active, "revoking")
            return KeyInfo.model_validate(row)

    def rotate(self, key_id: int) -> KeyCreated:
        """A new secret for the same key (owner, limits, usage); the old one stops working.
        The configured admin key is refused (the settings own its secret)."""
        secret = keys.generate_secret()
        with self._session.begin() as session:
            row = self._row(session, key_id)
            admin_rules.refuse_if_configured(row, self.configured_hash, "rotated")
            row.secret_hash, row.prefix = keys.hash_secret(secret), keys.display_prefix(secret)
            session.flush()
            return KeyCreated(**KeyInfo.model_validate(row).model_dump(), secret=secret)

    def ensure_admin(self, secret: str) -> KeyInfo:
        """The configured admin key: created when missing, and made an active admin again
        if it is not one (the settings win over changes made before this rule existed).
        Its display prefix is not its first characters: an operator's key may be short."""
        digest = keys.hash_secret(secret)
        with self._session.begin() as session:
            row = session.scalars(select(ApiKey).where(ApiKey.secret_hash == digest)).first()
            if row is not None:
                if not admin_rules.is_active_admin(row, keys.now()):
                    log.warning("the admin key from the settings (id %d) was revoked, demoted "
                                "or out of its validity dates; it is an active admin again",
                                row.id)
                    row.role, row.revoked_at, row.revoked_reason = "admin", None, None
                    row.valid_from = row.expires_at = None
                row.prefix = admin_rules.CONFIGURED_PREFIX
                session.flush()
                return KeyInfo.model_validate(row)
        return self.create(KeyLimits(name="admin (from settings)", role="admin"), secret,
                           prefix=admin_rules.CONFIGURED_PREFIX)

    @staticmethod
    def _row(session: Session, key_id: int) -> ApiKey:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise KeyNotFound(f"There is no key with id {key_id}.", param="id")
        return row

    # -- quotas ----------------------------------------------------------------------------

    def reserve(self, key_id: int, tokens: int) -> str | None:
        """Count one request and reserve `tokens`, only if both quotas allow it (one atomic
        statement); the lease the tokens are held under, or None when refused."""
        with self.engine.connect() as connection:
            lease = self.leases.hold(connection, key_id, tokens) if tokens else self.leases.id
            result = connection.execute(_RESERVE, {"key_id": key_id, "tokens": tokens,
                                                   "now": keys.now()})
            if result.rowcount != 1:
                connection.rollback()  # the lease's row too
                return None
            connection.commit()
            return lease

    def settle(self, key_id: int | None, lease: str, reserved: int, used: int, refund: bool,
               usage: Usage | None) -> None:
        """Turn a reservation held under `lease` into the real count (refunding the request
        when it never ran) and record the request, in one transaction."""
        with self.engine.begin() as connection:
            if key_id is not None:
                held = release(connection, lease, key_id, reserved) if reserved else 0
                connection.execute(_SETTLE, {"key_id": key_id, "refund": int(refund),
                                             "reserved": held, "used": used})
            if usage is not None:
                connection.execute(_RECORD, {**usage.__dict__, "day": usage.created_at.date()})
