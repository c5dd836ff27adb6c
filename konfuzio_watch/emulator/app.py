"""The Flask app of the emulated Konfuzio REST API v3 (token auth, DRF-style bodies, fault knobs)."""

from __future__ import annotations

import contextlib
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import urlencode

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from konfuzio_watch.emulator import forms

if TYPE_CHECKING:
    from konfuzio_watch.emulator.core import Emulator

log = logging.getLogger(__name__)

DEFAULT_PAGE_LIMIT = 10
MAX_PAGE_LIMIT = 1000
NOT_FOUND = {"detail": "Not found."}
INVALID_CHOICE = "Select a valid choice. That choice is not one of the available choices."


def create_app(emu: Emulator) -> Flask:
    """Build the WSGI app serving ``emu``'s documents and projects."""
    app = Flask("konfuzio_watch.emulator")
    app.before_request(lambda: _gate(emu))
    app.after_request(_reason_phrase)
    _add_document_routes(app, emu)
    _add_project_routes(app, emu)
    _add_error_handlers(app)
    return app


def _gate(emu: Emulator) -> Response | None:
    """Faults first (as a proxy would answer), then token auth, then throttling (as DRF orders them)."""
    if not request.path.startswith("/api/"):
        return None
    knobs = emu.knobs
    if knobs.outage:
        return Response("503 Service Temporarily Unavailable\n", status=503, mimetype="text/plain")
    if emu.chance(knobs.rate_5xx):
        return _server_error(emu)
    denied = _authenticate(request.headers.get("Authorization", ""), emu.token)
    if denied is not None:
        return denied
    if emu.chance(knobs.rate_429):
        return _throttled(knobs.retry_after_s)
    return None


def _reason_phrase(response: Response) -> Response:
    """Werkzeug says "404 NOT FOUND"; Django (and the SDK's error messages) say "404 Not Found"."""
    with contextlib.suppress(ValueError):  # a code http.HTTPStatus does not know: leave it
        response.status = f"{response.status_code} {HTTPStatus(response.status_code).phrase}"
    return response


def _server_error(emu: Emulator) -> Response:
    if emu.chance(0.5):
        return Response("<html><body><h1>502 Bad Gateway</h1></body></html>\n", 502, mimetype="text/html")
    return _json({"detail": "Service temporarily unavailable, try again later."}, 503)


def _authenticate(header: str, token: str) -> Response | None:
    parts = header.split()
    if not parts or parts[0].lower() != "token":
        return _unauthorized("Authentication credentials were not provided.")
    if len(parts) == 1:
        return _unauthorized("Invalid token header. No credentials provided.")
    if len(parts) > 2:
        return _unauthorized("Invalid token header. Token string should not contain spaces.")
    if parts[1] != token:
        return _unauthorized("Invalid token.")
    return None


def _unauthorized(detail: str) -> Response:
    response = _json({"detail": detail}, 401)
    response.headers["WWW-Authenticate"] = "Token"
    return response


def _throttled(retry_after_s: int) -> Response:
    wait = max(0, int(retry_after_s))
    unit = "second" if wait == 1 else "seconds"
    response = _json({"detail": f"Request was throttled. Expected available in {wait} {unit}."}, 429)
    response.headers["Retry-After"] = str(wait)
    return response


def _add_document_routes(app: Flask, emu: Emulator) -> None:
    @app.post("/api/v3/documents/", strict_slashes=False)
    def upload_document() -> Response:
        arrived_at = time.time()  # Waitress has read the whole body by now
        upload, errors = forms.parse_upload(request.form, request.files, emu.project_ids)
        if upload is None:
            return _json(errors, 400)
        return _json(emu.accept_upload(upload, arrived_at), 201)

    @app.get("/api/v3/documents/", strict_slashes=False)
    def list_documents() -> Response:
        project, errors = _int_filter("project", emu.project_ids)
        category, category_errors = _int_filter("category", None)
        if errors or category_errors:
            return _json({**errors, **category_errors}, 400)
        return _json(_paginate(emu.store.list_meta(project, category)))

    @app.get("/api/v3/documents/<int:doc_id>/", strict_slashes=False)
    def document_details(doc_id: int) -> Response:
        details = emu.store.details(doc_id)
        return _json(details) if details is not None else _json(NOT_FOUND, 404)

    @app.get("/api/v3/documents/<int:doc_id>/bbox")
    @app.get("/api/v3/documents/<int:doc_id>/bbox/")
    def document_bbox(doc_id: int) -> Response:
        bbox = emu.store.bbox(doc_id)
        return _json({"bbox": bbox}) if bbox is not None else _json(NOT_FOUND, 404)

    @app.get("/api/v3/annotations/", strict_slashes=False)
    def list_annotations() -> Response:
        return _json(_paginate([]))


def _add_project_routes(app: Flask, emu: Emulator) -> None:
    @app.get("/api/v3/projects/", strict_slashes=False)
    def list_projects() -> Response:
        return _json(_paginate([_project(pid) for pid in sorted(emu.project_ids)]))

    @app.get("/api/v3/projects/<int:project_id>/", strict_slashes=False)
    def project_details(project_id: int) -> Response:
        if project_id not in emu.project_ids:
            return _json(NOT_FOUND, 404)
        return _json(_project(project_id))

    # What Project(id_=...) downloads. The emulated projects have no categories, label sets or
    # labels (see _project), so these answer empty pages, filtered by project like the real API.
    @app.get("/api/v3/categories/", strict_slashes=False, endpoint="list_categories")
    @app.get("/api/v3/label-sets/", strict_slashes=False, endpoint="list_label_sets")
    @app.get("/api/v3/labels/", strict_slashes=False, endpoint="list_labels")
    def list_project_schema() -> Response:
        _, errors = _int_filter("project", emu.project_ids)
        if errors:
            return _json(errors, 400)
        return _json(_paginate([]))

    @app.get("/")
    def index() -> Response:
        return _json({"service": "konfuzio-emulator", "api": "/api/v3/"})


def _project(project_id: int) -> dict:
    return {
        "id": project_id,
        "name": f"Emulated project {project_id}",
        "storage_name": f"emulated_project_{project_id}",
        "labels": [],
        "label_sets": [],
        "categories": [],
        "ocr_method": "default",
        "created_at": "2024-01-01T00:00:00+00:00",
    }


def _add_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException) -> Response:
        if error.code == 404:
            return _json(NOT_FOUND, 404)
        if error.code == 405:
            return _json({"detail": f'Method "{request.method}" not allowed.'}, 405)
        return _json({"detail": error.description or error.name}, error.code or 400)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception) -> Response:
        log.exception("emulator request failed: %s %s", request.method, request.path)
        return _json({"detail": "A server error occurred."}, 500)


def _int_filter(key: str, allowed: object) -> tuple[int | None, dict]:
    raw = request.args.get(key, "")
    if raw == "":
        return None, {}
    try:
        value = int(raw)
    except ValueError:
        return None, {key: [INVALID_CHOICE]}
    if allowed is not None and value not in allowed:  # type: ignore[operator]
        return None, {key: [INVALID_CHOICE]}
    return value, {}


def _paginate(items: list[dict]) -> dict:
    """DRF LimitOffsetPagination with absolute next/previous URLs built from the request."""
    limit = min(_int_arg("limit", DEFAULT_PAGE_LIMIT), MAX_PAGE_LIMIT) or DEFAULT_PAGE_LIMIT
    offset = _int_arg("offset", 0)
    count = len(items)
    next_url = _page_url(limit, offset + limit) if offset + limit < count else None
    previous_url = None
    if offset > 0:
        previous_url = _page_url(limit, offset - limit if offset - limit > 0 else None)
    return {
        "count": count,
        "next": next_url,
        "previous": previous_url,
        "results": items[offset : offset + limit],
    }


def _int_arg(key: str, default: int) -> int:
    try:
        value = int(request.args.get(key, default))
    except ValueError:
        return default
    return value if value >= 0 else default


def _page_url(limit: int, offset: int | None) -> str:
    args = {k: v for k, v in request.args.items(multi=True) if k not in ("limit", "offset")}
    args["limit"] = str(limit)
    if offset is not None:
        args["offset"] = str(offset)
    return f"{request.base_url}?{urlencode(args)}"


def _json(body: object, status: int = 200) -> Response:
    response = jsonify(body)
    response.status_code = status
    return response
