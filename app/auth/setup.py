"""Opening the store at startup: migrations, the admin key bootstrap."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import sys
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy.exc import InterfaceError, OperationalError

from app.auth.limits import make_limiter
from app.auth.meter import Accounts
from app.auth.schemas import KeyCreated, KeyLimits
from app.auth.store import KeyStore
from app.errors import StoreUnavailable, response_for
from app.settings import Settings

log = logging.getLogger(__name__)


def _store_errors() -> tuple[type[Exception], ...]:
    errors: tuple[type[Exception], ...] = (OperationalError, InterfaceError)
    with contextlib.suppress(ImportError):
        from redis.exceptions import ConnectionError as RedisDown
        from redis.exceptions import TimeoutError as RedisSlow

        errors += (RedisDown, RedisSlow)
    return errors


STORE_ERRORS = _store_errors()  # a store or Redis that cannot be reached


def store_unavailable(exc: Exception | None = None) -> StoreUnavailable:
    """The 503 for a store or Redis that cannot be reached (logged, without details)."""
    log.error("the key store or the rate-limit counters are unreachable: %s",
              type(exc).__name__ if exc is not None else "unknown")
    return StoreUnavailable("The key and usage store is unavailable right now; retry shortly.")


def install_store_errors(app: FastAPI) -> None:
    """A store or Redis that cannot be reached answers 503, not an engine failure."""

    async def unavailable(_: Request, exc: Exception) -> JSONResponse:
        return response_for(store_unavailable(exc))

    for error in STORE_ERRORS:
        app.add_exception_handler(error, unavailable)


def open_accounts(settings: Settings) -> Accounts:
    """The store and the limiter the settings name (nothing is connected yet)."""
    configured = settings.auth.configured_admin_key() if settings.auth.enabled else None
    return Accounts(store=KeyStore(settings.store_url(), configured_admin=configured),
                    limiter=make_limiter(settings.redis_url), enabled=settings.auth.enabled)


def prepare_store(store: KeyStore, settings: Settings) -> None:
    """Apply migrations; with auth on, make sure an admin key exists; open this process's
    reservation lease, freeing what processes that died held (blocking)."""
    with store.exclusive():
        _prepare(store, settings)
    store.leases.open()


def _prepare(store: KeyStore, settings: Settings) -> None:
    store.migrate()
    log.info("key and usage store: %s", store.describe())
    if not settings.auth.enabled:
        log.warning("auth.enabled is false: every route is open to anyone who can reach the "
                    "server, without keys, quotas or rate limits")
        return
    configured = settings.auth.configured_admin_key()
    if configured is not None:
        warn_if_readable(settings.auth.admin_key_file)
        admin = store.ensure_admin(configured)
        log.info("admin key from the settings: id %d", admin.id)  # never any of the secret
        return
    if store.count() == 0:
        announce(store.create(KeyLimits(name="admin (created at first start)", role="admin")))


def announce(created: KeyCreated) -> None:
    """Print the bootstrap admin key once, to the console only (never to the log)."""
    sys.stderr.write(
        "\n"
        "llm-api: no API key existed, so an admin key was created. It is shown only this once\n"
        "(only its hash is stored); keep it somewhere safe:\n\n"
        f"    {created.secret}\n\n"
        "Use it as 'Authorization: Bearer <key>' (or 'X-API-Key: <key>'), e.g. create a user\n"
        "key with: curl -X POST -H 'Authorization: Bearer <key>' "
        "-H 'content-type: application/json' -d '{\"name\": \"alice\"}' "
        "http://HOST:PORT/admin/keys\n"
        "or with 'llm-api keys create --name alice'. Lost it? 'llm-api keys rotate "
        f"{created.id}'.\n\n")
    sys.stderr.flush()
    log.warning("created the first admin key: id %d, printed once to the console",
                created.id)


def warn_if_readable(path: Path | None) -> None:
    """A warning when the admin key file can be read by other users (POSIX modes)."""
    if path is None or os.name != "posix":
        return
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        log.warning("auth.admin_key_file %s can be read by other users (mode %o): it holds "
                    "the admin key; chmod 600 it", path, mode)
