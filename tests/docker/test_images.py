"""Docker deliverables, checked without a Docker engine: hadolint, the Compose schema, and the
image's own install and entrypoint steps run natively in a fresh venv."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.docker.dockerfile import Stage, install_command, stages

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
README = (ROOT / "README.md").read_text()


def _tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is not installed in the test venv (test extra)"
    return str(path)


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.gpu"])
def test_hadolint_clean(dockerfile: str) -> None:
    result = subprocess.run([_tool("hadolint"), str(ROOT / dockerfile)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_files_match_the_compose_specification(tmp_path: Path) -> None:
    files = [str(ROOT / "docker-compose.yaml"), str(ROOT / "docker-compose.gpu.yaml")]
    check = [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec"]
    result = subprocess.run(check + files, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    # The validator is real: a service with a malformed port list is refused.
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"services": {"x": {"image": "a", "ports": {"8000": 1}}}}))
    assert subprocess.run(check + [str(broken)], capture_output=True).returncode != 0


def _compose(name: str) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / name).read_text())
    return data


def _assert_server_service(service: dict[str, Any], dockerfile: str) -> None:
    assert service["build"] == {"context": ".", "dockerfile": dockerfile}
    assert service["ports"] == ["8000:8000"]
    assert service["volumes"][:2] == ["./models:/models", "./config.yaml:/llm-api/config.yaml:ro"]
    assert service["restart"] == "unless-stopped"
    assert "/health" in " ".join(service["healthcheck"]["test"])


def test_compose_services_are_what_the_readme_says() -> None:
    cpu = _compose("docker-compose.yaml")
    _assert_server_service(cpu["services"]["llm-api"], "Dockerfile")
    assert cpu["services"]["postgres"]["profiles"] == ["postgres", "scale"]
    assert cpu["services"]["redis"]["profiles"] == ["postgres", "scale"]
    assert "llm-api" not in [p for s in cpu["services"].values() for p in s.get("profiles", [])]
    gpu = _compose("docker-compose.gpu.yaml")
    service = gpu["services"]["llm-api"]
    _assert_server_service(service, "Dockerfile.gpu")
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for words in ["-v $PWD/models:/models", "-v $PWD/config.yaml:/llm-api/config.yaml:ro",
                  "-p 8000:8000", "docker compose --profile postgres up",
                  "docker compose -f docker-compose.gpu.yaml up", "`/health`",
                  "postgresql+psycopg://llm:llm@postgres:5432/llm"]:
        assert words in README, f"README's Docker section should say {words!r}"


def test_scale_profile_runs_replicas_and_workers_on_one_store_and_redis() -> None:
    """Profile scale: two API replicas and N workers, one image, one config, the same
    Postgres and Redis; the models run on the workers (placement remote)."""
    from typer.testing import CliRunner

    from app.cli import cli

    services = _compose("docker-compose.yaml")["services"]
    scale = {name for name, s in services.items() if "scale" in s.get("profiles", [])}
    assert scale == {"postgres", "redis", "api-1", "api-2", "worker"}
    replicas, worker = [services["api-1"], services["api-2"]], services["worker"]
    single = services["llm-api"]
    for service in [*replicas, worker]:
        assert (service["build"], service["image"]) == (single["build"], single["image"])
        assert service["environment"]["LLM_API_SERVER__PLACEMENT"] == "remote"
        assert "./config.yaml:/config/config.yaml:ro" in service["volumes"]
        assert service["command"][1:] == ["--config", "/config/config.yaml"]
        for store in ("postgres", "redis"):
            assert service["depends_on"][store] == {"condition": "service_healthy"}
        assert service["restart"] == "unless-stopped"
        # the command line is one the CLI accepts (--help: parse only, run nothing)
        parsed = CliRunner().invoke(cli, [*service["command"], "--help"])
        assert parsed.exit_code == 0, parsed.output
    assert [s["command"][0] for s in replicas] == ["serve", "serve"]
    assert worker["command"][0] == "worker"
    urls = {(s["environment"]["LLM_API_DATABASE_URL"], s["environment"]["LLM_API_REDIS_URL"])
            for s in [*replicas, worker]}
    assert len(urls) == 1, "every replica and worker must use the same store and Redis"
    database, redis = urls.pop()
    postgres = services["postgres"]["environment"]
    assert database.startswith(f"postgresql+psycopg://{postgres['POSTGRES_USER']}:")
    assert database.endswith(f"@postgres:5432/{postgres['POSTGRES_DB']}")
    assert redis == "redis://redis:6379/0"
    exposed = _runtime("Dockerfile").one("EXPOSE")
    ports = [p for s in replicas for p in s["ports"]]
    assert len(set(ports)) == 2 and all(p.endswith(f":{exposed}") for p in ports)
    assert "ports" not in worker  # workers take jobs from Redis; nothing connects to them
    assert worker["deploy"]["replicas"] >= 2
    assert "./models:/models" in worker["volumes"]
    # the image's HEALTHCHECK probes /health over HTTP, which a worker does not serve
    assert "/health" in _runtime("Dockerfile").one("HEALTHCHECK")
    assert worker["healthcheck"] == {"disable": True}


def _runtime(name: str) -> Stage:
    return stages(ROOT / name)[-1]


def test_both_images_share_layout_user_and_entrypoint() -> None:
    cpu, gpu = _runtime("Dockerfile"), _runtime("Dockerfile.gpu")
    for stage in (cpu, gpu):
        assert stage.one("WORKDIR") == "/llm-api"
        assert stage.one("VOLUME") == "/models"
        assert stage.one("EXPOSE") == "8000"
        assert stage.one("USER") == "1000"
        assert stage.exec_form("ENTRYPOINT") == ["llm-api"]
        assert stage.exec_form("CMD") == ["serve"]
        assert "/llm-api/config.yaml" in " ".join(stage.all("COPY"))
        assert stage.env()["LLM_API_MODELS_DIR"] == "/models"
    assert install_command(cpu)[1:3] == ["/opt/venv", "llama,postgres,redis"]
    assert install_command(gpu)[1:3] == ["/opt/venv", "llama,hf,gptq,postgres,redis"]
    builders = [stages(ROOT / name)[0] for name in ("Dockerfile", "Dockerfile.gpu")]
    assert "-DGGML_NATIVE=OFF" in " ".join(builders[0].all("RUN"))
    assert "-DGGML_CUDA=on" in " ".join(builders[1].all("RUN"))
    assert "torch" not in " ".join(cpu.all("RUN")), "the CPU image has no torch"


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _in_tmp(value: str, root: Path) -> str:
    for image_path in ("/opt/venv", "/models", "/llm-api"):
        value = value.replace(image_path, str(root) + image_path)
    return value


def test_cpu_image_steps_run_natively(tmp_path: Path) -> None:
    """Install and start exactly as the CPU image does, in a fresh venv under tmp_path:
    docker/install-app with the image's arguments, the image's ENV, WORKDIR, ENTRYPOINT,
    CMD and HEALTHCHECK, and a config at the image's path pointing at the tiny model."""
    import httpx

    from tests.conftest import TINY_GGUF, wait_for

    stage = _runtime("Dockerfile")
    argv = install_command(stage)
    if "--find-links" in argv:  # the builder stage's wheel dir; natively pip's cache has it
        index = argv.index("--find-links")
        del argv[index:index + 2]
    argv = [str(ROOT / "docker" / "install-app")] + [_in_tmp(a, tmp_path) for a in argv[1:]]
    installed = subprocess.run(argv, capture_output=True, text=True, timeout=1200)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    assert "llm-api" in installed.stdout  # the script ends with `llm-api --version`
    venv_python = tmp_path / "opt" / "venv" / "bin" / "python"
    no_torch = "import importlib.util as u; assert u.find_spec('torch') is None"
    assert subprocess.run([str(venv_python), "-c", no_torch]).returncode == 0
    stores = "import psycopg, redis"  # the compose file's postgres profile needs both
    assert subprocess.run([str(venv_python), "-c", stores]).returncode == 0

    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LLM_API_", "HF_"))}
    for key, value in stage.env().items():
        env[key] = _in_tmp(value.replace("$PATH", os.environ["PATH"]), tmp_path)
    env["LLM_API_SERVER__PORT"] = str(port)
    admin_key = "llmapi-docker-test-" + secrets.token_urlsafe(16)
    env["LLM_API_AUTH__ADMIN_KEY"] = admin_key  # auth is on in the image, as everywhere
    workdir = Path(_in_tmp(stage.one("WORKDIR"), tmp_path))
    workdir.mkdir(parents=True)
    (tmp_path / "models").mkdir()
    (workdir / "config.yaml").write_text(yaml.safe_dump({
        "model_family": "llama", "setup_params": {"model_path": str(TINY_GGUF)},
        "model_params": {"n_ctx": 512, "n_threads": 1}}))
    command = stage.exec_form("ENTRYPOINT") + stage.exec_form("CMD")
    executable = shutil.which(command[0], path=env["PATH"])
    assert executable and executable.startswith(str(tmp_path)), executable
    server = subprocess.Popen([executable, *command[1:]], cwd=workdir, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"

        def ready() -> bool:
            assert server.poll() is None, server.communicate()[0]
            try:
                return httpx.get(f"{url}/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout=120, what="the natively installed image to be ready")
        healthcheck = stage.one("HEALTHCHECK")
        probe = yaml.safe_load(healthcheck[healthcheck.index("CMD") + 3:])
        assert subprocess.run(probe, env=env, cwd=workdir, timeout=30).returncode == 0
        body = {"prompt": "Hello", "params": {"max_tokens": 4}}
        assert httpx.post(f"{url}/generate", json=body, timeout=60).status_code == 401
        response = httpx.post(f"{url}/generate", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {admin_key}"})
        assert response.status_code == 200, response.text
        assert isinstance(response.json(), str)
    finally:
        server.terminate()
        server.wait(30)
