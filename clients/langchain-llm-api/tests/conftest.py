"""Fixtures of the package's tests: the live servers and the recording endpoint."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from lc_servers import LOADING_MODELS, MAIN_MODELS, RecordingEndpoint, ServerProcess


@pytest.fixture(scope="session")
def llm_api_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    server = ServerProcess(tmp_path_factory.mktemp("llm-api-server"), MAIN_MODELS)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="module")
def loading_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """A server whose only model never finishes loading (its requests get 503)."""
    server = ServerProcess(tmp_path_factory.mktemp("llm-api-loading"), LOADING_MODELS,
                           wait_models=False)
    try:
        yield server.start()
    finally:
        server.stop(kill=True)


@pytest.fixture
def recording_endpoint() -> Iterator[RecordingEndpoint]:
    endpoint = RecordingEndpoint().start()
    yield endpoint
    endpoint.close()
