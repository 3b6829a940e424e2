"""Prometheus metrics (`GET /metrics`, prometheus-client): per model, and per key on request.

Each API process exposes its own metrics; replicas are scraped one by one. Request figures
(counts, tokens, time to first token, inter-token latency, end-to-end latency, queue wait)
are measured here, where the stream reaches the client, so they are the same whatever the
transport (in process, a local worker, remote workers). Engine figures (running and waiting
sequences, KV cells, prefix-cache reuse, restarts, workers, heartbeats, state) are read from
each model's `EngineClient.info` at scrape time, after `refresh()`: no worker exposes a port
of its own. Names and the mapping to llama-server's and vLLM's: docs/monitoring.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import uvicorn
from anyio import to_thread
from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.applications import Starlette
from starlette.routing import Route

from app.settings import MetricsSettings, SettingsError

if TYPE_CHECKING:
    from app.auth.store import KeyStore
    from app.pool import ModelPool

log = logging.getLogger(__name__)

STATES = ("loading", "ready", "restarting", "waiting", "failed", "stopped")


class Metrics:
    """The app's registry and the metrics the request path records (`app.state.metrics`)."""

    def __init__(self, settings: MetricsSettings) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series
        self.settings = settings
        self.per_key = settings.per_key
        self.registry = registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter("llm_api_requests", "Generations and embeddings by model, "
                                "route and HTTP status.", ["model", "route", "status"],
                                registry=registry)
        self.prompt_tokens = Counter("llm_api_prompt_tokens", "Prompt tokens processed.",
                                     ["model"], registry=registry)
        self.generation_tokens = Counter("llm_api_generation_tokens", "Tokens generated.",
                                         ["model"], registry=registry)
        self.ttft = Histogram("llm_api_time_to_first_token_seconds", "Time from the "
                              "request's admission to its first generated text.", ["model"],
                              buckets=settings.ttft_buckets, registry=registry)
        self.itl = Histogram("llm_api_inter_token_latency_seconds", "Time between two "
                             "streamed pieces of one generation.", ["model"],
                             buckets=settings.itl_buckets, registry=registry)
        self.duration = Histogram("llm_api_request_duration_seconds", "End-to-end time of a "
                                  "generation or embedding, admission to its end.",
                                  ["model", "route"], buckets=settings.latency_buckets,
                                  registry=registry)
        self.queue_wait = Histogram("llm_api_queue_wait_seconds", "Time from submitting a "
                                    "generation to the engine taking it (queue and "
                                    "transport).", ["model"],
                                    buckets=settings.latency_buckets, registry=registry)
        self.key_requests = Counter("llm_api_key_requests", "Generations and embeddings by "
                                    "key (metrics.per_key).", ["key_id", "model"],
                                    registry=registry)
        self.key_tokens = Counter("llm_api_key_tokens", "Tokens by key and type (prompt, "
                                  "completion; metrics.per_key).", ["key_id", "model", "type"],
                                  registry=registry)
        self.key_rejections = Counter("llm_api_key_rejections", "429 answers by key and "
                                      "reason (metrics.per_key).", ["key_id", "reason"],
                                      registry=registry)
        self._engines = EngineCollector()
        registry.register(self._engines)
        self._quotas = QuotaCollector()
        if self.per_key:
            registry.register(self._quotas)

    def attach(self, pool: ModelPool, store: KeyStore) -> None:
        """What the scrape-time figures come from (the app's lifespan)."""
        self._engines.pool = pool
        self._quotas.store = store

    # -- the request path ----------------------------------------------------------------

    def settled(self, model: str, route: str, status: int, key_id: int | None,
                prompt: int, completion: int, seconds: float) -> None:
        """One generation or embedding ended (`Ticket.settle`)."""
        self.requests.labels(model, route, str(status)).inc()
        if prompt:
            self.prompt_tokens.labels(model).inc(prompt)
        if completion:
            self.generation_tokens.labels(model).inc(completion)
        if status < 400 or prompt or completion:  # it ran: its time says something
            self.duration.labels(model, route).observe(seconds)
        if self.per_key and key_id is not None:
            key = str(key_id)
            self.key_requests.labels(key, model).inc()
            if prompt:
                self.key_tokens.labels(key, model, "prompt").inc(prompt)
            if completion:
                self.key_tokens.labels(key, model, "completion").inc(completion)

    def rejected(self, key_id: int | None, reason: str) -> None:
        """A 429 for key `key_id`; `reason`: max_parallel, rpm, tpm, requests, tokens."""
        if self.per_key and key_id is not None:
            self.key_rejections.labels(str(key_id), reason).inc()

    async def collect(self) -> bytes:
        """The text a scrape gets: engine figures refreshed first (never on the loop's
        time: the text is built in a thread, the key store is read there)."""
        pool = self._engines.pool
        if pool is not None:
            await asyncio.gather(*(client.refresh() for client in pool.clients.values()))
        return await to_thread.run_sync(generate_latest, self.registry)


class StreamClock:
    """Time to first token and inter-token latency of one generation stream."""

    __slots__ = ("_itl", "_last", "_ttft", "_start")

    def __init__(self, metrics: Metrics, model: str, start: float) -> None:
        self._ttft = metrics.ttft.labels(model)
        self._itl = metrics.itl.labels(model)
        self._start = start
        self._last = 0.0

    def piece(self) -> None:
        """A piece of generated text reached the client's stream."""
        now = time.monotonic()
        if self._last:
            self._itl.observe(now - self._last)
        else:
            self._ttft.observe(now - self._start)
        self._last = now


def _gauge(name: str, doc: str, labels: list[str]) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


class EngineCollector(Collector):
    """Each model's engine figures, from its client's `info` (refreshed before a scrape)."""

    def __init__(self) -> None:
        self.pool: ModelPool | None = None

    def describe(self) -> Iterable[Any]:
        return list(self._families({}))

    def collect(self) -> Iterable[Any]:
        pool = self.pool
        clients = pool.clients if pool is not None else {}
        return list(self._families(clients))

    def _families(self, clients: dict[str, Any]) -> Iterator[Any]:
        running = _gauge("llm_api_requests_running", "Generations running.", ["model"])
        waiting = _gauge("llm_api_requests_waiting", "Requests queued for the engine.",
                         ["model"])
        used = _gauge("llm_api_kv_cells_used", "KV cache cells holding tokens (running and "
                      "cached sequences).", ["model"])
        total = _gauge("llm_api_kv_cells_total", "KV cache cells.", ["model"])
        reused = CounterMetricFamily("llm_api_prefix_cache_hit_tokens", "Prompt tokens whose "
                                     "KV cells were reused instead of computed.",
                                     labels=["model"])
        restarts = CounterMetricFamily("llm_api_engine_restarts", "Times the model's worker "
                                       "process stopped and was restarted.", labels=["model"])
        workers = _gauge("llm_api_workers", "Live worker processes serving the model.",
                         ["model"])
        heartbeat = _gauge("llm_api_worker_heartbeat_age_seconds", "Seconds since a remote "
                           "worker's last heartbeat.", ["model", "worker"])
        state = _gauge("llm_api_model_state", "1 for the model's current state.",
                       ["model", "state"])
        for name, client in clients.items():
            info = client.info
            stats = info.stats
            running.add_metric([name], stats.get("running", 0))
            waiting.add_metric([name], stats.get("queued", 0))
            if "kv_cells_total" in stats:
                used.add_metric([name], stats.get("kv_cells_used", 0))
                total.add_metric([name], stats["kv_cells_total"])
            reused.add_metric([name], stats.get("prefix_reused_tokens", 0))
            restarts.add_metric([name], info.restarts)
            live = info.workers if info.workers is not None else \
                int(info.state in {"loading", "ready"})
            workers.add_metric([name], live)
            for worker, age in (info.heartbeats or {}).items():
                heartbeat.add_metric([name, worker], age)
            for one in STATES:
                state.add_metric([name, one], float(info.state == one))
        yield from (running, waiting, used, total, reused, restarts, workers, heartbeat, state)


class QuotaCollector(Collector):
    """Each key's remaining lifetime quota, read from the key store at scrape time."""

    def __init__(self) -> None:
        self.store: KeyStore | None = None

    def describe(self) -> Iterable[Any]:
        return [_gauge("llm_api_key_quota_remaining", "What is left of a key's lifetime "
                       "quota (quota: requests, tokens).", ["key_id", "quota"])]

    def collect(self) -> Iterable[Any]:
        family = _gauge("llm_api_key_quota_remaining", "What is left of a key's lifetime "
                        "quota (quota: requests, tokens).", ["key_id", "quota"])
        if self.store is not None:
            for key in self.store.list():
                if key.revoked_at is not None:
                    continue
                if key.max_requests is not None:
                    family.add_metric([str(key.id), "requests"],
                                      max(0, key.max_requests - key.used_requests))
                if key.max_tokens is not None:
                    family.add_metric([str(key.id), "tokens"], max(
                        0, key.max_tokens - key.used_tokens - key.reserved_tokens))
        return [family]


class MetricsListener:
    """`metrics.listen`: /metrics without a key on its own address (a private network's
    scraper), served by a second uvicorn server on the same event loop."""

    def __init__(self, metrics: Metrics, address: tuple[str, int] | None) -> None:
        assert address is not None
        self.metrics = metrics
        self.address = address
        self._server: _Sidecar | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        async def endpoint(_: Request) -> Response:
            return Response(await self.metrics.collect(), media_type=CONTENT_TYPE_LATEST)

        host, port = self.address
        try:  # bound here: a taken port is a clear startup error, not a silent exit
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            raise SettingsError(f"metrics.listen {host}:{port}: cannot listen there "
                                f"({exc.strerror})") from None
        app = Starlette(routes=[Route("/metrics", endpoint)])
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
        self._server = server = _Sidecar(config)
        self._task = asyncio.create_task(server.serve(sockets=[sock]))
        log.info("metrics on http://%s:%d/metrics (no key: metrics.listen)", host, port)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await self._task


class _Sidecar(uvicorn.Server):
    def capture_signals(self) -> contextlib.AbstractContextManager[None]:  # type: ignore[override]
        return contextlib.nullcontext()  # the main server handles the signals


router = APIRouter(tags=["admin"])


@router.get("/metrics", response_class=Response, responses={200: {
    "content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text format."}})
async def metrics(request: Request) -> Response:
    """Prometheus metrics of this API process and its models (admin key; see
    docs/monitoring.md, or `metrics.listen` for a listener without a key)."""
    registry: Metrics = request.app.state.metrics
    return Response(await registry.collect(), media_type=CONTENT_TYPE_LATEST)
