"""The Flask app of the emulated Konfuzio REST API v3 (token auth, DRF-style bodies, fault knobs)."""

from __future__ import annotations

import contextlib
import logging
import time
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode

import orjson
from flask import Flask, Response, g, jsonify, request
from flask.json.provider import DefaultJSONProvider
from werkzeug.exceptions import HTTPException

from konfuzio_watch.emulator import control, faults, forms, pdf
from konfuzio_watch.emulator.accounting import KINDS
from konfuzio_watch.emulator.schema import schema_for

if TYPE_CHECKING:
    from konfuzio_watch.emulator.core import Emulator

log = logging.getLogger(__name__)

DEFAULT_PAGE_LIMIT = 10
MAX_PAGE_LIMIT = 1000
NOT_FOUND = {"detail": "Not found."}
NO_OCR_YET = {"detail": "The OCR version of this document is not available yet."}
INVALID_CHOICE = "Select a valid choice. That choice is not one of the available choices."
API_PREFIXES = ("/api/", "/doc/")  # what the token, the fault knobs and the accounting cover


def create_app(emu: Emulator) -> Flask:
    """Build the WSGI app serving ``emu``'s documents and projects."""
    app = Flask("konfuzio_watch.emulator")
    app.json = _OrjsonProvider(app)
    app.before_request(lambda: _gate(emu))
    app.after_request(_reason_phrase)
    app.after_request(lambda response: _account(emu, response))
    _add_document_routes(app, emu)
    _add_file_routes(app, emu)
    _add_project_routes(app, emu)
    control.add_routes(app, emu)
    _add_error_handlers(app)
    return app


class _OrjsonProvider(DefaultJSONProvider):
    """Answers encoded by orjson: the character boxes are most of the bytes, and json's encoder made
    the emulator spend as much CPU per document as the daemon, on the same two cores in the
    benchmarks. Keys keep their order (as Django REST framework sends them, unsorted)."""

    def dumps(self, obj: object, **kwargs: object) -> str:
        return orjson.dumps(obj, default=self.default, option=orjson.OPT_NON_STR_KEYS).decode()


def _gate(emu: Emulator) -> Response | None:
    """Fault rules and faults first (as a proxy would answer), then token auth, then throttling
    (as DRF orders them)."""
    if not request.path.startswith(API_PREFIXES):
        return None
    knobs = emu.knobs
    rule = faults.take(knobs.fault_rules, request.method, request.path, forwarding=False)
    if rule is not None:
        return rule.response()
    if knobs.outage:
        return Response("503 Service Temporarily Unavailable\n", status=503, mimetype="text/plain")
    if emu.chance(knobs.rate_5xx):
        return _server_error(emu)
    forward = None
    if request.method == "POST" and request.endpoint == "upload_document":
        forward = faults.take(knobs.fault_rules, request.method, request.path, forwarding=True)
    denied = _authenticate(request.headers.get("Authorization", ""), emu.token)
    if denied is None and emu.chance(knobs.rate_429):
        denied = _throttled(knobs.retry_after_s)
    if denied is not None:  # the app refuses it: nothing is stored, whatever the gateway said
        return forward.response() if forward is not None else denied
    g.forward_rule = forward
    return None


def _reason_phrase(response: Response) -> Response:
    """Werkzeug says "404 NOT FOUND"; Django (and the SDK's error messages) say "404 Not Found"."""
    with contextlib.suppress(ValueError):  # a code http.HTTPStatus does not know: leave it
        response.status = f"{response.status_code} {HTTPStatus(response.status_code).phrase}"
    return response


def _account(emu: Emulator, response: Response) -> Response:
    if request.path.startswith(API_PREFIXES):
        kind = KINDS.get(request.endpoint or "", "other")
        emu.accounting.record(kind, response.status_code, response.content_length or 0, request.content_length or 0)
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


def _throttled(retry_after: int | str) -> Response:
    """DRF's 429. An int is seconds; a str goes into Retry-After verbatim (an HTTP date, a huge
    number): what a client must survive, whatever a proxy in between writes there."""
    if isinstance(retry_after, str):
        header = retry_after
        wait = int(retry_after) if retry_after.strip().isdigit() else None
    else:
        wait = max(0, int(retry_after))
        header = str(wait)
    detail = "Request was throttled."
    if wait is not None:
        detail += f" Expected available in {wait} {'second' if wait == 1 else 'seconds'}."
    response = _json({"detail": detail}, 429)
    response.headers["Retry-After"] = header
    return response


def _add_document_routes(app: Flask, emu: Emulator) -> None:
    @app.post("/api/v3/documents/", strict_slashes=False)
    def upload_document() -> Response:
        arrived_at = time.time()  # Waitress has read the whole body by now
        upload, errors = forms.parse_upload(request.form, request.files, emu.project_ids, emu.blobs)
        forward = g.get("forward_rule")
        if forward is not None:  # the gateway gave up at once; the app goes on in the background
            if upload is not None:
                emu.forward_upload(upload, forward, arrived_at)
            return forward.response()
        if upload is None:
            return _json(errors, 400)
        if emu.chance(emu.knobs.upload_500_rate):  # the handler failed before it stored anything
            return _json({"detail": "Server Error"}, 500)
        return _json(emu.accept_upload(upload, arrived_at), 201)

    @app.get("/api/v3/documents/", strict_slashes=False)
    def list_documents() -> Response:
        project, errors = _int_filter("project", emu.project_ids)
        category, category_errors = _int_filter("category", None)
        if errors or category_errors:
            return _json({**errors, **category_errors}, 400)
        limit, offset = _limit_offset()
        ordering = request.args.get("ordering", "-id")
        count, page = emu.store.list_page(project, category, ordering, offset, limit)
        return _json(_page(count, page, limit, offset))

    @app.get("/api/v3/documents/<int:doc_id>/", strict_slashes=False)
    def document_details(doc_id: int) -> Response:
        details = emu.store.details_json(doc_id)
        return Response(details, mimetype="application/json") if details is not None else _json(NOT_FOUND, 404)

    @app.delete("/api/v3/documents/<int:doc_id>/", strict_slashes=False)
    def delete_document(doc_id: int) -> Response:
        if not emu.delete_document(doc_id):
            return _json(NOT_FOUND, 404)
        return Response(status=204)

    @app.get("/api/v3/documents/<int:doc_id>/bbox")
    @app.get("/api/v3/documents/<int:doc_id>/bbox/")
    def document_bbox(doc_id: int) -> Response:
        bbox = emu.store.bbox(doc_id)
        return _json({"bbox": bbox}) if bbox is not None else _json(NOT_FOUND, 404)

    @app.get("/api/v3/annotations/", strict_slashes=False)
    def list_annotations() -> Response:
        """``?document=<id>``: the document's annotations (none before it is done; an unknown or
        missing document gives an empty page, as a filter that matches nothing)."""
        document, errors = _int_filter("document", None)
        if errors:
            return _json(errors, 400)
        annotations = emu.store.annotations(document) if document is not None else None
        return _json(_paginate(annotations or []))


def _add_file_routes(app: Flask, emu: Emulator) -> None:
    """The files, where ``download_file_konfuzio_api`` looks (``session.host`` + ``/doc/...``)."""

    @app.get("/doc/show/<int:doc_id>/", strict_slashes=False)
    def searchable_pdf(doc_id: int) -> Response:
        doc = emu.store.document(doc_id)
        if doc is None:
            return _json(NOT_FOUND, 404)
        if doc.details["text"] is None:
            return _json(NO_OCR_YET, 404)
        body = pdf.searchable_pdf(doc.layout.text, doc.page_sizes, doc.details["data_file_name"])
        name = doc.details["data_file_name"].rsplit(".", 1)[0] + ".pdf"
        return _file_response([body], len(body), "application/pdf", name)

    @app.get("/doc/show-original/<int:doc_id>/", strict_slashes=False)
    def original_file(doc_id: int) -> Response:
        doc = emu.store.document(doc_id)
        if doc is None or doc.original is None:
            return _json(NOT_FOUND, 404)
        blob = doc.original
        return _file_response(blob.chunks(), blob.size, doc.facts.media_type, doc.details["data_file_name"])


def _file_response(chunks, size: int, media_type: str, name: str) -> Response:  # type: ignore[no-untyped-def]
    """Streamed, with Content-Length, so a client can stream it to disk and check its length."""
    response = Response(chunks, mimetype=media_type, direct_passthrough=True)
    response.headers["Content-Length"] = str(size)
    response.headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(name)}"
    return response


def _add_project_routes(app: Flask, emu: Emulator) -> None:
    @app.get("/api/v3/projects/", strict_slashes=False)
    def list_projects() -> Response:
        return _json(_paginate([_project(pid) for pid in sorted(emu.project_ids)]))

    @app.get("/api/v3/projects/<int:project_id>/", strict_slashes=False)
    def project_details(project_id: int) -> Response:
        if project_id not in emu.project_ids:
            return _json(NOT_FOUND, 404)
        return _json(_project(project_id))

    # What Project(id_=...) downloads (categories) and get_project_labels/_label_sets read.
    @app.get("/api/v3/categories/", strict_slashes=False)
    def list_categories() -> Response:
        return _schema_list(emu, lambda schema: schema.categories_json())

    @app.get("/api/v3/label-sets/", strict_slashes=False)
    def list_label_sets() -> Response:
        return _schema_list(emu, lambda schema: schema.label_sets_json())

    @app.get("/api/v3/labels/", strict_slashes=False)
    def list_labels() -> Response:
        return _schema_list(emu, lambda schema: schema.labels_json())

    @app.get("/")
    def index() -> Response:
        return _json({"service": "konfuzio-emulator", "api": "/api/v3/"})


def _schema_list(emu: Emulator, render) -> Response:  # type: ignore[no-untyped-def]
    """A paginated list from each project's schema, filtered by ``?project=`` like the real API."""
    project, errors = _int_filter("project", emu.project_ids)
    if errors:
        return _json(errors, 400)
    projects = [project] if project is not None else sorted(emu.project_ids)
    return _json(_paginate([item for pid in projects for item in render(schema_for(pid))]))


def _project(project_id: int) -> dict:
    schema = schema_for(project_id)
    return {
        "id": project_id,
        "name": f"Emulated project {project_id}",
        "storage_name": f"emulated_project_{project_id}",
        "labels": [label.id for label in schema.labels],
        "label_sets": [label_set.id for label_set in schema.label_sets],
        "categories": [category.id for category in schema.categories],
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


def _limit_offset() -> tuple[int, int]:
    limit = min(_int_arg("limit", DEFAULT_PAGE_LIMIT), MAX_PAGE_LIMIT) or DEFAULT_PAGE_LIMIT
    return limit, _int_arg("offset", 0)


def _paginate(items: list[dict]) -> dict:
    """DRF LimitOffsetPagination of a whole list."""
    limit, offset = _limit_offset()
    return _page(len(items), items[offset : offset + limit], limit, offset)


def _page(count: int, results: list[dict], limit: int, offset: int) -> dict:
    """A DRF LimitOffsetPagination body with absolute next/previous URLs built from the request."""
    next_url = _page_url(limit, offset + limit) if offset + limit < count else None
    previous_url = None
    if offset > 0:
        previous_url = _page_url(limit, offset - limit if offset - limit > 0 else None)
    return {"count": count, "next": next_url, "previous": previous_url, "results": results}


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
