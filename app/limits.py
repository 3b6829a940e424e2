"""ASGI middleware in front of every route: authenticate from the headers, count the request
against its key's rpm, then read the body, bounded in size, time and concurrency, before any
route sees it.

Nothing of a request that needs a key is read before its key is checked: an unauthenticated
request is answered 401 from its headers alone (uvicorn discards the body it then sends), so
clients without a key cannot make the server hold their bodies; a key over its rpm gets its
429 the same way (the request is counted here, once: `app.auth.deps.count_once`). An
authenticated body is read within `server.body_read_timeout` (else 408), a time that starts
when the request starts waiting for a slot: at most `server.max_body_reads` bodies are read
at once, at most `server.max_body_reads_per_key` of them one key's, and the others wait their
turn. A slow sender holds a slot for a bounded time, and one key's slow senders cannot hold
the slots every other key needs.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence

import anyio
from starlette.datastructures import Headers
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.auth.deps import count_once, identify, remember_key
from app.auth.schemas import KeyInfo
from app.auth.setup import STORE_ERRORS, store_unavailable
from app.auth.throttle import client_address
from app.errors import BodyReadTimeout, PayloadTooLarge, response_for
from app.settings import ServerSettings
from backends.errors import LLMAPIError


class _KeySlots:
    """One key's body-read slots, kept while some request of the key holds or awaits one."""

    def __init__(self, limit: int) -> None:
        self.slots = anyio.Semaphore(limit)
        self.users = 0


class BodyReads:
    """The caps on bodies read at once, globally and per key, with their counts
    (`app.state.body_reads`)."""

    def __init__(self, limit: int, per_key: int) -> None:
        self.limit = limit
        self.per_key = per_key
        self.reading = 0
        self.waiting = 0  # for a slot, of their key's or a global one
        self.peak = 0  # the most bodies read at once since the start
        self._slots = anyio.Semaphore(limit)
        self._keys: dict[int, _KeySlots] = {}

    @contextlib.asynccontextmanager
    async def slot(self, key: int | None = None) -> AsyncIterator[None]:
        """A slot to read one body in: one of key `key`'s (an id; None: no per-key cap),
        then a global one, so that a key at its cap waits without holding a global slot.
        Waiting can be cancelled (the caller's timeout); what was taken is given back."""
        async with contextlib.AsyncExitStack() as taken:
            self.waiting += 1
            try:
                if key is not None:
                    await taken.enter_async_context(self._key_slot(key))
                await taken.enter_async_context(self._slots)
            finally:
                self.waiting -= 1
            self.reading += 1
            self.peak = max(self.peak, self.reading)
            try:
                yield
            finally:
                self.reading -= 1

    @contextlib.asynccontextmanager
    async def _key_slot(self, key: int) -> AsyncIterator[None]:
        slots = self._keys.get(key)
        if slots is None:
            slots = self._keys[key] = _KeySlots(self.per_key)
        slots.users += 1
        try:
            async with slots.slots:
                yield
        finally:
            slots.users -= 1
            if not slots.users:  # no state is kept for keys that read nothing
                del self._keys[key]


def _has_body(headers: Headers) -> bool:
    return "transfer-encoding" in headers or headers.get("content-length", "0") != "0"


class RequestGate:
    """Authentication before the body, then a bounded body read replayed to the app."""

    def __init__(self, app: ASGIApp, server: ServerSettings, reads: BodyReads,
                 open_routes: Sequence[BaseRoute]) -> None:
        self.app = app
        self.max_bytes = server.max_body_bytes
        self.timeout = server.body_read_timeout
        self.reads = reads
        self.open_routes = open_routes  # the routes served without a key (health's)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(self._too_large(), scope, receive, send)
            return
        if any(_full(route, scope) for route in self.open_routes):
            await self.app(scope, receive, send)  # health: no key, and it reads no body
            return
        try:
            routed, key = await self._authenticate(scope, headers)
            messages = await self._read(receive, key) if routed and _has_body(headers) else []
        except STORE_ERRORS as exc:
            await self._refuse(store_unavailable(exc), scope, receive, send)
            return
        except LLMAPIError as exc:
            await self._refuse(exc, scope, receive, send)
            return

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay if messages else receive, send)

    async def _authenticate(self, scope: Scope, headers: Headers) -> tuple[bool, KeyInfo | None]:
        """Check the key (every route but the open ones needs one, so a route added later is
        behind the key before its body is read too) and count the request against its rpm
        (429 past it, the body unread). (routed, key): routed is False when the key is
        refused but no route takes the request: the router answers it (404, 405) without
        reading the body; key is None when authentication is off."""
        state = scope["app"].state
        if not state.accounts.enabled:
            return True, None
        try:
            key = await identify(state, headers, client_address(scope))
        except LLMAPIError:
            routes: list[BaseRoute] = scope["app"].router.routes
            if any(_full(route, scope) for route in routes):  # matched only when refused:
                raise  # matching costs ~50 us on FastAPI's included routers
            return False, None
        remember_key(scope, key)
        await count_once(scope, state.accounts, key)
        return True, key

    async def _read(self, receive: Receive, key: KeyInfo | None) -> list[Message]:
        """The whole body (bounded), as the messages that carried it. The time starts as the
        request starts waiting for a slot (its key's, then a global one)."""
        messages: list[Message] = []
        size = 0
        reading = False
        with anyio.move_on_after(self.timeout) as timer:
            async with self.reads.slot(None if key is None else key.id):
                reading = True
                while True:
                    message = await receive()
                    messages.append(message)
                    if message["type"] != "http.request":
                        break  # the client left: the app sees the disconnect
                    size += len(message.get("body", b""))
                    if size > self.max_bytes:
                        raise self._too_large()
                    if not message.get("more_body", False):
                        break
        if timer.cancelled_caught:
            if reading:
                raise BodyReadTimeout(f"The request body did not arrive within "
                                      f"{self.timeout:g} s (server.body_read_timeout); send "
                                      "it faster.")
            raise BodyReadTimeout(f"The server could not start reading the request body "
                                  f"within {self.timeout:g} s (server.body_read_timeout): "
                                  "all body-read slots were busy (server.max_body_reads, "
                                  "server.max_body_reads_per_key for this key); retry later.")
        return messages

    def _too_large(self) -> PayloadTooLarge:
        return PayloadTooLarge(f"The request body is larger than the server accepts "
                               f"({self.max_bytes} bytes; see server.max_body_bytes).")

    @staticmethod
    async def _refuse(exc: LLMAPIError, scope: Scope, receive: Receive, send: Send) -> None:
        await response_for(exc)(scope, receive, send)


def _full(route: BaseRoute, scope: Scope) -> bool:
    return route.matches(scope)[0] is Match.FULL
