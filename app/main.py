"""The app factory: everything is built here, nothing at import time."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable

from anyio import to_thread
from fastapi import FastAPI

from app import __version__, metrics
from app.api import admin, docs, health, native, openai
from app.auth.deps import admin_only, admin_or_open, counted_only, guarded
from app.auth.setup import install_store_errors, open_accounts, prepare_store
from app.auth.throttle import make_throttle
from app.errors import install_error_handlers
from app.lifecycle import DrainGate, Lifecycle
from app.limits import BodyReads, RequestGate
from app.metrics import Metrics, MetricsListener
from app.pool import ModelPool
from app.settings import ModelEntry, Settings, model_entries
from app.telemetry import AccessLog
from engine.client import EngineClient

log = logging.getLogger(__name__)


def create_app(settings: Settings, on_load_failure: Callable[[], None] | None = None) -> FastAPI:
    """Build the server. Models load in the background once it starts; `/ready` tells when.

    `on_load_failure` is called when a model fails to load (the CLI uses it to exit).
    """
    entries = model_entries(settings)
    lifecycle = Lifecycle(settings.server.graceful_shutdown_seconds)
    registry = Metrics(settings.metrics)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        accounts = app.state.accounts = open_accounts(settings)
        throttle = app.state.throttle = make_throttle(settings)
        await to_thread.run_sync(prepare_store, accounts.store, settings)
        pool = ModelPool(entries, settings)
        app.state.pool = pool
        registry.attach(pool, accounts.store)
        listener = MetricsListener(registry, settings.metrics.listen_address) \
            if settings.metrics.enabled and settings.metrics.listen else None
        if listener is not None:
            await listener.start()
        pool.start()
        watcher = asyncio.create_task(_watch_loading(pool, settings, on_load_failure))
        try:
            yield
        finally:
            watcher.cancel()
            await pool.stop()
            if listener is not None:
                await listener.stop()
            await accounts.limiter.close()
            await throttle.close()
            accounts.store.close()

    app = FastAPI(title="llm-api", version=__version__, lifespan=lifespan,
                  description="Open LLMs behind a protected HTTP API.",
                  openapi_url=None, docs_url=None, redoc_url=None)  # served by docs.router
    app.state.settings = settings
    app.state.started = int(time.time())
    app.state.lifecycle = lifecycle
    app.state.metrics = registry

    async def drain() -> None:
        await lifecycle.drain(app.state.pool.interrupt_all)

    app.state.drain = drain  # `serve` calls it on SIGTERM (app.lifecycle.DrainingServer)
    install_error_handlers(app)
    install_store_errors(app)
    # Keys are checked from the headers before any body is read (app.limits).
    reads = app.state.body_reads = BodyReads(settings.server.max_body_reads,
                                             settings.server.max_body_reads_per_key)
    app.add_middleware(RequestGate, server=settings.server, reads=reads,
                       open_routes=health.router.routes)
    app.add_middleware(DrainGate, lifecycle=lifecycle)
    app.add_middleware(AccessLog, metrics=registry)  # the outermost: every request's line
    # Every router but health's needs a key: include new routers with guarded() too.
    app.include_router(health.router)
    app.include_router(native.router, dependencies=guarded())
    app.include_router(openai.router, dependencies=guarded())
    app.include_router(admin.router, dependencies=counted_only())
    app.include_router(docs.router, dependencies=counted_only())
    app.include_router(admin.admin, dependencies=admin_only())
    if settings.metrics.enabled:
        app.include_router(metrics.router, dependencies=admin_or_open())
    return app


async def _watch_loading(pool: ModelPool, settings: Settings,
                         on_failure: Callable[[], None] | None) -> None:
    for name, client in pool.clients.items():
        await client.wait_loaded()
        if client.info.state == "failed":
            log.error("model %s could not be loaded: %s", name, client.info.error)
            if on_failure is not None:
                on_failure()
                return
        else:
            log.info("%s", loaded_line(pool.entries[name], client))
    if pool.all_ready():
        server = settings.server
        log.info("llm-api ready on http://%s:%d (models: %s)", server.host, server.port,
                 ", ".join(pool.clients))


def loaded_line(entry: ModelEntry, client: EngineClient) -> str:
    """The startup line of one loaded model: family, file, context, parallel, load time,
    memory."""
    info, setup = client.info, entry.setup
    source = str(setup.model_path) if setup.model_path else \
        "/".join(p for p in (setup.repo_id, setup.filename) if p) or "(no file)"
    load = info.load
    memory = load.get("memory_bytes")
    parts = [f"model {entry.name} ready: family={entry.family}", f"file={source}",
             f"context={info.context_length}", f"parallel={load.get('parallel', '?')}",
             f"placement={client.placement}"]
    if "load_seconds" in load:
        parts.append(f"load={load['load_seconds']:.1f}s")
    if memory:
        where = "process" if client.placement == "inprocess" else "worker"
        parts.append(f"memory={memory / 2**20:.0f}MiB ({where} RSS)")
    return " ".join(parts)
