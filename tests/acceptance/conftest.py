"""The fixtures of the acceptance tests: the command on fresh databases (acceptance/cli.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from acceptance.cli import ACTIONS_MODULE, ACTIONS_SOURCE, Cli


@pytest.fixture(scope="session")
def actions_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory holding the action module ACTIONS_MODULE, for PYTHONPATH."""
    path = tmp_path_factory.mktemp("actions")
    (path / f"{ACTIONS_MODULE}.py").write_text(ACTIONS_SOURCE)
    return path


@pytest.fixture
def cli(db_url: str, tmp_path: Path, actions_path: Path) -> Cli:
    """The command on a fresh database holding the schema, on each backend in turn."""
    return Cli(tmp_path / "home", db_url, actions_path)


@pytest.fixture
def sqlite_cli(sqlite_url: str, tmp_path: Path, actions_path: Path) -> Cli:
    """The command on a fresh SQLite database holding the schema."""
    return Cli(tmp_path / "home", sqlite_url, actions_path)


@pytest.fixture
def home_cli(tmp_path: Path, actions_path: Path) -> Cli:
    """The command as a new user runs it: no database URL anywhere, an empty HOME."""
    return Cli(tmp_path / "home", None, actions_path)
