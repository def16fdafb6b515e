"""The data roles: the frozen holdout (freeze, extend, log), near-duplicates, calibration beside the
seed's train/validation split, the ungrouped warning, migration 0004 on a database that holds data,
and `bcc demo-data` with patient folders and a separate holdout."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import inspect, select, text

from bcc_pipeline import cli, dataset, images, store
from bcc_pipeline.demo_data import generate
from bcc_pipeline.display import display_path
from bcc_pipeline.errors import DatasetError
from bcc_pipeline.holdout import AUTO_FREEZE_REASON, describe_holdout
from bcc_pipeline.neardup import NEAR_DUPLICATE_BITS, hamming, perceptual_hash, turned_hashes
from bcc_pipeline.pipelines import split_step
from bcc_pipeline.store import HoldoutEvent, ImageRecord, session_scope


@pytest.fixture
def home(make_settings, migrated_url):
    return make_settings(migrated_url, settle_seconds=0)


def _land(s, *, benign=20, malignant=20, groups=5, seed=1, first_patient=1, out=None) -> dict:
    return generate(
        out or s.landing_dir,
        benign=benign,
        malignant=malignant,
        size=64,
        seed=seed,
        groups=groups,
        first_patient=first_patient,
    )


def _events(s) -> list[HoldoutEvent]:
    with session_scope(s.database_url) as sess:
        return list(sess.scalars(select(HoldoutEvent).order_by(HoldoutEvent.seq)))


def _roles_by_group(*manifests) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in manifests:
        for e in m.entries:
            out.setdefault(e["group_id"], set()).add(e["split"])
    return out


def test_freeze_is_group_aware_stratified_and_logged(home):
    _land(home, benign=40, malignant=40, groups=8)
    dataset.intake(home)
    h = dataset.freeze_holdout(home, fraction=0.25, actor="dr. who", reason="validation study 1")
    assert {e["split"] for e in h.entries} == {"holdout"} and h.n("holdout") == len(h.entries)
    counts = {lab: sum(e["label"] == lab for e in h.entries) for lab in ("benign", "malignant")}
    assert counts == {"benign": 10, "malignant": 10}  # 25 % of each label, in whole patients of 5 tiles
    split = split_step(home)
    dev = dataset.load_manifest(split["manifest_path"])
    assert split["holdout_hash"] == h.hash and split["n_holdout"] == 20 and split["grouped"] is True
    assert split["n_train"] + split["n_val"] + split["n_calibration"] == 60
    assert all(len(roles) == 1 for roles in _roles_by_group(dev, h).values())  # no patient in two roles
    assert set(split["role_hashes"]) == {"train", "validation", "calibration", "holdout"}
    assert split["role_hashes"]["holdout"] == h.role_hash("holdout")
    paths, labels = dataset.manifest_arrays(h, "holdout")
    assert len(paths) == 20 and sorted(labels) == [0] * 10 + [1] * 10
    [ev] = _events(home)
    assert (ev.seq, ev.action, ev.actor, ev.reason, ev.old_hash, ev.new_hash) == (
        1,
        "freeze",
        "dr. who",
        "validation study 1",
        None,
        h.hash,
    )
    assert (ev.n_before, ev.n_after, ev.counts) == (0, 20, {"benign": 10, "malignant": 10})
    with pytest.raises(DatasetError, match="already frozen"):
        dataset.freeze_holdout(home, fraction=0.2, actor="x", reason="again")
    with pytest.raises(DatasetError, match="reason"):
        dataset.extend_holdout(home, home.landing_dir, actor="x", reason=" ")


def test_holdout_stays_frozen_and_new_data_goes_to_development(home):
    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    first = split_step(home)
    assert first["holdout_frozen_now"] and first["n_holdout"] > 0
    [ev] = _events(home)
    assert ev.action == "freeze" and ev.reason == AUTO_FREEZE_REASON
    _land(home, benign=10, malignant=10, groups=2, seed=2, first_patient=50)  # new patients arrive
    new = {r.sha256 for r in _new_rows(home)}
    second = split_step(home)
    assert second["holdout_hash"] == first["holdout_hash"] and not second["holdout_frozen_now"]
    assert second["role_hashes"]["holdout"] == first["role_hashes"]["holdout"]
    dev = dataset.load_manifest(second["manifest_path"])
    assert new <= {e["sha256"] for e in dev.entries}  # every new image went to development
    assert second["n_train"] + second["n_val"] + second["n_calibration"] == 60 + 20 - second["n_holdout"]
    assert len(_events(home)) == 1  # nothing changed the holdout


def _new_rows(s) -> list[ImageRecord]:
    before = set()
    with session_scope(s.database_url) as sess:
        before = {r.sha256 for r in sess.scalars(select(ImageRecord))}
    dataset.intake(s)
    with session_scope(s.database_url) as sess:
        return [r for r in sess.scalars(select(ImageRecord)) if r.sha256 not in before]


def test_a_holdout_change_killed_mid_write_leaves_nothing_after_the_next_change(home, tmp_path):
    """Round 25: `bcc holdout extend` SIGKILLed while writing a stored copy left its `.bcc-tmp-*` file in
    `dataset/`, and its own reruns never removed it (only intake and scoring swept). Every holdout change
    and the split now sweep what a killed earlier one left."""
    import subprocess
    import sys

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    extra = tmp_path / "more-holdout"
    _land(home, benign=4, malignant=4, groups=2, seed=9, first_patient=40, out=extra)
    code = (
        "import os, signal\nos.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "from bcc_pipeline import dataset\nfrom bcc_pipeline.config import load_settings\n"
        f"s = load_settings(env={{'BCC_HOME': {str(home.home)!r}, 'BCC_DATABASE_URL': {home.database_url!r}}})\n"
        f"dataset.extend_holdout(s, {str(extra)!r}, actor='a', reason='killed')\n"
    )
    killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]

    def left():
        return [p for p in home.dataset_dir.rglob(".bcc-tmp-*")]

    assert left()  # the killed write's temporary
    grown = dataset.extend_holdout(home, extra, actor="a", reason="again")
    assert not left() and grown.n("holdout") > 0


def test_extend_is_logged_keeps_the_folder_and_never_enters_development(home, tmp_path):
    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    extra = tmp_path / "more-holdout"
    _land(home, benign=6, malignant=6, groups=2, seed=9, first_patient=40, out=extra)
    before = sorted(p.relative_to(extra) for p in extra.rglob("*") if p.is_file())
    grown = dataset.extend_holdout(home, extra, actor="dr. b", reason="new cohort")
    assert sorted(p.relative_to(extra) for p in extra.rglob("*") if p.is_file()) == before  # read, not moved
    assert grown.n("holdout") == frozen.n("holdout") + 12
    added = {e["sha256"] for e in grown.entries} - {e["sha256"] for e in frozen.entries}
    ev = _events(home)[-1]
    assert (ev.seq, ev.action, ev.actor, ev.reason, ev.old_hash, ev.new_hash, ev.n_before, ev.n_after) == (
        2,
        "extend",
        "dr. b",
        "new cohort",
        frozen.hash,
        grown.hash,
        frozen.n("holdout"),
        grown.n("holdout"),
    )
    assert dataset.current_holdout(home).hash == grown.hash
    split = split_step(home)
    dev = dataset.load_manifest(split["manifest_path"])
    assert not added & {e["sha256"] for e in dev.entries}
    assert split["holdout_hash"] == grown.hash
    with pytest.raises(DatasetError, match="no image .* was added.*12 already in it"):
        dataset.extend_holdout(home, extra, actor="dr. b", reason="again")
    info = describe_holdout(home)
    assert [e["action"] for e in info["history"]] == ["freeze", "extend"] and info["n"] == grown.n("holdout")


def _copies(src: Path, folder: Path) -> tuple[Path, Path]:
    """A re-encoded JPEG copy and a resized (150 %, PNG) copy of ``src`` in ``folder``."""
    bgr = cv2.imread(str(src))
    folder.mkdir(parents=True, exist_ok=True)
    jpeg, resized = folder / "reencoded.jpg", folder / "resized.png"
    cv2.imwrite(str(jpeg), bgr, [cv2.IMWRITE_JPEG_QUALITY, 70])
    cv2.imwrite(str(resized), cv2.resize(bgr, None, fx=1.5, fy=1.5, interpolation=cv2.INTER_LINEAR))
    return jpeg, resized


def test_near_duplicates_of_development_images_are_kept_out_of_the_holdout(home, tmp_path):
    dev = _land(home, benign=20, malignant=20, groups=4)
    folder = tmp_path / "holdout-in"
    _land(home, benign=10, malignant=10, groups=2, seed=5, first_patient=30, out=folder)
    src = sorted(f for f in dev["files"] if "/malignant/" in f)[0]
    jpeg, resized = _copies(Path(src), folder / "malignant" / "patient_99")
    dataset.intake(home)
    h = dataset.extend_holdout(home, folder, actor="t", reason="planted copies")
    assert h.n("holdout") == 20
    kept_out = {x["source"]: x for x in h.excluded}
    assert set(kept_out) == {str(jpeg), str(resized)}
    for x in kept_out.values():
        assert x["kind"] == "near_duplicate" and x["distance"] <= NEAR_DUPLICATE_BITS
        assert "near-duplicate of development image" in x["reason"]
    split = split_step(home)
    flagged = {x["source"]: x for x in split["near_duplicates"]}
    assert set(flagged) == {str(jpeg), str(resized)} and {x["kept_out_of"] for x in flagged.values()} == {
        "holdout"
    }
    assert any("near-duplicate" in w for w in split["warnings"])
    dev_m = dataset.load_manifest(split["manifest_path"])
    assert not {x["sha256"] for x in h.excluded} & {e["sha256"] for e in dev_m.entries}

    # the other way round: a copy of a holdout image arriving in landing is kept out of development
    hsrc = h.entries[0]["path"]
    label = h.entries[0]["label"]
    _copies(Path(hsrc), home.landing_dir / label / "patient_77")
    dataset.intake(home)
    again = split_step(home)
    assert again["holdout_hash"] == h.hash
    into_dev = [x for x in again["near_duplicates"] if x["kept_out_of"] == "development"]
    assert len(into_dev) == 2 and all(x["near_sha256"] == h.entries[0]["sha256"] for x in into_dev)


def test_perceptual_hash_rule_separates_copies_from_other_tiles(tmp_path):
    files = generate(tmp_path, benign=4, malignant=4, size=96, seed=3)["files"]
    hashes = [perceptual_hash(cv2.imread(f)[..., ::-1]) for f in files]
    assert all(len(h) == 16 for h in hashes)
    assert min(hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :]) > NEAR_DUPLICATE_BITS
    jpeg, resized = _copies(Path(files[0]), tmp_path / "copies")
    for copy in (jpeg, resized):
        assert hamming(hashes[0], perceptual_hash(cv2.imread(str(copy))[..., ::-1])) <= NEAR_DUPLICATE_BITS


def test_ungrouped_data_is_said_to_leak(home):
    _land(home, benign=15, malignant=15, groups=0)
    dataset.intake(home)
    split = split_step(home)
    assert split["grouped"] is False
    assert any("without patient groups, a split by image can leak" in w for w in split["warnings"])


def test_patient_of_the_holdout_arriving_later_is_kept_out_of_development(home, tmp_path):
    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    h = dataset.freeze_holdout(home, fraction=0.25, actor="t", reason="r")
    patient = next(e["group_id"] for e in h.entries if e["label"] == "malignant")
    for f in generate(tmp_path / "later", benign=0, malignant=2, size=64, seed=11)["files"]:
        (home.landing_dir / "malignant" / patient).mkdir(parents=True, exist_ok=True)
        shutil.move(f, home.landing_dir / "malignant" / patient / Path(f).name)
    dataset.intake(home)
    split = split_step(home)
    dev = dataset.load_manifest(split["manifest_path"])
    assert patient not in {e["group_id"] for e in dev.entries}
    assert {x["kind"] for x in dev.excluded} == {"group_in_holdout"} and len(dev.excluded) == 2
    assert split["holdout_hash"] == h.hash


def test_calibration_is_carved_by_group_and_fraction_zero_keeps_the_seed_split(make_settings, migrated_url):
    s = make_settings(migrated_url, settle_seconds=0, holdout_fraction=0)
    _land(s, benign=40, malignant=40, groups=10)
    dataset.intake(s)
    split = split_step(s)
    dev = dataset.load_manifest(split["manifest_path"])
    assert split["holdout_hash"] is None and any("no holdout" in w for w in split["warnings"])
    assert split["counts"]["calibration"] == {"benign": 8, "malignant": 8}  # 20 % of each label
    assert all(len(roles) == 1 for roles in _roles_by_group(dev).values())
    none = make_settings(migrated_url, settle_seconds=0, holdout_fraction=0, calibration_fraction=0)
    plain = split_step(none)
    assert plain["n_calibration"] == 0 and plain["n_train"] + plain["n_val"] == 80


def test_migration_upgrades_a_database_that_holds_data(db_url, tmp_path):
    store.upgrade(db_url, "0002")
    png = generate(tmp_path / "old", benign=1, malignant=0, size=64, seed=1)["files"][0]
    with store.get_engine(db_url).begin() as conn:
        conn.execute(
            text(
                "INSERT INTO images (sha256, label, group_id, width, height, format, source_path, stored_path, "
                "first_seen_at) VALUES (:sha, 'benign', 'p1', 64, 64, 'PNG', 'benign/p1/a.png', :path, :at)"
            ),
            {"sha": "a" * 64, "path": png, "at": store.utcnow()},
        )
    store.upgrade(db_url)
    cols = {c["name"] for c in inspect(store.get_engine(db_url)).get_columns("images")}
    assert "phash" in cols and "holdout_events" in inspect(store.get_engine(db_url)).get_table_names()
    from bcc_pipeline.neardup import ensure_phashes

    with session_scope(db_url) as s:
        row = s.get(ImageRecord, "a" * 64)
        assert (row.label, row.group_id, row.phash) == ("benign", "p1", None)  # kept, hash not yet computed
        rgb = cv2.imread(png)[..., ::-1]
        assert ensure_phashes(s, ["a" * 64]) == {"a" * 64: (perceptual_hash(rgb), turned_hashes(rgb))}
    with session_scope(db_url) as s:
        assert s.get(ImageRecord, "a" * 64).phash is not None  # computed once, stored


def test_demo_data_writes_patient_folders_and_a_separate_holdout(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BCC_HOME", str(tmp_path / "home"))
    dev, hold = tmp_path / "dev", tmp_path / "hold"
    assert (
        cli.main(
            [
                "demo-data",
                "--out",
                str(dev),
                "--benign",
                "60",
                "--malignant",
                "61",
                "--size",
                "40",
                "--holdout-out",
                str(hold),
                "--holdout",
                "20",
                "--json",
            ]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["n_files"] == 121 and out["holdout"]["n_files"] == 20
    dev_patients = {p.parent.name for p in dev.rglob("*.png")}
    hold_patients = {p.parent.name for p in hold.rglob("*.png")}
    assert all(p.startswith("patient_") for p in dev_patients | hold_patients)
    assert len(dev_patients) == out["patients"] == 2 * 13  # about 5 tiles per patient, 13 per label
    assert not dev_patients & hold_patients  # other patients
    per = [len(list(d.glob("*.png"))) for d in dev.glob("*/patient_*")]
    assert min(per) >= 4 and sum(per) == 121
    digests = lambda root: {p.read_bytes() for p in root.rglob("*.png")}  # noqa: E731
    assert not digests(dev) & digests(hold)
    assert sorted(len(list((hold / lab).rglob("*.png"))) for lab in ("benign", "malignant")) == [10, 10]
    assert len(hold_patients) == 20  # a small set is still spread over 10 patients per label


def test_small_demo_data_splits_into_all_four_roles(home, monkeypatch, capsys):
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    assert cli.main(["demo-data", "--benign", "12", "--malignant", "12", "--size", "40"]) == 0
    dataset.intake(home)
    split = split_step(home)
    assert (
        split["grouped"]
        and min(split["n_train"], split["n_val"], split["n_calibration"], split["n_holdout"]) >= 2
    )


def test_bcc_holdout_commands(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    assert cli.main(["holdout", "show"]) == 0
    assert "no holdout yet" in capsys.readouterr().out
    folder = tmp_path / "in"
    _land(home, benign=6, malignant=6, groups=2, out=folder)
    assert (
        cli.main(["holdout", "extend", "--from", str(folder), "--reason", "cohort B", "--actor", "dr. c"])
        == 0
    )
    assert "holdout extend" in capsys.readouterr().out
    assert cli.main(["holdout", "show", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 12 and info["counts"] == {"benign": 6, "malignant": 6} and len(info["groups"]) == 4
    assert [(e["action"], e["actor"], e["reason"]) for e in info["history"]] == [
        ("extend", "dr. c", "cohort B")
    ]
    assert cli.main(["holdout", "freeze", "--reason", "again"]) == 1
    assert "already frozen" in capsys.readouterr().err


def test_a_champion_developed_on_holdout_images_is_named(home):
    """After an upgrade the holdout is chosen from images an older champion was trained on: said so."""
    from tests.support import model_version_row

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    with session_scope(home.database_url) as s:
        records = [
            {"sha256": r.sha256, "label": r.label, "group_id": r.group_id, "path": r.stored_path}
            for r in s.scalars(select(ImageRecord))
        ]
    old = dataset.write_manifest(
        dataset.make_split(records), home.dataset_dir / "manifests", seed=1, val_fraction=0.2
    )
    with session_scope(home.database_url) as s:
        s.add(model_version_row("v-old", "champion", manifest_hash=old.hash))
    split = split_step(home)
    assert any(
        f"the champion v-old was developed on {split['n_holdout']} of the {split['n_holdout']} holdout" in w
        for w in split["warnings"]
    )


def test_extending_the_holdout_is_not_new_training_data(home, tmp_path):
    """The retrain-or-skip rule counts development images only: a bigger holdout triggers no retrain."""
    from bcc_pipeline.pipelines import count_new_images

    _land(home, benign=20, malignant=20, groups=5)
    dataset.intake(home)
    dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    before = count_new_images(home)
    assert before["total_images"] < 40  # the frozen holdout is not development data
    extra = tmp_path / "more-holdout"
    _land(home, benign=6, malignant=6, groups=2, seed=9, first_patient=40, out=extra)
    dataset.extend_holdout(home, extra, actor="dr. b", reason="new cohort")
    assert count_new_images(home) == before


def test_no_holdout_change_or_split_is_written_while_the_dataset_disk_is_not_mounted(home, tmp_path):
    """``dataset/`` on a disk of its own. While it is not mounted, the holdout manifest (and the extend's
    stored copies) would be written into the bare mount point, and be hidden once the disk is back: the
    logged holdout hash pointing at a manifest nobody can read. Each is refused with one line instead."""
    from bcc_pipeline.destinations import DestinationLost
    from tests.support import bind_mounted

    disk = tmp_path / "disk"
    disk.mkdir()
    _land(home, benign=12, malignant=12, groups=4)
    extra = tmp_path / "more-holdout"
    _land(home, benign=4, malignant=4, groups=2, seed=9, first_patient=40, out=extra)
    with bind_mounted(disk, home.dataset_dir):
        dataset.intake(home)
    for change in (
        lambda: dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first"),
        lambda: dataset.extend_holdout(home, extra, actor="a", reason="cohort"),
        lambda: split_step(home),
    ):
        with pytest.raises(DestinationLost, match="dataset is not the folder this home has put files into"):
            change()
    assert _events(home) == [] and list(home.dataset_dir.iterdir()) == []
    with bind_mounted(disk, home.dataset_dir):
        frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
        assert frozen.path.is_file() and [e.action for e in _events(home)] == ["freeze"]


def test_a_holdout_image_whose_label_is_contested_is_reported_and_withdrawn_only_by_a_logged_change(
    home, tmp_path, monkeypatch, capsys
):
    """The same content as a benign holdout image lands as malignant. Intake quarantines it as a conflict
    and excludes its row, as for any image; before, the holdout kept counting it as benign, and nothing
    said so. Now intake reports the holdout image as contested, `bcc holdout show` lists it, and the
    holdout changes only by the explicit, logged `bcc holdout withdraw --contested` (kept out from then
    on, never in development)."""
    from bcc_pipeline.files import sha256_file
    from bcc_pipeline.holdout import contested, withdraw_from_holdout

    extra = tmp_path / "cohort"
    _land(home, benign=4, malignant=4, groups=2, seed=9, first_patient=40, out=extra)
    frozen = dataset.extend_holdout(home, extra, actor="a", reason="cohort")
    benign_one = next(p for p in sorted((extra / "benign").rglob("*.png")))
    sha = sha256_file(benign_one)
    assert sha in {e["sha256"] for e in frozen.entries}
    (home.landing_dir / "malignant" / "p9").mkdir(parents=True)
    shutil.copyfile(benign_one, home.landing_dir / "malignant" / "p9" / "again.png")
    r = dataset.intake(home, run_id="i1")
    assert r.conflicts == 1 and r.contested_holdout == [sha]
    info = describe_holdout(home)
    assert [(c["sha256"], c["label"]) for c in info["contested"]] == [(sha, "benign")]
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    assert cli.main(["holdout", "show"]) == 0
    assert "LABEL CONTESTED (1)" in capsys.readouterr().out
    assert cli.main(["status"]) == 0
    assert "1 image(s) of the frozen holdout have a contested label" in capsys.readouterr().out
    with pytest.raises(DatasetError, match="at least 12 characters"):
        withdraw_from_holdout(home, [sha[:6]], actor="a", reason="typo")
    reason = "label contested by a second read"
    assert cli.main(["holdout", "withdraw", "--contested", "--reason", reason, "--actor", "dr. c"]) == 0
    now = dataset.current_holdout(home)
    assert sha not in {e["sha256"] for e in now.entries} and now.n("holdout") == frozen.n("holdout") - 1
    (kept,) = [x for x in now.excluded if x["sha256"] == sha]
    assert kept["kind"] == "withdrawn" and reason in kept["reason"]
    ev = _events(home)[-1]
    assert (ev.action, ev.actor, ev.reason, ev.old_hash, ev.new_hash) == (
        "withdraw",
        "dr. c",
        reason,
        frozen.hash,
        now.hash,
    )
    assert contested(home) == [] and describe_holdout(home)["contested"] == []


def test_images_withdrawn_back_to_an_earlier_holdout_never_enter_development(home, tmp_path):
    """freeze (H1), extend by a cohort (H2), withdraw that cohort: the holdout is H1's set again, so its
    manifest file (named by the entries' hash) was already there and was kept as it was, without the
    withdrawn images in its kept-out list; the next split put them into development. Now the file's list
    gains them, and they stay out of every role."""
    from bcc_pipeline.holdout import withdraw_from_holdout

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    first = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    cohort = tmp_path / "cohort"
    _land(home, benign=2, malignant=2, groups=1, seed=9, first_patient=40, out=cohort)
    grown = dataset.extend_holdout(home, cohort, actor="a", reason="cohort")
    added = sorted({e["sha256"] for e in grown.entries} - {e["sha256"] for e in first.entries})
    back = withdraw_from_holdout(home, [a[:16] for a in added], actor="a", reason="wrong cohort")
    assert back.hash == first.hash and len(added) == 4
    assert {x["sha256"] for x in dataset.current_holdout(home).excluded if x["kind"] == "withdrawn"} == set(
        added
    )
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    assert not set(added) & {e["sha256"] for e in dev.entries}


def test_extend_with_an_image_stored_under_the_other_label_or_a_near_copy_of_a_holdout_image(home, tmp_path):
    """A folder given to `bcc holdout extend` that holds (a) a holdout image's bytes under the other label:
    before, counted silently as already in the holdout; now the holdout image is contested; (b) a
    development image's bytes under the other label: before, kept out of the holdout while the development
    image stayed in training under its old label; now it is excluded under both labels, as intake does;
    (c) a near-copy of a holdout image (one pixel changed) under the other label: before, added beside the
    original; now kept out as a near-duplicate of the holdout image."""
    from bcc_pipeline.holdout import contested

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    hold_benign = [e for e in frozen.entries if e["label"] == "benign"]
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    train_benign = next(e for e in dev.entries if e["label"] == "benign" and e["split"] == "train")
    folder = tmp_path / "second-read" / "malignant"
    (folder / "p90").mkdir(parents=True)
    shutil.copyfile(hold_benign[0]["path"], folder / "p90" / "a.png")  # (a)
    shutil.copyfile(train_benign["path"], folder / "p90" / "b.png")  # (b)
    img = cv2.imread(hold_benign[1]["path"])
    img[0, 0] = (img[0, 0].astype(int) + 7) % 256
    cv2.imwrite(str(folder / "p90" / "c.png"), img)  # (c)
    with pytest.raises(DatasetError, match="no image .* was added"):
        dataset.extend_holdout(home, folder.parent, actor="a", reason="second read")
    # (a), and (c) since round 22: a near-copy under the other label contests it as an exact copy does
    assert [c["sha256"] for c in contested(home)] == sorted(e["sha256"] for e in hold_benign[:2])
    with session_scope(home.database_url) as s:
        assert "both benign and malignant" in s.get(ImageRecord, train_benign["sha256"]).excluded_reason
    assert dataset.current_holdout(home).hash == frozen.hash
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    assert train_benign["sha256"] not in {e["sha256"] for e in dev.entries}


def test_a_near_copy_of_a_holdout_image_landing_under_the_other_label_contests_its_label(home):
    """A near-copy (one pixel changed: another sha256, the same perceptual hash) of a benign holdout image
    lands as malignant. The split keeps it out of development as a near-duplicate of the holdout image, as
    before; before, the holdout image's label was not put in doubt. Now it is contested, as for an exact
    copy, and the split says so."""
    from bcc_pipeline.holdout import contested

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    original = next(e for e in frozen.entries if e["label"] == "benign")
    img = cv2.imread(original["path"])
    img[0, 0] = (img[0, 0].astype(int) + 7) % 256
    (home.landing_dir / "malignant" / "p90").mkdir(parents=True)
    cv2.imwrite(str(home.landing_dir / "malignant" / "p90" / "near.png"), img)
    assert dataset.intake(home, run_id="i2").accepted == 1
    split = split_step(home)
    assert any("near-copy labelled the other way" in w for w in split["warnings"])
    assert [c["sha256"] for c in contested(home)] == [original["sha256"]]
    # round 23: named where it landed, not by its path in the store
    assert "(malignant/p90/near.png)" in contested(home)[0]["reason"]


def _near_copy(src: Path, dest: Path) -> Path:
    """``src`` with one pixel changed, as PNG at ``dest``: other bytes, the same perceptual hash."""
    img = cv2.imread(str(src))
    img[0, 0] = (img[0, 0].astype(int) + 7) % 256
    dest.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dest), img)
    return dest


def test_extend_keeps_out_what_a_folder_holds_twice_or_under_both_labels_and_names_what_it_cannot_use(
    home, tmp_path, monkeypatch, capsys
):
    """Round 21. A folder given to `bcc holdout extend` with (a) the same bytes under both labels: before,
    frozen under the label walked first, the other copy counted as "already in it"; (b) a re-encoded copy
    under the other label and (c) under the same label: before, all added (one picture counted twice, or
    under both labels); (d) a patient folder whose name must be escaped: before, stored raw while intake
    stores it escaped, so the patient's later slides went into development (a name that is not UTF-8
    crashed it); (e) a `Malignant/` folder and a truncated file: before, passed over with exit 0."""
    folder = tmp_path / "second-read"
    made = _land(home, benign=8, malignant=8, groups=2, seed=7, first_patient=40, out=folder)
    benign = sorted(Path(f) for f in made["files"] if "/benign/" in f)
    (folder / "malignant" / "p_x").mkdir()
    shutil.copyfile(benign[0], folder / "malignant" / "p_x" / "same.png")  # (a)
    near_b = _near_copy(benign[1], folder / "malignant" / "p_y" / "near.png")  # (b)
    near_c = _near_copy(benign[2], folder / "benign" / "p_z" / "near.png")  # (c)
    odd = os.fsdecode(b"pat\\7 \xff")
    (folder / "benign" / odd).mkdir()
    shutil.move(benign[3], folder / "benign" / odd / "w.png")  # (d)
    (folder / "Malignant" / "p_m").mkdir(parents=True)
    shutil.copyfile(benign[4], folder / "Malignant" / "p_m" / "m.png")  # (e)
    (folder / "benign" / "p_z" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"cut" * 20)

    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    assert cli.main(["holdout", "extend", "--from", str(folder), "--reason", "second read"]) == 1
    out, err = capsys.readouterr()
    assert "NOT ADDED Malignant: not a label folder" in out and "NOT ADDED benign/p_z/bad.png" in out
    assert "2 path(s) of the folder were not added" in err
    h = dataset.current_holdout(home)
    kept = {x["sha256"]: x for x in h.excluded}
    held = {e["sha256"] for e in h.entries}
    sha = {p: images.sha256_bytes(p.read_bytes()) for p in (benign[0], benign[1], benign[2], near_b, near_c)}
    assert kept[sha[benign[0]]]["kind"] == "label_conflict" and sha[benign[0]] not in held  # (a)
    assert "as benign" in kept[sha[benign[0]]]["reason"] and "as malignant" in kept[sha[benign[0]]]["reason"]
    for p in (benign[1], near_b):  # (b): which label is right cannot be told, both out
        assert kept[sha[p]]["kind"] == "label_conflict" and sha[p] not in held
    pair = {sha[benign[2]], sha[near_c]}  # (c): counted once, the copy walked second kept out
    assert len(pair & held) == 1 and [kept[s]["kind"] for s in pair - held] == ["near_duplicate"]
    assert len(h.entries) == 16 - 2  # the 16 tiles (one moved into the odd folder), less (a) and (b)
    assert "pat\\\\7 \\xff" in {e["group_id"] for e in h.entries}  # (d): shown as intake stores it

    # (d) a later slide of that patient lands for training: kept out of development
    new = _land(home, benign=20, malignant=20, groups=4, seed=3, first_patient=70)
    later = Path(sorted(f for f in new["files"] if "/benign/" in f)[0])
    (home.landing_dir / "benign" / odd).mkdir()
    shutil.move(later, home.landing_dir / "benign" / odd / "later.png")
    dataset.intake(home)
    split = split_step(home)
    dev = dataset.load_manifest(split["manifest_path"])
    assert "pat\\\\7 \\xff" not in {e["group_id"] for e in dev.entries}
    assert any(x["kind"] == "group_in_holdout" for x in dev.excluded)


def test_a_picture_under_both_labels_with_other_bytes_never_trains_and_is_never_held_out_twice(
    home, tmp_path
):
    """Round 21. Near-copies (other bytes, one picture) were compared only between roles. (1) A tile landing
    as benign and its re-encoded copy as malignant: before, both trained, under opposite labels, with no
    warning. (2) A development image whose re-encoded copy `holdout extend` kept out under the other label:
    before, it stayed in training. Now each is kept out of development under both labels, and the split
    says so. (3) Freezing: a picture twice in the chosen groups was counted twice in the holdout."""
    made = _land(home, benign=30, malignant=30, groups=6)
    for f in made["files"][::8]:  # (3) a near-copy beside some tiles, in their own patient folder
        _near_copy(Path(f), Path(f).with_name("copy-" + Path(f).name))
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    bits = [e for e in frozen.excluded if e["kind"] == "near_duplicate"]
    held = _with_hashes(home, frozen.entries)
    assert all(hamming(a, b) > NEAR_DUPLICATE_BITS for i, a in enumerate(held) for b in held[:i])
    assert bits and all("another holdout image" in x["reason"] for x in bits)

    dev0 = dataset.load_manifest(split_step(home)["manifest_path"])
    d = next(e for e in dev0.entries if e["label"] == "benign")
    src = tmp_path / "src"
    tile = Path(
        sorted(_land(home, benign=2, malignant=2, groups=1, seed=11, first_patient=80, out=src)["files"])[0]
    )
    (home.landing_dir / "benign" / "p80").mkdir(parents=True)
    shutil.copyfile(tile, home.landing_dir / "benign" / "p80" / "q.png")
    q_near = _near_copy(tile, home.landing_dir / "malignant" / "p81" / "q.png")  # (1)
    q_shas = {images.sha256_bytes(tile.read_bytes()), images.sha256_bytes(q_near.read_bytes())}
    assert dataset.intake(home, run_id="i2").accepted == 2
    folder = tmp_path / "second-read"
    _near_copy(Path(d["path"]), folder / "malignant" / "p90" / "d.png")  # (2)
    _land(home, benign=2, malignant=2, groups=1, seed=12, first_patient=91, out=folder)
    dataset.extend_holdout(home, folder, actor="a", reason="second read")

    split = split_step(home)
    dev = dataset.load_manifest(split["manifest_path"])
    out = {x["sha256"]: x for x in dev.excluded if x["kind"] == "label_conflict"}
    assert q_shas <= set(out) and d["sha256"] in out
    assert not (q_shas | {d["sha256"]}) & {e["sha256"] for e in dev.entries}
    assert any("near-copy labelled the other way" in w and "development" in w for w in split["warnings"])


def _with_hashes(s, entries) -> list[str]:
    with session_scope(s.database_url) as ses:
        return [ses.get(ImageRecord, e["sha256"]).phash for e in entries]


def test_a_near_copy_under_the_other_label_is_caught_whatever_else_keeps_it_out(home, tmp_path):
    """Round 22. A re-encoded copy under the other label: (A) given to `holdout extend` in its development
    twin's own patient folder, kept out for the patient only, left the twin in training; (B) landing in its
    holdout twin's own patient folder, kept out for the patient only, never contested the holdout image;
    (C) given to `holdout extend` as a near-copy of a holdout image, kept out as a plain near-duplicate,
    never contested it. (D) A linked or hidden patient folder given to `holdout extend` was passed over
    without a word. (E, round 23) As (C), in a patient folder that has development images: kept out for
    the patient only, it never contested the holdout image."""
    from bcc_pipeline.holdout import contested

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    d = next(e for e in dev.entries if e["label"] == "benign")
    h, h2, h3 = [e for e in frozen.entries if e["label"] == "benign"][:3]
    folder = tmp_path / "second-read"
    _near_copy(Path(d["path"]), folder / "malignant" / d["group_id"] / "a.png")  # (A)
    _near_copy(Path(h3["path"]), folder / "malignant" / d["group_id"] / "e.png")  # (E)
    _near_copy(Path(h["path"]), folder / "malignant" / "p95" / "h.png")  # (C)
    _land(home, benign=2, malignant=2, groups=1, seed=21, first_patient=91, out=folder)
    elsewhere = tmp_path / "elsewhere"
    _near_copy(Path(dev.entries[-1]["path"]), elsewhere / "x.png")
    os.symlink(elsewhere, folder / "benign" / "p96")  # (D)
    _near_copy(Path(dev.entries[-2]["path"]), folder / "benign" / ".p97" / "y.png")
    changed = dataset.extend_holdout(home, folder, actor="a", reason="second read")
    # (D): listed; the link is not added (exit 1), the hidden folder is left alone as intake does
    assert sorted((x["path"], bool(x.get("ignored"))) for x in changed.refused) == [
        ("benign/.p97", True),
        ("benign/p96", False),
    ]
    assert {h["sha256"], h3["sha256"]} <= {c["sha256"] for c in contested(home)}  # (C), (E)
    assert any(x["kind"] == "label_conflict" and x["near_sha256"] == h["sha256"] for x in changed.excluded)

    _near_copy(Path(h2["path"]), home.landing_dir / "malignant" / h2["group_id"] / "b.png")  # (B)
    assert dataset.intake(home, run_id="i2").accepted == 1
    split = split_step(home)
    dev2 = dataset.load_manifest(split["manifest_path"])
    assert d["sha256"] not in {e["sha256"] for e in dev2.entries}  # (A)
    assert d["sha256"] in {x["sha256"] for x in dev2.excluded if x["kind"] == "label_conflict"}
    assert h2["sha256"] in {c["sha256"] for c in contested(home)}  # (B)


def test_extend_says_what_it_leaves_alone_and_a_store_it_cannot_write_is_one_line(
    home, tmp_path, monkeypatch, capsys
):
    """Round 23: hidden files and files that are no image were passed over by `holdout extend` without a
    word (now listed as `ignored`, exit 0, as intake counts them); a dataset store that cannot take a copy
    (full: the spare room it keeps; read-only) was an "unexpected error" (now one line, the holdout
    unchanged)."""
    folder = tmp_path / "cohort"
    _land(home, benign=4, malignant=4, groups=2, seed=31, first_patient=60, out=folder)
    (folder / "benign" / "README.txt").write_text("scanned 2026-12-01")
    (folder / "benign" / ".DS_Store").write_bytes(b"\0")
    (folder / "malignant" / "m1 1 malignant, h2").mkdir()  # round 23: a group name like a list
    shutil.move(sorted((folder / "malignant").rglob("*.png"))[0], folder / "malignant" / "m1 1 malignant, h2")
    monkeypatch.setenv("BCC_HOME", str(home.home))
    monkeypatch.setenv("BCC_DATABASE_URL", home.database_url)
    assert cli.main(["holdout", "extend", "--from", str(folder), "--reason", "cohort"]) == 0
    out = capsys.readouterr().out
    assert (
        "ignored benign/README.txt: not an image file extension" in out and "ignored benign/.DS_Store" in out
    )
    before = dataset.current_holdout(home).hash
    assert cli.main(["holdout", "show"]) == 0
    assert '"m1 1 malignant, h2" 1 malignant' in capsys.readouterr().out  # one group, quoted

    more = tmp_path / "more"
    made = _land(home, benign=2, malignant=2, groups=1, seed=32, first_patient=70, out=more)
    sha = images.sha256_bytes(Path(made["files"][0]).read_bytes())
    (home.dataset_dir / sha[:2] / f"{sha}.png").mkdir(parents=True)  # its copy cannot be written
    assert cli.main(["holdout", "extend", "--from", str(more), "--reason", "more"]) == 1
    err = capsys.readouterr().err
    assert "bcc: error: cannot write" in err and "into the dataset store" in err and "unexpected" not in err
    assert dataset.current_holdout(home).hash == before


@pytest.mark.parametrize(
    "spelling",
    [
        "upper",
        "space",
        "fullwidth",
        "tab",
        "nbsp",
        "ideographic",
        "zero-width",
        # round 26: invisible characters other than format ones, Turkish case pairs, punctuation
        "variation-selector",
        "braille-blank",
        "hangul-filler",
        "dotless-i",
        "hyphen",
    ],
)
def test_a_holdout_patient_under_another_spelling_of_its_folder_stays_out_of_development(home, spelling):
    """Round 23: slides landing in `Patient_07/`, `patient_07 /` or `patient_０7/` (a full-width digit)
    went into train/validation while `patient_07` was in the holdout. One patient is one patient however
    its folder is spelled (`holdout.records.patient_key`)."""
    made = _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    held = next(e for e in frozen.entries if e["label"] == "benign")["group_id"]
    other = {
        "upper": held.upper(),
        "space": f"{held} ",
        "fullwidth": held.replace("0", "\uff10", 1),
        # round 24: compared on the folder's own name, not its escaped display form
        "tab": f"{held}\t",
        "nbsp": f"{held}\u00a0",
        "ideographic": f"{held}\u3000",
        "zero-width": f"{held}\u200b",
        "variation-selector": f"{held}\ufe0f",
        "braille-blank": f"{held}\u2800",
        "hangul-filler": f"{held}\u3164",
        "dotless-i": held.replace("i", "\u0131"),
        "hyphen": held.replace("_", "-"),
    }[spelling]
    assert other != held
    new = _land(home, benign=2, malignant=2, groups=1, seed=41, first_patient=90, out=home.home / "new")
    slide = Path(sorted(f for f in new["files"] if "/benign/" in f)[0])
    (home.landing_dir / "benign" / other).mkdir(parents=True)
    shutil.move(slide, home.landing_dir / "benign" / other / "later.png")
    assert made and dataset.intake(home, run_id="i2").accepted == 1
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    shown = display_path(other)  # group ids are stored as displayed
    assert shown not in {e["group_id"] for e in dev.entries}
    assert shown in {x["group_id"] for x in dev.excluded if x["kind"] == "group_in_holdout"}


def test_a_patient_folder_named_like_an_ungrouped_image_is_a_patient(home, tmp_path):
    """Round 26: a patient folder literally named `sha:p9` in the holdout was taken for ungrouped images
    (their group is `sha:<sha256>`), so its later slides went into training."""
    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    extra = tmp_path / "more"
    made = _land(home, benign=3, malignant=3, groups=1, seed=9, first_patient=40, out=extra)
    for label in ("benign", "malignant"):
        (patient,) = {Path(f).parent for f in made["files"] if f"/{label}/" in f}
        patient.rename(patient.parent / ("sha:p9" if label == "benign" else "sha:p10"))
    dataset.extend_holdout(home, extra, actor="a", reason="sha-named patients")
    later = _land(home, benign=2, malignant=2, groups=1, seed=43, first_patient=95, out=tmp_path / "later")
    slide = Path(sorted(f for f in later["files"] if "/benign/" in f)[0])
    (home.landing_dir / "benign" / "sha:p9").mkdir(parents=True)
    shutil.move(slide, home.landing_dir / "benign" / "sha:p9" / "later.png")
    assert dataset.intake(home, run_id="i2").accepted == 1
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    assert "sha:p9" not in {e["group_id"] for e in dev.entries}
    assert "sha:p9" in {x["group_id"] for x in dev.excluded if x["kind"] == "group_in_holdout"}


def _kept_out_as_a_label_conflict(home, sha: str) -> None:
    """The split keeps ``sha`` out of development as a label conflict with a kept-out image."""
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    assert sha not in {e["sha256"] for e in dev.entries}
    (conflict,) = [x for x in dev.excluded if x["sha256"] == sha]
    assert conflict["kind"] == "label_conflict" and "a kept-out image" in conflict["reason"]


def test_a_slide_kept_out_for_its_patient_still_keeps_its_twin_under_the_other_label_out(home):
    """Round 26: a benign slide landing in a holdout patient's folder is kept out for its patient, and was
    never compared: its malignant copy (turned, re-encoded) in another patient's folder stayed in
    development. Both labels of one picture: the copy is kept out as a label conflict."""
    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    held = next(e for e in frozen.entries if e["label"] == "benign")["group_id"]
    new = _land(home, benign=2, malignant=2, groups=1, seed=41, first_patient=90, out=home.home / "new")
    slide = Path(sorted(f for f in new["files"] if "/benign/" in f)[0])
    kept = home.landing_dir / "benign" / held / "later.png"
    shutil.copyfile(slide, kept)
    twin = _turned(slide, home.landing_dir / "malignant" / "p97" / "twin.png", "turn")
    twin_sha = images.sha256_bytes(twin.read_bytes())
    assert dataset.intake(home, run_id="i2").accepted == 2
    _kept_out_as_a_label_conflict(home, twin_sha)


def test_a_copy_under_the_other_label_of_an_image_extend_kept_out_never_trains(home, tmp_path):
    """Round 27: `bcc holdout extend` kept a benign slide out (its patient has development images); its copy
    turned 90 degrees, landing afterwards as malignant in another patient's folder, went into development
    (landing before the extend, it was caught). Development is compared with every image a holdout change
    kept out."""
    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    in_dev = next(e for e in dev.entries if e["label"] == "benign")["group_id"]
    extra = tmp_path / "more"
    new = _land(home, benign=2, malignant=2, groups=1, seed=41, first_patient=90, out=tmp_path / "new")
    slide, other = (Path(f) for f in sorted(f for f in new["files"] if "/benign/" in f))
    (extra / "benign" / in_dev).mkdir(parents=True)
    kept = shutil.copyfile(slide, extra / "benign" / in_dev / "k.png")
    (extra / "benign" / "p95").mkdir()
    shutil.copyfile(other, extra / "benign" / "p95" / "new.png")  # and a new patient, added
    (extra / "malignant" / "p96").mkdir(parents=True)
    for f in (Path(f) for f in new["files"] if "/malignant/" in f):
        shutil.copyfile(f, extra / "malignant" / "p96" / f.name)
    grown = dataset.extend_holdout(home, extra, actor="a", reason="kept out for its patient")
    assert images.sha256_bytes(Path(kept).read_bytes()) in {x["sha256"] for x in grown.excluded}
    twin = _turned(slide, home.landing_dir / "malignant" / "p98" / "twin.png", "turn")
    twin_sha = images.sha256_bytes(twin.read_bytes())
    assert dataset.intake(home, run_id="i2").accepted == 1
    _kept_out_as_a_label_conflict(home, twin_sha)


def _turned(src: Path, dest: Path, how: str) -> Path:
    """``src`` turned 90 degrees (``turn``) or mirrored (``mirror``), as PNG at ``dest``."""
    img = cv2.imread(str(src))
    img = np.rot90(img).copy() if how == "turn" else np.fliplr(img).copy()
    dest.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(dest), img)
    return dest


def test_a_turned_or_mirrored_copy_is_the_same_picture(home, tmp_path):
    """Round 23: the near-copy check compared one orientation only, while training itself flips and turns
    tiles. A benign development tile turned 90 degrees landing as malignant trained under both labels; a
    mirrored copy of a holdout image under the other label went into training and contested nothing. Now
    every orientation is compared (`images.phash_turns`, migration 0009)."""
    from bcc_pipeline.holdout import contested

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    frozen = dataset.freeze_holdout(home, fraction=0.25, actor="a", reason="first")
    dev = dataset.load_manifest(split_step(home)["manifest_path"])
    d = next(e for e in dev.entries if e["label"] == "benign")
    h = next(e for e in frozen.entries if e["label"] == "benign")
    turned = _turned(Path(d["path"]), home.landing_dir / "malignant" / "p80" / "t.png", "turn")
    mirrored = _turned(Path(h["path"]), home.landing_dir / "malignant" / "p81" / "m.png", "mirror")
    shas = {p: images.sha256_bytes(p.read_bytes()) for p in (turned, mirrored)}
    assert dataset.intake(home, run_id="i2").accepted == 2
    dev2 = dataset.load_manifest(split_step(home)["manifest_path"])
    kept = {e["sha256"] for e in dev2.entries}
    assert not {d["sha256"], shas[turned], shas[mirrored]} & kept
    assert {d["sha256"], shas[turned]} <= {
        x["sha256"] for x in dev2.excluded if x["kind"] == "label_conflict"
    }
    assert h["sha256"] in {c["sha256"] for c in contested(home)}


def test_rows_from_before_migration_0009_get_their_turned_hashes_and_an_old_schema_is_named(home):
    """A database at 0008 is refused by intake with the command that fixes it; after the upgrade, rows
    written before it (no `phash_turns`) get theirs from their stored copy the first time a split needs
    them."""
    from bcc_pipeline.errors import StoreError

    _land(home, benign=30, malignant=30, groups=6)
    dataset.intake(home)
    assert store.downgrade(home.database_url, "0008") == "0008"
    store.dispose_engine(home.database_url)
    with pytest.raises(StoreError, match="0009.*bcc db upgrade"):
        dataset.intake(home, run_id="old-schema")
    assert store.upgrade(home.database_url) == "0009"
    store.dispose_engine(home.database_url)
    with session_scope(home.database_url) as s:
        assert (
            s.scalars(select(ImageRecord.phash_turns).where(ImageRecord.phash_turns.is_not(None))).all() == []
        )
    split_step(home)
    with session_scope(home.database_url) as s:
        turns = s.scalars(select(ImageRecord.phash_turns)).all()
    assert turns and all(t and len(t) == 112 for t in turns)


def test_a_mostly_flat_tile_is_compared_in_its_own_orientation_only(tmp_path):
    """Round 24: border tiles padded with white match each other more often when turned (the padding lines
    up): 60 distinct half-padded tiles gave 19 false near-copy pairs in one orientation and 112 in eight.
    A mostly flat tile gets no turned hashes, so eight orientations add no false pair; a tile of tissue
    keeps them."""
    from scipy.ndimage import gaussian_filter

    from bcc_pipeline.neardup import near_pairs

    rng = np.random.default_rng(7)
    recs = []
    for i in range(60):
        tissue = gaussian_filter(np.array([200, 120, 170.0]) + rng.normal(0, 50, (224, 224, 3)), (6, 6, 0))
        mask = np.zeros((224, 224), bool)
        mask[:, : int(224 * rng.uniform(0.3, 0.6))] = True
        mask = np.rot90(mask, rng.integers(4))
        tile = np.where(mask[..., None], tissue, 255.0).clip(0, 255).astype(np.uint8)
        recs.append({"sha256": f"{i:064x}", "phash": perceptual_hash(tile), "turns": turned_hashes(tile)})
    assert all(r["turns"] == "" for r in recs)
    assert len(near_pairs(recs)) == len(near_pairs([{**r, "turns": None} for r in recs]))
    tissue = generate(tmp_path, benign=1, malignant=0, size=224, seed=3)["files"][0]  # a tile of tissue
    assert len(turned_hashes(images.decode_file(tissue)[0])) == 112
