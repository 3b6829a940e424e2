"""The Meter on a real store: a refused admission is given back whole and may be retried
(how a route that retries with a smaller max_tokens stays exact)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from app.auth.limits import LocalLimiter
from app.auth.meter import Accounts, Meter
from app.auth.models import UsageRecord
from app.auth.schemas import KeyLimits
from app.auth.store import KeyStore
from backends.base import Chunk


def test_refund_then_admit_again_counts_once(tmp_path: Path) -> None:
    store = KeyStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    key = store.create(KeyLimits(name="k", max_requests=5, max_tokens=1000, rpm=10,
                                 max_parallel=1))
    limiter = LocalLimiter()

    async def scenario() -> None:
        meter = Meter(Accounts(store, limiter, enabled=True), key, "/generate")

        async def tokens() -> int:
            return 900

        await meter.admit("tiny", words=2, count_tokens=tokens)
        assert store.get(key.id).reserved_tokens == 900
        await meter.refund()  # e.g. the model said: no room for 900 tokens
        info = store.get(key.id)
        assert (info.used_requests, info.reserved_tokens) == (0, 0)

        async def fewer() -> int:
            return 300

        await meter.admit("tiny", words=2, count_tokens=fewer)  # parallel slot came back
        meter.running = True
        meter.observe(Chunk(prompt_tokens=4))
        meter.observe(Chunk(text="a"))
        meter.observe(Chunk(finish_reason="stop", prompt_tokens=4, completion_tokens=7))
        await meter.settle(200)
        await meter.settle(499)  # idempotent

    asyncio.run(scenario())
    info = store.get(key.id)
    assert (info.used_requests, info.used_tokens, info.reserved_tokens) == (1, 11, 0)
    with store.engine.connect() as connection:
        rows = connection.execute(UsageRecord.__table__.select()).all()
    assert [(r.status, r.prompt_tokens, r.completion_tokens, r.prompt_words) for r in rows] == \
        [(200, 4, 7, 2)]
    store.close()
