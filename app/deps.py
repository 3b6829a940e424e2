"""Dependency aliases: routes read like plain functions.

Dependencies are `async def` even when they do no I/O: FastAPI runs a plain `def` dependency
in its thread pool, a thread hop (and GIL hand-off) per dependency per request.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.pool import ModelPool
from app.settings import Settings


async def get_pool(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


PoolDep = Annotated[ModelPool, Depends(get_pool)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
