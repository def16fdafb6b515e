"""Test support shared by ``tests/conftest.py``, the Airflow test helpers and ``benchmarks/``.

* :func:`build_tiny_classifier` / :func:`save_tiny_artifact`: a tiny real Keras classifier with the
  champion's contract (S×S×3 → 2 softmax probabilities), saved with the real ``model.save_artifact``.
* :func:`install_artifact` and :func:`register_version`: put an artifact under ``models/<version>/``
  and register it (by default as the champion, retiring any other) with optional validation metrics.
* :func:`model_version_row`: the one place a ``ModelVersion`` row with test defaults is built.
* :func:`create_pg_database`: a freshly created PostgreSQL database and the function that drops it.
* :func:`write_png`: a small PNG every decoder accepts.
* Scoring: :func:`scoring_settings` (no settle time), :func:`fill_inbox`, :func:`count_rows`,
  :func:`inbox_files`, :func:`archived`, and :class:`Crash`, which stands in for SIGKILL.

Heavy libraries (keras, numpy, Pillow, SQLAlchemy) are imported inside the functions, so importing
this module costs nothing.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "PG_ADMIN_URL",
    "TINY_IMAGE_SIZE",
    "Crash",
    "archived",
    "build_tiny_classifier",
    "count_rows",
    "create_pg_database",
    "fill_inbox",
    "inbox_files",
    "install_artifact",
    "model_version_row",
    "pg_admin_engine",
    "pg_unavailable_reason",
    "register_version",
    "save_tiny_artifact",
    "scoring_settings",
    "write_png",
]

PG_ADMIN_URL = os.environ.get("BCC_TEST_POSTGRES_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
"""The admin connection used to create and drop throwaway databases."""

TINY_IMAGE_SIZE = 32


# ------------------------------------------------------------------------------------------ tiny model


def build_tiny_classifier(image_size: int = TINY_IMAGE_SIZE):
    """A tiny real Keras classifier with the champion's contract (S×S×3 → 2 softmax probabilities):
    Conv2D → GAP → Dense(2, softmax). Scoring and the gate are architecture-agnostic, and this one
    builds and traces in a second instead of DenseNet201's minutes. Seeded: the same weights every time."""
    import keras

    keras.utils.set_random_seed(7)
    inputs = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="tiny")


def save_tiny_artifact(
    out_dir: str | os.PathLike[str],
    image_size: int = TINY_IMAGE_SIZE,
    metadata: Mapping[str, Any] | None = None,
) -> tuple[Path, str]:
    """The tiny classifier saved with ``model.save_artifact`` into ``out_dir``; returns (path, sha256)."""
    from bcc_pipeline.model import save_artifact

    meta = {"image_size": image_size, **(metadata or {})}
    return save_artifact(build_tiny_classifier(image_size), out_dir, meta)


def install_artifact(
    artifact: str | os.PathLike[str], models_dir: str | os.PathLike[str], version: str
) -> Path:
    """Copy a saved model (and, when it is ``model.keras`` with sibling files such as converted-model
    caches, its whole folder) to ``models_dir/<version>/``; returns the copied ``model.keras``."""
    src = Path(artifact)
    dest = Path(models_dir) / version
    if src.is_dir():
        shutil.copytree(src, dest, dirs_exist_ok=True)
        return dest / "model.keras"
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest / "model.keras")
    return dest / "model.keras"


# ---------------------------------------------------------------------------------------- registering


def model_version_row(version: str, status: str = "candidate", **fields: Any):
    """A ``ModelVersion`` row with harmless defaults for every required column; ``fields`` override them."""
    from bcc_pipeline.images import PREPROCESSING_ID
    from bcc_pipeline.store import ModelVersion

    values: dict[str, Any] = {
        "artifact_path": "-",
        "artifact_sha256": "0" * 64,
        "base_weights": "none",
        "profile": "test",
        "image_size": TINY_IMAGE_SIZE,
        "preprocessing": PREPROCESSING_ID,
        "hyperparameters": {},
        "manifest_hash": "0" * 64,
        "n_train": 0,
        "n_val": 0,
        "threshold": 0.5,
        "code_version": "test",
    }
    values.update(fields)
    return ModelVersion(version=version, status=status, **values)


def register_version(
    database_url_or_settings: Any,
    version: str,
    *,
    status: str = "champion",
    artifact: tuple[str | os.PathLike[str], str] | None = None,
    threshold: float = 0.5,
    metrics: Mapping[str, float] | None = None,
    **fields: Any,
) -> str:
    """Register ``version`` in the store (migrated first) and return it.

    ``database_url_or_settings``: a database URL or a ``Settings`` (its ``database_url``).
    ``artifact``: (path, sha256) of the saved model the row points at (default: none, ``"-"``).
    ``status="champion"`` retires any other champion first, as a promotion does. ``metrics`` are saved
    as the version's validation metrics (what the gate compares a candidate with). Other ``fields``
    override the row's defaults (``image_size``, ``profile``, ...).
    """
    from sqlalchemy import update

    from bcc_pipeline import registry
    from bcc_pipeline.store import ModelVersion, session_scope, upgrade

    url = getattr(database_url_or_settings, "database_url", database_url_or_settings)
    if artifact is not None:
        fields = {"artifact_path": str(artifact[0]), "artifact_sha256": artifact[1], **fields}
    upgrade(url)
    with session_scope(url) as s:
        if status == "champion":
            s.execute(update(ModelVersion).where(ModelVersion.status == "champion").values(status="retired"))
            s.flush()
        s.add(model_version_row(version, status, threshold=threshold, **fields))
        s.flush()
        if metrics:
            registry.save_metrics(s, version, "validation", dict(metrics))
    return version


# ---------------------------------------------------------------------------------------- PostgreSQL


def pg_admin_engine(admin_url: str = PG_ADMIN_URL):
    from sqlalchemy import create_engine

    return create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)


def pg_unavailable_reason(admin_url: str = PG_ADMIN_URL) -> str | None:
    """None when PostgreSQL answers at ``admin_url``, else the reason it doesn't."""
    try:
        from sqlalchemy import text

        eng = pg_admin_engine(admin_url)
        try:
            with eng.connect() as c:
                c.execute(text("select 1"))
        finally:
            eng.dispose()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL not reachable at {admin_url}: {str(exc).splitlines()[0]}"


def create_pg_database(
    prefix: str = "bcc_test", admin_url: str = PG_ADMIN_URL
) -> tuple[str, Callable[[], None]]:
    """Create a uniquely named database; returns its URL and a ``drop()`` that closes this process's
    pooled connections to it (``store.dispose_engine``) and drops it, even with sessions still open."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    eng = pg_admin_engine(admin_url)
    with eng.connect() as c:
        c.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(admin_url).set(database=name).render_as_string(hide_password=False)

    def drop() -> None:
        from bcc_pipeline import store

        store.dispose_engine(url)
        with eng.connect() as c:
            c.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        eng.dispose()

    return url, drop


# -------------------------------------------------------------------------------------------- images


def write_png(path: Path, *, size: int = 48, seed: int = 0, mode: str = "RGB") -> Path:
    """A small random-ish PNG that every decoder accepts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


# ------------------------------------------------------------------------------------------- scoring


def scoring_settings(make_settings: Callable[..., Any], url: str | None, **overrides: Any) -> Any:
    """Settings from the ``make_settings`` fixture with no settle time (files just written are scored)."""
    return make_settings(url, settle_seconds=0, **overrides)


def fill_inbox(
    inbox: Path, png_writer: Callable[..., Path], n: int, *, prefix: str = "img", seed0: int = 0
) -> list[Path]:
    """``n`` distinct 40×40 PNGs in ``inbox/patient_<i % 3>/``."""
    out = []
    for i in range(n):
        out.append(png_writer(inbox / f"patient_{i % 3}" / f"{prefix}{i:03d}.png", seed=seed0 + i, size=40))
    return out


def count_rows(url: str, model: type) -> int:
    from sqlalchemy import func, select

    from bcc_pipeline.store import session_scope

    with session_scope(url) as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def inbox_files(inbox: Path) -> list[str]:
    """What is left in the inbox (files and links), relative paths, sorted."""
    return sorted(str(p.relative_to(inbox)) for p in inbox.rglob("*") if p.is_file() or p.is_symlink())


def archived(settings: Any) -> list[Path]:
    return [p for p in settings.archive_dir.rglob("*") if p.is_file()]


class Crash(BaseException):
    """Stands in for SIGKILL: nothing after it runs (not even except Exception handlers)."""


@contextlib.contextmanager
def _mounted(mount_args: list[str], view, what: str):
    """``mount <mount_args> view`` for the block, unmounted after it; skips (saying ``what``) where this
    process may not mount."""
    done = subprocess.run(["mount", *mount_args, str(view)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount {what} here (needs root and CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield view
    finally:
        subprocess.run(["umount", str(view)], check=True)


def bind_mounted(source, view):
    """``source`` bind-mounted at ``view`` (created) for the block; skips where mounting is not allowed."""
    view.mkdir(parents=True, exist_ok=True)
    return _mounted(["--bind", str(source)], view, "a bind mount")


def file_bind_mounted(source, view):
    """The single file ``source`` bind-mounted over the file ``view`` (created empty) for the block."""
    view.parent.mkdir(parents=True, exist_ok=True)
    view.touch()
    return _mounted(["--bind", str(source)], view, "a bind mount")


def tmpfs_mounted(view):
    """An empty tmpfs mounted over the folder ``view`` for the block (what was there is covered)."""
    return _mounted(["-t", "tmpfs", "none"], view, "a tmpfs")


def overlay_mounted(lower, view, scratch):
    """An overlay filesystem at ``view`` (created) whose lower folder is ``lower`` (its upper and work
    folders in ``scratch``) for the block; skips where overlays cannot be mounted."""
    upper, work = scratch / "upper", scratch / "work"
    for folder in (view, upper, work):
        folder.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={lower},upperdir={upper},workdir={work}"
    return _mounted(["-t", "overlay", "overlay", "-o", options], view, "an overlay")


def deeper_than_path_max(folder: Path, name: str = "deep.png") -> None:
    """``name`` in 20 folders of 250 bytes below ``folder``: its path is longer than PATH_MAX, so nothing
    reaches it by path, even as root (made through folder descriptors)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(20):  # 20 × 251 bytes > PATH_MAX
            os.mkdir("d" * 250, dir_fd=fd)
            nxt = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = nxt
        with open(os.open(name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd), "wb") as fh:
            fh.write(b"not reachable by path")
    finally:
        os.close(fd)


def exchange(a: Path, b: Path) -> None:
    """Swap two names atomically (``renameat2(RENAME_EXCHANGE)``): each name then holds the other's file;
    skips where the C library or the filesystem cannot."""
    import ctypes

    from bcc_pipeline.files import renameat2

    if renameat2 is None:
        pytest.skip("this C library has no renameat2: no atomic exchange")
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) != 0:
        err = ctypes.get_errno()
        pytest.skip(f"renameat2(RENAME_EXCHANGE) is refused here: {os.strerror(err)}")


def foreign_home(tmp_path: Path) -> Any:
    """Another deployment's home (``site_b/home`` below ``tmp_path``), set up as ``bcc db upgrade`` does:
    its settings."""
    from bcc_pipeline.config import load_settings
    from bcc_pipeline.store import upgrade

    other = load_settings(env={"BCC_HOME": str(tmp_path / "site_b" / "home")})
    upgrade(other.database_url, home=other.home)
    return other
