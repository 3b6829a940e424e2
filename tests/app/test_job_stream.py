"""`JobStream`'s hooks, which the meter uses to see every chunk and settle exactly once: at the
end of the stream, on an error item, and when the reader stops early."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.errors import RequestTimeout
from backends.base import Chunk
from engine.jobs import END as _END
from engine.jobs import Job, JobStream


class Recording(JobStream):
    def __init__(self, job: Job, first: Any) -> None:
        super().__init__(job, first)
        self.seen: list[Any] = []
        self.ends: list[BaseException | None] = []

    def observe(self, item: Any) -> None:
        self.seen.append(item)

    async def ended(self, error: BaseException | None) -> None:
        self.ends.append(error)


def stream_of(items: list[Any]) -> Recording:
    job = Job.on_loop(1e9)
    assert job.out is not None
    for item in items[1:]:
        job.out.put_nowait(item)
    return Recording(job, items[0])


def test_every_item_is_observed_and_the_end_is_reported_once() -> None:
    async def run() -> tuple[list[Any], Recording]:
        stream = stream_of([Chunk(prompt_tokens=3), Chunk("a"), Chunk("b", finish_reason="length"),
                            _END])
        return [item async for item in stream], stream

    got, stream = asyncio.run(run())
    assert [c.text for c in got] == ["", "a", "b"]
    assert stream.seen == got
    assert stream.ends == [None]
    assert stream._job.cancelled.is_set()  # closed at the end: the engine may drop the job


def test_an_error_item_is_raised_and_reported_as_the_end() -> None:
    async def run() -> Recording:
        stream = stream_of([Chunk(prompt_tokens=1), Chunk("a"), RequestTimeout("too slow")])
        with pytest.raises(RequestTimeout):
            async for _ in stream:
                pass
        return stream

    stream = asyncio.run(run())
    assert len(stream.seen) == 2
    assert len(stream.ends) == 1 and isinstance(stream.ends[0], RequestTimeout)


def test_a_reader_that_stops_early_ends_the_stream_once() -> None:
    async def run() -> Recording:
        stream = stream_of([Chunk(prompt_tokens=1), Chunk("a"), Chunk("b"), _END])
        iterator = aiter(stream)
        await anext(iterator)
        await iterator.aclose()  # type: ignore[attr-defined]
        return stream

    stream = asyncio.run(run())
    assert len(stream.seen) == 1
    assert len(stream.ends) == 1 and isinstance(stream.ends[0], GeneratorExit)
    assert stream._job.cancelled.is_set()
