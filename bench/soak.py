"""Soak: many concurrent clients against a running llm-api for a bounded time, every outcome
classified, and the server's memory and file descriptors watched.

    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --key $KEY --pid $SERVER_PID
    .venv/bin/python bench/soak.py --config soak.yaml --key $ADMIN_KEY   # starts the server

`--clients` (default 200) clients loop for `--seconds` (default 60), each request picked at
random: a streamed chat completion, a streamed or non-streamed `/v1/completions`, embeddings
(`/v1/embeddings` or `/embeddings`, when the model's capabilities in `/ready` include
`embed`) and streams the client closes on purpose after 0-3 events. `max_tokens` is small
(`--max-tokens`, default 16) so a 2-core machine with a tiny model makes progress.

With an admin `--key`, a share of the clients (`--limited-share`, default 10 %) uses a user key
the soak creates with `max_parallel: 1` and a small `rpm` (revoked at the end), so that 429s
happen on purpose. A server whose model queue is full answers 503 `queue_full` with
`Retry-After`. Clients that get either wait a moment (at most `--max-backoff`) and go on.

Every outcome is one of:
- ok: 200 with a well-formed body; a stream ends with its last chunk's `finish_reason` and
  then `data: [DONE]`;
- 429 (deliberate): `rate_limit_exceeded` or `quota_exceeded` in the one error shape, on the
  limited key (or on a `--key` that is not an admin key, whose limits we do not know); a
  `rate_limit_exceeded` needs `Retry-After`;
- 503 (deliberate): `queue_full` in the one error shape, with `Retry-After`;
- disconnected (deliberate): a stream the client closed on purpose;
- other: anything else — another status, an error body not exactly
  `{"error": {"message", "type", "param", "code"}}`, a non-JSON body or event, a stream that
  ends without `[DONE]` or carries an error frame, a connection error or timeout, a request
  still running at the hard deadline.

Before the measured run, the same load runs for `--warmup` seconds (default 5; its outcomes
are counted too): pools, caches and allocator arenas fill, so the start sample is a fair
baseline. The clients keep idle connections for `--keepalive-expiry` seconds (default 2), well
under uvicorn's keep-alive timeout (5 s): a client that reuses a connection at the instant the
server closes it for idleness gets a reset, a race of the client's own making.

The run stops itself: no request starts after `--seconds`; those running get `--grace`
seconds (default 30) to finish, then they are cancelled and counted as "other" (and the run
fails). A watchdog thread ends the process (and the server it started) if even that hangs.
With `--config` the server runs in a session of its own, gets SIGTERM if the soak dies, and
is stopped at the end (SIGTERM, then SIGKILL of its session after 30 s); every process ever
seen in its tree must be gone after that, else they are killed and the run fails.

Resources are sampled from /proc for the server process and all its descendants (the model
workers are children of a fork server): the sum of their RSS and of their open descriptors,
at the start (after the warm-up, once the descriptor count has stopped moving), every second
(the peak), in the middle of the run, and at the end (once the clients' connections are
closed and the model is idle, polling up to `--settle` seconds for the descriptors to come
back). Bounds, end against start:
- `--max-fd-growth` (default 10) for descriptors other than regular files: sockets, pipes,
  event fds. Each client connection is one while open; once they are closed the count comes
  back to the baseline; 10 leaves room for a few lazily opened things (a restarted worker's
  pipes, a new pooled connection to Postgres or Redis). A leak of one per request or per
  disconnect is hundreds to thousands here.
- `--max-file-fd-growth` (default 64) for regular files. SQLite keeps the descriptor of a
  closed connection open while other connections of the process hold locks on the same
  database (in WAL mode they always do) and reuses it for the next connection: after a burst
  the store's file holds one descriptor per connection the burst had at once, up to the
  pool's size + overflow (10 + 50 for SQLite in app/auth/store.py). Bounded, not a leak.
- `--max-rss-growth` (default 25 %): the tree's RSS. A busy run leaves a one-off high-water
  mark (the buffers of hundreds of streams at once, allocator arenas of busy threads) that
  CPython does not give back: a few % over the warm-up's; a per-request leak over the
  thousands of requests of a 200 x 60 s run grows far beyond it. A longer run tells a slow
  leak from the mark: the mark stays, a leak keeps growing.

Exit status 0 when there was no "other" outcome, every accepted stream ended properly, the
bounds held, the server's queues were empty afterwards, no worker restarted and (with
`--config`) the server exited 0 on SIGTERM leaving no process behind; 1 otherwise.
`--json PATH` writes the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

OK, LIMITED, BUSY, DISCONNECTED, OTHER = (
    "ok", "429 (deliberate)", "503 (deliberate)", "disconnected (deliberate)", "other")
ERROR_FIELDS = {"message", "type", "param", "code"}
KINDS = ("chat_stream", "completion_stream", "completion", "embedding", "disconnect")
WEIGHTS = {"chat_stream": 30, "completion_stream": 20, "completion": 15, "embedding": 15,
           "disconnect": 20}
WORDS = ("river stone cloud lamp orbit maple quiet signal copper garden winter echo harbor "
         "pixel lantern meadow").split()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    where.add_argument("--config", type=Path, help="start `llm-api serve --config` on a free "
                       "loopback port for the run, and stop it at the end")
    parser.add_argument("--pid", type=int, help="the running server's pid (with --url): "
                        "samples RSS and descriptors of it and its descendants")
    parser.add_argument("--key", help="API key (admin: the soak also creates a limited key)")
    parser.add_argument("--model", help="default: the first of /v1/models")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=5.0,
                        help="seconds of the same load before the start sample")
    parser.add_argument("--grace", type=float, default=30.0,
                        help="seconds running requests may take after --seconds")
    parser.add_argument("--settle", type=float, default=15.0,
                        help="seconds to wait for the descriptors to come back at the end")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--limited-share", type=float, default=0.1,
                        help="share of clients on a created key with max_parallel 1")
    parser.add_argument("--limited-rpm", type=int, default=120)
    parser.add_argument("--keepalive-expiry", type=float, default=2.0,
                        help="seconds the clients keep an idle connection for reuse")
    parser.add_argument("--max-backoff", type=float, default=0.5,
                        help="most seconds a client waits after a 429 or 503")
    parser.add_argument("--max-fd-growth", type=int, default=10,
                        help="descriptors other than files (sockets, pipes, ...)")
    parser.add_argument("--max-file-fd-growth", type=int, default=64)
    parser.add_argument("--max-rss-growth", type=float, default=25.0, help="percent")
    parser.add_argument("--start-timeout", type=float, default=120.0,
                        help="seconds the server may take to become ready")
    parser.add_argument("--server-log", type=Path, help="with --config (default: a temp file)")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.pid is not None and args.config is not None:
        parser.error("--pid goes with --url (with --config the soak knows the pid)")
    if args.clients < 1 or args.seconds <= 0 or not 0 <= args.limited_share <= 1:
        parser.error("--clients >= 1, --seconds > 0 and 0 <= --limited-share <= 1")
    return args


# -- the server's process tree, from /proc ---------------------------------------------------

def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, start time) of a process that has not ended (zombies have)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "
    return None if fields[0] in "ZX" else (int(fields[1]), int(fields[19]))


def process_tree(root: int) -> dict[int, int]:
    """{pid: start time} of `root` and all its descendants."""
    parents: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (stat := _stat(int(entry))) is not None:
            parents.setdefault(stat[0], []).append(int(entry))
            starts[int(entry)] = stat[1]
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in starts:
            tree[pid] = starts[pid]
            todo.extend(parents.get(pid, []))
    return tree


@dataclass
class Sample:
    at: float
    rss_mib: float
    fds: int
    files: int  # of those, descriptors of regular files (the rest: sockets, pipes, ...)
    processes: int

    @property
    def streams(self) -> int:
        return self.fds - self.files


def sample(root: int, seen: dict[int, int], started: float) -> Sample:
    """RSS and open descriptors summed over the tree; `seen` collects every process met."""
    rss_kib = fds = files = 0
    tree = process_tree(root)
    seen.update(tree)
    for pid in tree:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss_kib += int(line.split()[1])
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):  # closed meanwhile
                    files += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("/")
                    fds += 1
    return Sample(round(time.monotonic() - started, 1), round(rss_kib / 1024, 1), fds, files,
                  len(tree))


# -- outcomes --------------------------------------------------------------------------------

@dataclass
class Outcome:
    kind: str
    result: str
    detail: str = ""
    ttft: float | None = None
    accepted_stream: bool = False  # a 200 stream (not closed on purpose)
    retry_after: float = 0.0


@dataclass
class Tally:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    others: Counter[str] = field(default_factory=Counter)
    ttfts: list[float] = field(default_factory=list)
    streams_accepted: int = 0
    streams_unfinished: int = 0

    def add(self, outcome: Outcome) -> None:
        self.counts[outcome.result, outcome.kind] += 1
        if outcome.result == OTHER:
            self.others[f"{outcome.kind}: {outcome.detail}"[:200]] += 1
        if outcome.accepted_stream:
            self.streams_accepted += 1
            if outcome.result != OK:
                self.streams_unfinished += 1
        if outcome.result == OK and outcome.ttft is not None:
            self.ttfts.append(outcome.ttft)

    def total(self, result: str) -> int:
        return sum(n for (r, _), n in self.counts.items() if r == result)


def error_problem(body: bytes) -> str | None:
    """What is wrong with an error body, or None when it has the one shape."""
    try:
        data = json.loads(body)
    except ValueError:
        return f"non-JSON error body {body[:80]!r}"
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict) or set(data) != {"error"} or set(error) != ERROR_FIELDS \
            or not isinstance(error["message"], str) or not error["message"] \
            or not isinstance(error["type"], str):
        return f"wrong error shape {body[:120]!r}"
    return None


def refusal(kind: str, response: httpx.Response, body: bytes, limited_lane: bool) -> Outcome:
    """The outcome of a non-200 answer."""
    problem = error_problem(body)
    if problem:
        return Outcome(kind, OTHER, f"{response.status_code}: {problem}")
    code = json.loads(body)["error"]["code"]
    retry = response.headers.get("retry-after")
    waited = float(retry) if retry and retry.isdigit() else 0.0
    if response.status_code == 503 and code == "queue_full" and retry:
        return Outcome(kind, BUSY, retry_after=waited)
    if response.status_code == 429 and limited_lane and (
            code == "quota_exceeded" or (code == "rate_limit_exceeded" and retry)):
        return Outcome(kind, LIMITED, retry_after=waited)
    return Outcome(kind, OTHER, f"{response.status_code} {code}")


async def sse_events(response: httpx.Response) -> AsyncGenerator[tuple[str, str]]:
    """(event, data) per server-sent event; comments (keep-alives) skipped."""
    event, data = "message", list[str]()
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("data:"):
            data.append(line[6:] if line.startswith("data: ") else line[5:])
        elif line.startswith("event:"):
            event = line[6:].strip()
    if data:
        yield event, "\n".join(data)


def _piece(chunk: dict[str, Any]) -> str:
    choice = chunk["choices"][0] if chunk.get("choices") else {}
    text = choice.get("text") or (choice.get("delta") or {}).get("content") or ""
    return str(text)


async def read_stream(kind: str, response: httpx.Response, sent: float,
                      close_after: int | None) -> Outcome:
    """Check a 200 stream to its end (or close it after `close_after` events)."""
    if not response.headers.get("content-type", "").startswith("text/event-stream"):
        return Outcome(kind, OTHER, "stream without text/event-stream", accepted_stream=True)
    if close_after == 0:
        return Outcome(kind, DISCONNECTED)  # gone right after the head: maybe still queued
    async with contextlib.aclosing(sse_events(response)) as events_of:
        return await _check_events(kind, events_of, sent, close_after)


async def _check_events(kind: str, events_of: AsyncIterator[tuple[str, str]], sent: float,
                        close_after: int | None) -> Outcome:
    ttft, done, finished, events = None, False, False, 0
    async for event, data in events_of:
        if close_after is not None and events >= close_after:
            return Outcome(kind, DISCONNECTED)  # the caller's `async with` closes it
        events += 1
        if done:
            return Outcome(kind, OTHER, "data after [DONE]", accepted_stream=True)
        if data == "[DONE]":
            done = True
            continue
        try:
            chunk = json.loads(data)
            if event == "error" or "error" in chunk:
                code = (chunk.get("error") or {}).get("code")
                return Outcome(kind, OTHER, f"SSE error frame {code}", accepted_stream=True)
            if ttft is None and _piece(chunk):
                ttft = time.monotonic() - sent
            finished = finished or any(c["finish_reason"] for c in chunk["choices"])
        except (ValueError, LookupError, TypeError, AttributeError):
            return Outcome(kind, OTHER, f"malformed event {data[:80]!r}", accepted_stream=True)
    if close_after is not None:
        return Outcome(kind, DISCONNECTED)  # it ended before we closed it: fine too
    if not done or not finished:
        what = "without [DONE]" if not done else "without a finish_reason"
        return Outcome(kind, OTHER, f"stream ended {what}", accepted_stream=True)
    return Outcome(kind, OK, ttft=ttft, accepted_stream=True)


def check_json(kind: str, body: bytes) -> Outcome:
    """A non-streamed 200: a completion with its text, or a non-empty vector per input."""
    try:
        data = json.loads(body)
        if kind == "completion":
            good = isinstance(data["choices"][0]["text"], str)
        elif isinstance(data, dict):  # /v1/embeddings
            good = bool(data["data"]) and all(e["embedding"] for e in data["data"])
        else:  # /embeddings: a vector per text
            good = bool(data) and all(isinstance(v, list) and v for v in data)
    except (ValueError, LookupError, TypeError):
        good = False
    return Outcome(kind, OK) if good else Outcome(kind, OTHER, f"bad body {body[:80]!r}")


# -- the clients -----------------------------------------------------------------------------

@dataclass
class Lane:
    headers: dict[str, str]
    limited: bool


class Soak:
    """The clients' requests and their tally."""

    def __init__(self, args: argparse.Namespace, model: str, kinds: list[str]) -> None:
        self.args, self.model, self.kinds = args, model, kinds
        self.tally = Tally()

    def _prompt(self, rng: random.Random) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))

    def request(self, kind: str, rng: random.Random) -> tuple[str, dict[str, Any], bool]:
        """(path, body, streamed) of a request of `kind`."""
        tokens = rng.randint(max(1, self.args.max_tokens // 4), self.args.max_tokens)
        base = {"model": self.model, "max_tokens": tokens}
        if kind == "disconnect":
            kind = "chat_stream" if "chat_stream" in self.kinds else "completion_stream"
        if kind == "chat_stream":
            return "/v1/chat/completions", {
                **base, "stream": True, "stream_options": {"include_usage": rng.random() < .5},
                "messages": [{"role": "user", "content": self._prompt(rng)}]}, True
        if kind in ("completion_stream", "completion"):
            streamed = kind == "completion_stream"
            return "/v1/completions", {**base, "prompt": self._prompt(rng),
                                       "stream": streamed}, streamed
        texts = [self._prompt(rng) for _ in range(rng.randint(1, 3))]
        if rng.random() < .5:
            return "/v1/embeddings", {"model": self.model, "input": texts}, False
        return "/embeddings", {"model": self.model, "text": texts}, False

    async def one(self, client: httpx.AsyncClient, lane: Lane, kind: str,
                  rng: random.Random) -> Outcome:
        """One request of `kind`, classified (one cut off by cancellation is counted here)."""
        path, body, streamed = self.request(kind, rng)
        close_after = rng.randint(0, 3) if kind == "disconnect" else None
        sent = time.monotonic()
        accepted = False  # a 200 stream we meant to read to its end
        steps: list[str] = []  # httpcore's trace: what a connection error interrupted

        async def trace(name: str, _info: dict[str, Any]) -> None:
            if name.startswith("http11.response_closed"):
                return  # the cleanup after a failure, not where it failed
            if name.startswith("connection.connect_tcp") or not steps:
                steps.append(name)
            else:
                steps[-1] = name

        try:
            async with client.stream("POST", path, json=body, headers=lane.headers,
                                     extensions={"trace": trace}) as response:
                if response.status_code != 200:
                    return refusal(kind, response, await response.aread(), lane.limited)
                accepted = streamed and close_after is None
                if streamed:
                    return await read_stream(kind, response, sent, close_after)
                return check_json(kind, await response.aread())
        except (httpx.HTTPError, httpx.StreamError) as exc:
            fresh = "new" if any(s.startswith("connection.") for s in steps) else "reused"
            return Outcome(kind, OTHER, f"{type(exc).__name__} {str(exc)[:80]!r} on a {fresh} "
                           f"connection at {steps[-1] if steps else '-'}, "
                           f"{time.monotonic() - sent:.1f} s in", accepted_stream=accepted)
        except asyncio.CancelledError:
            self.tally.add(Outcome(kind, OTHER, "still running at the hard deadline",
                                   accepted_stream=accepted))
            raise

    async def client(self, number: int, client: httpx.AsyncClient, lane: Lane,
                     stop_at: float) -> None:
        rng = random.Random(self.args.seed * 100_003 + number)
        weights = [WEIGHTS[k] for k in self.kinds]
        await asyncio.sleep(rng.random() * 0.5)  # not all in the same millisecond
        while time.monotonic() < stop_at:
            outcome = await self.one(client, lane, rng.choices(self.kinds, weights)[0], rng)
            self.tally.add(outcome)
            if outcome.result in (LIMITED, BUSY, OTHER):  # OTHER: no tight loop on a dead server
                wait = min(outcome.retry_after or self.args.max_backoff, self.args.max_backoff)
                await asyncio.sleep(wait * (0.5 + rng.random() / 2))


# -- the run ---------------------------------------------------------------------------------

class OwnServer:
    """`llm-api serve --config` on a free loopback port, in a session of its own."""

    def __init__(self, config: Path, log: Path | None) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        exe = Path(sys.executable).parent / "llm-api"
        command = [str(exe)] if exe.exists() else [shutil.which("llm-api") or "llm-api"]
        self.log = log or Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [*command, "serve", "--config", str(config), "--host", "127.0.0.1",
                 "--port", str(port)], stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent)

    def stop(self, seen: dict[int, int]) -> list[int]:
        """SIGTERM, then SIGKILL of the session after 30 s; returns the pids of processes of
        the tree that outlived the server's own shutdown (killed now)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        deadline = time.monotonic() + 5  # the workers may take a moment after the API exits
        left = [pid for pid, start in seen.items() if _alive(pid, start)]
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = [pid for pid in left if _alive(pid, seen[pid])]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        return left

    def emergency_stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)


def _alive(pid: int, start: int) -> bool:
    """Is the process of that pid and start time still there (not a reused pid)?"""
    stat = _stat(pid)
    return stat is not None and stat[1] == start


def _die_with_parent() -> None:
    """In the server's child: SIGTERM when the soak dies (PR_SET_PDEATHSIG), so that even a
    killed soak leaves no server behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)


async def wait_ready(client: httpx.AsyncClient, timeout: float,
                     server: OwnServer | None) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        if server is not None and server.process.poll() is not None:
            raise SystemExit(f"the server exited ({server.process.returncode}); log: "
                             f"{server.log}\n{server.log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(httpx.TransportError):
            response = await client.get("/ready")
            if response.status_code == 200:
                ready: dict[str, Any] = response.json()
                return ready
        if time.monotonic() > deadline:
            raise SystemExit(f"the server was not ready within {timeout:g} s")
        await asyncio.sleep(0.2)


async def limited_lane(client: httpx.AsyncClient, lane: Lane,
                       args: argparse.Namespace) -> tuple[Lane, int] | None:
    """A lane on a new key with max_parallel 1 and a small rpm (admin `--key`), and its id;
    else None."""
    created = await client.post("/admin/keys", headers=lane.headers, json={
        "name": f"soak {time.strftime('%Y-%m-%d %H:%M:%S')}", "max_parallel": 1,
        "rpm": args.limited_rpm})
    if created.status_code != 201:
        return None
    body = created.json()
    return Lane({"Authorization": f"Bearer {body['secret']}"}, limited=True), body["id"]


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Run:
    """What one soak needs while it runs."""

    args: argparse.Namespace
    url: str
    pid: int | None
    seen: dict[int, int]  # every process of the server's tree met: {pid: start time}
    started: float = field(default_factory=time.monotonic)
    samples: dict[str, Sample] = field(default_factory=dict)
    peak: list[Sample] = field(default_factory=list)

    def sample(self) -> Sample | None:
        return None if self.pid is None else sample(self.pid, self.seen, self.started)

    def client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.args.clients + 10,
                              max_keepalive_connections=None,
                              keepalive_expiry=self.args.keepalive_expiry)
        return httpx.AsyncClient(base_url=self.url, limits=limits,
                                 timeout=httpx.Timeout(60.0, connect=15.0))

    async def phase(self, runner: Soak, lanes: list[Lane], seconds: float,
                    measured: bool) -> bool:
        """All clients for `seconds`, on a connection pool closed at the end; True when
        some request was still running `--grace` seconds later (then cancelled)."""
        limited = round(self.args.clients * self.args.limited_share) if len(lanes) > 1 else 0
        stop_at = time.monotonic() + seconds
        async with self.client() as client:
            tasks = [asyncio.create_task(runner.client(
                i, client, lanes[1] if i < limited else lanes[0], stop_at))
                for i in range(self.args.clients)]
            watcher = asyncio.create_task(self.watch(stop_at - seconds / 2)) if measured \
                else None
            _, pending = await asyncio.wait(tasks, timeout=seconds + self.args.grace)
            for task in [*pending, *([watcher] if watcher else [])]:
                task.cancel()
            await asyncio.gather(*pending, *([watcher] if watcher else []),
                                 return_exceptions=True)
        return bool(pending)

    async def watch(self, middle_at: float) -> None:
        """A sample every second (the peak), and the middle one."""
        while (now := self.sample()) is not None:
            self.peak.append(now)
            if "middle" not in self.samples and time.monotonic() >= middle_at:
                self.samples["middle"] = now
            await asyncio.sleep(1.0)

    async def settled(self, within: float, bound: Sample | None = None) -> Sample | None:
        """A sample once the descriptors stop moving (two equal counts 0.5 s apart) or are
        within the bound of `bound`, or the last one after `within` seconds."""
        deadline = time.monotonic() + within
        last = self.sample()
        while last is not None and time.monotonic() < deadline:
            if bound is not None and not fd_growth(self.args, bound, last):
                break
            await asyncio.sleep(0.5)
            now = self.sample()
            if bound is None and now is not None and now.fds == last.fds:
                return now
            last = now
        return last


async def soak(args: argparse.Namespace, url: str, pid: int | None,
               server: OwnServer | None, seen: dict[int, int]) -> dict[str, Any]:
    run = Run(args, url, pid, seen)
    headers = {"Authorization": f"Bearer {args.key}"} if args.key else {}
    main = Lane(headers, limited=False)
    async with run.client() as client:
        ready = await wait_ready(client, args.start_timeout, server)
        model = args.model or (await client.get("/v1/models", headers=headers)).json()[
            "data"][0]["id"]
        info = next((m for m in ready["models"] if m["name"] == model), None)
        if info is None:
            raise SystemExit(f"no model {model!r} in /ready; served: "
                             f"{[m['name'] for m in ready['models']]}")
        caps = set(info["capabilities"])
        kinds = [k for k in KINDS if (k != "embedding" or "embed" in caps)
                 and (k != "chat_stream" or "chat" in caps)]
        runner = Soak(args, model, kinds)
        key_id = None
        lanes = [main]
        if args.key:
            made = await limited_lane(client, main, args) if args.limited_share > 0 else None
            if made is None:  # not an admin key: its own limits (unknown here) are deliberate
                main.limited = (await client.get("/admin/keys", headers=headers)).status_code \
                    != 200
            else:
                lanes.append(made[0])
                key_id = made[1]
    # warm-up: the same load, so that pools and lazily created state are in the baseline
    hit_deadline = args.warmup > 0 and await run.phase(runner, lanes, args.warmup, False)
    if (start := await run.settled(args.settle)) is not None:
        run.samples["start"] = start
    hit_deadline = await run.phase(runner, lanes, args.seconds, True) or hit_deadline
    async with run.client() as client:
        if key_id is not None:
            await client.post(f"/admin/keys/{key_id}/revoke", headers=headers,
                              json={"reason": "end of the soak"})
        idle, after = await wait_idle(client, model, args.settle)
    if (end := await run.settled(args.settle, start)) is not None:
        run.samples["end"] = end
    if run.peak:
        top = max(run.peak, key=lambda s: s.rss_mib)
        run.samples["peak"] = Sample(top.at, top.rss_mib, max(s.fds for s in run.peak),
                                     max(s.files for s in run.peak),
                                     max(s.processes for s in run.peak))
    return {"model": model, "kinds": kinds, "tally": runner.tally, "samples": run.samples,
            "hit_deadline": hit_deadline, "idle": idle, "ready_before": info,
            "ready_after": after, "limited_clients": round(args.clients * args.limited_share)
            if len(lanes) > 1 else 0}


async def wait_idle(client: httpx.AsyncClient, model: str,
                    within: float) -> tuple[bool, dict[str, Any]]:
    """Poll /ready until the model has nothing queued or running (within `within` s)."""
    deadline = time.monotonic() + within
    while True:
        after: dict[str, Any] = {}
        with contextlib.suppress(httpx.HTTPError, ValueError, StopIteration):
            ready = (await client.get("/ready")).json()
            after = next(m for m in ready["models"] if m["name"] == model)
        idle = bool(after) and after["queued"] == 0 and after["running"] == 0
        if idle or time.monotonic() > deadline:
            return idle, after
        await asyncio.sleep(0.5)


def fd_growth(args: argparse.Namespace, start: Sample, end: Sample) -> list[str]:
    """The descriptor bounds that `end` breaks."""
    failures = []
    if end.streams - start.streams > args.max_fd_growth:
        failures.append(f"open descriptors other than files grew {start.streams} -> "
                        f"{end.streams} (bound +{args.max_fd_growth})")
    if end.files - start.files > args.max_file_fd_growth:
        failures.append(f"open file descriptors grew {start.files} -> {end.files} "
                        f"(bound +{args.max_file_fd_growth})")
    return failures


def verdict(args: argparse.Namespace, result: dict[str, Any], left: list[int]) -> list[str]:
    tally: Tally = result["tally"]
    failures = []
    if tally.total(OTHER):
        failures.append(f"{tally.total(OTHER)} other outcome(s)")
    if tally.streams_unfinished:
        failures.append(f"{tally.streams_unfinished} of {tally.streams_accepted} accepted "
                        "streams did not end properly")
    if not tally.total(OK):
        failures.append("no request succeeded")
    if result["hit_deadline"]:
        failures.append("requests were still running at the hard deadline")
    samples = result["samples"]
    if "start" in samples and "end" in samples:
        start, end = samples["start"], samples["end"]
        failures += fd_growth(args, start, end)
        growth = 100 * (end.rss_mib - start.rss_mib) / start.rss_mib
        if growth > args.max_rss_growth:
            failures.append(f"RSS grew {growth:.0f} % (bound {args.max_rss_growth:g} %)")
    if not result["idle"]:
        failures.append(f"the model was not idle after the run: {result['ready_after']}")
    before = result["ready_before"]["restarts"]
    restarts = result["ready_after"].get("restarts", before) - before
    if restarts:
        failures.append(f"its worker restarted {restarts} time(s) during the run")
    if left:
        failures.append(f"processes left behind after the server stopped: {left}")
    return failures


def report(args: argparse.Namespace, result: dict[str, Any], failures: list[str]) -> str:
    tally: Tally = result["tally"]
    kinds = result["kinds"]
    lines = [f"soak: {args.clients} clients x {args.seconds:g} s (after {args.warmup:g} s of "
             f"warm-up, counted too), model {result['model']}, {result['limited_clients']} "
             "clients on a limited key",
             "", "| outcome | total | " + " | ".join(kinds) + " |",
             "|---|---|" + "---|" * len(kinds)]
    for name in (OK, LIMITED, BUSY, DISCONNECTED, OTHER):
        row = [str(tally.counts[name, k]) for k in kinds]
        lines.append(f"| {name} | {tally.total(name)} | " + " | ".join(row) + " |")
    for what, n in tally.others.most_common(10):
        lines.append(f"  other x{n}: {what}")
    p50, p99 = percentile(tally.ttfts, 0.5), percentile(tally.ttfts, 0.99)
    lines.append("")
    if p50 is not None and p99 is not None:
        lines.append(f"time to first token of ok streams: p50 {1000 * p50:.0f} ms, "
                     f"p99 {1000 * p99:.0f} ms ({len(tally.ttfts)} streams)")
    lines.append(f"accepted streams: {tally.streams_accepted}, not ended properly: "
                 f"{tally.streams_unfinished}")
    samples: dict[str, Sample] = result["samples"]
    if samples:
        lines += ["", "| server tree | at s | RSS MiB | open fds | of which files | processes |",
                  "|---|---|---|---|---|---|"]
        for name in ("start", "middle", "peak", "end"):
            if name in samples:
                s = samples[name]
                lines.append(f"| {name} | {s.at:g} | {s.rss_mib:.1f} | {s.fds} | {s.files} | "
                             f"{s.processes} |")
    else:
        lines.append("(no --pid: RSS and descriptors not sampled)")
    lines.append("")
    lines += [f"FAIL: {f}" for f in failures] or ["PASS"]
    return "\n".join(lines)


def as_json(args: argparse.Namespace, result: dict[str, Any], failures: list[str],
            left: list[int], seen: dict[int, int]) -> dict[str, Any]:
    tally: Tally = result["tally"]
    return {
        "clients": args.clients, "seconds": args.seconds, "model": result["model"],
        "kinds": result["kinds"], "limited_clients": result["limited_clients"],
        "outcomes": {name: tally.total(name) for name in (OK, LIMITED, BUSY, DISCONNECTED,
                                                           OTHER)},
        "by_kind": {f"{r} / {k}": n for (r, k), n in sorted(tally.counts.items())},
        "others": dict(tally.others),
        "streams_accepted": tally.streams_accepted,
        "streams_unfinished": tally.streams_unfinished,
        "ttft_p50": percentile(tally.ttfts, 0.5), "ttft_p99": percentile(tally.ttfts, 0.99),
        "samples": {k: asdict(v) for k, v in result["samples"].items()},
        "bounds": {"max_fd_growth": args.max_fd_growth,
                   "max_file_fd_growth": args.max_file_fd_growth,
                   "max_rss_growth": args.max_rss_growth},
        "hit_deadline": result["hit_deadline"], "idle_after": result["idle"],
        "processes_seen": sorted(seen), "left_behind": left, "failures": failures,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = OwnServer(args.config, args.server_log) if args.config else None
    url = server.url if server else args.url.rstrip("/")
    pid = server.process.pid if server else args.pid
    seen: dict[int, int] = {}
    bound = args.start_timeout + args.warmup + args.seconds + 2 * args.grace \
        + 3 * args.settle + 60
    watchdog = threading.Timer(bound, _give_up, (server, bound))
    watchdog.daemon = True
    watchdog.start()
    signal.signal(signal.SIGTERM, _interrupt)
    left: list[int] = []
    exit_code: int | None = 0
    try:
        result = asyncio.run(soak(args, url, pid, server, seen))
    except KeyboardInterrupt:
        print("soak: interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None:
            left = server.stop(seen)
            exit_code = server.process.returncode
        watchdog.cancel()
    failures = verdict(args, result, left)
    if exit_code != 0 and server is not None:
        failures.append(f"the server exited with {exit_code} on SIGTERM (log: {server.log})")
    print(report(args, result, failures))
    if args.json:
        args.json.write_text(json.dumps(as_json(args, result, failures, left, seen), indent=1))
    return 1 if failures else 0


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # the `finally` of main stops the server


def _give_up(server: OwnServer | None, bound: float) -> None:
    print(f"soak: still running after {bound:g} s; stopping hard", file=sys.stderr, flush=True)
    if server is not None:
        server.emergency_stop()
    os._exit(3)


if __name__ == "__main__":
    sys.exit(main())
