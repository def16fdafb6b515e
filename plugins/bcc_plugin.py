"""BCC pages in the Airflow UI: predictions, model versions and their quality, scoring runs, the inbox.

A FastAPI app that Airflow's api-server mounts under ``/bcc`` (plus a "BCC" entry in the Airflow
navigation). Server-rendered HTML (Jinja2, no JavaScript, no external assets) and JSON under
``/bcc/api/...`` for scripts. The plugin only renders: every query is a read-only function of
:mod:`bcc_pipeline.predictions` and :mod:`bcc_pipeline.overview`.

Security:

* Every route requires an authenticated Airflow user through Airflow's own dependency
  (``requires_authenticated``), set once on the app so no route can be added without it. A request
  without a token gets 401; a browser asking for a page is sent to the Airflow login page instead, and
  comes back after logging in (the UI's ``_token`` cookie authenticates the pages).
* Files are served only by content hash (archived images) or by a plain file name inside a registered
  model version's plots folder; :mod:`bcc_pipeline.overview` resolves them and refuses anything outside
  ``BCC_HOME`` (``..``, absolute paths, encoded forms, links pointing out).
* The access log never sees the path filter: its value is masked in the request's query string once
  the response is sent. Pages are sent with ``Cache-Control: no-store``.

Importing this module loads no TensorFlow, Keras or OpenCV (the api-server imports every plugin).
"""

from __future__ import annotations

import datetime as dt
import io
import math
import os
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlencode

from airflow.api_fastapi.app import get_auth_manager
from airflow.api_fastapi.core_api.security import GetUserDep, requires_authenticated
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.templating import Jinja2Templates
from starlette.exceptions import HTTPException as StarletteHTTPException

from bcc_pipeline import ui_text
from bcc_pipeline.config import Settings, load_settings
from bcc_pipeline.errors import BCCError, ConfigError
from bcc_pipeline.overview import (
    archived_image,
    archived_images,
    inbox_status,
    model_version_detail,
    model_versions,
    plot_file,
    promotion_log,
    rejection_summary,
    scoring_runs,
)
from bcc_pipeline.predictions import (
    SORT_KEYS,
    count_predictions,
    csv_chunks,
    json_chunks,
    parse_since,
    query_predictions,
)

URL_PREFIX = "/bcc"
PAGE_SIZES = (25, 50, 100, 250)
THUMBNAIL_PX = 112
MASKED_QUERY_KEYS = ("path",)  # may name a patient or a case: never in the access log
IMAGE_TYPES = {
    ".png": "image/png",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
}

templates = Jinja2Templates(directory=str(Path(__file__).with_name("bcc_templates")))


def bcc_settings() -> Settings:
    """The project's settings, read from the environment on each request (BCC_HOME, ...), with the database
    the DAGs' tasks use: ``BCC_DATABASE_URL``, else the Airflow connection ``bcc_db``, else SQLite in
    ``BCC_HOME`` (:func:`bcc_pipeline.airflow_db.database_url`)."""
    from bcc_pipeline.airflow_db import database_url

    url = database_url(_server_connection)
    return load_settings(overrides={"database_url": url} if url else None)


def _server_connection(conn_id: str) -> Any:
    """The Airflow connection ``conn_id`` as the api-server reads it (secrets backends, environment
    variables, then the metadata database); None when there is none."""
    from airflow.exceptions import AirflowNotFoundException
    from airflow.models.connection import Connection

    try:
        return Connection.get_connection_from_secrets(conn_id)
    except AirflowNotFoundException:
        return None


SettingsDep = Annotated[Settings, Depends(bcc_settings)]

bcc_app = FastAPI(
    title="BCC pages",
    description="Predictions, model versions, scoring runs and the inbox "
    "of the BCC pipeline. Every route requires an authenticated Airflow user.",
    dependencies=[Depends(requires_authenticated())],
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


# -- auth failures, errors and response headers -------------------------------------------------
def _wants_page(request: Request) -> bool:
    return (
        request.method == "GET"
        and not request.url.path.startswith(f"{URL_PREFIX}/api/")
        and "text/html" in request.headers.get("accept", "")
    )


@bcc_app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
    if exc.status_code in (401, 403) and _wants_page(request):
        # A browser without a (valid) session: to the Airflow login page, and back here afterwards.
        # ``next`` is relative: the login page only follows a same-origin target, and a Host header
        # cannot point it elsewhere.
        # The path filter (which may name a patient) is left out: the login page's own access log would
        # show it, and the bookmark comes back without it.
        query = urlencode([(k, v) for k, v in parse_qsl(request.url.query) if k not in MASKED_QUERY_KEYS])
        back = request.url.path + (f"?{query}" if query else "")
        return RedirectResponse(get_auth_manager().get_url_login(next_url=back), status_code=303)
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


@bcc_app.exception_handler(BCCError)
async def _bcc_error(request: Request, exc: BCCError) -> Response:
    status = 400 if isinstance(exc, ConfigError) else 503
    if _wants_page(request):
        return templates.TemplateResponse(
            request, "error.html", {"page": "", "message": str(exc), "user": None}, status_code=status
        )
    return JSONResponse({"detail": str(exc)}, status_code=status)


@bcc_app.middleware("http")
async def _headers_and_quiet_logs(request: Request, call_next: Any) -> Response:
    response = await call_next(request)
    response.headers.setdefault("Cache-Control", "no-store")
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; "
        "form-action 'self'; frame-ancestors 'self'; base-uri 'none'"
    )
    # The api-server's access log reads the query string from this (shared) scope after the response.
    raw = request.scope.get("query_string", b"")
    if raw:
        pairs = parse_qsl(raw.decode("latin-1"), keep_blank_values=True)
        if any(k in MASKED_QUERY_KEYS and v for k, v in pairs):
            request.scope["query_string"] = urlencode(
                [(k, "***" if k in MASKED_QUERY_KEYS and v else v) for k, v in pairs]
            ).encode()
    return response


# -- filters shared by the predictions page, the CSV and the JSON ---------------------------------
class PredictionFilter:
    """The predictions filters, from the query string; ``since``/``until`` accept what ``bcc predictions
    --since`` accepts (a date, a date-time, or an age such as 12h or 7d)."""

    def __init__(
        self,
        label: Annotated[str | None, Query(pattern="^(benign|malignant)?$")] = None,
        since: str | None = None,
        until: str | None = None,
        model_version: str | None = None,
        path: Annotated[str | None, Query(max_length=500)] = None,
        sort: Annotated[str, Query(max_length=40)] = "-scored_at",
        latest: bool = False,
    ) -> None:
        self.label = label or None
        self.since_text, self.until_text = (since or "").strip(), (until or "").strip()
        self.model_version = model_version or None
        self.path = path or None
        self.sort = sort if sort.removeprefix("-") in SORT_KEYS else "-scored_at"
        self.latest = latest
        self.since = parse_since(self.since_text) if self.since_text else None
        self.until = self._until(self.until_text) if self.until_text else None

    @staticmethod
    def _until(text: str) -> dt.datetime:
        t = parse_since(text)
        # A bare date means the whole of that day: up to the next midnight.
        return t + dt.timedelta(days=1) if len(text) == 10 and text[4] == "-" else t

    def query(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "since": self.since,
            "until": self.until,
            "model_version": self.model_version,
            "path_contains": self.path,
            "latest": self.latest,
        }

    def params(self, **change: Any) -> str:
        """The query string of these filters, with ``change`` applied (for links)."""
        p = {
            "label": self.label,
            "since": self.since_text,
            "until": self.until_text,
            "model_version": self.model_version,
            "path": self.path,
            "sort": self.sort,
            "latest": "true" if self.latest else None,
        } | change
        return urlencode({k: v for k, v in p.items() if v not in (None, "", "-scored_at")})


FilterDep = Annotated[PredictionFilter, Depends(PredictionFilter)]


# -- pages ------------------------------------------------------------------------------------
def _page(request: Request, name: str, user: Any, **ctx: Any) -> Response:
    return templates.TemplateResponse(request, name, {"user": user.get_name(), "prefix": URL_PREFIX, **ctx})


@bcc_app.get("/", include_in_schema=False)
def index() -> RedirectResponse:
    return RedirectResponse(f"{URL_PREFIX}/predictions", status_code=303)


@bcc_app.get("/predictions", response_class=Response)
def predictions_page(
    request: Request,
    user: GetUserDep,
    s: SettingsDep,
    f: FilterDep,
    page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
    per_page: Annotated[int, Query(ge=1, le=500)] = 50,
) -> Response:
    total = count_predictions(s, **f.query())
    pages = max(1, math.ceil(total / per_page))
    page = min(page, pages)
    rows = list(query_predictions(s, **f.query(), sort=f.sort, limit=per_page, offset=(page - 1) * per_page))
    models = {m["version"]: m for m in model_versions(s, champion_first=True)}
    available = set(archived_images(s, [r["sha256"] for r in rows]))
    return _page(
        request,
        "predictions.html",
        user,
        page_name="predictions",
        rows=rows,
        total=total,
        page=page,
        available=available,
        pages=pages,
        per_page=per_page,
        page_sizes=PAGE_SIZES,
        f=f,
        models=models,
        sort_keys=SORT_KEYS,
        first=(page - 1) * per_page + 1 if rows else 0,
        last=(page - 1) * per_page + len(rows),
    )


@bcc_app.get("/models", response_class=Response)
def models_page(request: Request, user: GetUserDep, s: SettingsDep) -> Response:
    models = model_versions(s, champion_first=True)
    for m in models:  # the known metrics in a fixed order, then any others by name
        names = {n for split in m["metrics"].values() for n in split}
        m["metric_names"] = [n for n in ui_text.SHOWN_METRICS if n in names] + sorted(
            names - set(ui_text.SHOWN_METRICS)
        )
    return _page(request, "models.html", user, page_name="models", models=models, promotions=promotion_log(s))


@bcc_app.get("/models/{version}", response_class=Response)
def version_page(request: Request, user: GetUserDep, s: SettingsDep, version: str) -> Response:
    """One model version: its holdout metrics with intervals, plots, the decisions about it and its model
    card (where a prediction row's model link leads)."""
    detail = _version_detail(s, version)
    return _page(request, "version.html", user, page_name="models", **detail)


def _version_detail(s: Settings, version: str) -> dict[str, Any]:
    detail = model_version_detail(s, version)
    if detail is None:
        raise HTTPException(status_code=404, detail="no such model version")
    return detail


@bcc_app.get("/runs", response_class=Response)
def runs_page(
    request: Request,
    user: GetUserDep,
    s: SettingsDep,
    run_id: Annotated[str | None, Query(max_length=255)] = None,
) -> Response:
    return _page(
        request,
        "runs.html",
        user,
        page_name="runs",
        runs=scoring_runs(s, limit=200),
        rejections=rejection_summary(s, run_id=run_id or None),
        run_id=run_id or None,
    )


@bcc_app.get("/inbox", response_class=Response)
def inbox_page(request: Request, user: GetUserDep, s: SettingsDep) -> Response:
    return _page(request, "inbox.html", user, page_name="inbox", inbox=inbox_status(s))


# -- files ------------------------------------------------------------------------------------
@bcc_app.get("/images/{sha256}/thumbnail.png")
def thumbnail(sha256: str, s: SettingsDep) -> Response:
    """A small PNG of the archived image with this content hash (404 once the archive no longer has it)."""
    path = _archived(s, sha256)
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = s.max_pixels  # the scoring limit: a decompression bomb is refused here too
    try:
        with Image.open(path) as im:
            im.draft("RGB", (THUMBNAIL_PX * 2, THUMBNAIL_PX * 2))
            im.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            buf = io.BytesIO()
            im.convert("RGB").save(buf, format="PNG")
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise HTTPException(status_code=404, detail="no preview for this image") from exc
    return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@bcc_app.get("/images/{sha256}")
def archived(sha256: str, s: SettingsDep) -> FileResponse:
    """The archived image itself (inline, typed by its extension)."""
    path = _archived(s, sha256)
    return FileResponse(
        path,
        media_type=IMAGE_TYPES.get(path.suffix.lower(), "application/octet-stream"),
        content_disposition_type="inline",
        filename=f"{sha256[:16]}{path.suffix.lower()}",
    )


@bcc_app.get("/models/{version}/plots/{name}")
def plot(version: str, name: str, s: SettingsDep) -> FileResponse:
    try:
        path = plot_file(s, version, name)
    except ConfigError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    if path is None:
        raise HTTPException(status_code=404, detail="no such plot")
    return FileResponse(path, media_type="image/png")


def _archived(s: Settings, sha256: str) -> Path:
    try:
        path = archived_image(s, sha256)
    except ConfigError as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    if path is None:
        raise HTTPException(status_code=404, detail="the archive no longer holds this image")
    return path


# -- downloads and JSON -----------------------------------------------------------------------
@bcc_app.get("/predictions.csv")
def predictions_csv(s: SettingsDep, f: FilterDep) -> StreamingResponse:
    """Every prediction matching the filters (no paging), the columns of ``bcc predictions --format csv``."""
    rows = query_predictions(s, **f.query(), sort=f.sort)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
    return StreamingResponse(
        csv_chunks(rows),
        media_type="text/csv; charset=utf-8",
        headers={"Content-Disposition": f'attachment; filename="bcc-predictions-{stamp}.csv"'},
    )


@bcc_app.get("/api/predictions")
def api_predictions(
    s: SettingsDep,
    f: FilterDep,
    limit: Annotated[int | None, Query(ge=0)] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> StreamingResponse:
    """The rows ``bcc predictions --format json`` prints for the same filters (all of them unless
    ``limit``); ``X-Total-Count`` is the number matching the filters."""
    total = count_predictions(s, **f.query())
    rows = query_predictions(s, **f.query(), sort=f.sort, limit=limit, offset=offset)
    return StreamingResponse(
        json_chunks(rows), media_type="application/json", headers={"X-Total-Count": str(total)}
    )


@bcc_app.get("/api/models")
def api_models(s: SettingsDep) -> dict[str, Any]:
    """Model versions (champion first) with metrics per split and plot URLs, and the promotion log."""
    models = model_versions(s, champion_first=True)
    for m in models:
        m["plot_urls"] = [f"{URL_PREFIX}/models/{m['version']}/plots/{p}" for p in m["plots"]]
        m["url"] = f"{URL_PREFIX}/models/{m['version']}"
    return {"models": models, "promotions": promotion_log(s)}


@bcc_app.get("/api/models/{version}")
def api_version(s: SettingsDep, version: str) -> dict[str, Any]:
    """One model version (as in ``/api/models``), the decisions about it and its model card (markdown)."""
    d = _version_detail(s, version)
    d["m"]["plot_urls"] = [f"{URL_PREFIX}/models/{version}/plots/{p}" for p in d["m"]["plots"]]
    return {"model": d["m"], "decisions": d["decisions"], "model_card": d["card"]}


@bcc_app.get("/api/runs")
def api_runs(
    s: SettingsDep,
    run_id: Annotated[str | None, Query(max_length=255)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 200,
) -> dict[str, Any]:
    """Scoring runs (newest first) with their counts, and rejections grouped by reason."""
    return {"runs": scoring_runs(s, limit=limit), "rejections": rejection_summary(s, run_id=run_id or None)}


@bcc_app.get("/api/inbox")
def api_inbox(s: SettingsDep) -> dict[str, Any]:
    """Files waiting, files still being written, ignored files, and the quarantine with reasons."""
    return inbox_status(s)


# Registered last, so that it only gets what no route above takes: an unknown path, or a method other
# than GET on a known one (FastAPI would answer those 404/405 before any dependency runs). The app's auth
# dependency runs first here too, so anyone without a login gets 401 (a browser the login page) for every
# path and method under the prefix, and a logged-in user learns only 404 or 405. Every route is read-only.
@bcc_app.api_route(
    "/{rest:path}",
    methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
    include_in_schema=False,
)
def no_such_route(request: Request, rest: str) -> Response:
    if request.method == "GET":
        raise HTTPException(status_code=404, detail="Not Found")
    raise HTTPException(status_code=405, detail="Method Not Allowed", headers={"Allow": "GET"})


# -- template helpers (bcc_pipeline.ui_text) ------------------------------------------------------
templates.env.filters["fmt"] = ui_text.fmt
templates.env.filters["metric"] = ui_text.metric
templates.env.filters["when"] = ui_text.when
templates.env.filters["basename"] = lambda p: os.path.basename(str(p))


class BarePrefix:
    """``/bcc`` without the slash would reach the Airflow UI's catch-all page instead of this app: it is
    answered as ``/bcc/`` (login required, like every route here). A root middleware of the api-server."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("path") == URL_PREFIX:
            scope = dict(scope, path=URL_PREFIX + "/", raw_path=(URL_PREFIX + "/").encode())
        await self.app(scope, receive, send)


class BCCPlugin(AirflowPlugin):
    name = "bcc"
    fastapi_apps = [{"app": bcc_app, "url_prefix": URL_PREFIX, "name": "BCC pages"}]
    fastapi_root_middlewares = [
        {"middleware": BarePrefix, "args": [], "kwargs": {}, "name": "BCC bare prefix"}
    ]
    external_views = [
        {"name": "BCC", "href": f"{URL_PREFIX}/predictions", "destination": "nav", "url_route": "bcc"}
    ]
