"""Tests of the SYNTHETIC demo tile generator (bcc_pipeline.demo_data)."""

from __future__ import annotations

import ast
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bcc_pipeline import demo_data
from bcc_pipeline.demo_data import LABELS, generate, render_tile


def _digests(files: list[str], root: Path) -> dict[str, str]:
    return {str(Path(f).relative_to(root)): hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}


def test_public_api() -> None:
    assert LABELS == ("benign", "malignant")
    assert set(demo_data.__all__) >= {"LABELS", "generate", "render_tile"}
    assert 3.0 <= demo_data.DEFAULT_SEPARATION <= 4.0
    assert 0.93 <= demo_data.bayes_accuracy() <= 0.97


def test_counts_layout_and_format(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = generate(out, benign=3, malignant=4, size=224, seed=1)
    assert res["out_dir"] == str(out)
    assert (res["benign"], res["malignant"], res["seed"]) == (3, 4, 1)
    assert len(res["files"]) == 7 == len(set(res["files"]))
    assert sorted(p.name for p in out.iterdir()) == ["benign", "malignant"]
    for label, n in (("benign", 3), ("malignant", 4)):
        names = sorted(p.name for p in (out / label).iterdir())
        assert len(names) == n
        for i, name in enumerate(names, start=1):
            prefix, idx, digest = Path(name).stem.split("_")
            assert (prefix, idx, Path(name).suffix) == (label, f"{i:04d}", ".png")
            assert len(digest) == 6 and int(digest, 16) >= 0
    for f in res["files"]:
        assert Path(f).is_file()
        with Image.open(f) as im:
            assert im.format == "PNG"
            assert im.mode == "RGB"
            assert im.size == (224, 224)
    # No temporary files left behind.
    assert not [p for p in out.rglob("*") if p.name.startswith(".")]


def test_deterministic_given_seed(tmp_path: Path) -> None:
    a = generate(tmp_path / "a", benign=2, malignant=2, size=64, seed=7)
    b = generate(tmp_path / "b", benign=2, malignant=2, size=64, seed=7)
    c = generate(tmp_path / "c", benign=2, malignant=2, size=64, seed=8)
    da, db, dc = (_digests(r["files"], tmp_path / k) for r, k in ((a, "a"), (b, "b"), (c, "c")))
    assert da == db
    assert set(da.values()).isdisjoint(dc.values())


def test_render_tile_deterministic_and_shape() -> None:
    x = render_tile(1.0, np.random.default_rng(3), size=48)
    y = render_tile(1.0, np.random.default_rng(3), size=48)
    assert x.shape == (48, 48, 3) and x.dtype == np.uint8
    assert np.array_equal(x, y)
    assert not np.array_equal(x, render_tile(1.0, np.random.default_rng(4), size=48))


def test_rerun_is_idempotent_and_never_overwrites(tmp_path: Path) -> None:
    first = generate(tmp_path, benign=2, malignant=1, size=48, seed=3)
    again = generate(tmp_path, benign=2, malignant=1, size=48, seed=3)
    assert again["files"] == first["files"]
    assert len(list(tmp_path.rglob("*.png"))) == 3
    # A different file already holding the name is kept; the new image goes elsewhere.
    victim = Path(first["files"][0])
    victim.write_bytes(b"not the generated image")
    third = generate(tmp_path, benign=2, malignant=1, size=48, seed=3)
    assert victim.read_bytes() == b"not the generated image"
    assert third["files"][0] != str(victim)
    assert Path(third["files"][0]).read_bytes() != victim.read_bytes()
    assert len(set(third["files"])) == 3


@pytest.mark.parametrize(
    ("benign", "malignant", "groups", "expected"), [(5, 7, 3, (3, 3)), (2, 6, 4, (2, 4))]
)
def test_groups_layout(tmp_path: Path, benign: int, malignant: int, groups: int, expected: tuple) -> None:
    res = generate(tmp_path, benign=benign, malignant=malignant, size=40, seed=2, groups=groups)
    assert len(res["files"]) == benign + malignant
    owner: dict[str, str] = {}
    counts = {label: 0 for label in LABELS}
    for f in res["files"]:
        rel = Path(f).relative_to(tmp_path)
        assert len(rel.parts) == 3
        label, patient, name = rel.parts
        assert label in LABELS and name.startswith(label + "_")
        assert patient.startswith("patient_")
        assert owner.setdefault(patient, label) == label  # one label per patient
        counts[label] += 1
    assert counts == {"benign": benign, "malignant": malignant}
    per_label = tuple(sum(1 for lab in owner.values() if lab == label) for label in LABELS)
    assert per_label == expected  # `groups` patients per label, fewer if a label has fewer images


def test_groups_with_an_empty_label(tmp_path: Path) -> None:
    res = generate(tmp_path, benign=0, malignant=3, size=40, groups=2)
    assert len(res["files"]) == 3
    assert sorted(p.name for p in (tmp_path / "malignant").iterdir()) == ["patient_01", "patient_02"]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"benign": -1},
        {"malignant": -5},
        {"size": 31},
        {"size": 0},
        {"groups": -1},
        {"groups": "2"},
        {"separation": -1.0},
        {"separation": float("nan")},
        {"fmt": "gif"},
        {"benign": 1.5},
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    args = {"benign": 2, "malignant": 2, "size": 32} | kwargs
    with pytest.raises(ValueError):
        generate(tmp_path, **args)
    assert not any(tmp_path.iterdir())


def test_render_tile_rejects_small_size() -> None:
    with pytest.raises(ValueError):
        render_tile(0.0, np.random.default_rng(0), size=16)


def test_zero_images(tmp_path: Path) -> None:
    res = generate(tmp_path, benign=0, malignant=0)
    assert res["files"] == [] and res["benign"] == res["malignant"] == 0


def test_jpeg_format(tmp_path: Path) -> None:
    res = generate(tmp_path, benign=1, malignant=1, size=40, fmt="jpg")
    for f in res["files"]:
        assert f.endswith(".jpg")
        with Image.open(f) as im:
            assert im.format == "JPEG" and im.size == (40, 40)


def _purple_fraction_and_darkness(img: np.ndarray) -> tuple[float, float]:
    f = img.astype(np.float32)
    purple = ((f[..., 2] - f[..., 0]) > 5) & (f.mean(-1) < 170)
    return float(purple.mean()), float(255.0 - f.mean())


def test_malignant_tiles_have_more_and_darker_nuclei() -> None:
    stats: dict[int, list[tuple[float, float]]] = {0: [], 1: []}
    for label in (0, 1):
        for i in range(20):
            rng = np.random.default_rng([123, label, i])
            z = demo_data.DEFAULT_SEPARATION * label + rng.standard_normal()
            stats[label].append(_purple_fraction_and_darkness(render_tile(z, rng, size=64)))
    benign, malignant = np.array(stats[0]), np.array(stats[1])
    assert malignant[:, 0].mean() > 1.5 * benign[:, 0].mean()  # more nuclear (purple) area
    assert malignant[:, 1].mean() > benign[:, 1].mean() + 5  # darker overall


def test_classes_overlap() -> None:
    """The label reaches the pixels only through z: equal z gives equal pixels, whatever the label."""
    img = render_tile(1.7, np.random.default_rng(5), size=48)
    assert np.array_equal(img, render_tile(1.7, np.random.default_rng(5), size=48))
    assert 0.93 < demo_data.bayes_accuracy(3.4) < 0.96
    assert demo_data.bayes_accuracy(0.0) == pytest.approx(0.5)


def test_no_heavy_imports() -> None:
    tree = ast.parse(Path(demo_data.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not imported & {"tensorflow", "keras", "airflow", "torch"}
