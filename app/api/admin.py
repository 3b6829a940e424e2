"""Key management (admins) and usage reports (/usage for the caller, /admin/usage for all)."""

from __future__ import annotations

import re
from datetime import date
from typing import Annotated, Any

from anyio import to_thread
from fastapi import APIRouter, Path, Query
from pydantic import BeforeValidator

from app.api.docs import KEY_ERRORS, errors
from app.auth.deps import AccountsDep, KeyDep
from app.auth.schemas import (
    KeyCreate,
    KeyCreated,
    KeyInfo,
    KeyUpdate,
    RevokeRequest,
    UsageReport,
)
from app.auth.usage import usage_report
from app.errors import InvalidParams
from app.json_body import JSONBodyRoute
from app.json_types import MAX_EXACT_INT

router = APIRouter(tags=["usage"], route_class=JSONBodyRoute)
admin = APIRouter(prefix="/admin", tags=["admin"], route_class=JSONBodyRoute)


def _iso_day(value: Any) -> Any:
    """Days are YYYY-MM-DD only: pydantic would also read '0' or '1700000000' as a day (a
    Unix time), which the OpenAPI `format: date` does not allow."""
    if isinstance(value, str) and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ValueError("must be a day written YYYY-MM-DD")
    return value


Day = Annotated[date, BeforeValidator(_iso_day)]
From = Annotated[Day | None, Query(alias="from", description="First day (YYYY-MM-DD), UTC.")]
To = Annotated[Day | None, Query(alias="to", description="Last day (YYYY-MM-DD), inclusive.")]
KeyId = Annotated[int, Path(ge=1, le=MAX_EXACT_INT, description="The key's id.")]
KeyIdFilter = Annotated[int | None, Query(ge=1, le=MAX_EXACT_INT, description="Only this key.")]


@router.get("/usage", response_model_by_alias=True)
async def my_usage(key: KeyDep, accounts: AccountsDep, start: From = None,
                   end: To = None) -> UsageReport:
    """The calling key's usage: totals and one row per day (requests, errors, prompt and
    completion tokens, prompt words). Without auth: the requests made without a key."""
    return await to_thread.run_sync(lambda: usage_report(
        accounts.store, key.id if key else None, None, start, end))


@admin.get("/usage", response_model_by_alias=True)
async def all_usage(accounts: AccountsDep, start: From = None, end: To = None,
                    key_id: KeyIdFilter = None, model: str | None = None) -> UsageReport:
    """Usage of every key, or of one (`key_id`), one `model`, between two days."""
    return await to_thread.run_sync(lambda: usage_report(
        accounts.store, key_id, model, start, end, all_keys=True))


@admin.post("/keys", status_code=201)
async def create_key(body: KeyCreate, accounts: AccountsDep) -> KeyCreated:
    """Create a key. The response holds its secret: the only time it is shown."""
    return await to_thread.run_sync(accounts.store.create, body)


@admin.get("/keys")
async def list_keys(accounts: AccountsDep) -> list[KeyInfo]:
    """Every key with its limits and counters (never a secret)."""
    return await to_thread.run_sync(accounts.store.list)


@admin.get("/keys/{key_id}", responses=errors(*KEY_ERRORS))
async def show_key(key_id: KeyId, accounts: AccountsDep) -> KeyInfo:
    return await to_thread.run_sync(accounts.store.get, key_id)


@admin.patch("/keys/{key_id}", responses=errors(400, *KEY_ERRORS))
async def update_key(key_id: KeyId, body: KeyUpdate, accounts: AccountsDep) -> KeyInfo:
    """Change the fields sent; null clears a limit or a date."""
    try:
        changes = body.changes()
    except ValueError as exc:
        raise InvalidParams(str(exc)) from None
    return await to_thread.run_sync(accounts.store.update, key_id, changes)


@admin.post("/keys/{key_id}/revoke", responses=errors(400, *KEY_ERRORS))
async def revoke_key(key_id: KeyId, accounts: AccountsDep,
                     body: RevokeRequest | None = None) -> KeyInfo:
    """Revoke a key for good (its usage stays on record)."""
    reason = body.reason if body else None
    return await to_thread.run_sync(accounts.store.revoke, key_id, reason)


@admin.post("/keys/{key_id}/rotate", responses=errors(400, *KEY_ERRORS))
async def rotate_key(key_id: KeyId, accounts: AccountsDep) -> KeyCreated:
    """A new secret for the same key; the old secret stops working at once."""
    return await to_thread.run_sync(accounts.store.rotate, key_id)

