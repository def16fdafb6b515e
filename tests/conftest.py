"""Shared fixtures: throwaway BCC homes, SQLite and PostgreSQL databases, tiny images.

PostgreSQL: ``BCC_TEST_POSTGRES_URL`` (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/test``)
is the admin connection; each test that needs it gets its own freshly created database, dropped
afterwards. When the server is absent those tests skip with the reason, unless
``BCC_REQUIRE_POSTGRES=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import (
    PG_ADMIN_URL,
    TINY_IMAGE_SIZE,
    build_tiny_classifier,
    create_pg_database,
    install_artifact,
    pg_unavailable_reason,
    register_version,
    save_tiny_artifact,
    write_png,
)

# Re-exported for tests that import them from here; they are defined once, in tests/support.py.
__all__ = ["TINY_IMAGE_SIZE", "build_tiny_classifier", "create_pg_database", "write_png"]

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REQUIRE_PG = os.environ.get("BCC_REQUIRE_POSTGRES", "") not in ("", "0", "false", "no")


def pytest_configure(config: pytest.Config) -> None:
    """Each pytest-xdist worker gets a mount namespace of its own (as root, on Linux): the tmpfs and bind
    mounts some tests make are then not seen by a scoring or intake run of another test in the other worker,
    which would (rightly: `mounts.MountWatch`) leave a file read while the mount table changed for the next
    run, and fail that test by chance. Children of the worker (the CLI, Airflow) share its namespace."""
    import ctypes
    import subprocess
    import sys

    if not os.environ.get("PYTEST_XDIST_WORKER") or os.geteuid() != 0 or not sys.platform.startswith("linux"):
        return
    clone_newns = 0x00020000
    if ctypes.CDLL(None, use_errno=True).unshare(clone_newns) != 0:
        return  # not allowed here (a container without CAP_SYS_ADMIN): the mounting tests skip anyway
    # mounts made in here stay in here (a shared / would pass them on to every other namespace)
    subprocess.run(["mount", "--make-rprivate", "/"], check=False, capture_output=True)


@pytest.fixture(scope="session")
def pg_server() -> str:
    reason = pg_unavailable_reason()
    if reason:
        if REQUIRE_PG:
            pytest.fail(f"BCC_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(reason)
    return PG_ADMIN_URL


@pytest.fixture
def pg_url(pg_server: str) -> Iterator[str]:
    url, drop = create_pg_database()
    yield url
    drop()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> Iterator[str]:
    url = f"sqlite:///{tmp_path / 'bcc-test.db'}"
    yield url
    from bcc_pipeline import store

    store.dispose_engine(url)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Both backends, one after the other."""
    if request.param == "sqlite":
        yield request.getfixturevalue("sqlite_url")
    else:
        yield request.getfixturevalue("pg_url")


@pytest.fixture
def migrated_url(db_url: str) -> str:
    from bcc_pipeline.store import upgrade

    upgrade(db_url)
    return db_url


@pytest.fixture
def make_settings(tmp_path: Path):
    """Settings rooted in a fresh temporary BCC_HOME, with no BCC_* variables leaking in."""
    from bcc_pipeline.config import load_settings

    def _make(database_url: str | None = None, profile: str = "demo", **overrides):
        home = tmp_path / "home"
        env = {"BCC_HOME": str(home)}
        if database_url:
            env["BCC_DATABASE_URL"] = database_url
        return load_settings(profile=profile, overrides=overrides, env=env)

    return _make


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than ``tmp_path``: /dev/shm where it is a separate tmpfs."""
    import shutil
    import tempfile

    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm: no second filesystem to move across")
    if os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("/dev/shm is on the same filesystem as the test folder: no second filesystem")
    folder = Path(tempfile.mkdtemp(prefix="bcc-test-", dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def png_writer() -> Callable[..., Path]:
    return write_png


# -- a tiny champion, so scoring tests need no DenseNet ---------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny classifier saved once per session with the real ``model.save_artifact``.
    Returns (path, sha256)."""
    return save_tiny_artifact(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture
def register_champion(tiny_model_artifact: tuple[Path, str]):
    """``register_champion(settings, version=..., threshold=...)``: copy the tiny artifact into
    ``settings.models_dir/<version>/`` and register it as the champion (any other champion is retired)."""

    def _register(settings, version: str = "v-tiny-1", threshold: float = 0.5) -> str:
        src, sha = tiny_model_artifact
        dest = install_artifact(src, settings.models_dir, version)
        return register_version(settings, version, artifact=(dest, sha), threshold=threshold, profile="demo")

    return _register
