import json
import os
import shutil

import numpy as np
import pytest
from sqlalchemy import select

from bcc_pipeline import dataset
from bcc_pipeline.errors import DatasetError
from bcc_pipeline.store import ImageRecord, Rejection, session_scope, upgrade


@pytest.fixture
def home(make_settings, migrated_url):
    s = make_settings(migrated_url, settle_seconds=0)
    return s


def test_intake_stores_once_reports_and_never_loses_files(home, png_writer, tmp_path):
    land = home.landing_dir
    png_writer(land / "benign" / "a.png", seed=1)
    png_writer(land / "benign" / "patient_7" / "b.png", seed=2)
    png_writer(land / "malignant" / "c.png", seed=3)
    shutil.copy(land / "benign" / "a.png", land / "benign" / "a_copy.png")  # same content, same label
    shutil.copy(
        land / "benign" / "patient_7" / "b.png", land / "malignant" / "b_as_malignant.png"
    )  # conflict
    (land / "malignant" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    (land / "malignant" / "notes.txt").write_text("not an image")
    (land / "malignant" / ".DS_Store").write_bytes(b"\0")
    outside = png_writer(tmp_path / "outside" / "secret.png", seed=9)
    os.symlink(outside, land / "malignant" / "link.png")
    (land / "unknown_label").mkdir()

    r = dataset.intake(home, run_id="intake-test")
    assert (r.accepted, r.duplicates, r.conflicts, r.rejected) == (3, 1, 1, 3)
    assert r.ignored == 3  # notes.txt, .DS_Store, unknown_label/
    reasons = {x["path"]: x["reason"] for x in r.rejections}
    assert "symbolic link" in reasons["malignant/link.png"]
    assert "already taken in as benign" in reasons["malignant/b_as_malignant.png"]
    assert "malignant/broken.png" in reasons
    # the link's target is untouched; the link itself went to quarantine
    assert outside.read_bytes() and outside.exists()
    q = home.quarantine_dir / "intake-test" / "landing" / "malignant"
    assert (q / "link.png").is_symlink() and (q / "broken.png.reason.txt").read_text().strip()
    # stored files are gone from landing; ignored ones stay
    left = sorted(str(p.relative_to(land)) for p in land.rglob("*") if p.is_file())
    assert left == ["malignant/.DS_Store", "malignant/notes.txt"]
    with session_scope(home.database_url) as s:
        rows = {r.source_path: r for r in s.scalars(select(ImageRecord))}
        assert set(rows) == {"benign/a.png", "benign/patient_7/b.png", "malignant/c.png"}
        assert rows["benign/patient_7/b.png"].group_id == "patient_7"
        assert rows["benign/a.png"].group_id is None
        assert "both benign and malignant" in rows["benign/patient_7/b.png"].excluded_reason
        for row in rows.values():
            assert os.path.isfile(row.stored_path) and row.sha256 in row.stored_path
        assert len(s.scalars(select(Rejection)).all()) == 3

    again = dataset.intake(home, run_id="intake-test-2")
    assert (again.accepted, again.rejected, again.duplicates) == (0, 0, 0)


def test_intake_skips_files_still_being_written(make_settings, migrated_url, png_writer):
    s = make_settings(migrated_url, settle_seconds=3600)
    png_writer(s.landing_dir / "benign" / "fresh.png")
    r = dataset.intake(s)
    assert (r.skipped, r.accepted) == (1, 0)
    assert (s.landing_dir / "benign" / "fresh.png").exists()


def test_intake_without_landing_is_a_no_op(home):
    assert dataset.intake(home).accepted == 0


def test_intake_needs_a_migrated_database(make_settings, sqlite_url, png_writer):
    from bcc_pipeline.errors import StoreError
    from bcc_pipeline.pipelines import intake_step

    s = make_settings(sqlite_url, settle_seconds=0)
    png_writer(s.landing_dir / "benign" / "x.png")
    with pytest.raises(StoreError, match="bcc db upgrade"):
        intake_step(s)
    assert (s.landing_dir / "benign" / "x.png").exists()
    upgrade(sqlite_url)
    assert intake_step(s)["accepted"] == 1


def _records(n_benign, n_malignant, groups=None):
    out = []
    for i in range(n_benign + n_malignant):
        label = "benign" if i < n_benign else "malignant"
        g = None if groups is None else f"{label}-p{i % groups}"
        out.append({"sha256": f"{i:064x}", "label": label, "group_id": g, "path": f"/d/{i}.png"})
    return out


def test_split_is_stratified_80_20_and_seeded():
    entries = dataset.make_split(_records(112, 127), seed=42)
    val = [e for e in entries if e["split"] == "validation"]
    assert sum(e["label"] == "benign" for e in val) == round(0.2 * 112)
    assert sum(e["label"] == "malignant" for e in val) == round(0.2 * 127)
    assert entries == dataset.make_split(_records(112, 127), seed=42)
    assert entries != dataset.make_split(_records(112, 127), seed=7)


def test_split_never_puts_a_group_on_both_sides():
    entries = dataset.make_split(_records(60, 60, groups=9), seed=1)
    sides: dict[str, set] = {}
    for e in entries:
        sides.setdefault(e["group_id"], set()).add(e["split"])
    assert all(len(v) == 1 for v in sides.values())
    val = sum(e["split"] == "validation" for e in entries)
    assert 0.1 <= val / len(entries) <= 0.3


def test_a_patient_spelled_two_ways_never_straddles_train_validation_or_calibration():
    """Round 24 residual: the holdout compared patients however their folder was spelled, but the split
    inside development used the exact group id, so `Patient_3/` and `patient_3 /` (one patient) could sit
    in train and in validation or calibration. Every split keeps one patient together
    (`manifests.group_key`); each entry keeps its own folder's spelling."""
    from types import SimpleNamespace

    from bcc_pipeline.holdout.records import patient_key
    from bcc_pipeline.holdout.roles import _development_entries
    from bcc_pipeline.manifests import assign, select_groups

    spellings = ["p3", "P3", "p3 ", "p\uff13", "p3\u200b"]
    records = []
    for label in ("benign", "malignant"):
        for g in range(8):
            for i in range(5):
                name = spellings[i] if g == 3 else f"p{g}"
                sha = f"{label}{g}{i}".encode().hex().ljust(64, "0")
                records.append({"sha256": sha, "label": label, "group_id": name, "path": f"/d/{sha}.png"})
    straddled = []
    for seed in range(40):
        cfg = SimpleNamespace(seed=seed, calibration_fraction=0.2, val_fraction=0.25)
        dev = _development_entries(records, cfg)
        chosen = select_groups(records, 0.25, seed=seed, salt="holdout:")  # the holdout's freeze
        for entries in (dev, assign(records, chosen, "holdout", "development")):
            sides: dict[str, set] = {}
            for e in entries:
                sides.setdefault(patient_key(e["group_id"]), set()).add(e["split"])
            straddled += [(seed, k, v) for k, v in sides.items() if len(v) > 1]
        assert {e["group_id"] for e in dev} == {r["group_id"] for r in records}  # own spellings kept
    assert not straddled


def test_a_long_patient_folder_name_is_one_patient_however_it_is_spelled():
    """Round 25: a folder name displayed longer than the column (255 characters: escapes make it up to four
    times its bytes) was cut with a hash of its case-sensitive text, so two spellings of one long name were
    two patients. Such a name's id is now the patient's normalized name (`manifests.patient_name`)."""
    from bcc_pipeline.holdout.records import patient_key
    from bcc_pipeline.intake import patient_group

    pairs = [
        ("PATIENT_" + "A" * 200 + "\\" * 30, "patient_" + "a" * 200 + "\\" * 30),  # cut with a hash
        ("Patient_" + "A" * 238 + "\u200b", "patient_" + "a" * 238),  # only one of them too long
        ("P" + "\uff10" * 84, "p" + "0" * 84),  # full-width digits: 3 bytes each
        # round 26: short as shown, longer than the column once decomposed (each ½ is 1⁄2), against a
        # spelling too long to show
        ("patient_07_" + "x" * 89 + "\u00bd" * 60, "patient_07_" + "x" * 89 + "\u00bd" * 60 + "\u00a0" * 60),
    ]
    for one, other in pairs:
        assert len(patient_group(one)) <= 255 and len(patient_group(other)) <= 255
        assert patient_key(patient_group(one)) == patient_key(patient_group(other)), (one, other)
    assert patient_group("Patient_07") == "Patient_07"  # a name that fits keeps its spelling
    assert patient_key(patient_group("x" * 300 + "1")) != patient_key(patient_group("x" * 300 + "2"))


def test_a_new_spelling_of_a_patient_moves_no_other_image():
    """Round 26: groups were ranked by their first spelling, so `B_PATIENT_05` landing beside
    `b_patient_05` could move other patients' images between train and validation. They are ranked by
    the patient now."""
    records = _records(60, 60, groups=12)
    before = {e["sha256"]: e["split"] for e in dataset.make_split(records, seed=5)}
    moved = 0
    for g in range(12):
        label = "benign" if g % 2 == 0 else "malignant"
        name = f"{label}-p{g}"
        extra = {
            "sha256": f"{g:02d}".ljust(64, "f"),
            "label": label,
            "group_id": name.upper(),
            "path": "/d/x.png",
        }
        after = {e["sha256"]: e["split"] for e in dataset.make_split(records + [extra], seed=5)}
        moved += sum(after[sha] != split for sha, split in before.items())
    assert moved == 0


def test_split_is_stable_when_new_data_arrives():
    old = {e["sha256"]: e["split"] for e in dataset.make_split(_records(100, 100), seed=3)}
    new = {e["sha256"]: e["split"] for e in dataset.make_split(_records(110, 110), seed=3)}
    moved = sum(old[k] != new[k] for k in old if k in new)
    assert moved <= 0.1 * len(old)


@pytest.mark.parametrize(
    "records,match",
    [
        ([], "no labelled images"),
        (_records(1, 10), "at least 2 benign"),
        (_records(5, 5, groups=1), "one side"),
    ],
)
def test_split_errors(records, match):
    with pytest.raises(DatasetError, match=match):
        dataset.make_split(records)


def test_manifest_hash_detects_edits(tmp_path):
    entries = dataset.make_split(_records(10, 10))
    m = dataset.write_manifest(entries, tmp_path, seed=42, val_fraction=0.2)
    assert m.path.name == f"{m.hash}.json" and m.n_train + m.n_val == 20
    assert dataset.write_manifest(entries, tmp_path, seed=42, val_fraction=0.2).hash == m.hash
    doc = json.loads(m.path.read_text())
    doc["entries"][0]["label"] = "malignant" if doc["entries"][0]["label"] == "benign" else "benign"
    m.path.write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match="does not match its own hash"):
        dataset.load_manifest(m.path)
    with pytest.raises(DatasetError, match="cannot read manifest"):
        dataset.load_manifest(tmp_path / "missing.json")


def test_prepare_split_uses_only_usable_images(make_settings, migrated_url, png_writer):
    # train/validation only: no holdout and no calibration role (tests/unit/test_holdout.py has those)
    home = make_settings(migrated_url, settle_seconds=0, holdout_fraction=0, calibration_fraction=0)
    for i in range(6):
        png_writer(home.landing_dir / "benign" / f"b{i}.png", seed=i)
        png_writer(home.landing_dir / "malignant" / f"m{i}.png", seed=100 + i)
    dataset.intake(home)
    m = dataset.prepare_split(home)
    assert m.n_train + m.n_val == 12 and m.data_cutoff
    paths, labels = dataset.manifest_arrays(m, "train")
    assert len(paths) == m.n_train and set(labels) == {0, 1}


def test_tf_dataset_shapes_labels_and_augmentation(tmp_path, png_writer):
    paths = [str(png_writer(tmp_path / f"{i}.png", size=40, seed=i)) for i in range(5)]
    ds = dataset.make_dataset(paths, [0, 1, 0, 1, 1], image_size=32, batch_size=2)
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [2, 2, 1]
    assert batches[0][0].shape[1:] == (32, 32, 3)
    np.testing.assert_array_equal(batches[0][1].numpy(), [[1, 0], [0, 1]])
    from bcc_pipeline.images import load_for_model

    np.testing.assert_allclose(batches[0][0][0].numpy(), load_for_model(paths[0], 32)[0], atol=1e-6)
    only_x = next(iter(dataset.make_dataset(paths, None, image_size=32, batch_size=5)))
    assert only_x.shape == (5, 32, 32, 3)
    aug = dataset.make_dataset(paths, [0] * 5, image_size=32, batch_size=5, training=True, seed=1)
    x1 = next(iter(aug))[0].numpy()
    assert x1.shape == (5, 32, 32, 3)
    plain = np.stack([load_for_model(p, 32)[0] for p in paths])
    assert not np.allclose(np.sort(x1.ravel()), np.sort(plain.ravel())) or not np.allclose(x1, plain)


def test_tf_dataset_errors(tmp_path):
    with pytest.raises(DatasetError):
        dataset.make_dataset([], None, image_size=32, batch_size=2)
    with pytest.raises(ValueError, match="labels"):
        dataset.make_dataset(["a.png"], [0, 1], image_size=32, batch_size=2)


def test_intake_never_opens_special_files(home, png_writer):
    png_writer(home.landing_dir / "benign" / "ok.png")
    os.mkfifo(home.landing_dir / "benign" / "pipe.png")  # reading it would block forever
    r = dataset.intake(home)
    assert (r.accepted, r.ignored) == (1, 1) and "benign/pipe.png" in r.ignored_paths
    assert (home.landing_dir / "benign" / "pipe.png").exists()


def test_intake_reports_a_file_it_cannot_move_and_goes_on(home, png_writer):
    png_writer(home.landing_dir / "benign" / "a.png", seed=1)
    (home.landing_dir / "benign" / "bad.png").write_bytes(b"not an image at all")
    png_writer(home.landing_dir / "benign" / "c.png", seed=2)
    home.quarantine_dir.parent.mkdir(parents=True, exist_ok=True)
    home.quarantine_dir.write_text("a file where the quarantine folder should be")  # the move must fail
    r = dataset.intake(home)
    assert r.accepted == 2 and [f["path"] for f in r.failed] == ["benign/bad.png"]
    assert (home.landing_dir / "benign" / "bad.png").exists()


def test_intake_progress_line_appears_once_per_step(home, png_writer):
    """Files that are not stored (rejected, ignored) leave the count where it is; the line for that count
    is not repeated for each of them."""
    land = home.landing_dir
    for i in range(dataset.PROGRESS_EVERY):
        png_writer(land / "benign" / f"a_{i:03d}.png", seed=100 + i)
    for i in range(4):  # sorted after the good ones: processed while the count stands on a multiple
        (land / "benign" / f"z_{i}.png").write_bytes(b"not an image at all")
        (land / "benign" / f"z_{i}.txt").write_text("notes")
    lines: list[str] = []
    r = dataset.intake(home, run_id="intake-progress", progress=lines.append)
    assert (r.accepted, r.rejected, r.ignored) == (dataset.PROGRESS_EVERY, 4, 4)
    assert lines == [f"intake: {dataset.PROGRESS_EVERY} accepted, 0 duplicates so far"]
