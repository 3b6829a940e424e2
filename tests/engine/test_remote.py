"""Remote workers over Redis Streams: `llm-api worker` subprocesses serving an API server
through a real Redis (127.0.0.1:6379; each test module uses a key prefix of its own)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import (
    TINY_GGUF,
    LiveServer,
    assert_error,
    generate,
    parse_sse,
    service_missing,
    stream_events,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]


def model(**extra: Any) -> dict[str, Any]:
    return {"model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
            "model_params": {"n_ctx": 4096, "n_threads": 2}, "placement": "remote",
            "request_timeout": 60, **extra}


def remote_config(redis_url: str, prefix: str) -> dict[str, Any]:
    return {"redis_url": redis_url,
            "workers": {"prefix": prefix, "heartbeat_seconds": 0.2, "dead_after_seconds": 1.0},
            "models": {"tiny": model(default_max_tokens=64),
                       # one sequence per worker, no queue: the backlog bound is the slots
                       "one": model(max_queue=0, model_params={"n_ctx": 4096, "n_threads": 2,
                                                               "parallel": 1}),
                       "orphan": model()}}  # no worker serves it


class Cluster:
    """An API server and `llm-api worker` subprocesses sharing one Redis key prefix."""

    def __init__(self, directory: Path, redis_url: str, netns: str | None = None) -> None:
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.redis = redis.Redis.from_url(redis_url)
        self.directory = directory
        self.netns = netns
        self.api = LiveServer(remote_config(redis_url, self.prefix), directory / "api")
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self, models: str = "tiny,one",
                     on_host_b: bool = True) -> subprocess.Popen[bytes]:
        command = [sys.executable, "-m", "app.cli", "worker", "--config",
                   str(self.api.config_path), "--models", models]
        if self.netns and on_host_b:
            command = ["ip", "netns", "exec", self.netns, *command]
        log = (self.directory / f"worker{len(self.workers)}.log").open("wb")
        env = {**os.environ, "LLM_API_SERVER__LOG_FORMAT": "json",
               "LLM_API_SERVER__LOG_LEVEL": "debug"}
        worker = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                  env=env)
        self.workers.append(worker)
        return worker

    def worker_log(self, index: int) -> str:
        return (self.directory / f"worker{index}.log").read_text(errors="replace")

    def live(self, name: str = "tiny") -> int:
        return int(self.api.model_stats(name)["workers"] or 0)

    def wait_workers(self, count: int, name: str = "tiny") -> None:
        wait_for(lambda: self.live(name) == count, 60, f"{count} live workers of {name}")

    def pid_running(self, name: str) -> int:
        """The pid of the worker that holds the model's one running job."""
        pending: Any = []

        def found() -> bool:
            nonlocal pending
            pending = self.redis.xpending_range(f"{self.prefix}:{name}:jobs", "workers",
                                                "-", "+", 10)
            return len(pending) == 1
        wait_for(found, 10, "a running job")
        return int(pending[0]["consumer"].decode().split("-")[-2])  # host-pid-random

    def stop(self) -> None:
        self.api.stop()
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGINT)
        for worker in self.workers:
            try:
                worker.wait(10)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        keys = list(self.redis.scan_iter(f"{self.prefix}:*", count=1000))
        if keys:
            self.redis.delete(*keys)
        self.redis.close()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Cluster]:
    """An API server whose models tiny and one are served by two workers; orphan by none."""
    cluster = Cluster(tmp_path_factory.mktemp("remote"), redis_url)
    cluster.api.start(wait_ready=False)
    cluster.start_worker()
    cluster.start_worker()
    try:
        cluster.wait_workers(2)
        cluster.wait_workers(2, "one")
        yield cluster
    finally:
        cluster.stop()


def greedy(max_tokens: int, prompt: str = "the quick brown fox", name: str = "tiny"
           ) -> dict[str, Any]:
    return {"prompt": prompt, "model": name,
            "params": {"temperature": 0, "max_tokens": max_tokens}}


def test_request_is_served_by_a_worker_and_streamed_back(cluster: Cluster) -> None:
    body = greedy(40)
    text = generate(cluster.api, body["prompt"], temperature=0, max_tokens=40)
    events = stream_events(cluster.api.client, body)
    assert len(events) > 1 and "".join(data for _, data in events) == text
    ready = cluster.api.model_stats("tiny")
    assert ready["placement"] == "remote" and ready["state"] == "ready"
    assert "generate" in ready["capabilities"] and ready["context_length"] == 4096
    vectors = cluster.api.client.post("/embeddings", json={"model": "tiny", "text": "a b"})
    assert vectors.status_code == 200, vectors.text


def test_the_request_id_reaches_the_worker_log_and_heartbeats_the_metrics(
        cluster: Cluster) -> None:
    rid = f"remote-{uuid.uuid4().hex[:12]}"
    response = cluster.api.client.post("/generate", json=greedy(3),
                                       headers={"X-Request-ID": rid})
    assert response.status_code == 200 and response.headers["x-request-id"] == rid

    def logged() -> list[dict[str, Any]]:
        lines = [line for i in range(len(cluster.workers))
                 for line in cluster.worker_log(i).splitlines() if rid in line]
        return [json.loads(line) for line in lines]

    wait_for(lambda: any(r["message"].startswith("generation completed") for r in logged()),
             what="the worker's line about the request")
    assert {r["request_id"] for r in logged()} == {rid}
    metrics = cluster.api.client.get("/metrics")  # auth is off: open
    assert metrics.status_code == 200
    ages = [s.value for family in text_string_to_metric_families(metrics.text)
            if family.name == "llm_api_worker_heartbeat_age_seconds"
            for s in family.samples if s.labels["model"] == "tiny"]
    assert len(ages) == 2 and all(0 <= age <= 1.0 for age in ages)
    workers = [s.value for family in text_string_to_metric_families(metrics.text)
               if family.name == "llm_api_workers" for s in family.samples
               if s.labels["model"] == "tiny"]
    assert workers == [2]


def test_no_live_worker_is_503_naming_the_model(cluster: Cluster) -> None:
    response = cluster.api.client.post("/generate", json=greedy(5, name="orphan"))
    assert_error(response, 503, "no_workers", mentions=("orphan",))
    assert int(response.headers["Retry-After"]) > 0
    assert cluster.api.model_stats("orphan")["state"] == "waiting"


def test_backlog_over_the_bound_is_503_queue_full(cluster: Cluster) -> None:
    # "one": no queue and one sequence per worker, two workers: two jobs fill it.
    client = cluster.api.client
    with client.stream("POST", "/agenerate", json=greedy(3000, name="one")) as first, \
            client.stream("POST", "/agenerate", json=greedy(3000, name="one")) as second:
        # (an iterator dropped closes its response: keep them)
        lines = [response.iter_lines() for response in (first, second)]
        assert first.status_code == second.status_code == 200
        assert all(next(one) for one in lines)
        refused = client.post("/generate", json=greedy(5, name="one"))
        error = assert_error(refused, 503, "queue_full", mentions=("one", "busy"))
        assert int(refused.headers["Retry-After"]) >= 1, error
    # the two were cancelled: the backlog empties and the model serves again
    wait_for(lambda: cluster.redis.xlen(f"{cluster.prefix}:one:jobs") == 0, 20, "no backlog")
    assert generate(cluster.api, "hello", model="one", temperature=0, max_tokens=5)


def test_cancel_on_disconnect_reaches_the_worker(cluster: Cluster) -> None:
    before = cluster.api.model_stats("tiny")
    with cluster.api.client.stream("POST", "/agenerate", json=greedy(3000)) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    # the worker's stats (from its heartbeats): the job ended as cancelled, long before
    # its 3000 tokens, and no token is generated after that
    wait_for(lambda: cluster.api.model_stats("tiny")["cancelled"] > before["cancelled"]
             and cluster.api.model_stats("tiny")["running"] == 0, 20, "the job cancelled")
    generated = cluster.api.model_stats("tiny")["tokens_generated"]
    assert generated - before["tokens_generated"] < 3000
    time.sleep(0.6)  # three heartbeats
    assert cluster.api.model_stats("tiny")["tokens_generated"] == generated


def test_kill9_of_a_worker_mid_stream_reruns_greedy_once(cluster: Cluster) -> None:
    body = greedy(400, prompt="once upon a time")
    expected = generate(cluster.api, body["prompt"], temperature=0, max_tokens=400)
    texts: list[str] = []
    with cluster.api.client.stream("POST", "/agenerate", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(lines)
        os.kill(cluster.pid_running("tiny"), signal.SIGKILL)
        events = list(parse_sse([first, *lines]))
    texts = [data for event, data in events if event == "message"]
    assert "".join(texts) == expected
    assert any("taking over job" in cluster.worker_log(i) for i in range(len(cluster.workers)))
    replace_dead_worker(cluster)


def test_kill9_mid_stream_ends_a_sampled_request_with_engine_restarted(cluster: Cluster
                                                                      ) -> None:
    body = {"prompt": "once upon a time", "model": "tiny",
            "params": {"temperature": 0.9, "max_tokens": 400}}
    with cluster.api.client.stream("POST", "/agenerate", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(lines)
        os.kill(cluster.pid_running("tiny"), signal.SIGKILL)
        events = list(parse_sse([first, *lines]))
    # what was sent stays; the rerun (other text: it samples) is not appended to it
    assert events[-1][0] == "error" and "engine_restarted" in events[-1][1]
    replace_dead_worker(cluster)


def replace_dead_worker(cluster: Cluster) -> None:
    """The dead worker is dropped from the live ones; a new one takes its place."""
    cluster.wait_workers(1)
    cluster.start_worker()
    cluster.wait_workers(2)
    cluster.wait_workers(2, "one")


def test_a_job_whose_workers_keep_dying_ends_with_an_error(cluster: Cluster) -> None:
    """Three workers took the job in turn and died (it was delivered three times, never
    acked): the worker that takes it over next (max_attempts 3) ends it with a clean error
    instead of running it, and the dead consumers are removed from the group."""
    r, jobs, job_id = cluster.redis, f"{cluster.prefix}:tiny:jobs", uuid.uuid4().hex
    message = json.dumps({"id": job_id, "timeout": 30, "texts": ["a"]})
    with r.pipeline(transaction=True) as pipe:  # no live worker can read it in between
        pipe.xadd(jobs, {"m": message})
        pipe.xreadgroup("workers", "dead-0", {jobs: ">"}, count=1)
        entry = pipe.execute()[0].decode()
    r.xclaim(jobs, "workers", "dead-1", 0, [entry])
    r.xclaim(jobs, "workers", "dead-2", 0, [entry])
    result: Any = []

    def answered() -> bool:
        nonlocal result
        result = r.xrange(f"{cluster.prefix}:r:{job_id}")
        return bool(result)
    wait_for(answered, 20, "the job's error")
    items = json.loads(result[-1][1][b"m"])["items"]
    kind, error = items[-1][2]
    assert kind == "error" and error["class"].endswith(":EngineRestarted"), error
    assert "3 times" in error["message"]
    assert r.xlen(jobs) == 0 and not r.xpending_range(jobs, "workers", "-", "+", 10)

    def swept() -> bool:
        names = {c["name"].decode() for c in r.xinfo_consumers(jobs, "workers")}
        return not names & {"dead-0", "dead-1", "dead-2"}
    wait_for(swept, 20, "the dead consumers removed")


def test_two_hosts(tmp_path: Path, redis_url: str) -> None:
    """Host A (this process: the API, and a Redis bound to A's veth address only) and host
    B (a network namespace whose only way out is the veth pair): a request accepted on A
    is served by B's worker and streamed back. Then with a worker on each host, `kill -9`
    of the one running a greedy stream: the other completes it, its text exactly once."""
    if os.geteuid() != 0:
        service_missing("network namespaces", PermissionError("they need root"))
    with two_hosts() as (address_a, netns_b):
        with redis_server(address_a) as url:
            cluster = Cluster(tmp_path, url, netns=netns_b)
            try:
                cluster.api.start(wait_ready=False)
                worker = cluster.start_worker(models="tiny")
                cluster.wait_workers(1)
                body = greedy(30)
                text = generate(cluster.api, body["prompt"], temperature=0, max_tokens=30)
                events = stream_events(cluster.api.client, body)
                assert text and "".join(data for _, data in events) == text
                assert password_of(url) not in cluster.worker_log(0)
                served = cluster.redis.smembers(f"{cluster.prefix}:tiny:workers")
                # `ip netns exec` execs the worker: the pid in its id is B's process
                assert [m.decode().split("-")[-2] for m in served] == [str(worker.pid)]
                kill_the_running_worker_of_two_hosts(cluster)
            finally:
                cluster.stop()


def kill_the_running_worker_of_two_hosts(cluster: Cluster) -> None:
    cluster.start_worker(models="tiny", on_host_b=False)
    cluster.wait_workers(2)
    body = greedy(400, prompt="once upon a time")
    expected = generate(cluster.api, body["prompt"], temperature=0, max_tokens=400)
    with cluster.api.client.stream("POST", "/agenerate", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        first = next(lines)
        running = cluster.pid_running("tiny")
        os.kill(running, signal.SIGKILL)
        events = list(parse_sse([first, *lines]))
    assert "".join(data for event, data in events if event == "message") == expected
    survivor = next(i for i, w in enumerate(cluster.workers) if w.pid != running)
    assert "taking over job" in cluster.worker_log(survivor)


def password_of(url: str) -> str:
    return url.split("//:", 1)[1].split("@", 1)[0]


class two_hosts:
    """A network namespace B joined to this one (A) by a veth pair, with addresses."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.netns, self.veth_a, self.veth_b = f"llmapi-b{n}", f"llmA{n}", f"llmB{n}"
        self.a, self.b = f"10.231.{n}.1", f"10.231.{n}.2"

    def __enter__(self) -> tuple[str, str]:
        try:
            for command in (
                    ["ip", "netns", "add", self.netns],
                    ["ip", "link", "add", self.veth_a, "type", "veth", "peer", "name",
                     self.veth_b],
                    ["ip", "link", "set", self.veth_b, "netns", self.netns],
                    ["ip", "addr", "add", f"{self.a}/24", "dev", self.veth_a],
                    ["ip", "link", "set", self.veth_a, "up"],
                    ["ip", "netns", "exec", self.netns, "ip", "addr", "add", f"{self.b}/24",
                     "dev", self.veth_b],
                    ["ip", "netns", "exec", self.netns, "ip", "link", "set", self.veth_b, "up"],
                    ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"]):
                subprocess.run(command, check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as exc:
            self.__exit__()
            pytest.fail(f"could not set up the network namespaces: {exc}")
        return self.a, self.netns

    def __exit__(self, *_: Any) -> None:
        subprocess.run(["ip", "link", "del", self.veth_a], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)


class redis_server:
    """A redis-server of this test, bound to one address only."""

    def __init__(self, address: str) -> None:
        self.address = address

    def __enter__(self) -> str:
        import socket

        with socket.socket() as sock:
            sock.bind((self.address, 0))
            port = sock.getsockname()[1]
        # a password: Redis refuses clients off loopback without one (protected mode)
        password = uuid.uuid4().hex
        self.process = subprocess.Popen(
            ["redis-server", "--bind", self.address, "--port", str(port), "--save", "",
             "--appendonly", "no", "--requirepass", password], stdout=subprocess.DEVNULL)
        url = f"redis://:{password}@{self.address}:{port}/0"
        client = redis.Redis.from_url(url)

        def up() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False
        try:
            wait_for(up, 10, "the test's redis-server")
        except BaseException:
            self.__exit__()
            raise
        client.close()
        return url

    def __exit__(self, *_: Any) -> None:
        self.process.terminate()
        self.process.wait(10)


def test_worker_exits_when_redis_is_unreachable(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"auth": {"enabled": False}, "models": {"tiny": model()}}))
    env = {**os.environ, "LLM_API_REDIS_URL": "redis://:s3cret-pass@127.0.0.1:1/0"}
    done = subprocess.run([sys.executable, "-m", "app.cli", "worker", "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, timeout=60)
    assert done.returncode == 1
    stderr = done.stderr.decode()
    assert "error: Redis at redis://127.0.0.1:1/0 is unreachable" in stderr, stderr
    assert "s3cret" not in stderr + done.stdout.decode()


def test_worker_needs_redis_url_and_known_models(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"auth": {"enabled": False}, "models": {"tiny": model()}}))
    run = [sys.executable, "-m", "app.cli", "worker", "--config", str(config)]
    done = subprocess.run(run, cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 1 and b"needs redis_url" in done.stderr
    done = subprocess.run([*run, "--models", "nope"], cwd=ROOT, capture_output=True, timeout=60)
    assert done.returncode == 2 and b"no model named nope" in done.stderr
