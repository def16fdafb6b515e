"""Reading predictions back (bcc_pipeline.predictions)."""

from __future__ import annotations

import datetime as dt

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
