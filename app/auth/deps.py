"""FastAPI dependencies: who is calling (`KeyDep`), admins only, the request's `Meter`.

`create_app` includes every router except health's with `guarded()` (or `admin_only()`), so
a new route is authenticated by the way its router is included. The key itself is found
earlier, from the headers, by the request gate (`app.limits.RequestGate`, before any body is
read, with failed attempts throttled per address: `app.auth.throttle`), and it counts the
request against the key's rpm there, before the body; `authenticate` returns the key it found
and `counted` counts only a request the gate did not.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Annotated, Any

from anyio import to_thread
from fastapi import Depends, Request
from fastapi.params import Depends as DependsParam
from starlette.types import Scope

from app import telemetry
from app.auth.keys import MAX_SECRET_CHARS, now
from app.auth.meter import Accounts, Meter
from app.auth.schemas import KeyInfo
from app.auth.throttle import Throttle, client_address
from app.errors import AdminOnly, KeyNotValidNow, KeyRevoked, MissingKey, Unauthorized

HOW = "Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
_KEY_STATE = "llm_api_key"  # the request's key, in scope["state"] (request.state)
_COUNTED_STATE = "llm_api_counted"  # True once the request was counted against rpm


def get_accounts(request: Request) -> Accounts:
    accounts: Accounts = request.app.state.accounts
    return accounts


async def accounts_dep(request: Request) -> Accounts:
    """`get_accounts` as a dependency (async: no thread-pool hop, see app/deps.py)."""
    return get_accounts(request)


AccountsDep = Annotated[Accounts, Depends(accounts_dep)]


def presented_secret(headers: Mapping[str, str]) -> str:
    """The key in the Authorization (Bearer) or X-API-Key header; 401 when absent/malformed."""
    header = headers.get("authorization")
    if header is not None:
        scheme, _, secret = header.strip().partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized(f"The Authorization header is malformed. {HOW}")
    else:
        secret = (headers.get("x-api-key") or "").strip()
        if not secret:
            raise MissingKey(f"This route needs an API key. {HOW}")
    if len(secret) > MAX_SECRET_CHARS or any(c.isspace() for c in secret):
        raise Unauthorized(f"The API key is malformed. {HOW}")
    return secret


def check_valid_now(key: KeyInfo) -> None:
    moment = now()
    if key.revoked_at is not None:
        reason = f" ({key.revoked_reason})" if key.revoked_reason else ""
        raise KeyRevoked(f"This API key was revoked on {key.revoked_at:%Y-%m-%d %H:%M} UTC"
                         f"{reason}.")
    if key.valid_from is not None and moment < key.valid_from:
        raise KeyNotValidNow(f"This API key is not valid yet: it becomes valid on "
                             f"{key.valid_from:%Y-%m-%d %H:%M} UTC.")
    if key.expires_at is not None and moment >= key.expires_at:
        raise KeyNotValidNow(f"This API key expired on {key.expires_at:%Y-%m-%d %H:%M} UTC.")


async def identify(state: Any, headers: Mapping[str, str], address: str) -> KeyInfo:
    """The caller's key, from the headers alone (`state` is the app's: accounts, throttle).

    An address over the failed-authentication limit is refused before its key is looked up.
    A presented key that is unknown, revoked or outside its validity counts as a failure; a
    missing or malformed header does not (no key was tried)."""
    accounts: Accounts = state.accounts
    throttle: Throttle = state.throttle
    await throttle.check(address)
    secret = presented_secret(headers)
    key = await to_thread.run_sync(accounts.store.find, secret)
    try:
        if key is None:
            raise Unauthorized(f"The API key is not valid. {HOW}")
        check_valid_now(key)
    except Unauthorized:
        await throttle.failed(address)
        raise
    return key


def remember_key(scope: Scope, key: KeyInfo) -> None:
    """Keep the key the request gate found for `authenticate` (one lookup per request)."""
    scope.setdefault("state", {})[_KEY_STATE] = key
    telemetry.note_key(key.id)


async def count_once(scope: Scope, accounts: Accounts, key: KeyInfo) -> None:
    """Count this HTTP request against the key's rpm (429 past it), unless it was counted
    already: the request gate counts it before the body is read, `counted` when the gate
    did not, so each request is counted exactly once."""
    state = scope.setdefault("state", {})
    if state.get(_COUNTED_STATE):
        return
    await accounts.limiter.count_request(key)
    state[_COUNTED_STATE] = True


async def authenticate(request: Request) -> KeyInfo | None:
    """The caller's key (None when auth is disabled): the one the request gate
    (app.limits.RequestGate) found before the body was read."""
    accounts = get_accounts(request)
    if not accounts.enabled:
        return None
    key: KeyInfo | None = request.scope.get("state", {}).get(_KEY_STATE)
    if key is None:  # a route the gate did not see as needing a key: check it here
        key = await identify(request.app.state, request.headers, client_address(request.scope))
        telemetry.note_key(key.id)
    return key


KeyDep = Annotated[KeyInfo | None, Depends(authenticate)]


async def counted(request: Request, key: KeyDep) -> KeyInfo | None:
    """The caller's key, with this HTTP request counted against its rpm (429 past it).
    Every authenticated route depends on this once (FastAPI caches it per request), so
    tokenizing, listing models or the admin API cost a request like generating does. The
    request gate has usually counted it already, before reading the body (`count_once`)."""
    if key is not None:
        await count_once(request.scope, get_accounts(request), key)
    return key


CountedKeyDep = Annotated[KeyInfo | None, Depends(counted)]


async def require_admin(request: Request, key: KeyDep) -> KeyInfo:
    if key is None:
        raise AdminOnly("Authentication is disabled (auth.enabled: false), so the admin API "
                        "is off; manage keys with the 'llm-api keys' command.")
    if key.role != "admin":
        raise AdminOnly("This route needs an admin key; this key's role is 'user'.")
    return key


AdminDep = Annotated[KeyInfo, Depends(require_admin)]


async def metered(request: Request, key: CountedKeyDep) -> AsyncIterator[Meter]:
    """The request's meter. A request that fails records its status here; a meter the work
    never settled (a stream the client left before it began) is settled after the response."""
    settings = request.app.state.settings
    meter = Meter(get_accounts(request), key, request.url.path, request.app.state.metrics,
                  settings.server.log_prompts, settings.auth.charge_cached_prompt_tokens,
                  settings.auth.prefix_cache_scope)
    try:
        yield meter
    except BaseException as exc:
        await meter.close(exc)
        raise
    await meter.close(None)


MeterDep = Annotated[Meter, Depends(metered)]


def guarded() -> list[DependsParam]:
    """Router dependencies: a valid key, and the request's meter."""
    return [Depends(metered)]


def counted_only() -> list[DependsParam]:
    """Router dependencies: a valid key, the request counted (routes that use no model)."""
    return [Depends(counted)]


def admin_only() -> list[DependsParam]:
    return [Depends(counted), Depends(require_admin)]


async def admin_unless_open(request: Request, key: KeyDep) -> None:
    """An admin key, or none at all when authentication is off (everything is open then)."""
    if key is not None:
        await require_admin(request, key)


def admin_or_open() -> list[DependsParam]:
    """Router dependencies of operator routes (/metrics): like `admin_only`, but open when
    auth is disabled, as every other route then is."""
    return [Depends(counted), Depends(admin_unless_open)]
