"""The Meter on a real store: a refused admission is given back whole and may be retried
(how a route that retries with a smaller max_tokens stays exact); several tickets (the `n`
choices of one request) each count."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from app.auth.limits import LocalLimiter
from app.auth.meter import Accounts, Meter
from app.auth.models import UsageRecord
from app.auth.schemas import KeyLimits
from app.auth.store import KeyStore
from app.errors import QuotaExceeded
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

        refused = await meter.admit("tiny", words=2, count_tokens=tokens)
        assert store.get(key.id).reserved_tokens == 900
        await refused.refund()  # e.g. the model said: no room for 900 tokens
        info = store.get(key.id)
        assert (info.used_requests, info.reserved_tokens) == (0, 0)

        async def fewer() -> int:
            return 300

        ticket = await meter.admit("tiny", words=2, count_tokens=fewer)  # the slot is back
        ticket.running = True
        ticket.observe(Chunk(prompt_tokens=4))
        ticket.observe(Chunk(text="a"))
        ticket.observe(Chunk(finish_reason="stop", prompt_tokens=4, completion_tokens=7))
        await ticket.settle(200)
        await meter.close(None)  # the refused attempt is dropped, the settled one kept

    asyncio.run(scenario())
    info = store.get(key.id)
    assert (info.used_requests, info.used_tokens, info.reserved_tokens) == (1, 11, 0)
    with store.engine.connect() as connection:
        rows = connection.execute(UsageRecord.__table__.select()).all()
    assert [(r.status, r.prompt_tokens, r.completion_tokens, r.prompt_words) for r in rows] == \
        [(200, 4, 7, 2)]
    store.close()


def test_each_choice_is_a_ticket(tmp_path: Path) -> None:
    store = KeyStore(f"sqlite:///{tmp_path / 'store.db'}")
    store.migrate()
    key = store.create(KeyLimits(name="k", max_requests=2))

    async def scenario() -> None:
        meter = Meter(Accounts(store, LocalLimiter(), enabled=True), key, "/v1/completions")
        first = await meter.admit("tiny", words=1)
        first.running = True
        first.observe(Chunk(finish_reason="stop", prompt_tokens=3, completion_tokens=2))
        await first.settle(200)
        second = await meter.admit("tiny", words=1)
        second.running = True  # a stream the client left: never settled by the work
        with pytest.raises(QuotaExceeded):
            await meter.admit("tiny", words=1)
        await meter.close(QuotaExceeded("x"))

    asyncio.run(scenario())
    info = store.get(key.id)
    assert (info.used_requests, info.used_tokens, info.reserved_tokens) == (2, 5, 0)
    with store.engine.connect() as connection:
        statuses = sorted(r.status for r in connection.execute(
            UsageRecord.__table__.select()))
    assert statuses == [200, 429, 499]
    store.close()
