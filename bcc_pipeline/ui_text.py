"""How the BCC pages show values (the Airflow plugin's template filters): the order of the metrics on the
models page, numbers with the digits a person needs, times in UTC. Light: imported by the api-server."""

from __future__ import annotations

import math
from typing import Any

from jinja2 import Undefined

__all__ = ["COUNT_METRICS", "SHOWN_METRICS", "fmt", "metric", "when"]

SHOWN_METRICS = (
    "accuracy",
    "sensitivity",
    "specificity",
    "precision",
    "f1",
    "roc_auc",
    "log_loss",
    "brier",
    "ece",
    "tp",
    "fp",
    "tn",
    "fn",
    "n",
)  # the models page's order; other metrics follow by name
COUNT_METRICS = ("tp", "fp", "tn", "fn", "n")


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or isinstance(value, Undefined) or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def metric(value: Any, name: str) -> str:
    """A metric for people: counts as whole numbers, rates and losses with three decimals."""
    return fmt(value, 0 if name in COUNT_METRICS else 3)


def when(iso: str | None) -> str:
    return "" if not iso else iso[:19].replace("T", " ") + " UTC"
