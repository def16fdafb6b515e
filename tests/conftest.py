"""Shared fixtures: throwaway BCC homes, SQLite and PostgreSQL databases, tiny images.

PostgreSQL: ``BCC_TEST_POSTGRES_URL`` (default ``postgresql+psycopg2://postgres@127.0.0.1:5432/test``)
is the admin connection; each test that needs it gets its own freshly created database, dropped
afterwards. When the server is absent those tests skip with the reason, unless
``BCC_REQUIRE_POSTGRES=1`` (set by CI), which turns the skip into a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PG_ADMIN_URL = os.environ.get("BCC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
REQUIRE_PG = os.environ.get("BCC_REQUIRE_POSTGRES", "") not in ("", "0", "false", "no")


def _pg_admin_engine():
    from sqlalchemy import create_engine

    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def _pg_available() -> str | None:
    """None when PostgreSQL answers, else the reason it doesn't."""
    try:
        from sqlalchemy import text

        eng = _pg_admin_engine()
        with eng.connect() as c:
            c.execute(text("select 1"))
        eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL not reachable at {PG_ADMIN_URL}: {str(exc).splitlines()[0]}"


@pytest.fixture(scope="session")
def pg_server() -> str:
    reason = _pg_available()
    if reason:
        if REQUIRE_PG:
            pytest.fail(f"BCC_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(reason)
    return PG_ADMIN_URL


def create_pg_database(prefix: str = "bcc_test") -> tuple[str, Callable[[], None]]:
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    eng = _pg_admin_engine()
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        from bcc_pipeline import store

        engine = store._ENGINES.pop(url, None)
        if engine is not None:
            engine.dispose()
        with eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()

    return url, drop


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

    engine = store._ENGINES.pop(url, None)
    if engine is not None:
        engine.dispose()


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


def write_png(path: Path, *, size: int = 48, seed: int = 0, mode: str = "RGB") -> Path:
    """A small random-ish PNG that every decoder accepts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


@pytest.fixture
def png_writer() -> Callable[..., Path]:
    return write_png


# -- batch scoring (issue 3): a tiny champion, so scoring tests need no DenseNet ---------------------
TINY_IMAGE_SIZE = 32


def build_tiny_classifier(image_size: int = TINY_IMAGE_SIZE):
    """A tiny real Keras classifier with the champion's contract (S×S×3 → 2 softmax probabilities):
    Conv2D → GAP → Dense(2, softmax). Scoring and the gate are architecture-agnostic, and this one
    builds and traces in a second instead of DenseNet201's minutes."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="tiny")


@pytest.fixture(scope="session")
def tiny_model_artifact(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The tiny classifier saved once per session with the real ``model.save_artifact``.
    Returns (path, sha256)."""
    from bcc_pipeline.model import save_artifact

    return save_artifact(build_tiny_classifier(), tmp_path_factory.mktemp("tiny-model"),
                         {"image_size": TINY_IMAGE_SIZE})


@pytest.fixture
def register_champion(tiny_model_artifact: tuple[Path, str]):
    """``register_champion(settings, version=..., threshold=...)``: copy the tiny artifact into
    ``settings.models_dir/<version>/`` and register it as the champion (any other champion is retired)."""
    import shutil

    from sqlalchemy import update

    from bcc_pipeline.store import ModelVersion, session_scope, upgrade

    def _register(settings, version: str = "v-tiny-1", threshold: float = 0.5) -> str:
        upgrade(settings.database_url)
        src, sha = tiny_model_artifact
        dest = settings.models_dir / version / "model.keras"
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        with session_scope(settings.database_url) as s:
            s.execute(update(ModelVersion).where(ModelVersion.status == "champion").values(status="retired"))
            s.flush()
            s.add(ModelVersion(version=version, status="champion", artifact_path=str(dest), artifact_sha256=sha,
                               base_weights="none", profile="demo", image_size=TINY_IMAGE_SIZE,
                               preprocessing="densenet-torch-v1", hyperparameters={}, manifest_hash="0" * 64,
                               n_train=0, n_val=0, threshold=threshold, code_version="test"))
        return version

    return _register
