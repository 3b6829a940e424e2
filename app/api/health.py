"""Liveness and readiness: never behind auth, never blocked by a generation."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

from app.deps import PoolDep

router = APIRouter(tags=["health"])


class ModelReadiness(BaseModel):
    name: str
    family: str
    state: str = Field(description="loading, ready, restarting (its worker process stopped "
                       "and is being started again), failed (see error), stopped; waiting: "
                       "a remote model with no live worker.")
    error: str | None
    placement: str = Field(description="local, remote or inprocess (server.placement).")
    capabilities: list[str]
    context_length: int | None
    queued: int
    running: int
    completed: int
    cancelled: int
    tokens_generated: int
    restarts: int = Field(description="Times its worker process stopped and was restarted.")
    workers: int | None = Field(description="Live workers of a remote model.")


class Readiness(BaseModel):
    """/ready's body: 200 when every model is loaded, else 503 with the same body."""

    status: Literal["ready", "not_ready", "shutting_down"]
    models: list[ModelReadiness]


@router.get("/check")
async def check() -> str:
    """Classic liveness probe: answers "Ok"."""
    return "Ok"


@router.get("/health")
async def health() -> dict[str, str]:
    """200 while the process is alive."""
    return {"status": "ok"}


@router.get("/ready", response_model=Readiness, responses={
    503: {"model": Readiness, "description": "A model is not loaded (yet, or failed)."}})
async def ready(pool: PoolDep, request: Request) -> JSONResponse:
    """200 once every model is loaded, else 503 (also while the server shuts down); lists
    each model's state and load."""
    models: list[dict[str, Any]] = []
    await asyncio.gather(*(client.refresh() for client in pool.clients.values()))
    for name, client in pool.clients.items():
        info = client.info
        stats = info.stats
        models.append({
            "name": name, "family": pool.entries[name].family, "state": info.state,
            "error": info.error, "placement": client.placement,
            "capabilities": sorted(info.capabilities),
            "context_length": info.context_length,
            "queued": stats.get("queued", 0), "running": stats.get("running", 0),
            "completed": stats.get("completed", 0), "cancelled": stats.get("cancelled", 0),
            "tokens_generated": stats.get("tokens_generated", 0),
            "restarts": info.restarts, "workers": info.workers,
        })
    status = "ready" if pool.all_ready() else "not_ready"
    if request.app.state.lifecycle.draining:
        status = "shutting_down"
    return JSONResponse({"status": status, "models": models},
                        status_code=200 if status == "ready" else 503)
