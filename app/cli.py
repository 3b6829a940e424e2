"""The `llm-api` command: serve, worker, download, keys, usage, --version."""

from __future__ import annotations

import signal
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from app import __version__
from app.cli_keys import keys_cli, usage
from app.settings import Settings, SettingsError, load_settings, model_entries

if TYPE_CHECKING:
    import uvicorn

cli = typer.Typer(no_args_is_help=True, add_completion=False,
                  help="Serve open LLMs behind a protected HTTP API.")

cli.add_typer(keys_cli, name="keys")
cli.command("usage")(usage)

ConfigOption = Annotated[Path | None, typer.Option(
    "--config", "-c", help="YAML config; default: $LLM_API_CONFIG, else ./config.yaml.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"llm-api {__version__}")
        raise typer.Exit()


@cli.callback()
def _root(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print the version.")] = False,
          ) -> None:
    """llm-api command line."""


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except SettingsError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _logging(settings: Settings) -> None:
    from app.telemetry import configure_logging

    configure_logging(settings.server.log_level, settings.server.log_format)


@cli.command()
def serve(config: ConfigOption = None,
          host: Annotated[str | None, typer.Option(help="Bind address.")] = None,
          port: Annotated[int | None, typer.Option(help="TCP port.")] = None) -> None:
    """Download (if needed), load and serve the configured models."""
    from app.http import server_config
    from app.lifecycle import DrainingServer
    from app.main import create_app

    settings = _settings(config)
    if host:
        settings.server.host = host
    if port:
        settings.server.port = port
    _logging(settings)
    failed = False

    def on_load_failure() -> None:
        nonlocal failed
        failed = True
        server.should_exit = True

    app = create_app(settings, on_load_failure=on_load_failure)
    server = DrainingServer(server_config(app, settings.server), app.state.drain)
    _stop_on_signals(server)
    server.run()
    if failed:
        typer.echo("error: a model could not be loaded (see the log above)", err=True)
        raise typer.Exit(1)


def _stop_on_signals(server: uvicorn.Server) -> None:
    """Make SIGTERM and SIGINT a graceful shutdown that exits 0.

    While it runs, the server handles both itself (drain: app.lifecycle; then uvicorn stops
    accepting and runs the lifespan shutdown). Afterwards it puts
    back the handlers it found and raises the signal again, so that with the default handlers
    the process dies of SIGTERM (-15) or raises KeyboardInterrupt (130) although it shut down
    cleanly. These handlers are the ones it puts back: the re-raised signal just asks a
    server that has already stopped to stop, and `serve` returns normally (a signal that
    comes before uvicorn takes over stops the server as soon as it has started).
    """
    def stop(_signum: int, _frame: FrameType | None) -> None:
        server.should_exit = True

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


@cli.command()
def download(config: ConfigOption = None) -> None:
    """Fetch the weights of every configured model into models_dir, then exit."""
    from backends.errors import ModelLoadError
    from engine.loading import resolve_tokenizer, resolve_weights

    settings = _settings(config)
    _logging(settings)
    ok = True
    for entry in model_entries(settings):
        try:
            path = resolve_weights(entry, settings.models_dir)
            resolve_tokenizer(entry, settings.models_dir)
        except ModelLoadError as exc:
            typer.echo(f"error: {entry.name}: {exc.message}", err=True)
            ok = False
            continue
        typer.echo(f"{entry.name}: {path if path else '(no files needed)'}")
    if not ok:
        raise typer.Exit(1)


@cli.command()
def worker(config: ConfigOption = None,
           models: Annotated[str | None, typer.Option(
               help="Comma-separated names of the models to serve; default: every model "
                    "with placement remote.")] = None) -> None:
    """Serve models to API servers anywhere: take their jobs from Redis Streams (redis_url)."""
    from engine.redis_worker import WorkerError, run_worker

    settings = _settings(config)
    _logging(settings)
    entries = model_entries(settings)
    if models:
        names = [n.strip() for n in models.split(",") if n.strip()]
        unknown = [n for n in names if n not in {e.name for e in entries}]
        if unknown:
            typer.echo(f"error: --models: no model named {', '.join(unknown)} in the config; "
                       f"configured: {', '.join(e.name for e in entries)}", err=True)
            raise typer.Exit(2)
        entries = [e for e in entries if e.name in names]
    else:
        entries = [e for e in entries if e.placement == "remote"]
        if not entries:
            typer.echo("error: no model has placement remote; name the models to serve with "
                       "--models", err=True)
            raise typer.Exit(2)
    try:
        run_worker(settings.redis_url, settings.workers, settings.models_dir, entries,
                   settings.server.graceful_shutdown_seconds)
    except WorkerError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
