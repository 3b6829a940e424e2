"""The app factory: everything is built here, nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from app import __version__
from app.api import health, native, openai
from app.errors import install_error_handlers
from app.limits import BodySizeLimit
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
        pool = ModelPool(entries, settings.models_dir)
        app.state.pool = pool
        pool.start()
        watcher = asyncio.create_task(_watch_loading(pool, on_load_failure))
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(pool.stop)

    app = FastAPI(title="llm-api", version=__version__, lifespan=lifespan,
                  description="Open LLMs behind a protected HTTP API.")
    app.state.settings = settings
    app.state.started = int(time.time())
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.server.max_body_bytes)
    app.include_router(health.router)
    app.include_router(native.router)
    app.include_router(openai.router)
    return app


async def _watch_loading(pool: ModelPool, on_failure: Callable[[], None] | None) -> None:
    for name, scheduler in pool.schedulers.items():
        await scheduler.wait_loaded()
        if scheduler.state == "failed":
            log.error("model %s could not be loaded: %s", name, scheduler.error)
            if on_failure is not None:
                on_failure()
                return
    if pool.all_ready():
        log.info("all models ready: %s", ", ".join(pool.schedulers))
