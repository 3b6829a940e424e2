"""`llm-api keys ...` and `llm-api usage`: the key store, straight from the settings."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from app.auth.schemas import KeyCreate, KeyCreated, KeyInfo, KeyUpdate, UsageReport
from app.auth.store import KeyStore
from app.auth.usage import usage_report
from app.settings import SettingsError, load_settings
from backends.errors import LLMAPIError

keys_cli = typer.Typer(no_args_is_help=True, add_completion=False,
                       help="Create, list, change, revoke and rotate API keys.")
console = Console(soft_wrap=True)

Config = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML config; default: $LLM_API_CONFIG, else ./config.yaml.")]
Opt = typer.Option
Name = Annotated[str | None, Opt(help="Owner's name.")]
Email = Annotated[str | None, Opt(help="Owner's email.")]
Org = Annotated[str | None, Opt("--org", help="Owner's organisation.")]
Role = Annotated[str | None, Opt(help="user or admin.")]
ValidFrom = Annotated[str | None, Opt(help="UTC date or datetime (2026-01-31[T12:00]).")]
Expires = Annotated[str | None, Opt(help="UTC date (valid through that day) or datetime.")]
MaxRequests = Annotated[int | None, Opt(help="Lifetime request quota.")]
MaxTokens = Annotated[int | None, Opt(help="Lifetime token quota (prompt + completion).")]
Rpm = Annotated[int | None, Opt(help="Requests per minute.")]
Tpm = Annotated[int | None, Opt(help="Tokens per minute.")]
Parallel = Annotated[int | None, Opt(help="Concurrent requests.")]
Models = Annotated[list[str] | None, Opt("--model", help="Allowed model (repeat); none = all.")]
KeyId = Annotated[int, typer.Argument(help="The key's id (see 'llm-api keys list').")]


@contextmanager
def open_store(config: Path | None) -> Iterator[KeyStore]:
    """The configured store, migrated; domain errors become 'error: ...' and exit 1."""
    try:
        settings = load_settings(config)
        # The configured admin key is owned by the settings: the store refuses to rotate it.
        configured = settings.auth.configured_admin_key() if settings.auth.enabled else None
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    store = KeyStore(settings.store_url(), configured_admin=configured)
    try:
        with store.exclusive():
            store.migrate()
        yield store
    except LLMAPIError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    except (ValidationError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    finally:
        store.close()


def _fields(**options: Any) -> dict[str, Any]:
    renamed = {"org": "organisation", "model": "allowed_models"}
    return {renamed.get(k, k): v for k, v in options.items() if v is not None}


def _when(value: datetime | date | None) -> str:
    if value is None:
        return "-"
    return f"{value:%Y-%m-%d %H:%M}" if isinstance(value, datetime) else value.isoformat()


def _of(used: int, limit: int | None) -> str:
    return f"{used}/{limit}" if limit is not None else f"{used}/-"


def _status(key: KeyInfo) -> str:
    if key.revoked_at is not None:
        return "revoked"
    moment = datetime.now(key.created_at.tzinfo)
    if key.expires_at is not None and moment >= key.expires_at:
        return "expired"
    if key.valid_from is not None and moment < key.valid_from:
        return "not yet valid"
    return "active"


def _print_keys(keys: list[KeyInfo]) -> None:
    table = Table("id", "prefix", "name", "role", "status", "requests", "tokens", "rpm", "tpm",
                  "parallel", "models", "valid", "last used")
    for k in keys:
        table.add_row(str(k.id), k.prefix, k.name, k.role, _status(k),
                      _of(k.used_requests, k.max_requests), _of(k.used_tokens, k.max_tokens),
                      str(k.rpm or "-"), str(k.tpm or "-"), str(k.max_parallel or "-"),
                      ", ".join(k.allowed_models) or "all",
                      f"{_when(k.valid_from)} .. {_when(k.expires_at)}", _when(k.last_used_at))
    console.print(table)


def _print_key(key: KeyInfo) -> None:
    table = Table("field", "value")
    for name, value in key.model_dump(exclude={"secret"}).items():
        shown = _when(value) if isinstance(value, datetime) else value
        table.add_row(name, "-" if shown is None else str(shown))
    console.print(table)
    if isinstance(key, KeyCreated):
        console.print("\nThe secret, shown only this once:\n")
        typer.echo(f"    {key.secret}\n")


@keys_cli.command("create")
def create(name: Annotated[str, Opt(help="Owner's name.")], config: Config = None,
           email: Email = None, org: Org = None, role: Role = None, valid_from: ValidFrom = None,
           expires_at: Expires = None, max_requests: MaxRequests = None,
           max_tokens: MaxTokens = None, rpm: Rpm = None, tpm: Tpm = None,
           max_parallel: Parallel = None, model: Models = None) -> None:
    """Create a key and print its secret (shown only this once)."""
    with open_store(config) as store:
        fields = KeyCreate.model_validate(_fields(
            name=name, email=email, org=org, role=role, valid_from=valid_from,
            expires_at=expires_at, max_requests=max_requests, max_tokens=max_tokens, rpm=rpm,
            tpm=tpm, max_parallel=max_parallel, model=model or None))
        _print_key(store.create(fields))


@keys_cli.command("list")
def list_keys(config: Config = None) -> None:
    """Every key with its limits and counters."""
    with open_store(config) as store:
        _print_keys(store.list())


@keys_cli.command("show")
def show(key_id: KeyId, config: Config = None) -> None:
    """One key, every field."""
    with open_store(config) as store:
        _print_key(store.get(key_id))


@keys_cli.command("update")
def update(key_id: KeyId, config: Config = None, name: Name = None, email: Email = None,
           org: Org = None, role: Role = None, valid_from: ValidFrom = None,
           expires_at: Expires = None, max_requests: MaxRequests = None,
           max_tokens: MaxTokens = None, rpm: Rpm = None, tpm: Tpm = None,
           max_parallel: Parallel = None, model: Models = None,
           clear: Annotated[list[str] | None, Opt(help="Field to empty (repeat), e.g. "
                                                  "--clear max_tokens.")] = None) -> None:
    """Change the options given; --clear FIELD empties a limit, a date or the model list."""
    with open_store(config) as store:
        data: dict[str, Any] = _fields(
            name=name, email=email, org=org, role=role, valid_from=valid_from,
            expires_at=expires_at, max_requests=max_requests, max_tokens=max_tokens, rpm=rpm,
            tpm=tpm, max_parallel=max_parallel, model=model or None)
        data.update(dict.fromkeys(clear or ()))
        _print_key(store.update(key_id, KeyUpdate.model_validate(data).changes()))


@keys_cli.command("revoke")
def revoke(key_id: KeyId, config: Config = None,
           reason: Annotated[str | None, Opt(help="Why, for the record.")] = None) -> None:
    """Revoke a key for good."""
    with open_store(config) as store:
        _print_key(store.revoke(key_id, reason))


@keys_cli.command("rotate")
def rotate(key_id: KeyId, config: Config = None) -> None:
    """Give a key a new secret (printed once); the old one stops working."""
    with open_store(config) as store:
        _print_key(store.rotate(key_id))


def usage(config: Config = None,
          key: Annotated[int | None, Opt(help="Only this key's requests.")] = None,
          model: Annotated[str | None, Opt(help="Only this model's requests.")] = None,
          start: Annotated[str | None, Opt("--from", help="First day, YYYY-MM-DD.")] = None,
          end: Annotated[str | None, Opt("--to", help="Last day, YYYY-MM-DD.")] = None) -> None:
    """Usage per day and in total: requests, errors, prompt/completion tokens, words."""
    with open_store(config) as store:
        first = date.fromisoformat(start) if start else None
        last = date.fromisoformat(end) if end else None
        _print_usage(usage_report(store, key, model, first, last, all_keys=key is None))


def _print_usage(report: UsageReport) -> None:
    table = Table("day", "requests", "errors", "prompt tokens", "completion tokens", "words")
    for d in report.days:
        table.add_row(d.day.isoformat(), str(d.requests), str(d.errors), str(d.prompt_tokens),
                      str(d.completion_tokens), str(d.words))
    t = report.totals
    table.add_row("total", str(t.requests), str(t.errors), str(t.prompt_tokens),
                  str(t.completion_tokens), str(t.words), style="bold")
    console.print(table)
