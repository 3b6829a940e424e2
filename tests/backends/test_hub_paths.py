"""A hub file path must resolve inside models_dir (issue #22, finding 11c): names from the
config, from a glob matched against the repository listing and from a snapshot's file list
are refused when they are absolute or climb out with `..`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from backends.errors import ModelLoadError
from backends.hub import fetch_file, fetch_snapshot
from tests.fakehub import FakeHub

REPO = "acme/hostile"


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    fake = FakeHub()
    outside = (tmp_path / "outside" / "abs.tiktoken").as_posix()  # absolute, but harmless
    fake.add(REPO, {"config.json": b"{}", "good.gguf": b"GGUF", "../evil": b"evil",
                    "/etc/x": b"x", "../../climb.gguf": b"climb",
                    "../evil.tiktoken": b"evil", outside: b"abs"})
    fake.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)
    yield fake
    fake.stop()


def files_under(folder: Path) -> set[str]:
    """Files written under `folder`, but the repository's download lock (taken first)."""
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.name != ".lock"}


@pytest.mark.parametrize("pattern", ["*evil", "/etc/*", "*climb.gguf"])
def test_glob_match_outside_the_repository_is_refused(hub: FakeHub, tmp_path: Path,
                                                      pattern: str) -> None:
    models = tmp_path / "models"
    with pytest.raises(ModelLoadError) as err:
        fetch_file(models, REPO, pattern, where="models.m.setup_params")
    message = err.value.message
    assert "models.m.setup_params.filename" in message and "inside" in message
    assert not any("/resolve/" in path for _, path, _ in hub.requests)  # nothing downloaded
    assert not (tmp_path / "evil").exists() and not Path("/etc/x").exists()
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("filename", ["../evil", "/etc/x", "sub/../../evil", "..",
                                      "C:\\evil", "a\\..\\..\\evil"])
def test_configured_filename_outside_the_repository_is_refused(hub: FakeHub, tmp_path: Path,
                                                                filename: str) -> None:
    with pytest.raises(ModelLoadError, match="setup_params.filename.*inside"):
        fetch_file(tmp_path / "models", REPO, filename)
    assert hub.requests == []  # refused before asking the hub anything


@pytest.mark.parametrize("repo_id", ["acme/../../x", "../x", "/abs/x", "acme/x/../.."])
def test_repo_id_outside_models_dir_is_refused(hub: FakeHub, tmp_path: Path,
                                               repo_id: str) -> None:
    with pytest.raises(ModelLoadError, match="setup_params.repo_id"):
        fetch_file(tmp_path / "models", repo_id, "good.gguf")
    with pytest.raises(ModelLoadError, match="setup_params.repo_id"):
        fetch_snapshot(tmp_path / "models", repo_id)
    assert hub.requests == []


def test_snapshot_file_list_outside_the_repository_is_refused(hub: FakeHub,
                                                              tmp_path: Path) -> None:
    models = tmp_path / "models"
    with pytest.raises(ModelLoadError) as err:
        fetch_snapshot(models, REPO)  # "*.tiktoken" matches the hostile names
    assert "../evil.tiktoken" in err.value.message and "inside" in err.value.message
    assert files_under(tmp_path) == set()


def test_a_good_file_of_the_same_repository_still_downloads(hub: FakeHub,
                                                            tmp_path: Path) -> None:
    path = fetch_file(tmp_path / "models", REPO, "good*.gguf")
    assert path == tmp_path / "models" / "acme" / "hostile" / "good.gguf"
    assert path.read_bytes() == b"GGUF"
