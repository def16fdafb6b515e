"""Inference back-ends (bcc_pipeline.inference) on a small real Keras model with a nested sub-model,
BatchNorm and a softmax head, like the DenseNet201 classifier: every back-end loads the artifact,
agrees with fp32 Keras, caches its conversion, and refuses a tampered artifact."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

from bcc_pipeline.errors import ArtifactError, ConfigError
from bcc_pipeline.inference import BACKENDS, DEFAULT_BACKEND, load_predictor

SIZE = 32


def _nested_classifier():
    import keras

    keras.utils.set_random_seed(3)
    inner_in = keras.Input((SIZE, SIZE, 3))
    y = keras.layers.Conv2D(8, 3, padding="same")(inner_in)
    y = keras.layers.BatchNormalization()(y)
    y = keras.layers.ReLU()(y)
    inner = keras.Model(inner_in, y, name="base")
    inputs = keras.Input((SIZE, SIZE, 3), name="image")
    x = inner(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    x = keras.layers.BatchNormalization(name="bn")(x)
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(x)
    return keras.Model(inputs, outputs, name="nested")


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    from bcc_pipeline.model import save_artifact

    net = _nested_classifier()
    x = np.random.default_rng(0).normal(size=(16, SIZE, SIZE, 3)).astype("float32")
    ref = net.predict(x, verbose=0)
    path, sha = save_artifact(net, tmp_path_factory.mktemp("nested"), {"image_size": SIZE})
    return path, sha, x, ref


def _needs(backend: str) -> None:
    if backend == "onnxruntime":
        pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
        pytest.importorskip("tf2onnx", reason="the onnx extra is not installed")


def _copy(artifact, tmp_path: Path) -> tuple[Path, str]:
    path, sha, _x, _ref = artifact
    dest = tmp_path / "v1" / "model.keras"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(path, dest)
    return dest, sha


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_agrees_with_fp32_keras(artifact, tmp_path, backend):
    _needs(backend)
    path, sha = _copy(artifact, tmp_path)
    _p, _s, x, ref = artifact
    if backend == "openvino-int8":
        pytest.importorskip("nncf", reason="the int8 extra is not installed")
    pred = load_predictor(path, sha, image_size=SIZE, backend=backend, version="v1", calibration=lambda: x)
    out = pred(x)
    assert out.shape == (16, 2) and out.dtype == np.float32
    assert np.allclose(out.sum(axis=1), 1.0, atol=1e-2)
    tolerance = 2e-2 if "bf16" in backend else 5e-2 if "int8" in backend else 1e-5
    assert np.abs(out - ref).max() <= tolerance, (backend, np.abs(out - ref).max())
    assert pred.backend == backend and pred.precision in ("f32", "bf16", "f16", "int8")
    if backend == "keras-bf16":
        assert pred.precision == "bf16"


def test_default_backend_is_a_known_one():
    assert DEFAULT_BACKEND in BACKENDS


@pytest.mark.parametrize("backend", ["openvino", "onnxruntime"])
def test_conversion_is_cached_beside_the_artifact_and_rebuilt_when_damaged(artifact, tmp_path, backend):
    _needs(backend)
    path, sha = _copy(artifact, tmp_path)
    _p, _s, x, ref = artifact
    first = load_predictor(path, sha, image_size=SIZE, backend=backend)
    assert first.converted
    [cache] = (path.parent / "compiled").iterdir()
    meta = json.loads((cache / "source.json").read_text())
    assert meta["artifact_sha256"] == sha
    second = load_predictor(path, sha, image_size=SIZE, backend=backend)
    assert not second.converted
    assert np.abs(second(x) - ref).max() <= 1e-5
    # a damaged cache file is noticed by its checksum and the conversion is redone
    victim = next(p for p in cache.iterdir() if p.suffix in (".bin", ".onnx"))
    with open(victim, "r+b") as f:
        f.seek(100)
        f.write(b"\0" * 16)
    third = load_predictor(path, sha, image_size=SIZE, backend=backend)
    assert third.converted
    assert np.abs(third(x) - ref).max() <= 1e-5
    assert [p.name for p in (path.parent / "compiled").iterdir()] == [cache.name]  # no leftovers


@pytest.mark.parametrize("kind", ["file", "link", "compiled-file"])
def test_a_cache_folder_replaced_by_a_file_or_link_is_rebuilt_and_leaves_nothing(artifact, tmp_path, kind):
    """The converted model's folder replaced by a file, or by a link to a file outside the home: it is
    never used, the conversion is redone, and what stood there is removed, not left under a temporary
    name (the link's target untouched). `compiled/` itself replaced by a file (round 25: every run then
    converted the model in memory again, and the file stayed) is removed and the cache rebuilt."""
    _needs("openvino")
    path, sha = _copy(artifact, tmp_path)
    _p, _s, x, ref = artifact
    load_predictor(path, sha, image_size=SIZE, backend="openvino")
    [cache] = (path.parent / "compiled").iterdir()
    shutil.rmtree(cache)
    outside = tmp_path / "outside.txt"
    outside.write_text("not a model")
    if kind == "file":
        cache.write_text("not a model")
    elif kind == "compiled-file":
        cache.parent.rmdir()
        cache.parent.write_text("not a folder")
    else:
        cache.symlink_to(outside)
    again = load_predictor(path, sha, image_size=SIZE, backend="openvino")
    assert again.converted and np.abs(again(x) - ref).max() <= 1e-5
    assert [p.name for p in (path.parent / "compiled").iterdir()] == [cache.name] and cache.is_dir()
    assert outside.read_text() == "not a model"


class _Ledger:
    """A database's ``compiled_models`` in memory: one per home."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str], dict[str, str]] = {}

    def expected(self, sha: str, fmt: str) -> dict[str, str] | None:
        return self.rows.get((sha, fmt))

    def record(self, sha: str, fmt: str, files: dict[str, str]) -> None:
        self.rows[(sha, fmt)] = dict(files)


def _home_artifact(artifact, home: Path) -> tuple[Path, str]:
    path, sha, _x, _ref = artifact
    dest = home / "models" / "v1" / "model.keras"
    dest.parent.mkdir(parents=True)
    shutil.copyfile(path, dest)
    return dest, sha


def _tree(root: Path) -> dict[str, tuple[int, bytes | str]]:
    """Every entry below ``root`` (links not followed): its inode and its bytes (a link: its target)."""
    out: dict[str, tuple[int, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            body = os.readlink(p) if p.is_symlink() else b"" if p.is_dir() else p.read_bytes()
            out[str(p.relative_to(root))] = (st.st_ino, body)
    return out


def _other_homes_cache(artifact, tmp_path: Path) -> tuple[Path, Path, str]:
    """Home B (``tmp_path/B``) with its conversion cached, and a file of its own in the cache folder:
    its ``compiled/``, the cache folder, the artifact's sha256."""
    path_b, sha = _home_artifact(artifact, tmp_path / "B")
    load_predictor(path_b, sha, image_size=SIZE, backend="openvino", ledger=_Ledger())
    compiled_b = path_b.parent / "compiled"
    [cache_b] = compiled_b.iterdir()
    (cache_b / "notes.txt").write_text("B's own file")
    return compiled_b, cache_b, sha


def test_a_compiled_folder_that_is_a_link_into_another_home_is_never_followed_or_deleted(artifact, tmp_path):
    """Home A's ``models/v1/compiled`` is a link to home B's, and A's database has no record of the
    conversion: A removes its link (never B's folder), converts into a real folder of its own, and B's
    files keep their bytes and inodes (an extra file of B's there too)."""
    _p, _s, x, ref = artifact
    compiled_b, cache_b, sha = _other_homes_cache(artifact, tmp_path)
    before = _tree(compiled_b)
    path_a, _ = _home_artifact(artifact, tmp_path / "A")
    compiled_a = path_a.parent / "compiled"
    compiled_a.symlink_to(compiled_b)
    pred = load_predictor(path_a, sha, image_size=SIZE, backend="openvino", ledger=_Ledger(), version="v1")
    assert pred.converted and np.abs(pred(x) - ref).max() <= 1e-5
    assert _tree(compiled_b) == before  # the same files, bytes and inodes; nothing added or removed
    assert not compiled_a.is_symlink() and compiled_a.is_dir()
    cache_a = compiled_a / cache_b.name
    assert not cache_a.is_symlink() and cache_a.is_dir()
    assert sorted(p.name for p in cache_a.iterdir()) == ["model.bin", "model.xml", "source.json"]


def test_a_cache_folder_replaced_by_a_link_is_removed_and_rebuilt(artifact, tmp_path):
    """The cache folder replaced by a link to a matching copy outside the home (its files match the
    database's checksums): the link is never read through; it is removed (its target untouched) and the
    conversion is redone into a real folder."""
    _p, _s, x, ref = artifact
    path, sha = _home_artifact(artifact, tmp_path / "A")
    ledger = _Ledger()
    load_predictor(path, sha, image_size=SIZE, backend="openvino", ledger=ledger)
    [cache] = (path.parent / "compiled").iterdir()
    outside = tmp_path / "outside" / cache.name
    shutil.copytree(cache, outside)
    (outside / "notes.txt").write_text("somebody's file")
    before = _tree(outside.parent)
    shutil.rmtree(cache)
    cache.symlink_to(outside)
    again = load_predictor(path, sha, image_size=SIZE, backend="openvino", ledger=ledger)
    assert again.converted and np.abs(again(x) - ref).max() <= 1e-5
    assert not cache.is_symlink() and cache.is_dir()
    assert [p.name for p in (path.parent / "compiled").iterdir()] == [cache.name]  # no leftovers
    assert _tree(outside.parent) == before


def test_a_version_folder_that_is_a_link_gets_no_cache_through_it(artifact, tmp_path, caplog):
    """``models/v1`` itself a link into another home (not this home's to change): the converted model is
    neither read nor cached through it; the model is converted into a temporary folder, with a warning
    naming the link, and the other home's files are left as they were."""
    _p, _s, x, ref = artifact
    path_b, sha = _home_artifact(artifact, tmp_path / "B")
    load_predictor(path_b, sha, image_size=SIZE, backend="openvino", ledger=_Ledger())
    before = _tree(path_b.parent)
    version_a = tmp_path / "A" / "models" / "v1"
    version_a.parent.mkdir(parents=True)
    version_a.symlink_to(path_b.parent)
    with caplog.at_level(logging.WARNING, logger="bcc_pipeline.compiled_cache"):
        pred = load_predictor(
            version_a / "model.keras", sha, image_size=SIZE, backend="openvino", ledger=_Ledger()
        )
    assert pred.converted and np.abs(pred(x) - ref).max() <= 1e-5
    assert _tree(path_b.parent) == before and version_a.is_symlink()
    assert any(str(version_a) in r.getMessage() and "link" in r.getMessage() for r in caplog.records)


def test_a_cache_published_meanwhile_is_kept(artifact, tmp_path):
    """Two shards converting the same new model at once: the second never replaces a good cache that the
    first may be reading."""
    from bcc_pipeline import compiled_cache

    path, sha = _copy(artifact, tmp_path)
    load_predictor(path, sha, image_size=SIZE, backend="openvino")
    [cache] = (path.parent / "compiled").iterdir()
    inode = cache.stat().st_ino
    names = ("model.xml", "model.bin")
    written: list[Path] = []
    got = compiled_cache.publish(
        cache, sha, names, lambda d: written.append(d) or [shutil.copyfile(cache / n, d / n) for n in names]
    )
    assert got == cache and cache.stat().st_ino == inode and written
    assert [p.name for p in (path.parent / "compiled").iterdir()] == [cache.name]


def test_a_conversion_is_written_into_a_temporary_the_sweep_recognises(tmp_path):
    """A conversion killed halfway leaves its temporary folder under compiled/: it carries the prefix that
    :func:`bcc_pipeline.leftovers.sweep_stale_temporaries` removes once it is stale."""
    from bcc_pipeline import compiled_cache, files

    folder = tmp_path / "models" / "v1" / "compiled" / "openvino-0123456789abcdef"
    seen: list[Path] = []

    def write(d: Path) -> None:
        seen.append(d)
        (d / "model.bin").write_bytes(b"converted")

    assert compiled_cache.publish(folder, "0123", ("model.bin",), write) == folder
    assert seen[0].parent == folder.parent and seen[0].name.startswith(files.TEMP_PREFIX)
    assert not seen[0].exists() and (folder / "model.bin").read_bytes() == b"converted"


def test_unwritable_cache_converts_in_memory(artifact, tmp_path):
    """A file at compiled/ that cannot be removed (immutable): the cache folder cannot be made there, so
    the model is converted in memory and the file is left as it is. (One that can be removed is removed
    and the cache rebuilt: test_a_cache_folder_replaced_by_a_file_or_link_is_rebuilt_and_leaves_nothing.)"""
    import subprocess

    path, sha = _copy(artifact, tmp_path)
    _p, _s, x, ref = artifact
    blocker = path.parent / "compiled"
    blocker.write_text("not a folder")
    if subprocess.run(["chattr", "+i", str(blocker)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a filesystem that keeps it)")
    try:
        pred = load_predictor(path, sha, image_size=SIZE, backend="openvino")
        assert pred.converted and np.abs(pred(x) - ref).max() <= 1e-5
        assert blocker.read_text() == "not a folder"
    finally:
        subprocess.run(["chattr", "-i", str(blocker)], check=True)


@pytest.mark.parametrize("backend", ["keras", "openvino"])
def test_tampered_artifact_is_refused(artifact, tmp_path, backend):
    path, sha = _copy(artifact, tmp_path)
    load_predictor(path, sha, image_size=SIZE, backend=backend)  # a cache now exists for openvino
    with open(path, "ab") as f:
        f.write(b"tampered")
    with pytest.raises(ArtifactError, match="changed or corrupted"):
        load_predictor(path, sha, image_size=SIZE, backend=backend)


@pytest.mark.parametrize("backend", ["keras", "openvino"])
def test_wrong_image_size_is_refused(artifact, tmp_path, backend):
    path, sha = _copy(artifact, tmp_path)
    with pytest.raises(ArtifactError, match="image_size 64"):
        load_predictor(path, sha, image_size=64, backend=backend, version="v1")


def test_unknown_backend_is_a_config_error(artifact, tmp_path):
    path, sha = _copy(artifact, tmp_path)
    with pytest.raises(ConfigError, match="unknown inference back-end 'tpu'"):
        load_predictor(path, sha, image_size=SIZE, backend="tpu")


def test_xla_pads_a_smaller_batch_and_returns_only_its_rows(artifact, tmp_path):
    path, sha = _copy(artifact, tmp_path)
    _p, _s, x, ref = artifact
    pred = load_predictor(path, sha, image_size=SIZE, backend="xla")
    assert np.abs(pred(x) - ref).max() <= 1e-5
    small = pred(x[:3])  # padded to the 16 already compiled for, cut back to 3
    assert small.shape == (3, 2) and np.abs(small - ref[:3]).max() <= 1e-5


@pytest.mark.parametrize("where", ["compiled", "cache folder"])
def test_a_compiled_folder_bind_mounted_from_another_home_is_never_changed(artifact, tmp_path, where):
    """Home B's ``compiled/`` (or its cache folder) bind-mounted at home A's, A's database without a record
    of the conversion: a mount point looks like a real folder to ``lstat``, and A deleted B's cache and
    put its own conversion there (or failed with EBUSY). Now a mount on the way gets no cache: A converts
    in a temporary folder and B's files keep their bytes and inodes."""
    from tests.support import bind_mounted

    _p, _s, x, ref = artifact
    compiled_b, cache_b, sha = _other_homes_cache(artifact, tmp_path)
    before = _tree(compiled_b)
    path_a, _ = _home_artifact(artifact, tmp_path / "A")
    source, view = (compiled_b, path_a.parent / "compiled")
    if where == "cache folder":
        source, view = cache_b, path_a.parent / "compiled" / cache_b.name
    with bind_mounted(source, view):
        pred = load_predictor(
            path_a, sha, image_size=SIZE, backend="openvino", ledger=_Ledger(), version="v1"
        )
        assert pred.converted and np.abs(pred(x) - ref).max() <= 1e-5
    assert _tree(compiled_b) == before


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_cache_file_that_is_a_fifo_or_a_device_is_converted_again(artifact, tmp_path, kind):
    """``model.bin`` replaced by a FIFO another process holds open (no data: the read gave None, a
    TypeError that was never taken for damage, on every load) or by a character device (``/dev/zero``:
    read until memory ran out). Now a cache file that is not a regular file is damaged: converted again."""
    _p, _s, x, ref = artifact
    path, sha = _home_artifact(artifact, tmp_path / "A")
    ledger = _Ledger()
    load_predictor(path, sha, image_size=SIZE, backend="openvino", ledger=ledger)
    [cache] = (path.parent / "compiled").iterdir()
    (cache / "model.bin").unlink()
    holder = None
    if kind == "fifo":
        os.mkfifo(cache / "model.bin")
        holder = os.open(cache / "model.bin", os.O_RDWR | os.O_NONBLOCK)  # a writer: no EOF
    else:
        try:
            os.mknod(cache / "model.bin", 0o600 | stat.S_IFCHR, os.makedev(1, 5))
        except PermissionError as exc:
            pytest.skip(f"cannot make a device node here: {exc}")
    try:
        again = load_predictor(path, sha, image_size=SIZE, backend="openvino", ledger=ledger)
    finally:
        if holder is not None:
            os.close(holder)
    assert again.converted and np.abs(again(x) - ref).max() <= 1e-5
    assert stat.S_ISREG(os.lstat(cache / "model.bin").st_mode)
