"""What a chat request with tools costs vs the same chat without: prompt tokens, TTFT, latency.

    .venv/bin/python bench/tools.py [--n 20] [--clients 4] [--max-tokens 48] [--json PATH]

Starts its own `llm-api serve` (loopback, auth off, a data dir of its own; stopped at the end,
and by a watchdog after `--deadline`) over the bench GGUF (bench/.cache/rand-91m-q8_0-noeos.gguf:
serving.py's random ~91M-parameter Q8_0 model, if it was built) else the tiny fixture
(tests/fixtures/tiny-llama-q8_0.gguf), or `--model PATH`, with `model_params.chat_template` set
to the Qwen 2.5 template (tests/fixtures/templates/; it renders the tools into the system turn)
and `--parallel` slots. An agent's 8 tools (descriptions, parameter schemas with enums, arrays
and a nested object) and short user questions; greedy, `--max-tokens` each (both models are
random: they never end early, never call a tool by themselves, and under the grammar of (d)
never close a string, so each answer runs to max_tokens); every request streamed with usage.

Cases, the same questions in the same order in each:
  a  no tools: a system message that starts with a session line unique to the request (so no
     slot's cached prefix shares more than a few leading tokens), then the question;
  b  tools (tool_choice auto), cold: the same chat plus the 8 tools;
  c  tools, warm: the same tools and one fixed system message: after an unmeasured first wave
     (one request per client, so that every slot in use holds the prefix), each request finds
     the KV cells of the system + tools prefix in its slot and computes only the question;
  d  tool_choice required, cold: as b, the answer constrained by a grammar of the tools'
     schemas to a call.
Each case runs `--n` requests one at a time, then `--n` with `--clients` concurrent clients;
the cases take turns in blocks of `--block` requests, the order rotating block by block, so a
slow spell of this shared machine falls on all of them. Per case: prompt tokens (usage, p50);
prompt tokens reused from a slot's cache (growth of llm_api_prefix_cache_hit_tokens_total on
/metrics over the case's requests, per request); TTFT p50 as a client sees it (the first delta
with content or a tool call: a call goes out whole once its arguments are complete, and a
forced call cut by max_tokens is dropped, so (d) on a random model has none); the server's time
to first token (mean of llm_api_time_to_first_token_seconds over the case's requests: to the
first generated text, before the tool-call parser holds any back); total latency p50; the
ratios to (a). Exits 1 when a request failed or the server did not stop cleanly.

With the bench model a cold request prefills ~3,500 prompt tokens (its 1,000-entry vocabulary
spends ~1.4 characters a token on the tools' JSON): ~20 s each on one core of this machine, so
the default run takes ~50 minutes and `--n 8 --block 4` ~20; the tiny fixture, ~2 minutes.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serving_systems import CACHE  # noqa: E402
from soak import OwnServer, process_tree  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
BENCH_GGUF = CACHE / "rand-91m-q8_0-noeos.gguf"
TINY_GGUF = ROOT / "tests" / "fixtures" / "tiny-llama-q8_0.gguf"
TEMPLATE = ROOT / "tests" / "fixtures" / "templates" / "Qwen-Qwen2.5-7B-Instruct.jinja"
MODEL = "bench"
FLASH: dict[str, bool | str] = {"auto": "auto", "on": True, "off": False}
#: /metrics series read before and after each block of requests (the model's label)
SERIES = {"reused": "llm_api_prefix_cache_hit_tokens_total",
          "ttft_sum": "llm_api_time_to_first_token_seconds_sum",
          "ttft_count": "llm_api_time_to_first_token_seconds_count"}
CASES = {"a": "no tools", "b": "tools (auto), cold", "c": "tools (auto), warm prefix",
         "d": "tool_choice required, cold"}
SYSTEM = ("You are Ops Assistant, the operations agent of a small software company. Use the "
          "tools when they help; answer briefly.")


def _fn(name: str, description: str, properties: dict[str, Any],
        required: list[str]) -> dict[str, Any]:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": properties, "required": required}}}


def _s(description: str, **extra: Any) -> dict[str, Any]:
    return {"type": "string", "description": description, **extra}


#: An agent's tool list, as an assistant for a small company's operations might carry.
#: Numeric bounds and email addresses are in the descriptions, not `minimum`/`maximum` or
#: `format: email`: constrained decoding cannot enforce those, so tool_choice required
#: refuses a list with them (400).
TOOLS = [
    _fn("get_weather", "Current weather and the forecast for a city.", {
        "city": _s("City name, e.g. 'Lisbon' or 'San Francisco, CA'."),
        "days": {"type": "integer", "description": "Days of forecast after today, 0 to 7 "
                 "(0: current conditions only)."},
        "units": _s("Temperature units.", enum=["celsius", "fahrenheit"])}, ["city"]),
    _fn("search_web", "Search the web and return the top results with titles, URLs and "
        "snippets.", {
            "query": _s("The search query."),
            "max_results": {"type": "integer", "description": "How many results to "
                            "return, 1 to 10."},
            "recency": _s("Only results from this period.",
                          enum=["any", "day", "week", "month", "year"])}, ["query"]),
    _fn("read_file", "Read a text file from the shared workspace.", {
        "path": _s("Path relative to the workspace root."),
        "start_line": {"type": "integer", "description": "First line to read (from 1)."},
        "end_line": {"type": "integer", "description": "Last line to read."}},
        ["path"]),
    _fn("run_sql", "Run a read-only SQL query on the analytics database (PostgreSQL) and "
        "return at most 100 rows.", {
            "query": _s("A single SELECT statement."),
            "database": _s("Which database.", enum=["sales", "support", "billing"])},
        ["query", "database"]),
    _fn("send_email", "Send an email from the operations mailbox.", {
        "to": {"type": "array", "items": {"type": "string"},
               "description": "Recipients' email addresses."},
        "subject": _s("Subject line."),
        "body": _s("Plain-text body."),
        "cc": {"type": "array", "items": {"type": "string"},
               "description": "Email addresses in copy."}}, ["to", "subject", "body"]),
    _fn("create_calendar_event", "Create an event in the team calendar and invite people.", {
        "title": _s("Event title."),
        "start": _s("Start, ISO 8601 date and time with offset."),
        "duration_minutes": {"type": "integer", "description": "Length, 5 to 480."},
        "attendees": {"type": "array", "items": {"type": "string"},
                      "description": "Attendees' email addresses."},
        "location": _s("Room or video-call link.")}, ["title", "start"]),
    _fn("create_ticket", "Open a ticket in the issue tracker.", {
        "title": _s("One-line summary."),
        "description": _s("What happened, steps to reproduce, expected result."),
        "priority": _s("Priority.", enum=["low", "medium", "high", "urgent"]),
        "labels": {"type": "array", "items": {"type": "string"}},
        "assignee": {"type": "object", "description": "Who should handle it.", "properties": {
            "team": _s("Team name."), "user": _s("User name, if known.")},
            "required": ["team"]}}, ["title", "priority"]),
    _fn("convert_currency", "Convert an amount between currencies at today's rate.", {
        "amount": {"type": "number", "description": "Amount to convert."},
        "from_currency": _s("ISO 4217 code, e.g. EUR."),
        "to_currency": _s("ISO 4217 code, e.g. USD.")},
        ["amount", "from_currency", "to_currency"]),
]

QUESTIONS = [
    "What's the weather in Lisbon tomorrow?",
    "How much is 250 EUR in USD today?",
    "Find recent news about the PostgreSQL 17 release.",
    "How many support tickets did we close last week?",
    "Open a ticket: the login page is slow since this morning.",
    "Set up a 30 minute call with Ana tomorrow at 10.",
    "What does the README in the deploy folder say about rollbacks?",
    "Email the team that the release moved to Friday.",
]


# -- one streamed request --------------------------------------------------------------------

@dataclass
class Result:
    """One streamed chat request; times in seconds from its start."""

    ttft: float | None = None  # first delta with content or a tool call
    total: float = 0.0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    finish: str | None = None
    called: bool = False  # some delta carried tool_calls
    error: str | None = None


def _read(response: http.client.HTTPResponse, result: Result, start: float) -> None:
    while line := response.readline():
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return
        chunk = json.loads(data)
        if "error" in chunk:
            result.error = str(chunk["error"])[:300]
            return
        if chunk.get("usage"):
            result.prompt_tokens = int(chunk["usage"]["prompt_tokens"])
            result.completion_tokens = int(chunk["usage"]["completion_tokens"])
        for choice in chunk.get("choices") or ():
            delta = choice.get("delta") or {}
            result.called = result.called or bool(delta.get("tool_calls"))
            if result.ttft is None and (delta.get("content") or delta.get("tool_calls")):
                result.ttft = time.perf_counter() - start
            result.finish = choice.get("finish_reason") or result.finish
    result.error = result.error or "stream ended without [DONE]"


def chat(port: int, body: dict[str, Any], timeout: float) -> Result:
    payload = json.dumps({**body, "stream": True, "stream_options": {"include_usage": True}})
    result = Result()
    start = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("POST", "/v1/chat/completions", payload,
                           {"Content-Type": "application/json"})
        response = connection.getresponse()
        if response.status != 200:
            result.error = f"HTTP {response.status}: {response.read()[:300]!r}"
        else:
            _read(response, result, start)
    except (OSError, http.client.HTTPException, ValueError) as exc:
        result.error = repr(exc)
    finally:
        result.total = time.perf_counter() - start
        connection.close()
    if result.error is None and result.prompt_tokens is None:
        result.error = "no usage in the stream"
    return result


def get(port: int, path: str) -> tuple[int, str]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.read().decode()
    except OSError:
        return 0, ""
    finally:
        connection.close()


def scrape(port: int) -> dict[str, float]:
    """The model's SERIES from /metrics: prompt tokens reused from a slot's cache, and the
    server's time-to-first-token histogram (admission to the first generated text, before
    any tool-call parsing holds text back)."""
    status, text = get(port, "/metrics")
    found: dict[str, float] = {}
    for line in text.splitlines():
        for key, name in SERIES.items():
            if line.startswith(name + "{") and f'model="{MODEL}"' in line:
                found[key] = float(line.rsplit(" ", 1)[1])
    if "reused" not in found:
        raise RuntimeError(f"no {SERIES['reused']} for model {MODEL} on /metrics "
                           f"(HTTP {status})")
    return {key: found.get(key, 0.0) for key in SERIES}


# -- the cases -------------------------------------------------------------------------------

class Bodies:
    """Request bodies of each case; request i asks QUESTIONS[i % 8] in every case."""

    def __init__(self, args: argparse.Namespace, seed: int) -> None:
        self.rng = random.Random(seed)
        self.base = {"model": MODEL, "max_tokens": args.max_tokens, "temperature": 0}
        self.tools = TOOLS[:args.tools]
        self.warm_system = f"Session {self._session()}. {SYSTEM}"  # c: one for the run
        self.count = {case: 0 for case in CASES}

    def _session(self) -> str:
        return "".join(self.rng.choices("0123456789abcdef", k=12))

    def next(self, case: str) -> dict[str, Any]:
        question = QUESTIONS[self.count[case] % len(QUESTIONS)]
        self.count[case] += 1
        system = self.warm_system if case == "c" else f"Session {self._session()}. {SYSTEM}"
        body: dict[str, Any] = {**self.base, "messages": [
            {"role": "system", "content": system}, {"role": "user", "content": question}]}
        if case != "a":
            body["tools"] = self.tools
            body["tool_choice"] = "required" if case == "d" else "auto"
        return body


@dataclass
class Block:
    """The measured requests of one case at one concurrency."""

    results: list[Result] = field(default_factory=list)
    reused: float = 0.0  # growth of the prefix-reuse counter over them
    server_ttft: float = 0.0  # growth of the server's TTFT histogram: sum (s) and count
    server_ttft_count: float = 0.0
    wall: float = 0.0


def wave(port: int, bodies: list[dict[str, Any]], clients: int,
         timeout: float) -> tuple[list[Result], float]:
    """The bodies through `clients` concurrent clients (each takes the next body when its
    request ends); the results in body order and the wall time."""
    results: list[Result | None] = [None] * len(bodies)
    lock = threading.Lock()
    todo = iter(range(len(bodies)))

    def client() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            results[i] = chat(port, bodies[i], timeout)

    began = time.perf_counter()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None], time.perf_counter() - began


def run_block(port: int, bodies: Bodies, case: str, n: int, clients: int,
              timeout: float, into: Block) -> None:
    if case == "c":  # the first wave leaves the system + tools prefix in the slots it used
        done, _ = wave(port, [bodies.next(case) for _ in range(clients)], clients, timeout)
        errors = [r.error for r in done if r.error]
        if errors:
            raise RuntimeError(f"warm-up of case c failed: {errors[0]}")
    before = scrape(port)
    results, wall = wave(port, [bodies.next(case) for _ in range(n)], clients, timeout)
    after = scrape(port)
    into.reused += after["reused"] - before["reused"]
    into.server_ttft += after["ttft_sum"] - before["ttft_sum"]
    into.server_ttft_count += after["ttft_count"] - before["ttft_count"]
    into.results += results
    into.wall += wall


def blocks_of(n: int, size: int) -> list[int]:
    return [min(size, n - i) for i in range(0, n, size)]


def measure(port: int, args: argparse.Namespace) -> dict[str, dict[str, Block]]:
    """{concurrency label: {case: Block}}; the cases take turns block by block."""
    out: dict[str, dict[str, Block]] = {}
    bodies = Bodies(args, args.seed)
    for clients in dict.fromkeys((1, args.clients)):
        label = "1" if clients == 1 else str(clients)
        out[label] = {case: Block() for case in CASES}
        order = list(CASES)
        for r, size in enumerate(blocks_of(args.n, args.block)):
            for case in order[r % 4:] + order[:r % 4]:
                began = time.perf_counter()
                run_block(port, bodies, case, size, clients, args.timeout, out[label][case])
                print(f"  clients {clients}, block {r + 1}: {case} x {size} "
                      f"{time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
    return out


# -- the report ------------------------------------------------------------------------------

def p50(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summary(block: Block) -> dict[str, Any]:
    ok = [r for r in block.results if r.error is None]
    finishes: dict[str, int] = {}
    for r in ok:
        finishes[r.finish or "-"] = finishes.get(r.finish or "-", 0) + 1
    return {
        "requests": len(block.results), "errors": len(block.results) - len(ok),
        "first_error": next((r.error for r in block.results if r.error), None),
        "prompt_tokens": p50([r.prompt_tokens for r in ok if r.prompt_tokens is not None]),
        "completion_tokens": p50([r.completion_tokens for r in ok
                                  if r.completion_tokens is not None]),
        "reused_per_request": block.reused / len(ok) if ok else None,
        "ttft_p50": p50([r.ttft for r in ok if r.ttft is not None]),
        "server_ttft_mean": block.server_ttft / block.server_ttft_count
        if block.server_ttft_count else None,
        "total_p50": p50([r.total for r in ok]),
        "tool_calls": sum(r.called for r in ok), "finish": finishes,
        "requests_per_s": len(ok) / block.wall if block.wall else None,
    }


def _ratio(value: float | None, base: float | None) -> str:
    return f"{value / base:.2f}×" if value is not None and base else "–"


def _ms(value: float | None) -> str:
    return f"{1000 * value:.0f}" if value is not None else "–"


def table(stats: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| case | clients | prompt tokens | × (a) | reused / request | TTFT p50 ms | × (a) "
             "| server first token, mean ms | × (a) | total p50 ms | × (a) "
             "| completion tokens | tool calls | finish |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for clients, cases in stats.items():
        a = cases["a"]
        for case, s in cases.items():
            tokens = "–" if s["prompt_tokens"] is None else f"{s['prompt_tokens']:.0f}"
            reused = "–" if s["reused_per_request"] is None else \
                f"{s['reused_per_request']:.0f}"
            completion = "–" if s["completion_tokens"] is None else \
                f"{s['completion_tokens']:.0f}"
            done = s["requests"] - s["errors"]
            finish = ", ".join(f"{k} {n}" for k, n in sorted(s["finish"].items())) or "–"
            lines.append(
                f"| ({case}) {CASES[case]} | {clients} | {tokens} | "
                f"{_ratio(s['prompt_tokens'], a['prompt_tokens'])} | {reused} | "
                f"{_ms(s['ttft_p50'])} | {_ratio(s['ttft_p50'], a['ttft_p50'])} | "
                f"{_ms(s['server_ttft_mean'])} | "
                f"{_ratio(s['server_ttft_mean'], a['server_ttft_mean'])} | "
                f"{_ms(s['total_p50'])} | {_ratio(s['total_p50'], a['total_p50'])} | "
                f"{completion} | {s['tool_calls']}/{done} | {finish} |")
    return "\n".join(lines)


# -- the server and the run ------------------------------------------------------------------

def pick_model(given: Path | None) -> Path:
    if given is not None:
        if not given.is_file():
            raise SystemExit(f"no model at {given}")
        return given
    return BENCH_GGUF if BENCH_GGUF.is_file() else TINY_GGUF


def write_config(workdir: Path, args: argparse.Namespace, model: Path) -> Path:
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({
        "auth": {"enabled": False}, "data_dir": str(workdir / "data"),
        "server": {"max_queue": 64, "log_level": "warning"},
        "models": {MODEL: {"model_family": "llama", "setup_params": {"model_path": str(model)},
                           "model_params": {
                               "n_ctx": args.n_ctx, "n_threads": args.threads,
                               "n_threads_batch": args.threads, "parallel": args.parallel,
                               "flash_attn": FLASH[args.flash_attn],
                               "chat_template": TEMPLATE.read_text()}}}}))
    return config


def wait_ready(server: OwnServer, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while get(port, "/ready")[0] != 200:
        if server.process.poll() is not None:
            raise SystemExit(f"the server exited ({server.process.returncode}); log "
                             f"{server.log}:\n{server.log.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            raise SystemExit(f"the server was not ready within {timeout:g} s (log {server.log})")
        time.sleep(0.2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, help="a GGUF (default: the bench model if built, "
                        "else the tiny fixture)")
    parser.add_argument("--n", type=int, default=20, help="measured requests per case and "
                        "concurrency")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients of the "
                        "second pass (1: sequential only)")
    parser.add_argument("--block", type=int, default=10, help="requests of a case in a "
                        "row before the next case takes its turn (each block of case c starts "
                        "with its unmeasured warm-up wave)")
    parser.add_argument("--tools", type=int, default=len(TOOLS), help=f"the first K of the "
                        f"{len(TOOLS)} tools")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--parallel", type=int, default=4, help="model_params.parallel (slots)")
    parser.add_argument("--n-ctx", type=int, default=4096, help="context per slot")
    parser.add_argument("--threads", type=int, default=1, help="n_threads and "
                        "n_threads_batch (2 threads stall whenever another process holds one "
                        "of this machine's 2 cores)")
    parser.add_argument("--flash-attn", choices=list(FLASH), default="auto",
                        help="model_params.flash_attn (auto: llama.cpp decides; on for CPU)")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--deadline", type=float, default=7200.0, help="seconds the whole run "
                        "may take before the server is killed and the bench exits 2")
    parser.add_argument("--start-timeout", type=float, default=120.0)
    parser.add_argument("--server-log", type=Path, help="default: a temp file")
    parser.add_argument("--json", type=Path, help="write the figures here ('-': stdout, "
                        "instead of the table)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if min(args.n, args.clients, args.block, args.max_tokens, args.tools) < 1 \
            or args.parallel < 2 or args.tools > len(TOOLS):
        parser.error(f"--n, --clients, --block, --max-tokens >= 1, --parallel >= 2 and "
                     f"1 <= --tools <= {len(TOOLS)}")
    if args.block < args.clients:
        parser.error("--block must be at least --clients (else a block never has every "
                     "client busy)")
    return args


def header(args: argparse.Namespace, model: Path, load: tuple[float, ...]) -> dict[str, Any]:
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cores": os.cpu_count(), "load_before": [round(x, 2) for x in load],
            "model": str(model.relative_to(ROOT) if model.is_relative_to(ROOT) else model),
            "template": TEMPLATE.name, "tools": args.tools,
            "tools_json_chars": len(json.dumps(TOOLS[:args.tools])), "n": args.n,
            "clients": args.clients, "block": args.block, "max_tokens": args.max_tokens,
            "parallel": args.parallel, "n_ctx": args.n_ctx, "threads": args.threads,
            "flash_attn": args.flash_attn}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = pick_model(args.model)
    info = header(args, model, os.getloadavg())
    with tempfile.TemporaryDirectory(prefix="bench-tools-") as tmp:
        server = OwnServer(write_config(Path(tmp), args, model), args.server_log)
        port = int(server.url.rsplit(":", 1)[1])
        seen: dict[int, int] = {}

        def give_up() -> None:
            print(f"tools bench: over --deadline {args.deadline:g} s; killing the server",
                  file=sys.stderr, flush=True)
            server.emergency_stop()
            os._exit(2)

        watchdog = threading.Timer(args.deadline, give_up)
        watchdog.daemon = True
        watchdog.start()
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            wait_ready(server, port, args.start_timeout)
            seen.update(process_tree(server.process.pid))
            print(f"tools bench: {info['model']}, {args.n} requests per case x clients 1 and "
                  f"{args.clients}", file=sys.stderr, flush=True)
            blocks = measure(port, args)
            seen.update(process_tree(server.process.pid))
        except KeyboardInterrupt:
            print("tools bench: interrupted", file=sys.stderr)
            return 130
        finally:
            left = server.stop(seen)
            watchdog.cancel()
    info["load_after"] = [round(x, 2) for x in os.getloadavg()]
    stats = {clients: {case: summary(b) for case, b in cases.items()}
             for clients, cases in blocks.items()}
    failures = [f"clients {c}, case {k}: {s['errors']} error(s), e.g. {s['first_error']}"
                for c, cases in stats.items() for k, s in cases.items() if s["errors"]]
    if left:
        failures.append(f"processes left behind after the server stopped: {left}")
    if server.process.returncode != 0:
        failures.append(f"the server exited with {server.process.returncode} on SIGTERM")
    out = {**info, "stats": stats, "failures": failures,
           "raw": {c: {k: [asdict(r) for r in b.results] for k, b in cases.items()}
                   for c, cases in blocks.items()}}
    if args.json is not None and str(args.json) == "-":
        print(json.dumps(out, indent=1))
    else:
        print(f"{info['date']}, {info['cores']} cores, load {info['load_before']} -> "
              f"{info['load_after']}; {info['model']}, {args.threads} threads, parallel "
              f"{args.parallel}, n_ctx {args.n_ctx}/slot, flash_attn {args.flash_attn}; "
              f"{args.tools} tools "
              f"({info['tools_json_chars']} characters of JSON), {args.n} requests per row, "
              f"max_tokens {args.max_tokens}, greedy, streamed\n")
        print(table(stats))
        print("\n" + ("\n".join(f"FAIL: {f}" for f in failures) or "PASS"))
        if args.json is not None:
            args.json.write_text(json.dumps(out, indent=1))
    return 1 if failures else 0


def _interrupt(_signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt  # the `finally` of main stops the server


if __name__ == "__main__":
    sys.exit(main())
