"""The app factory: everything is built here, nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from anyio import to_thread
from fastapi import FastAPI

from app import __version__
from app.api import admin, docs, health, native, openai
from app.auth.deps import admin_only, counted_only, guarded
from app.auth.setup import install_store_errors, open_accounts, prepare_store
from app.auth.throttle import make_throttle
from app.errors import install_error_handlers
from app.limits import BodyReads, RequestGate
from app.pool import ModelPool
from app.settings import Settings, model_entries

log = logging.getLogger(__name__)


def create_app(settings: Settings, on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """Build the server. Models load in the background once it starts; `/ready` tells when.

    `on_load_failure` is called when a model fails to load (the CLI uses it to exit).
    """
    entries = model_entries(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        accounts = app.state.accounts = open_accounts(settings)
        throttle = app.state.throttle = make_throttle(settings)
        await to_thread.run_sync(prepare_store, accounts.store, settings)
        pool = ModelPool(entries, settings)
        app.state.pool = pool
        pool.start()
        watcher = asyncio.create_task(_watch_loading(pool, on_load_failure))
        try:
            yield
        finally:
            watcher.cancel()
            await pool.stop()
            await accounts.limiter.close()
            await throttle.close()
            accounts.store.close()

    app = FastAPI(title="llm-api", version=__version__, lifespan=lifespan,
                  description="Open LLMs behind a protected HTTP API.",
                  openapi_url=None, docs_url=None, redoc_url=None)  # served by docs.router
    app.state.settings = settings
    app.state.started = int(time.time())
    install_error_handlers(app)
    install_store_errors(app)
    # Keys are checked from the headers before any body is read (app.limits).
    reads = app.state.body_reads = BodyReads(settings.server.max_body_reads,
                                             settings.server.max_body_reads_per_key)
    app.add_middleware(RequestGate, server=settings.server, reads=reads,
                       open_routes=health.router.routes)
    # Every router but health's needs a key: include new routers with guarded() too.
    app.include_router(health.router)
    app.include_router(native.router, dependencies=guarded())
    app.include_router(openai.router, dependencies=guarded())
    app.include_router(admin.router, dependencies=counted_only())
    app.include_router(docs.router, dependencies=counted_only())
    app.include_router(admin.admin, dependencies=admin_only())
    return app


async def _watch_loading(pool: ModelPool, on_failure: Callable[[], None] | None) -> None:
    for name, client in pool.clients.items():
        await client.wait_loaded()
        if client.info.state == "failed":
            log.error("model %s could not be loaded: %s", name, client.info.error)
            if on_failure is not None:
                on_failure()
                return
    if pool.all_ready():
        log.info("all models ready: %s", ", ".join(pool.clients))
