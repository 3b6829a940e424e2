"""The settings tree: one validated object, loaded in one place.

Sources, strongest first: arguments, `LLM_API_*` environment variables (nested with `__`,
deep-merged into the file), the YAML file, field defaults.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from backends.base import Backend, ModelParams
from backends.registry import UnknownFamily, backend_class

ENV_PREFIX = "LLM_API_"
DEFAULT_CONFIG = Path("config.yaml")
_GLOB_CHARS = re.compile(r"[*?\[]")


MIN_ADMIN_KEY_CHARS = 32


class SettingsError(Exception):
    """A setting is invalid; the message names the key path and where it came from."""


class SetupParams(BaseModel):
    """Where a model's files come from."""

    model_config = ConfigDict(extra="forbid")

    repo_id: str | None = Field(None, description="Hugging Face Hub repository, e.g. "
                                "'Qwen/Qwen2.5-0.5B-Instruct-GGUF'.")
    filename: str | None = Field(None, description="File in the repository; a glob such as "
                                 "'*q4_k_m.gguf' must match exactly one file.")
    revision: str | None = Field(None, description="Branch, tag or commit; default 'main'.")
    model_path: Path | None = Field(None, description="A local weights file or directory; "
                                    "when set, the hub is not used at all.")
    # Keys only some families read (Backend.setup_keys); model_entries rejects the others.
    tokenizer_repo_id: str | None = Field(None, description="Hub repository of the tokenizer, "
                                          "when it is not the model's (huggingface, gptq).")
    config_params: dict[str, Any] = Field(default_factory=dict, description="Overrides merged "
                                          "into the model's config.json (huggingface, gptq).")
    task: Literal["generate", "embedding"] = Field("generate", description="'embedding': a "
                                                   "sentence-embedding model (huggingface).")


BASE_SETUP_KEYS = ("repo_id", "filename", "revision", "model_path")
FAMILY_SETUP_KEYS = frozenset(SetupParams.model_fields) - set(BASE_SETUP_KEYS)


Placement = Literal["local", "remote", "inprocess"]


class ModelConfig(BaseModel):
    """One served model."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model_family: str = Field("llama", description="Backend family: llama, or a plugin's name.")
    setup_params: SetupParams = Field(default_factory=SetupParams,
                                      description="Where the weights come from.")
    model_params: dict[str, Any] = Field(
        default_factory=dict, description="Engine options, validated by the family's schema.")
    max_queue: int | None = Field(None, ge=0, le=10_000,
                                  description="Overrides server.max_queue for this model.")
    request_timeout: float | None = Field(None, gt=0,
                                          description="Overrides server.request_timeout.")
    default_max_tokens: int | None = Field(None, ge=1, description="max_tokens of requests "
                                           "that set none; default: what the context leaves.")
    placement: Placement | None = Field(None, description="Where the model runs; default: "
                                        "server.placement.")


class ServerSettings(BaseModel):
    """HTTP server and request limits."""

    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="Address to bind; 0.0.0.0 in containers.")
    port: int = Field(8000, ge=1, le=65535, description="TCP port.")
    log_level: str = Field("info", pattern="^(critical|error|warning|info|debug)$",
                           description="Log level of the server.")
    log_format: Literal["text", "json"] = Field(
        "text", description="text: one readable line per event; json: one JSON object per "
        "line (time, level, logger, message, request_id, key_id, model, route, status, "
        "latency_ms, prompt_tokens, completion_tokens) for log collectors.")
    log_prompts: bool = Field(
        False, description="Also log prompts and completions (at info level, with the "
        "request id). Off by default: they are the users' data; turn it on only where "
        "that is acceptable.")
    placement: Placement = Field(
        "local", description="Where models run: local (a worker process per model, spawned "
        "and restarted by serve), remote (workers started with `llm-api worker` on any host, "
        "reached over Redis Streams; needs redis_url), inprocess (in the API process: no "
        "isolation, for plugin development).")
    max_queue: int = Field(16, ge=0, le=10_000, description="Requests that may wait per model "
                           "beyond those running; more get 503 with Retry-After. Embedding "
                           "requests are bounded by texts instead: (max_queue + running "
                           "slots) x 64 texts may wait (a local or in-process model).")
    request_timeout: float = Field(600.0, gt=0, description="Seconds a request may take in "
                                   "total (queue + generation) before it is cancelled.")
    max_body_bytes: int = Field(1_048_576, ge=1024, description="Largest request body accepted.")
    max_embedding_inputs: int = Field(256, ge=1, le=100_000,
                                      description="Most texts in one /embeddings request.")
    sse_ping_seconds: float = Field(15.0, gt=0, description="Interval of SSE keep-alive "
                                    "comments on streaming responses.")
    graceful_shutdown_seconds: float = Field(10.0, ge=0, description="On SIGTERM, how long "
                                             "open requests may finish before they are cut.")
    body_read_timeout: float = Field(30.0, gt=0, description="Seconds a client may take to "
                                     "send a request body; slower bodies get 408.")
    max_body_reads: int = Field(64, ge=1, le=100_000, description="Request bodies read at "
                                "once (after authentication); more wait their turn.")
    max_body_reads_per_key: int = Field(8, ge=1, le=100_000, description="Request bodies "
                                        "one key may have read at once; its others wait "
                                        "(within server.body_read_timeout).")
    max_header_bytes: int = Field(65_536, ge=4096, le=16_777_216, description="Largest "
                                  "request line + headers accepted; larger get 431 and the "
                                  "connection closes.")
    header_read_timeout: float = Field(10.0, gt=0, description="Seconds a client may take "
                                       "to send a request's headers; slower connections are "
                                       "closed.")
    forwarded_allow_ips: str | None = Field(None, description="Proxies trusted to set "
                                            "X-Forwarded-For/-Proto (comma-separated "
                                            "addresses or '*'), e.g. '127.0.0.1' behind a "
                                            "local nginx; default: none, the socket peer is "
                                            "the client.")
    max_prompt_chars_per_token: int = Field(8, ge=1, le=1000, description="A prompt may hold "
                                            "at most this many characters per token of the "
                                            "model's context; longer ones get 400 before any "
                                            "tokenization.")
    max_grammar_repeat: int = Field(500, ge=1, le=100_000, description="Largest repetition "
                                    "bound a JSON schema may ask for (maxLength, maxItems, "
                                    "{m,n} in a pattern); larger ones get 400.")
    max_grammar_bytes: int = Field(65_536, ge=1024, le=10_000_000, description="Largest "
                                   "grammar a JSON schema may turn into (GBNF bytes).")


class AuthSettings(BaseModel):
    """API keys: who may call the server, and how much."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Require an API key on every route except "
                          "/health, /ready and /check; false serves everyone (with a warning).")
    admin_key: SecretStr | None = Field(None, min_length=32, description="An admin key to "
                                        "accept (its hash is stored); without it and without "
                                        "keys, the first start creates one and prints it once.")
    admin_key_file: Path | None = Field(None, description="A file holding the admin key "
                                        "(e.g. a mounted secret), instead of admin_key.")
    failed_auth_limit: int = Field(10, ge=1, le=1_000_000, description="Failed "
                                   "authentications one client address may make in "
                                   "failed_auth_window seconds; more get 429 with Retry-After.")
    failed_auth_window: float = Field(60.0, gt=0, description="Seconds over which failed "
                                      "authentications are counted per client address.")
    prefix_cache_scope: Literal["key", "all"] = Field(
        "key", description="Who shares cached prompt prefixes: `key` — only requests of the "
        "same API key (a key cannot learn from cached_tokens or timing what another key's "
        "prompts begin with); `all` — every request (more reuse between keys of one "
        "application).")
    charge_cached_prompt_tokens: bool = Field(True, description="Charge prompt tokens "
                                              "whose KV cells were reused or shared (usage "
                                              "cached_tokens) against token quotas and tpm "
                                              "like computed ones; false charges only the "
                                              "computed part.")

    def configured_admin_key(self) -> str | None:
        """The admin key from admin_key or admin_key_file, if one is configured."""
        if self.admin_key is not None:
            return self.admin_key.get_secret_value()
        if self.admin_key_file is not None:
            try:
                key = self.admin_key_file.read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise SettingsError(f"auth.admin_key_file '{self.admin_key_file}' cannot be "
                                    f"read: {exc.strerror}") from None
            if len(key) < MIN_ADMIN_KEY_CHARS:
                raise SettingsError(f"auth.admin_key_file '{self.admin_key_file}' must hold "
                                    f"a key of at least {MIN_ADMIN_KEY_CHARS} characters")
            return key
        return None


class WorkerSettings(BaseModel):
    """Remote workers (placement: remote): their Redis Streams keys and timings. The API
    and every `llm-api worker` serving the same models must agree on these."""

    model_config = ConfigDict(extra="forbid")

    prefix: str = Field("llm-api", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:-]+$",
                        description="Prefix of every Redis key of the workers' streams (one "
                        "deployment per prefix).")
    heartbeat_seconds: float = Field(1.0, gt=0, le=60, description="How often a worker "
                                     "says it is alive and keeps its running jobs claimed.")
    dead_after_seconds: float = Field(5.0, gt=0, le=3600, description="A worker silent this "
                                      "long is dead: its jobs are rerun by another worker.")
    max_attempts: int = Field(3, ge=1, le=100, description="Workers a job may be started on "
                              "(a worker died while running it); then it ends with an error.")
    max_backlog: int | None = Field(None, ge=0, description="Jobs a model may have queued or "
                                    "running; more get 503 with Retry-After. Default: the "
                                    "model's max_queue + the slots of its live workers.")
    result_ttl_seconds: float = Field(300.0, gt=0, description="Seconds an unread result "
                                      "stream is kept (its reader is gone).")
    max_connections: int = Field(512, ge=4, le=100_000, description="Redis connections of an "
                                 "API process for its remote models (one per running job).")

    @model_validator(mode="after")
    def _dead_after_heartbeats(self) -> WorkerSettings:
        if self.dead_after_seconds < 2 * self.heartbeat_seconds:
            raise ValueError("dead_after_seconds must be at least twice heartbeat_seconds")
        return self


#: Histogram buckets (seconds) that resolve a CPU's and a GPU's speeds alike.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 320.0,
                   640.0)


def _buckets(values: list[float]) -> list[float]:
    if not values or len(values) > 64 or any(b <= 0 for b in values) \
            or sorted(set(values)) != values:
        raise ValueError("buckets must be 1 to 64 increasing positive numbers of seconds")
    return values


class MetricsSettings(BaseModel):
    """Prometheus metrics at /metrics (see docs/monitoring.md)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Serve /metrics (an admin key is needed on the "
                          "server's own port).")
    listen: str | None = Field(None, pattern=r"^[^\s:]*:\d{1,5}$", description="host:port "
                               "of a separate listener serving /metrics without a key, for "
                               "scrapers on a private network, e.g. 127.0.0.1:9464.")
    per_key: bool = Field(False, description="Also export per-key series (label key_id): "
                          "one series set per key, so only where keys are few (cardinality).")
    ttft_buckets: list[float] = Field(list(TTFT_BUCKETS), description="Buckets (seconds) of "
                                      "the time-to-first-token histogram.")
    itl_buckets: list[float] = Field(list(ITL_BUCKETS), description="Buckets (seconds) of "
                                     "the inter-token latency histogram.")
    latency_buckets: list[float] = Field(list(LATENCY_BUCKETS), description="Buckets "
                                         "(seconds) of the end-to-end and queue-wait "
                                         "histograms.")

    _check_buckets = field_validator("ttft_buckets", "itl_buckets", "latency_buckets")(
        _buckets)

    @property
    def listen_address(self) -> tuple[str, int] | None:
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host or "0.0.0.0", int(port)  # noqa: S104 - the operator's choice


class Settings(BaseSettings):
    """Everything the server reads from config.yaml and the environment."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", extra="forbid",
        protected_namespaces=(), nested_model_default_partial_update=False,
    )

    models_dir: Path = Field(Path("models"), description="Where downloaded weights are kept "
                             "(a mounted volume in containers).")
    server: ServerSettings = Field(default_factory=ServerSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    data_dir: Path = Field(Path("data"), description="Where the server keeps its state: the "
                           "SQLite key and usage store unless database_url is set.")
    database_url: str | None = Field(None, description="SQLAlchemy URL of the key and usage "
                                     "store, e.g. postgresql+psycopg://user@host/db; default: "
                                     "sqlite:///<data_dir>/llm-api.db.")
    redis_url: str | None = Field(None, description="redis://host:6379/0 to share rate-limit "
                                  "and parallel-request counters between replicas; default: "
                                  "in process.")
    workers: WorkerSettings = Field(default_factory=WorkerSettings,
                                    description="Remote workers over Redis Streams.")
    metrics: MetricsSettings = Field(default_factory=MetricsSettings,
                                     description="Prometheus metrics.")
    models: dict[str, ModelConfig] = Field(default_factory=dict,
                                           description="Served models by name.")
    # The classic single-model form; folded into `models` under a derived name.
    model_family: str | None = Field(None, description="Classic form: the one model's family.")
    setup_params: SetupParams | None = Field(None, description="Classic form: its files.")
    model_params: dict[str, Any] | None = Field(None, description="Classic form: its options.")

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, YamlConfigSettingsSource(settings_cls))

    @model_validator(mode="after")
    def _fold_classic_form(self) -> Settings:
        if self.setup_params is None:
            if self.model_family is not None or self.model_params is not None:
                raise ValueError("model_family/model_params need setup_params (classic form)")
            if not self.models:
                raise ValueError("no model configured: set setup_params (classic form) or "
                                 "models: {name: {model_family, setup_params, model_params}}")
            return self
        if self.models:
            raise ValueError("use either the classic keys (model_family, setup_params, "
                             "model_params) or models:, not both")
        self.models = {classic_model_name(self.setup_params): ModelConfig(
            model_family=self.model_family or "llama", setup_params=self.setup_params,
            model_params=self.model_params or {})}
        return self

    def store_url(self) -> str:
        """The key and usage store's SQLAlchemy URL."""
        return self.database_url or f"sqlite:///{self.data_dir / 'llm-api.db'}"

    def is_classic(self) -> bool:
        return self.setup_params is not None

    def config_path(self, name: str) -> tuple[str, ...]:
        """Key path of a model's entry as the user wrote it."""
        return () if self.is_classic() else ("models", name)


def classic_model_name(setup: SetupParams) -> str:
    """Derive a model name from the classic form's files."""
    if setup.filename and not _GLOB_CHARS.search(setup.filename):
        name = Path(setup.filename).name
    elif setup.repo_id:
        name = setup.repo_id.rsplit("/", 1)[-1]
    else:
        name = Path(str(setup.model_path)).name
    return re.sub(r"\.gguf$", "", name, flags=re.IGNORECASE).lower()


@dataclass(frozen=True)
class ModelEntry:
    """A configured model with its family resolved and its params validated."""

    name: str
    family: str
    backend: type[Backend]
    params: ModelParams
    setup: SetupParams
    max_queue: int
    request_timeout: float
    default_max_tokens: int | None
    setup_key: str  # where setup_params sits in the config, for messages
    prompt_chars_per_token: int = 8  # server.max_prompt_chars_per_token
    max_grammar_repeat: int = 500  # server.max_grammar_repeat
    max_grammar_bytes: int = 65_536  # server.max_grammar_bytes
    placement: str = "local"


def load_settings(config: str | Path | None = None) -> Settings:
    """Read the config file and the environment; raise SettingsError on anything invalid."""
    explicit = config or os.environ.get(f"{ENV_PREFIX}CONFIG")
    path = Path(explicit) if explicit else DEFAULT_CONFIG
    if explicit and not path.is_file():
        raise SettingsError(f"config file '{path}' does not exist")
    source = (f"config file '{path}'" if path.is_file()
              else f"defaults: there is no config file at '{path.resolve()}'")
    try:
        if path.is_file():
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
            if data is not None and not isinstance(data, dict):
                raise SettingsError(f"config file '{path}' must hold a mapping of settings")
        cls = type("Settings", (Settings,), {"model_config": {**Settings.model_config,
                                                                "yaml_file": path}})
        settings: Settings = cls()
    except yaml.YAMLError as exc:
        raise SettingsError(f"config file '{path}' is not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise SettingsError(_explain(exc, source)) from None
    model_entries(settings, source)
    return settings


def model_entries(settings: Settings, source: str = "settings") -> list[ModelEntry]:
    """Resolve every model's family and validate its params against the family's schema."""
    entries = []
    problems: list[str] = []
    for name, cfg in settings.models.items():
        where = settings.config_path(name)
        try:
            backend = backend_class(cfg.model_family)
        except UnknownFamily as exc:
            problems.append(_line((*where, "model_family"), str(exc), source))
            continue
        if problem := _setup_problem(cfg, backend, where, source):
            problems.append(problem)
            continue
        try:
            params = backend.Params.model_validate(cfg.model_params)
        except ValidationError as exc:
            problems.extend(_lines(exc, source, (*where, "model_params"), backend.Params))
            continue
        entries.append(ModelEntry(
            name=name, family=cfg.model_family, backend=backend, params=params,
            setup=cfg.setup_params,
            max_queue=settings.server.max_queue if cfg.max_queue is None else cfg.max_queue,
            request_timeout=cfg.request_timeout or settings.server.request_timeout,
            default_max_tokens=cfg.default_max_tokens,
            setup_key=".".join((*where, "setup_params")),
            prompt_chars_per_token=settings.server.max_prompt_chars_per_token,
            max_grammar_repeat=settings.server.max_grammar_repeat,
            max_grammar_bytes=settings.server.max_grammar_bytes,
            placement=cfg.placement or settings.server.placement))
    if problems:
        raise SettingsError("invalid settings:\n" + "\n".join(problems))
    return entries


def _setup_problem(cfg: ModelConfig, backend: type[Backend], where: tuple[str, ...],
                   source: str) -> str | None:
    """What is wrong with a model's setup_params for its family, if anything."""
    setup = cfg.setup_params
    foreign = sorted((setup.model_fields_set & FAMILY_SETUP_KEYS) - backend.setup_keys)
    if foreign:
        accepted = ", ".join([*BASE_SETUP_KEYS, *sorted(backend.setup_keys)])
        return _line((*where, "setup_params", foreign[0]), f"not used by model_family "
                     f"'{cfg.model_family}'; it takes: {accepted}", source)
    if backend.weights is not None and setup.model_path is None and setup.repo_id is None:
        what = "a local directory" if backend.weights == "snapshot" else "a local file"
        files = "" if backend.weights == "snapshot" else " + filename (a file on it)"
        return _line((*where, "setup_params"), f"set model_path ({what}) or repo_id (a "
                     f"Hugging Face Hub repository){files}", source)
    return None


def _explain(exc: ValidationError, source: str) -> str:
    return "invalid settings:\n" + "\n".join(_lines(exc, source, ()))


def _lines(exc: ValidationError, source: str, prefix: tuple[str, ...],
           schema: type[BaseModel] | None = None) -> list[str]:
    lines = []
    for err in exc.errors():
        loc = (*prefix, *(str(p) for p in err["loc"]))
        if err["type"] == "extra_forbidden" and schema is not None:
            message = f"unknown key; accepted keys: {', '.join(schema.model_fields)}"
        elif err["type"] == "extra_forbidden":
            message = "unknown key"
        else:
            message = err["msg"].removeprefix("Value error, ")
        lines.append(_line(loc, message, source))
    return lines


def _line(loc: tuple[str, ...], message: str, source: str) -> str:
    key = ".".join(loc) or "(root)"
    return f"  {key}: {message} (from {_origin(loc, source)})"


def _origin(loc: tuple[str, ...], source: str) -> str:
    """The environment variable that set `loc` (or one of its parents), else the file."""
    upper = {k.upper(): k for k in os.environ}
    for depth in range(len(loc), 0, -1):
        name = ENV_PREFIX + "__".join(loc[:depth]).upper()
        if name in upper:
            return f"environment variable {upper[name]}"
    return source
