"""The compose profile `monitoring` (Prometheus + Grafana), checked without a container engine.

promtool is not used here: the only package that ships it for these machines is Debian's
`prometheus` (apt-get), which .ci/run does not install; no PyPI or npm package carries it. So
prometheus.yml is checked against a schema of the fields it uses (unknown keys refused, as
Prometheus' strict YAML loading does) plus the cross-file facts that matter: the scrape
target is llm-api's metrics listener, Grafana's datasource points at this Prometheus with its
scrape interval, and the provisioned dashboard is where the provider looks for it.

The dashboard's PromQL may only name metrics of the contract below (METRICS, the one list of
what app/metrics.py exposes); the live test compares that list with a real /metrics.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "docker" / "monitoring"
DASHBOARD = MONITORING / "grafana" / "dashboards" / "llm-api.json"
DATASOURCES = MONITORING / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = MONITORING / "grafana" / "provisioning" / "dashboards" / "llm-api.yaml"

# ---- the metric contract: name -> (type, labels). The one place it is written down. ----
M = ("model",)
METRICS: dict[str, tuple[str, tuple[str, ...]]] = {
    "llm_api_requests_total": ("counter", ("model", "route", "status")),
    "llm_api_prompt_tokens_total": ("counter", M),
    "llm_api_generation_tokens_total": ("counter", M),
    "llm_api_time_to_first_token_seconds": ("histogram", M),
    "llm_api_inter_token_latency_seconds": ("histogram", M),
    "llm_api_request_duration_seconds": ("histogram", ("model", "route")),
    "llm_api_queue_wait_seconds": ("histogram", M),
    "llm_api_requests_running": ("gauge", M),
    "llm_api_requests_waiting": ("gauge", M),
    "llm_api_kv_cells_used": ("gauge", M),
    "llm_api_kv_cells_total": ("gauge", M),
    "llm_api_prefix_cache_hit_tokens_total": ("counter", M),
    "llm_api_engine_restarts_total": ("counter", M),
    "llm_api_workers": ("gauge", M),
    "llm_api_worker_heartbeat_age_seconds": ("gauge", ("model", "worker")),
    "llm_api_model_state": ("gauge", ("model", "state")),
    # per key (metrics.per_key: true)
    "llm_api_key_requests_total": ("counter", ("key_id", "model")),
    "llm_api_key_tokens_total": ("counter", ("key_id", "model", "type")),
    "llm_api_key_rejections_total": ("counter", ("key_id", "reason")),
    "llm_api_key_quota_remaining": ("gauge", ("key_id", "quota")),
    # the API process (prometheus-client's process and platform collectors)
    "process_resident_memory_bytes": ("gauge", ()),
    "process_virtual_memory_bytes": ("gauge", ()),
    "process_cpu_seconds_total": ("counter", ()),
    "process_start_time_seconds": ("gauge", ()),
    "process_open_fds": ("gauge", ()),
    "process_max_fds": ("gauge", ()),
    "python_info": ("gauge", ("implementation", "major", "minor", "patchlevel", "version")),
}
#: Figures of the engine or the shared key store: every API replica reports the same value,
#: so a dashboard aggregates them with max/min, never sum.
SHARED = {"llm_api_requests_running", "llm_api_requests_waiting", "llm_api_kv_cells_used",
          "llm_api_kv_cells_total", "llm_api_prefix_cache_hit_tokens_total",
          "llm_api_engine_restarts_total", "llm_api_workers",
          "llm_api_worker_heartbeat_age_seconds", "llm_api_model_state",
          "llm_api_key_quota_remaining"}
TARGET_LABELS = {"job", "instance"}  # added by Prometheus to every series it scrapes
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}
AGGREGATIONS = {"sum", "max", "min", "avg", "count", "topk", "bottomk", "quantile", "stddev",
                "stdvar", "group", "count_values"}


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = _yaml(ROOT / "docker-compose.yaml")
    return data


def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


# ---- PromQL, read just far enough to name what an expression uses -------------------------

def _strip_strings(expr: str) -> str:
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)


def _series_in(expr: str) -> list[tuple[str, int]]:
    """(series name, position in `_strip_strings(expr)`) of every metric `expr` selects."""
    text = _strip_strings(expr)
    # blank out what holds label names or durations, keeping positions
    for pattern in (r"\{[^}]*\}", r"\[[^\]]*\]",
                    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)"):
        text = re.sub(pattern, lambda m: " " * len(m.group()), text)
    found = []
    for match in re.finditer(r"(?<![\w$.])[A-Za-z_:][\w:]*", text):
        rest = text[match.end():].lstrip()
        if match.group() not in PROMQL_WORDS and not rest.startswith("("):
            found.append((match.group(), match.start()))
    return found


def _contract_name(series: str) -> str:
    """A series' name in METRICS: a histogram's _bucket/_sum/_count are its own."""
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and METRICS.get(base, ("",))[0] == "histogram":
            return base
    return series


def _calls_around(text: str, position: int) -> list[str]:
    """Names of the calls and aggregations enclosing `position` of `text` (an expression
    without its strings), innermost first."""
    names, depth = [], 0
    for i in range(position - 1, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(" and depth:
            depth -= 1
        elif text[i] == "(":
            call = re.search(r"(\w+)\s*(?:(?:by|without)\s*\([^)]*\)\s*)?$", text[:i])
            names.append(call.group(1) if call else "")
    return names


def _selectors(expr: str) -> list[tuple[str, set[str]]]:
    """(series name, label names it matches on) of every `name{...}` selector."""
    return [(m.group(1), set(re.findall(r"(\w+)\s*[!=]~?", m.group(2))))
            for m in re.finditer(r"([A-Za-z_:][\w:]*)\{([^}]*)\}", _strip_strings(expr))]


def _targets(dashboard: dict[str, Any]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(panel, target) for panel in dashboard["panels"]
            for target in panel.get("targets", [])]


def test_promql_reader_finds_what_an_expression_selects() -> None:
    expr = ('histogram_quantile(0.95, sum by (model, le) (rate(llm_api_queue_wait_seconds_bucket'
            '{job="$job", model=~"a|b"}[$__rate_interval]))) / on (model) group_left '
            'max by (model) (llm_api_workers) > bool 2')
    names = [name for name, _ in _series_in(expr)]
    assert names == ["llm_api_queue_wait_seconds_bucket", "llm_api_workers"]
    assert [_contract_name(n) for n in names] == ["llm_api_queue_wait_seconds", "llm_api_workers"]
    position = dict(_series_in(expr))["llm_api_queue_wait_seconds_bucket"]
    assert _calls_around(_strip_strings(expr), position) == \
        ["rate", "sum", "histogram_quantile"]
    assert _selectors(expr) == [("llm_api_queue_wait_seconds_bucket", {"job", "model"})]


# ---- Prometheus ------------------------------------------------------------------------------

DURATION = {"type": "string", "pattern": r"^(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?$",
            "minLength": 2}
PROMETHEUS_SCHEMA = {
    "type": "object", "additionalProperties": False, "required": ["scrape_configs"],
    "properties": {
        "global": {"type": "object", "additionalProperties": False, "properties": {
            "scrape_interval": DURATION, "scrape_timeout": DURATION,
            "evaluation_interval": DURATION}},
        "scrape_configs": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False, "required": ["job_name"],
            "properties": {
                "job_name": {"type": "string", "minLength": 1},
                "metrics_path": {"type": "string", "pattern": "^/"},
                "scheme": {"enum": ["http", "https"]},
                "scrape_interval": DURATION, "scrape_timeout": DURATION,
                "authorization": {"type": "object", "additionalProperties": False,
                                  "properties": {"type": {"type": "string"},
                                                 "credentials_file": {"type": "string"}}},
                "static_configs": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["targets"],
                    "properties": {
                        "targets": {"type": "array", "minItems": 1, "items": {
                            "type": "string", "pattern": r"^[\w.-]+:\d{1,5}$"}},
                        "labels": {"type": "object",
                                   "additionalProperties": {"type": "string"}}}}}}}}}}


def _seconds(duration: str) -> int:
    units = {"y": 31536000, "w": 604800, "d": 86400, "h": 3600, "m": 60, "s": 1}
    return sum(int(n) * units[u] for n, u in re.findall(r"(\d+)(y|w|d|h|m(?!s)|s)", duration))


def test_prometheus_config_is_valid_and_scrapes_the_metrics_listener() -> None:
    config = _yaml(MONITORING / "prometheus.yml")
    jsonschema.validate(config, PROMETHEUS_SCHEMA)
    # the validator is real: a misspelt key is refused
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "scrape_config": []}, PROMETHEUS_SCHEMA)
    glob = config["global"]
    assert _seconds(glob["scrape_timeout"]) <= _seconds(glob["scrape_interval"])
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert len(jobs) == len(config["scrape_configs"]), "job names must be unique"
    job = jobs["llm-api"]  # the dashboard's $job default
    assert job["metrics_path"] == "/metrics" and "authorization" not in job
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    assert targets == [f"llm-api:{_metrics_port()}"]
    variables = {v["name"]: v for v in _dashboard()["templating"]["list"]}
    assert variables["job"]["current"]["value"] == "llm-api"


def _metrics_port() -> str:
    """The port of llm-api's metrics listener in compose (LLM_API_METRICS__LISTEN)."""
    listen = _compose()["services"]["llm-api"]["environment"]["LLM_API_METRICS__LISTEN"]
    found = re.fullmatch(r"\$\{LLM_API_METRICS__LISTEN:-[\d.]*:(\d+)\}", listen)
    assert found, f"LLM_API_METRICS__LISTEN should default to host:port, not {listen!r}"
    return found.group(1)


# ---- compose ---------------------------------------------------------------------------------

def test_monitoring_profile_services_mounts_and_ports() -> None:
    compose = _compose()
    services = compose["services"]
    monitoring = {n for n, s in services.items() if "monitoring" in s.get("profiles", [])}
    assert monitoring == {"prometheus", "grafana"}
    for name in monitoring:
        service = services[name]
        assert service["profiles"] == ["monitoring"]
        image, _, tag = service["image"].rpartition(":")
        assert image and re.fullmatch(r"v?\d+\.\d+\.\d+", tag), f"{name}: pin {tag!r}"
        for volume in service["volumes"]:
            source, target = volume.split(":")[:2]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts missing {source}"
                assert volume.endswith(":ro"), f"{name}: mount {source} read-only"
            else:
                assert source in compose["volumes"], f"{name}: undeclared volume {source}"
        for port in service.get("ports", []):  # published on loopback only
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} to every host"
    # the metrics listener is never published: only Prometheus on the compose network reads it
    api = services["llm-api"]
    assert all(_metrics_port() not in port.split(":") for port in api["ports"])
    assert "monitoring" not in api.get("profiles", [])  # the API runs in every profile
    prometheus = services["prometheus"]
    assert "./docker/monitoring/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in \
        prometheus["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prometheus["command"]
    assert "/-/ready" in " ".join(prometheus["healthcheck"]["test"])
    grafana = services["grafana"]
    assert grafana["depends_on"]["prometheus"] == {"condition": "service_healthy"}
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _in_container(grafana, home) == DASHBOARD


def _in_container(service: dict[str, Any], path: str) -> Path:
    """The repository file that a bind mount of `service` shows at container `path`."""
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        if source.startswith("./") and (path == target or path.startswith(target + "/")):
            return ROOT / source / path[len(target):].lstrip("/")
    raise AssertionError(f"nothing is mounted at {path}")


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    grafana = _compose()["services"]["grafana"]
    provisioning = _in_container(grafana, "/etc/grafana/provisioning")
    assert provisioning == MONITORING / "grafana" / "provisioning"
    assert DATASOURCES.parent.parent == provisioning and PROVIDERS.parent.parent == provisioning
    datasources = _yaml(DATASOURCES)
    assert datasources["apiVersion"] == 1
    [source] = datasources["datasources"]
    assert source["type"] == "prometheus" and source["access"] == "proxy"
    assert source["url"] == "http://prometheus:9090" and source["isDefault"] is True
    scrape = _yaml(MONITORING / "prometheus.yml")["global"]["scrape_interval"]
    assert source["jsonData"]["timeInterval"] == scrape  # what $__rate_interval is built on
    providers = _yaml(PROVIDERS)
    assert providers["apiVersion"] == 1
    [provider] = providers["providers"]
    assert provider["type"] == "file" and provider["disableDeletion"] is True
    folder = _in_container(grafana, provider["options"]["path"])
    assert sorted(p.name for p in folder.iterdir()) == ["llm-api.json"]
    # every panel and variable uses the provisioned datasource by its uid
    dashboard = _dashboard()
    uses = [p["datasource"] for p in dashboard["panels"] if p["type"] != "row"]
    uses += [t["datasource"] for _, t in _targets(dashboard)]
    uses += [v["datasource"] for v in dashboard["templating"]["list"]]
    assert uses and all(u == {"type": "prometheus", "uid": source["uid"]} for u in uses)


# ---- the dashboard ---------------------------------------------------------------------------

def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "llm-api" and dashboard["title"]
    assert dashboard["schemaVersion"] >= 41  # Grafana 12's classic JSON model or later
    panels = dashboard["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        grid = panel["gridPos"]
        assert set(grid) == {"h", "w", "x", "y"} and grid["x"] + grid["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(grid["x"], grid["x"] + grid["w"])
                for y in range(grid["y"], grid["y"] + grid["h"])}
        assert not mine & cells, f"{panel['title']!r} overlaps another panel"
        cells |= mine
        if panel["type"] == "row":
            continue
        assert panel["title"] and panel["description"], panel["id"]
        assert panel["datasource"]["type"] == "prometheus"
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs)), panel["title"]
        assert all(t["expr"].strip() for t in panel["targets"]), panel["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    model = variables["model"]
    assert model["type"] == "query" and model["multi"] and model["includeAll"]
    assert model["allValue"] == ".*"
    assert 'job="$job"' in model["query"] and model["query"] == model["definition"]
    for _, target in _targets(dashboard):  # every selector follows $job, and $model if it can
        expr = target["expr"]
        assert 'job="$job"' in expr and len(_selectors(expr)) == len(_series_in(expr)), expr
        for name, labels in _selectors(expr):
            wanted = {"job"} | ({"model"} & set(METRICS[_contract_name(name)][1]))
            assert wanted <= labels, f"{name} in {expr} should match on {wanted - labels}"
        if "model" in " ".join(" ".join(labels) for _, labels in _selectors(expr)):
            assert 'model=~"$model"' in expr, expr
    # the panel list the dashboard promises
    titles = " | ".join(p["title"] for p in panels).lower()
    for words in ("tokens/s", "time to first token", "inter-token", "end-to-end", "queue wait",
                  "running and waiting", "kv cells", "errors", "429s by reason",
                  "top keys by tokens", "model state", "engine restarts", "workers"):
        assert words in titles, f"no panel for {words!r}"
    replica_note = [p for p in panels if "max by (model)" in p.get("description", "")
                    and "replica" in p.get("description", "")]
    assert replica_note, "say in a panel description that replicas are aggregated with max"


def test_dashboard_uses_only_contract_metrics_with_their_labels() -> None:
    dashboard = _dashboard()
    used: set[str] = set()
    for panel, target in _targets(dashboard):
        expr = target["expr"]
        where = f"{panel['title']!r} {target['refId']}"
        series = _series_in(expr)
        assert series, f"{where}: no metric in {expr}"
        names = {_contract_name(name) for name, _ in series}
        unknown = names - set(METRICS)
        assert not unknown, f"{where}: not in the metric contract: {unknown}"
        used |= names
        labels = set().union(*(METRICS[n][1] for n in names)) | TARGET_LABELS
        for name, matched in _selectors(expr):
            assert matched <= set(METRICS[_contract_name(name)][1]) | TARGET_LABELS, \
                f"{where}: {name} has no label {matched}"
        grouped = set(re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr))
        grouping = {g.strip() for group in grouped for g in group.split(",")} - {"le"}
        assert grouping <= labels, f"{where}: grouping by unknown labels {grouping - labels}"
        legend = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", target["legendFormat"]))
        assert legend <= (grouping or labels), f"{where}: legend labels {legend}"
        for name, position in series:
            _assert_aggregation(where, expr, name, position)
    for variable in dashboard["templating"]["list"]:
        query = variable["query"]
        found = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*(\w+)\)", query)
        assert found, query
        metric, label = found.groups()
        assert label in set(METRICS[metric][1]) | TARGET_LABELS, query
        used.add(metric)
    assert {m for m in METRICS if m.startswith("llm_api_")} - used <= {
        "llm_api_key_requests_total"}, "a contract metric has no panel"


def test_docs_describe_every_contract_metric() -> None:
    docs = (ROOT / "docs" / "monitoring.md").read_text()
    missing = [name for name in METRICS if f"`{name}`" not in docs]
    assert not missing, f"docs/monitoring.md does not describe {missing}"
    assert "docker compose --profile monitoring up" in docs
    assert "http://127.0.0.1:3000" in docs and DASHBOARD.relative_to(ROOT).as_posix() in docs


def _assert_aggregation(where: str, expr: str, series: str, position: int) -> None:
    """Counters and histograms are read through rate/increase, gauges directly; figures
    that every replica reports alike are combined with max/min, the others with sum."""
    name = _contract_name(series)
    kind = METRICS[name][0]
    calls = _calls_around(_strip_strings(expr), position)
    first = calls[0] if calls else ""
    if kind == "gauge":
        assert first not in {"rate", "increase", "irate"}, f"{where}: rate of gauge {name}"
    else:
        assert first in {"rate", "increase"}, f"{where}: {name} read without rate/increase"
        if kind == "histogram":
            assert series.endswith("_bucket") and "histogram_quantile" in calls, where
            assert "le" in expr, f"{where}: histogram_quantile needs le kept"
    aggregation = next((c for c in calls if c in AGGREGATIONS), None)
    if name in SHARED:
        assert aggregation in {"max", "min"}, f"{where}: {name} is the same on every " \
            f"replica: aggregate with max or min, not {aggregation}"
    elif name.startswith("llm_api_"):
        assert aggregation == "sum", f"{where}: {name} is counted per replica: sum it"


# ---- the contract against a live /metrics ----------------------------------------------------

ADMIN_KEY = "llmapi-monitoring-test-admin-key-0123456789"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _exposed(text: str) -> dict[str, tuple[str, set[str]]]:
    """Series name -> (type, label names seen) of a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    exposed = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")
        labels = {label for sample in family.samples for label in sample.labels} - {"le"}
        exposed[name] = (family.type, labels)
    return exposed


def test_live_metrics_match_the_contract(live_server: Any) -> None:
    """A real server (auth on, per-key series, the separate listener as in compose) after one
    generation: every contract metric is exposed with its type and labels, every llm_api_
    metric exposed is in the contract, and the listener serves the same without a key."""
    from tests.conftest import tiny_config

    listen = f"127.0.0.1:{_free_port()}"
    server = live_server({"models": {"tiny": tiny_config()},
                          "auth": {"enabled": True, "admin_key": ADMIN_KEY},
                          "metrics": {"per_key": True, "listen": listen}})
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    answer = server.client.post("/generate", headers=admin, json={
        "prompt": "Hello", "model": "tiny", "params": {"max_tokens": 4}})
    assert answer.status_code == 200, answer.text
    assert server.client.get("/metrics").status_code == 401
    response = server.client.get("/metrics", headers=admin)
    assert response.status_code == 200, response.text
    exposed = _exposed(response.text)
    for name, (kind, labels) in METRICS.items():
        assert name in exposed, f"{name} is not exposed"
        assert exposed[name][0] == kind, f"{name}: {exposed[name][0]}, not {kind}"
        assert exposed[name][1] <= set(labels), f"{name}: labels {exposed[name][1]}"
    extra = {n for n in exposed if n.startswith("llm_api_")} - set(METRICS)
    assert not extra, f"exposed but not in the contract (and docs/monitoring.md): {extra}"
    assert exposed["llm_api_requests_total"][1] == {"model", "route", "status"}
    listener = httpx.get(f"http://{listen}/metrics", timeout=10)
    assert listener.status_code == 200
    assert set(_exposed(listener.text)) == set(exposed)
