"""Liveness and readiness: never behind auth, never blocked by a generation."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from app.deps import PoolDep

router = APIRouter(tags=["health"])


class ModelReadiness(BaseModel):
    name: str
    family: str
    state: str
    error: str | None
    capabilities: list[str]
    context_length: int | None
    queued: int
    running: int
    completed: int
    cancelled: int
    tokens_generated: int


class Readiness(BaseModel):
    """/ready's body: 200 when every model is loaded, else 503 with the same body."""

    status: Literal["ready", "not_ready"]
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
async def ready(pool: PoolDep) -> JSONResponse:
    """200 once every model is loaded, else 503; lists each model's state and load."""
    models: list[dict[str, Any]] = []
    for name, scheduler in pool.schedulers.items():
        backend = scheduler.backend
        stats = scheduler.stats
        models.append({
            "name": name, "family": pool.entries[name].family, "state": scheduler.state,
            "error": scheduler.error,
            "capabilities": sorted(backend.capabilities) if backend else [],
            "context_length": backend.context_length if backend else None,
            "queued": stats.queued, "running": stats.running,
            "completed": stats.completed, "cancelled": stats.cancelled,
            "tokens_generated": stats.tokens_generated,
        })
    status = "ready" if pool.all_ready() else "not_ready"
    return JSONResponse({"status": status, "models": models},
                        status_code=200 if status == "ready" else 503)
