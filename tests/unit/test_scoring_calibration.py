"""Scoring stores the calibrated probability: the version's temperature is applied with the same
``stats.calibrate`` evaluation used, and the label compares it with the threshold (chosen on that scale)."""

from __future__ import annotations

import shutil

import pytest
from sqlalchemy import select

from bcc_pipeline import scoring, stats
from bcc_pipeline.store import Prediction, session_scope
from tests.support import archived, fill_inbox, install_artifact, register_version, scoring_settings


def test_scoring_applies_the_versions_temperature(make_settings, sqlite_url, tiny_model_artifact, png_writer):
    s = scoring_settings(make_settings, sqlite_url)
    src, sha = tiny_model_artifact
    for version, temperature in (("v-raw", None), ("v-cal", 0.2)):
        dest = install_artifact(src, s.models_dir, version)
        register_version(
            s, version, artifact=(dest, sha), threshold=0.5, temperature=temperature, profile="demo"
        )
        if version == "v-raw":
            fill_inbox(s.inbox_dir, png_writer, 6)
        else:  # the same images again, for the calibrated version (now the champion)
            for p in archived(s):
                dest = s.inbox_dir / p.name
                shutil.copyfile(p, dest)
        assert scoring.score_inbox(s, batch_size=4)["scored"] == 6

    with session_scope(sqlite_url) as ses:
        rows = ses.scalars(select(Prediction)).all()
        by = {(p.image_sha256, p.model_version): p for p in rows}
    shas = {sha for sha, _ in by}
    assert len(shas) == 6
    for sha_ in shas:
        raw, cal = by[(sha_, "v-raw")], by[(sha_, "v-cal")]
        assert cal.prob_malignant == pytest.approx(
            float(stats.calibrate([raw.prob_malignant], 0.2)[0]), abs=1e-9
        )
        assert cal.label == ("malignant" if cal.prob_malignant >= 0.5 else "benign")
    # T < 1 sharpens: every probability moves away from 0.5
    assert all(
        abs(by[(x, "v-cal")].prob_malignant - 0.5) >= abs(by[(x, "v-raw")].prob_malignant - 0.5) for x in shas
    )
