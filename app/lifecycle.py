"""Graceful shutdown: on SIGTERM (or Ctrl-C) the server drains before it stops.

Draining: `/ready` answers 503 at once (a load balancer stops sending), new requests that
need a key get 503 `server_shutting_down` with Retry-After, and the requests already running
may finish within `server.graceful_shutdown_seconds`. Those still running then are cut: each
ends with that same error (an SSE error frame when streaming), which settles its usage like
any failed request. Then uvicorn stops and the process exits 0. A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from app.errors import ServerShuttingDown, response_for

log = logging.getLogger(__name__)

#: Routes a draining server still answers: probes and metrics.
OPEN_WHILE_DRAINING = frozenset({"/health", "/check", "/ready", "/metrics"})
#: Seconds the cut requests get to send their error and settle their usage.
SETTLE_SECONDS = 5.0


class Lifecycle:
    """Whether the server is draining, and the requests in flight (`app.state.lifecycle`)."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self.draining = False
        self.active = 0
        self._deadline = 0.0

    def retry_after(self) -> int:
        return max(1, math.ceil(self._deadline - time.monotonic()))

    def refusal(self) -> ServerShuttingDown:
        return ServerShuttingDown(
            "The server is shutting down and takes no new requests; retry on another "
            "replica or once it is back.", retry_after=self.retry_after())

    async def drain(self, cut: Callable[[BaseException], int]) -> None:
        """Refuse new requests, let running ones finish within the grace, then `cut` the
        rest (it ends every running job with the error given; returns how many)."""
        self.draining = True
        self._deadline = time.monotonic() + self.grace
        log.info("shutting down: %d requests running may finish within %g s "
                 "(server.graceful_shutdown_seconds); new requests get 503", self.active,
                 self.grace)
        await self._until_idle(self.grace)
        if self.active:
            count = cut(ServerShuttingDown(
                f"The server is shutting down: this request ran past "
                f"server.graceful_shutdown_seconds ({self.grace:g} s) and was cut. Retry it.",
                retry_after=1))
            log.warning("shutting down: cut %d running generations", count)
            await self._until_idle(SETTLE_SECONDS)
        log.info("shutting down: no request is running")

    async def _until_idle(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while self.active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)


class DrainGate:
    """ASGI middleware: counts the requests in flight; while draining, refuses new ones
    (except probes and metrics) before anything else reads them."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self.app = app
        self.lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_WHILE_DRAINING:
            await self.app(scope, receive, send)
            return
        lifecycle = self.lifecycle
        if lifecycle.draining:
            await response_for(lifecycle.refusal())(scope, receive, send)
            return
        lifecycle.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            lifecycle.active -= 1


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app (`Lifecycle.drain`) on the first SIGTERM/SIGINT
    before it stops; a second signal stops it at once."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_asked = False
        self._draining: asyncio.Future[None] | None = None  # kept: a task needs a reference

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        loop = self._loop
        if self._drain_asked or loop is None or self.should_exit:
            super().handle_exit(sig, frame)
            return
        self._drain_asked = True
        self._captured_signals.append(sig)
        loop.call_soon_threadsafe(self._start_draining)

    def _start_draining(self) -> None:
        async def drain_then_exit() -> None:
            try:
                await self._drain()
            finally:
                self.should_exit = True

        self._draining = asyncio.ensure_future(drain_then_exit())
