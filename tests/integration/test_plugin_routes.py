"""The BCC Airflow plugin's routes through FastAPI's TestClient, with Airflow's real auth: the Simple auth
manager signs the JWTs and its own dependency checks them (and the revoked-token table in Airflow's
metadata database, created here). The data is real: images scored by the scoring pipeline with a tiny
registered champion.

Airflow reads its configuration once per process: when this module is the first to import Airflow, it
points Airflow at a throwaway home and database first (and leaves them set for the rest of the session).
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from .airflow_support import REPO, evaluate_version

if "airflow" not in sys.modules:
    _home = tempfile.mkdtemp(prefix="bcc-plugin-airflow-")
    atexit.register(shutil.rmtree, _home, True)
    os.environ.update(
        {
            "AIRFLOW_HOME": _home,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{_home}/airflow.db",
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__API_AUTH__JWT_SECRET": "bcc-route-test-secret-not-for-production",
        }
    )

PAGES = ["/bcc/", "/bcc/predictions", "/bcc/models", "/bcc/runs", "/bcc/inbox", "/bcc/models/{version}"]
FILES = [
    "/bcc/predictions.csv",
    "/bcc/api/predictions",
    "/bcc/api/models",
    "/bcc/api/models/{version}",
    "/bcc/api/runs",
    "/bcc/api/inbox",
    "/bcc/images/{sha}",
    "/bcc/images/{sha}/thumbnail.png",
    "/bcc/models/{version}/plots/roc.png",
]


@pytest.fixture(scope="module")
def plugin():
    """The plugin module, loaded from plugins/ the way Airflow's plugin manager finds it."""
    from airflow import settings
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.models.revoked_token import RevokedToken

    RevokedToken.__table__.create(settings.engine, checkfirst=True)
    create_auth_manager()
    sys.path.insert(0, str(REPO / "plugins"))
    try:
        import bcc_plugin
    finally:
        sys.path.remove(str(REPO / "plugins"))
    return bcc_plugin


@pytest.fixture
def site(plugin, make_settings, migrated_url, register_champion, png_writer, monkeypatch):
    """Airflow's app layout (the plugin app mounted under its prefix), real scored data from two model
    versions, a token for a viewer, and the settings the plugin reads from the environment."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from bcc_pipeline.scoring import score_inbox

    s = make_settings(migrated_url, settle_seconds=0, inference="keras")
    old = register_champion(
        s, version="v-tiny-1", threshold=0.379
    )  # the tiny net says ~0.37-0.39: both labels
    for i in range(7):
        png_writer(s.inbox_dir / f"ward_{i % 2}" / f"case_{i:02d}.png", seed=i, size=40)
    score_inbox(s)
    new = register_champion(s, version="v-tiny-2", threshold=0.384)
    evaluate_version(s.database_url, new, s.models_dir / new / "plots")
    for i in range(7, 12):
        png_writer(s.inbox_dir / "ward_9" / f"case_{i:02d}.png", seed=i, size=40)
    (s.inbox_dir / "broken.png").write_bytes(b"not a png")
    score_inbox(s)
    monkeypatch.setenv("BCC_HOME", str(s.home))
    monkeypatch.setenv("BCC_DATABASE_URL", s.database_url)
    monkeypatch.setenv("BCC_SETTLE_SECONDS", "0")
    for k in [
        k
        for k in os.environ
        if k.startswith("BCC_") and k not in ("BCC_HOME", "BCC_DATABASE_URL", "BCC_SETTLE_SECONDS")
    ]:
        monkeypatch.delenv(k)
    app = FastAPI()
    app.mount(plugin.URL_PREFIX, plugin.bcc_app)
    token = get_auth_manager().generate_jwt(SimpleAuthManagerUser(username="vera", role="viewer"))
    client = TestClient(app, base_url="http://testserver")
    return {
        "client": client,
        "auth": {"Authorization": f"Bearer {token}"},
        "token": token,
        "settings": s,
        "versions": (old, new),
    }


def test_the_route_lists_cover_every_route(plugin):
    listed = {
        u.removeprefix("/bcc").replace("{sha}", "{sha256}").replace("roc.png", "{name}")
        for u in PAGES + FILES
    }
    assert {r.path for r in plugin.bcc_app.routes} == listed | {"/{rest:path}"}


def _rows(site, query: str = "") -> list[dict]:
    r = site["client"].get(f"/bcc/api/predictions{query}", headers=site["auth"])
    assert r.status_code == 200, r.text
    return r.json()


def test_every_route_refuses_without_a_valid_token(site):
    c = site["client"]
    sha = _rows(site)[0]["sha256"]
    routes = [u.format(sha=sha, version=site["versions"][1]) for u in PAGES + FILES]
    routes += [
        "/bcc/predictions?since=not-a-date",
        "/bcc/api/predictions?label=maybe",
        "/bcc/models/x/plots/a.txt",
    ]
    for url in routes:
        r = c.get(url, follow_redirects=False)
        assert r.status_code == 401, (url, r.status_code)
        assert "ward_" not in r.text and "case_" not in r.text
        r = c.get(url, headers={"Authorization": "Bearer not.a.jwt"}, follow_redirects=False)
        assert r.status_code in (401, 403), (url, r.status_code)
        c.cookies.set("_token", "forged")
        r = c.get(url, follow_redirects=False)
        c.cookies.clear()
        assert r.status_code in (401, 403), (url, r.status_code)
    # a path that matches no route (a decoded %2f adds segments), or any method but GET, is refused too:
    # nothing under the prefix answers anything but 401 without a login
    for method, url in [
        ("GET", "/bcc/models/x/plots/..%2f..%2fetc%2fpasswd"),
        ("GET", "/bcc/no-such-page"),
        ("HEAD", "/bcc/predictions"),
        ("OPTIONS", "/bcc/api/predictions"),
        ("POST", "/bcc/api/predictions"),
        ("DELETE", "/bcc/no-such-page"),
    ]:
        r = c.request(method, url, follow_redirects=False)
        assert r.status_code == 401, (method, url, r.status_code)
    # ... and a logged-in user learns only that the path or the method does not exist
    assert c.get("/bcc/models/x/plots/..%2f..%2fetc%2fpasswd", headers=site["auth"]).status_code == 404
    assert c.get("/bcc/no-such-page", headers=site["auth"]).status_code == 404
    r = c.request("HEAD", "/bcc/predictions", headers=site["auth"])
    assert r.status_code == 405 and r.headers["allow"] == "GET"
    # a browser asking for a page goes to the Airflow login page, and comes back after it
    r = c.get("/bcc/predictions?label=benign", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 303
    assert r.headers["location"] == "/auth/login?next=%2Fbcc%2Fpredictions%3Flabel%3Dbenign"
    # ... without the path filter, which may name a patient (the login page's access log would show it)
    r = c.get(
        "/bcc/predictions?path=ward_9&label=benign", headers={"Accept": "text/html"}, follow_redirects=False
    )
    assert r.status_code == 303 and "ward" not in r.headers["location"]
    assert r.headers["location"] == "/auth/login?next=%2Fbcc%2Fpredictions%3Flabel%3Dbenign"
    # ... but an image or the JSON is a plain 401 even for a browser
    r = c.get("/bcc/api/models", headers={"Accept": "text/html"}, follow_redirects=False)
    assert r.status_code == 401
    # a token signed with another secret is refused
    import jwt

    claims = jwt.decode(site["token"], options={"verify_signature": False})
    forged = jwt.encode(claims, "another-secret", algorithm="HS512")
    assert c.get("/bcc/api/models", headers={"Authorization": f"Bearer {forged}"}).status_code == 403


def test_no_request_changes_anything(site):
    """Every route is read-only: a POST, PUT, PATCH or DELETE, with or without a token, from this origin or
    another, is refused and leaves the database as it was."""
    from sqlalchemy import func, select

    from bcc_pipeline.store import InboxFile, Prediction, Promotion, ScoringRun, session_scope

    def counts():
        with session_scope(site["settings"].database_url) as db:
            return [
                db.scalar(select(func.count()).select_from(t))
                for t in (Prediction, InboxFile, Promotion, ScoringRun)
            ]

    before = counts()
    c, sha = site["client"], _rows(site)[0]["sha256"]
    for url in [u.format(sha=sha, version=site["versions"][1]) for u in PAGES + FILES]:
        for method in ("POST", "PUT", "PATCH", "DELETE"):
            for headers in ({}, site["auth"], {**site["auth"], "Origin": "http://evil.example"}):
                r = c.request(method, url, headers=headers, data={"label": "benign"}, follow_redirects=False)
                expected = 405 if "Authorization" in headers else 401
                assert r.status_code == expected, (method, url, r.status_code)
    assert counts() == before


def test_the_model_of_a_prediction_is_one_click_away(site):
    """What did the model say about image X, with which model, and how good is that model: the row names
    the version with its frozen-holdout intervals and links to the version's page (plots, decisions, card)."""
    c, auth = site["client"], site["auth"]
    old, new = site["versions"]
    html = c.get("/bcc/predictions?path=case_09", headers=auth).text
    assert "case_09.png" in html and f'href="/bcc/models/{new}"' in html
    assert "frozen holdout (95% intervals): sensitivity <strong>" in html
    page = c.get(f"/bcc/models/{new}", headers=auth)
    assert page.status_code == 200
    text = page.text
    assert "Frozen holdout, 95% intervals: sensitivity <strong>" in text and "badge champion" in text
    assert f"/bcc/models/{new}/plots/roc.png" in text and f"Model card: {new}" in text
    assert "## Holdout metrics" in text and "<script" not in text
    # a version without holdout metrics says so; an unknown version is a 404
    assert "No frozen-holdout metrics recorded" in c.get(f"/bcc/models/{old}", headers=auth).text
    assert c.get("/bcc/models/v-nope", headers=auth).status_code == 404
    # the models list shows the intervals for every version that has them, and links each page
    listing = c.get("/bcc/models", headers=auth).text
    assert f'href="/bcc/models/{old}"' in listing and f'href="/bcc/models/{new}"' in listing
    one = c.get(f"/bcc/api/models/{new}", headers=auth).json()
    assert one["model"]["version"] == new and one["model_card"].startswith(f"# Model card: {new}")
    assert (
        one["model"]["intervals"]["sensitivity"]["lower"] <= one["model"]["intervals"]["sensitivity"]["value"]
    )
    assert c.get("/bcc/api/models/v-nope", headers=auth).status_code == 404


def test_the_pages_read_the_database_the_dags_use(site, monkeypatch):
    """With no BCC_DATABASE_URL, the plugin reads the Airflow connection bcc_db, as the DAGs' tasks do."""
    url = site["settings"].database_url
    monkeypatch.delenv("BCC_DATABASE_URL")
    monkeypatch.setenv(
        "AIRFLOW_CONN_BCC_DB", json.dumps({"conn_type": "generic", "extra": {"sqlalchemy_url": url}})
    )
    assert len(_rows(site)) == 12
    monkeypatch.delenv("AIRFLOW_CONN_BCC_DB")  # neither: the SQLite default in BCC_HOME, which has no schema
    r = site["client"].get("/bcc/api/predictions", headers=site["auth"])
    assert r.status_code == 503 and "bcc db upgrade" in r.text


def test_pages_render_for_a_viewer_and_through_the_cookie(site):
    c, auth = site["client"], site["auth"]
    old, new = site["versions"]
    for url in [u.format(version=new) for u in PAGES[1:]]:
        r = c.get(url, headers=auth)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), url
        assert r.headers["cache-control"] == "no-store" and "vera" in r.text
        assert "<script" not in r.text and "http://" not in r.text.replace("http://testserver", "")
    c.cookies.set("_token", site["token"])  # what the Airflow UI's login sets
    r = c.get("/bcc/models")
    c.cookies.clear()
    assert r.status_code == 200
    html = r.text
    assert html.index(f'id="v-{new}"') < html.index(f'id="v-{old}"')  # champion first
    for name in ("training_curves.png", "confusion_matrix.png", "roc.png"):
        assert f"/bcc/models/{new}/plots/{name}" in html
        img = c.get(f"/bcc/models/{new}/plots/{name}", headers=auth)
        assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert "holdout" in html and "validation" in html
    assert "Frozen holdout, 95% intervals: sensitivity <strong>" in html  # the champion's headline
    runs = c.get("/bcc/runs", headers=auth).text
    assert "broken.png" in runs and runs.count("badge finished") + runs.count("badge success") >= 2
    assert c.get("/bcc/", headers=auth, follow_redirects=False).headers["location"] == "/bcc/predictions"


def test_json_matches_the_cli_and_filters_paginate(site, capsys):
    from bcc_pipeline.cli import main

    everything = _rows(site)
    assert len(everything) == 12  # 7 + 5 images (the broken file was rejected)
    assert main(["predictions", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out) == everything
    old, new = site["versions"]
    for query, cli in (
        (f"?model_version={new}", ["--model-version", new]),
        ("?label=benign", ["--label", "benign"]),
        ("?latest=true", ["--latest"]),
        ("?since=2000-01-01&limit=3", ["--since", "2000-01-01", "--limit", "3"]),
    ):
        assert main(["predictions", "--format", "json", *cli]) == 0
        assert _rows(site, query) == json.loads(capsys.readouterr().out), query
    # path substring, date range, sort, paging
    ward9 = _rows(site, "?path=WARD_9")
    assert len(ward9) == 5 and all("ward_9/" in r["source_path"] for r in ward9)
    assert _rows(site, "?until=2000-01-01") == [] and len(_rows(site, "?since=1d")) == 12
    by_p = _rows(site, "?sort=prob_malignant")
    assert [r["prob_malignant"] for r in by_p] == sorted(r["prob_malignant"] for r in everything)
    pages = [_rows(site, f"?sort=prob_malignant&limit=4&offset={o}") for o in (0, 4, 8)]
    assert sum(pages, []) == by_p and [len(p) for p in pages] == [4, 4, 4]
    r = site["client"].get("/bcc/api/predictions?label=malignant&limit=1", headers=site["auth"])
    assert int(r.headers["x-total-count"]) == len(_rows(site, "?label=malignant"))
    # the HTML page shows the same page of rows, with numbered pages
    html = (
        site["client"]
        .get("/bcc/predictions?sort=prob_malignant&per_page=4&page=2", headers=site["auth"])
        .text
    )
    for row in pages[1]:
        assert row["source_path"] in html
    for row in pages[0] + pages[2]:
        assert row["source_path"] not in html
    assert "page 2 of 3" in html and "12 predictions" in html
    assert site["client"].get("/bcc/api/predictions?since=soon", headers=site["auth"]).status_code == 400
    assert site["client"].get("/bcc/api/predictions?label=maybe", headers=site["auth"]).status_code == 422


def test_csv_export_matches_the_json(site):
    c, auth = site["client"], site["auth"]
    for query in (
        "",
        "?label=malignant",
        "?path=ward_0&sort=source_path",
        f"?model_version={site['versions'][0]}",
    ):
        r = c.get(f"/bcc/predictions.csv{query}", headers=auth)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
        assert r.headers["content-disposition"].startswith('attachment; filename="bcc-predictions-')
        rows = list(csv.DictReader(io.StringIO(r.text)))
        want = _rows(site, query)
        assert len(rows) == len(want) and (want or query)
        for got, exp in zip(rows, want, strict=True):
            assert got == {k: str(v) for k, v in exp.items()}


def test_thumbnails_and_archived_images(site):
    c, auth = site["client"], site["auth"]
    row = _rows(site, "?path=case_03")[0]
    r = c.get(f"/bcc/images/{row['sha256']}/thumbnail.png", headers=auth)
    assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    from PIL import Image

    assert max(Image.open(io.BytesIO(r.content)).size) <= 112
    full = c.get(f"/bcc/images/{row['sha256']}", headers=auth)
    archived = next(Path(site["settings"].archive_dir).rglob("case_03.png"))
    assert full.status_code == 200 and full.content == archived.read_bytes()
    html = c.get("/bcc/predictions?path=case_03", headers=auth).text
    assert f"/bcc/images/{row['sha256']}/thumbnail.png" in html
    archived.unlink()  # the archive was cleaned up: no thumbnail, and the page says so
    assert c.get(f"/bcc/images/{row['sha256']}/thumbnail.png", headers=auth).status_code == 404
    assert "no longer in the archive" in c.get("/bcc/predictions?path=case_03", headers=auth).text


@pytest.mark.parametrize(
    "url",
    [
        "/bcc/models/{v}/plots/../../../../etc/passwd",
        "/bcc/models/{v}/plots/..%2f..%2f..%2fetc%2fpasswd",
        "/bcc/models/{v}/plots/%2e%2e%2fmodel.keras",
        "/bcc/models/{v}/plots/%252e%252e%252fmodel.keras",
        "/bcc/models/{v}/plots/%2fetc%2fpasswd",
        "/bcc/models/{v}/plots//etc/passwd",
        "/bcc/models/{v}/plots/model.keras",
        "/bcc/models/{v}/plots/..",
        "/bcc/models/{v}/plots/escape.png",
        "/bcc/models/..%2f..%2f..%2fetc/plots/roc.png",
        "/bcc/models/%2e%2e/plots/roc.png",
        "/bcc/images/..%2f..%2fbcc.db",
        "/bcc/images/%2e%2e%2f%2e%2e%2fbcc.db/thumbnail.png",
        "/bcc/images/{sha_upper}",
        "/bcc/images/{outside}",
        "/bcc/images/{outside}/thumbnail.png",
        "/bcc/images//etc/passwd",
    ],
)
def test_path_traversal_is_refused(site, url, tmp_path):
    from bcc_pipeline.store import InboxFile, session_scope

    s = site["settings"]
    v = site["versions"][1]
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"\x89PNG secret outside BCC_HOME")
    (s.models_dir / v / "plots" / "escape.png").symlink_to(secret)  # a link pointing out of the plots folder
    outside = "ab" * 32
    with session_scope(s.database_url) as db:  # a ledger row pointing outside the archive
        db.add(
            InboxFile(
                run_id="forged",
                path="x.png",
                path_key="f" * 64,
                sha256=outside,
                status="scored",
                moved_to=str(secret),
            )
        )
    sha = _rows(site)[0]["sha256"]
    r = site["client"].get(url.format(v=v, sha_upper=sha.upper(), outside=outside), headers=site["auth"])
    if url.endswith("/plots/.."):  # the client resolves the dot segment: the version's own page, no file
        assert str(r.url).endswith(f"/bcc/models/{v}") and r.headers["content-type"].startswith("text/html")
    else:
        assert r.status_code in (400, 404), (url, r.status_code)
    assert b"secret outside" not in r.content and b"root:" not in r.content


def test_path_filter_is_masked_for_the_access_log(site):
    """Airflow's access log reads the query string after the response; the plugin masks the path filter."""
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    seen: list[bytes] = []

    class Recorder:  # sits where Airflow's HttpAccessLogMiddleware sits: around the mounted app
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            await self.app(scope, receive, send)
            if scope["type"] == "http":
                seen.append(scope["query_string"])

    app = FastAPI()
    app.add_middleware(Recorder)
    from bcc_plugin import URL_PREFIX, bcc_app

    app.mount(URL_PREFIX, bcc_app)
    r = TestClient(app).get("/bcc/api/predictions?path=patient_4711&label=benign", headers=site["auth"])
    assert r.status_code == 200
    assert seen and b"patient_4711" not in seen[-1] and b"label=benign" in seen[-1]


def test_file_names_are_escaped_in_the_pages(site):
    """A file name is data, never markup: a hostile one shows as text."""
    from bcc_pipeline.store import Prediction, session_scope

    hostile = 'ward_x/<img src=x onerror="alert(1)">.png'
    with session_scope(site["settings"].database_url) as db:
        db.add(
            Prediction(
                image_sha256="c" * 64,
                model_version=site["versions"][1],
                prob_malignant=0.9,
                label="malignant",
                threshold=0.5,
                source_path=hostile,
                run_id="<b>run</b>",
            )
        )
    html = site["client"].get("/bcc/predictions?path=ward_x", headers=site["auth"]).text
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;.png" in html
    assert "<img src=x" not in html and "<b>run</b>" not in html
