"""Back-end validation (bcc_pipeline.validation): a back-end labels images only once it is proven against
fp32 Keras for the model version on this CPU class; ``auto`` picks the fastest validated one, else fp32;
an explicit unvalidated back-end is refused unless forced (and then recorded); predictions near the
threshold are re-scored in fp32; every prediction row says which back-end and precision made it; the
converted-model cache is used only when its files match the checksums recorded in the database."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sqlalchemy import select, text

from bcc_pipeline import scoring, store
from bcc_pipeline.backend_store import CompiledModel, record_validation, validation_rows
from bcc_pipeline.cpu import cpu_info, parse_cpuinfo, software_info
from bcc_pipeline.errors import ConfigError
from bcc_pipeline.inference import load_predictor
from bcc_pipeline.scoring.predictor import PinnedModel, probability
from bcc_pipeline.store import Prediction, ScoringRun, session_scope
from bcc_pipeline.validation import (
    REFERENCE_TILES,
    load_for,
    reference_images,
    resolve_backend,
    validate_backends,
)
from tests.support import TINY_IMAGE_SIZE, fill_inbox, scoring_settings

SIZE = TINY_IMAGE_SIZE


def _probs(artifact, backend: str, x) -> np.ndarray:
    path, sha = artifact
    return probability(load_predictor(path, sha, image_size=SIZE, backend=backend)(x), {"version": "t"})


def _mv(settings, version: str) -> dict:
    with session_scope(settings.database_url) as s:
        mv = s.get(store.ModelVersion, version)
        return {
            "version": version,
            "image_size": mv.image_size,
            "threshold": mv.threshold,
            "artifact_path": mv.artifact_path,
            "artifact_sha256": mv.artifact_sha256,
        }


def test_cpu_class_is_vendor_model_and_numerics_flags():
    a = parse_cpuinfo(
        "vendor_id : GenuineIntel\nmodel name : Xeon X\nflags : fpu avx2 amx_bf16 md_clear\n\n"
        "vendor_id : other\n"
    )
    assert a == {
        "vendor": "GenuineIntel",
        "model": "Xeon X",
        "flags": ["amx_bf16", "avx2"],
    }  # md_clear: not numerics
    here = cpu_info()
    assert here["cpu_class"].count("-") >= 1 and len(here["cpu_class"]) <= 64
    assert set(software_info()["packages"]) >= {"tensorflow", "openvino"}


def test_a_backend_that_flips_a_label_is_not_validated_and_auto_skips_it(
    make_settings, sqlite_url, register_champion, tiny_model_artifact
):
    x = reference_images(SIZE)
    assert x.shape == (REFERENCE_TILES, SIZE, SIZE, 3) and np.array_equal(
        x, reference_images.__wrapped__(SIZE)
    )
    ref, bf16 = _probs(tiny_model_artifact, "keras", x), _probs(tiny_model_artifact, "keras-bf16", x)
    i = int(np.argmax(np.abs(bf16 - ref)))
    assert abs(bf16[i] - ref[i]) > 1e-5  # bf16 rounding moves this image's probability
    threshold = float((ref[i] + bf16[i]) / 2)  # ... across this threshold: its label flips under bf16
    # max |Δp| allowed 1.0: only the flip can make bf16 fail
    s = scoring_settings(make_settings, sqlite_url, backend_max_delta=1.0)
    version = register_champion(s, "v-flip", threshold=threshold)
    r = validate_backends(s, version, ["keras-bf16", "openvino"])
    assert r["images"] == {"reference": REFERENCE_TILES}  # no manifest: the reference set alone
    rows = {row["backend"]: row for row in validation_rows(s.database_url, version)}
    bf = rows["keras-bf16"]
    flips = (bf["flips_malignant_to_benign"], bf["flips_benign_to_malignant"])
    assert flips == ((0, 1) if bf16[i] > ref[i] else (1, 0)) and not bf["validated"]
    assert bf["max_delta"] == pytest.approx(abs(bf16[i] - ref[i]), rel=1e-3) and bf["precision"] == "bf16"
    assert rows["openvino"]["validated"] and rows["keras"]["validated"]
    assert (
        rows["openvino"]["cpu_class"] == cpu_info()["cpu_class"] and rows["openvino"]["packages"]["openvino"]
    )
    chosen = resolve_backend(s, version, "auto")
    assert chosen["inference"] in ("openvino", "keras") and chosen["validated"]
    # the same back-end with a threshold no image lies near is validated
    s2 = scoring_settings(make_settings, sqlite_url, backend_max_delta=1.0)
    register_champion(s2, "v-noflip", threshold=1.0)
    validate_backends(s2, "v-noflip", ["keras-bf16"])
    assert {r["backend"]: r["validated"] for r in validation_rows(s2.database_url, "v-noflip")}["keras-bf16"]


def test_auto_picks_fp32_when_nothing_is_validated(make_settings, sqlite_url, register_champion, png_writer):
    s = scoring_settings(make_settings, sqlite_url, backend_max_delta=0.0)
    version = register_champion(s)
    nothing = resolve_backend(s, version, "auto")
    assert nothing["inference"] == "keras" and "no back-end validation" in nothing["reason"]
    validate_backends(s, version, ["keras-bf16"])  # differs from fp32 at all: not validated at max |Δp| 0
    assert not {r["backend"]: r["validated"] for r in validation_rows(s.database_url, version)}["keras-bf16"]
    assert resolve_backend(s, version, "auto")["inference"] == "keras"
    fill_inbox(s.inbox_dir, png_writer, 3)
    r = scoring.score_inbox(s)
    assert r["inference"] == "keras" and r["precision"] == "f32" and r["rescored_fp32"] == 0
    assert r["shard_backends"] == [{"shard": 0, "inference": "keras", "precision": "f32", "why": "pinned"}]
    with session_scope(sqlite_url) as ses:
        assert set(ses.execute(select(Prediction.backend, Prediction.precision))) == {("keras", "f32")}


def test_a_new_cpu_class_validates_on_the_reference_set_first(make_settings, sqlite_url, register_champion):
    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    elsewhere = {
        "model_version": version,
        "backend": "openvino",
        "cpu_class": "othervendor-000000000000",
        "software": "sw-000000000000",
        "validated": True,
        "precision": "f32",
        "n_images": 100,
        "images": {"holdout": 52, "reference": 48},
        "flips_malignant_to_benign": 0,
        "flips_benign_to_malignant": 0,
        "max_delta": 1e-6,
        "p99_delta": 1e-7,
        "max_delta_allowed": 0.01,
        "threshold": 0.5,
        "images_per_second": 1e6,
        "cpu": {},
        "packages": {},
        "error": None,
    }
    record_validation(s.database_url, elsewhere)
    chosen = resolve_backend(s, version, "auto")
    here = [r for r in validation_rows(s.database_url, version) if r["cpu_class"] == cpu_info()["cpu_class"]]
    assert {r["backend"] for r in here} == {"keras", "openvino"}
    assert all(r["images"] == {"reference": REFERENCE_TILES} for r in here)
    assert chosen["inference"] in ("keras", "openvino")


def test_an_unvalidated_explicit_backend_is_refused_unless_forced(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch, capsys
):
    from bcc_pipeline.cli import main

    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    fill_inbox(s.inbox_dir, png_writer, 3)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["score", "--inference", "keras-bf16"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "keras-bf16 is not validated for model v-tiny-1" in err
    assert "--force-unvalidated" in err and len(list(s.inbox_dir.rglob("*.png"))) == 3  # nothing scored
    with pytest.raises(ConfigError, match="not validated"):
        scoring.plan_shards(s, "r-refused", 1, inference="keras-bf16")
    assert main(["score", "--json", "--inference", "keras-bf16", "--force-unvalidated"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["force_unvalidated"] is True and r["inference"] == "keras-bf16" and r["precision"] == "bf16"
    plan = json.loads((scoring.run_dir(s, r["run_id"]) / "plan.json").read_text())
    assert plan["force_unvalidated"] is True and plan["inference_requested"] == "keras-bf16"
    with session_scope(sqlite_url) as ses:
        counts = ses.get(ScoringRun, r["run_id"]).counts
        assert (
            counts["force_unvalidated"] is True and counts["shard_backends"][0]["inference"] == "keras-bf16"
        )
        assert set(ses.execute(select(Prediction.backend, Prediction.precision)).all()) <= {
            ("keras-bf16", "bf16"),
            ("keras", "f32"),
        }
    # once validated, the same request needs no force
    validate_backends(s, version, ["keras-bf16"])
    if {r["backend"]: r["validated"] for r in validation_rows(sqlite_url, version)}["keras-bf16"]:
        assert resolve_backend(s, version, "keras-bf16")["inference"] == "keras-bf16"


def test_guard_band_rescores_exactly_the_near_threshold_images(
    make_settings, sqlite_url, register_champion, tiny_model_artifact, png_writer
):
    from bcc_pipeline.images import load_for_model

    s0 = scoring_settings(make_settings, sqlite_url)
    paths = fill_inbox(s0.inbox_dir, png_writer, 12)
    x = np.stack([load_for_model(p, SIZE)[0] for p in paths])
    bf16, ref = _probs(tiny_model_artifact, "keras-bf16", x), _probs(tiny_model_artifact, "keras", x)
    order = np.sort(bf16)
    threshold = float(order[6])
    band = float(
        (order[8] - order[6] + order[9] - order[6]) / 2
    )  # images 4..8 of 12 lie inside, more or less
    near = np.abs(bf16 - threshold) <= band
    assert 0 < near.sum() < len(paths)
    s = scoring_settings(make_settings, sqlite_url, guard_band=band)
    version = register_champion(s, threshold=threshold)
    model = PinnedModel(_mv(s, version), "keras-bf16", settings=s, forced=True)
    p = model.predict(x)
    assert np.array_equal(model.rescored, near) and model.rescored_fp32 == near.sum()
    assert np.allclose(p[near], ref[near], atol=1e-7) and np.allclose(p[~near], bf16[~near], atol=1e-7)
    # the whole run: the re-scored images' rows say fp32 Keras made them, the others bf16
    r = scoring.score_inbox(
        scoring_settings(make_settings, sqlite_url, guard_band=band, inference="keras-bf16"),
        force_unvalidated=True,
    )
    assert r["rescored_fp32"] == near.sum() and r["scored"] == len(paths)
    with session_scope(sqlite_url) as ses:
        rows = dict((p_.source_path, (p_.backend, p_.precision)) for p_ in ses.scalars(select(Prediction)))
    want = {
        str(p.relative_to(s0.inbox_dir)): ("keras", "f32") if n else ("keras-bf16", "bf16")
        for p, n in zip(paths, near, strict=True)
    }
    assert rows == want


def test_migration_upgrades_a_database_that_holds_predictions(db_url):
    store.upgrade(db_url, "0002")
    eng = store.get_engine(db_url)
    with eng.begin() as c:
        c.execute(
            text(
                "INSERT INTO model_versions (version, status, artifact_path, artifact_sha256, base_weights, "
                "profile, image_size, preprocessing, hyperparameters, manifest_hash, n_train, n_val, "
                "threshold, code_version, created_at) VALUES ('v0', 'champion', '-', :z, 'none', 'demo', 32, "
                "'p', '{}', :z, 1, 1, 0.5, 't', CURRENT_TIMESTAMP)"
            ),
            {"z": "0" * 64},
        )
        for k in range(3):
            c.execute(
                text(
                    "INSERT INTO predictions (image_sha256, model_version, prob_malignant, label, threshold, "
                    "source_path, run_id, scored_at) VALUES (:s, 'v0', 0.7, 'malignant', 0.5, :p, 'r0', "
                    "CURRENT_TIMESTAMP)"
                ),
                {"s": f"{k}" * 64, "p": f"old/{k}.png"},
            )
    assert store.upgrade(db_url) == "0009"
    with eng.connect() as c:
        old = c.execute(
            text(
                "SELECT source_path, prob_malignant, backend, precision FROM predictions ORDER BY source_path"
            )
        ).all()
        view = c.execute(
            text(
                "SELECT source_path, backend, precision, champion_version FROM latest_predictions "
                "ORDER BY source_path"
            )
        ).all()
    assert [tuple(r) for r in old] == [(f"old/{k}.png", 0.7, None, None) for k in range(3)]
    assert [tuple(r) for r in view] == [(f"old/{k}.png", None, None, "v0") for k in range(3)]
    with session_scope(db_url) as s:  # new rows carry them
        store.insert_rows(
            s,
            Prediction,
            [
                {
                    "image_sha256": "f" * 64,
                    "model_version": "v0",
                    "prob_malignant": 0.1,
                    "label": "benign",
                    "threshold": 0.5,
                    "source_path": "new.png",
                    "run_id": "r1",
                    "scored_at": store.utcnow(),
                    "backend": "openvino",
                    "precision": "f32",
                }
            ],
            key=("image_sha256", "model_version"),
        )
    with eng.connect() as c:
        assert tuple(
            c.execute(
                text("SELECT backend, precision FROM latest_predictions WHERE source_path = 'new.png'")
            ).one()
        ) == ("openvino", "f32")


@pytest.mark.parametrize("victim", ["model.bin", "model.xml"])
def test_a_tampered_compiled_cache_is_never_used(
    make_settings, sqlite_url, register_champion, tiny_model_artifact, victim
):
    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    mv = _mv(s, version)
    x = reference_images(SIZE)[:8]
    ref = _probs(tiny_model_artifact, "keras", x)
    first = load_for(s, mv, "openvino")
    assert first.converted
    with session_scope(sqlite_url) as ses:
        row = ses.scalars(select(CompiledModel)).one()
        recorded = dict(row.files)
    assert row.model_version == version and set(recorded) == {"model.xml", "model.bin"}
    [cache] = (s.models_dir / version / "compiled").iterdir()
    assert not load_for(s, mv, "openvino").converted  # intact: loaded from the cache
    # an attacker rewrites the file AND the cache's own source.json to match: the database still knows
    from bcc_pipeline.files import sha256_file

    data = bytearray((cache / victim).read_bytes())
    if victim == "model.bin":
        data[:64] = b"\0" * 64
    else:
        data = bytearray(data.decode().replace("<net ", '<net tampered="1" ', 1).encode())
    (cache / victim).write_bytes(bytes(data))
    meta = json.loads((cache / "source.json").read_text())
    meta["files"][victim] = sha256_file(cache / victim)
    (cache / "source.json").write_text(json.dumps(meta))
    again = load_for(s, mv, "openvino")
    assert again.converted  # rebuilt, not used
    assert np.abs(probability(again(x), mv) - ref).max() < 1e-5
    assert {n: sha256_file(cache / n) for n in recorded} == validation_files(sqlite_url)
    # a cache with no record in the database is not trusted either
    with session_scope(sqlite_url) as ses:
        ses.execute(CompiledModel.__table__.delete())
    assert load_for(s, mv, "openvino").converted


def validation_files(url: str) -> dict:
    with session_scope(url) as ses:
        return dict(ses.scalars(select(CompiledModel)).one().files)


def test_cli_validate_backends_models_and_predictions_show_the_backend(
    make_settings, sqlite_url, register_champion, png_writer, monkeypatch, capsys
):
    from bcc_pipeline.cli import main
    from bcc_pipeline.validation import champion_validations

    s = scoring_settings(make_settings, sqlite_url)
    version = register_champion(s)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    assert main(["validate-backends", version, "--backend", "openvino", "--backend", "keras-bf16"]) == 0
    out = capsys.readouterr().out
    assert (
        f"{version} on {cpu_info()['cpu_class']}" in out
        and f"{REFERENCE_TILES} images ({REFERENCE_TILES} reference)" in out
    )
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert set(lines) == {"keras", "openvino", "keras-bf16"}
    assert "flips m→b   0 b→m   0" in lines["openvino"] and "max|Δp|" in lines["keras-bf16"]
    ok = {r["backend"] for r in validation_rows(sqlite_url, version) if r["validated"]} - {"keras"}
    assert main(["models", "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["backends_validated_here"] == (
        ",".join(sorted(ok, key=["keras-bf16", "openvino"].index)) or "-"
    )
    rows, table = champion_validations(s)
    assert {r["backend"] for r in rows} == {"keras", "openvino", "keras-bf16"} and "openvino" in table
    fill_inbox(s.inbox_dir, png_writer, 2)
    assert main(["score", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert main(["predictions", "--format", "json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    assert len(preds) == 2 and {(p["backend"], p["precision"]) for p in preds} <= {
        (r["inference"], r["precision"]),
        ("keras", "f32"),
    }
    assert main(["predictions", "--format", "csv", "--latest"]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(",backend,precision")


def test_int8_is_calibrated_on_development_images_and_validated_like_the_others(
    make_settings, sqlite_url, register_champion, png_writer, tmp_path, monkeypatch, capsys
):
    pytest.importorskip("nncf", reason="the int8 extra is not installed")
    from bcc_pipeline.dataset import write_manifest
    from bcc_pipeline.files import sha256_file
    from bcc_pipeline.validation import development_images

    s = scoring_settings(make_settings, sqlite_url, backend_max_delta=1.0)
    version = register_champion(s)
    roles = ["train"] * 6 + ["validation"] * 3 + ["holdout"] * 4
    files = [png_writer(tmp_path / "img" / f"{k}.png", size=40, seed=100 + k) for k in range(len(roles))]
    entries = sorted(
        (
            {
                "sha256": sha256_file(f),
                "label": "benign" if k % 2 else "malignant",
                "group_id": f"g{k}",
                "path": str(f),
                "split": role,
            }
            for k, (f, role) in enumerate(zip(files, roles, strict=True))
        ),
        key=lambda e: e["sha256"],
    )
    manifest = write_manifest(entries, tmp_path / "manifests", seed=0, val_fraction=0.3)
    frozen = write_manifest(
        [dict(e, split="holdout") for e in entries[:2]], tmp_path / "holdout", seed=0, val_fraction=0.3
    )  # the frozen holdout the version was measured on
    (s.models_dir / version / "metadata.json").write_text(
        json.dumps({"manifest_path": str(manifest.path), "holdout_path": str(frozen.path)})
    )
    mv = _mv(s, version)
    assert development_images(s, mv).shape == (9, SIZE, SIZE, 3)  # train + validation, never the holdout
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("BCC_BACKEND_MAX_DELTA", "1.0")
    capsys.readouterr()
    from bcc_pipeline.cli import main

    assert main(["validate-backends", version, "--backend", "openvino-int8", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)  # NNCF's progress bars stay off stdout
    # calibration is not in this manifest: the validation images stand in; the holdout is the frozen one
    assert r["images"] == {"validation": 3, "holdout": 2, "reference": REFERENCE_TILES}
    row = {x["backend"]: x for x in r["results"]}["openvino-int8"]
    assert row["precision"] == "int8" and row["error"] is None and row["max_delta"] is not None
    assert row["validated"] == (row["flips_malignant_to_benign"] + row["flips_benign_to_malignant"] == 0)
    assert (s.models_dir / version / "compiled").is_dir()
    with session_scope(sqlite_url) as ses:
        assert ses.scalars(select(CompiledModel.format)).all() == ["openvino-int8"]


def test_promotion_validates_the_back_ends_named_by_publish_backends(
    make_settings, sqlite_url, register_champion
):
    from bcc_pipeline.validation import validate_published

    s = scoring_settings(make_settings, sqlite_url, publish_backends="keras-bf16")
    version = register_champion(s)
    out = validate_published(s, version)
    assert {r["backend"] for r in validation_rows(s.database_url, version)} == {"keras", "keras-bf16"}
    assert set(out["validated"]) <= {"keras", "keras-bf16"}
    none = scoring_settings(make_settings, sqlite_url, publish_backends="none")
    assert validate_published(none, register_champion(none, version="v-none")) == {
        "version": "v-none",
        "validated": [],
    }
    assert validation_rows(s.database_url, "v-none") == []
