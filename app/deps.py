"""Dependency aliases: routes read like plain functions."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.pool import ModelPool
from app.settings import Settings


def get_pool(request: Request) -> ModelPool:
    pool: ModelPool = request.app.state.pool
    return pool


def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


PoolDep = Annotated[ModelPool, Depends(get_pool)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
