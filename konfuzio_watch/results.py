"""Pure: the rich result of a done document, from the API's answers. No I/O.

On top of today's OCR result (``export.build_result``): the document's category, every extracted
value with its position (``annotations``), the values by label set and label for scripts
(``fields``), a link to the document in the Konfuzio web app, and a revision number, because a done
document can change later (review, re-extraction) and be exported again.
The parts: ``extractions`` (what was found, and the rules for it), ``project_catalog`` (names by id)
and ``fingerprint`` (whether a revision is new).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

from . import export
from .extractions import build_extractions
from .journal import Row
from .project_catalog import ProjectCatalog

REDACTED = "<redacted>"


def web_url(host: str, document_id: int) -> str:
    """The document in the Konfuzio web app (the Document Validation UI): ``{host}/d/<id>/``.

    konfuzio-sdk 0.3.52 has no helper for it: its ``get_document_details_url`` is the API's JSON
    (token needed), and its only web link is ``get_annotation_view_url`` (``{host}/a/<annotation
    id>``). Konfuzio documents ``/d/<id>/`` as the link to a document (server changelog, DVUI docs).
    """
    return f"{host.rstrip('/')}/d/{int(document_id)}/"


def redact_callback_url(details: dict[str, Any]) -> dict[str, Any]:
    """A shallow copy of ``details`` whose ``callback_url`` no longer carries our per-file token.

    The token is the last path segment (``tokens.token_hash_of``); it becomes ``<redacted>``. User
    info, query and fragment go too: a result file must give nobody a way to post a callback.
    """
    out = dict(details)
    url = out.get("callback_url")
    if isinstance(url, str) and url:
        out["callback_url"] = _redact(url)
    return out


def _redact(url: str) -> str:
    try:
        parts = urlsplit(url)
        host = parts.netloc.rpartition("@")[2]
    except ValueError:
        return REDACTED
    path = parts.path
    trailing = "/" if path.endswith("/") else ""
    head, _, last = path.rstrip("/").rpartition("/")
    if last:
        path = f"{head}/{REDACTED}{trailing}"
    return urlunsplit((parts.scheme, host, path, "", ""))


def build_result(
    row: Row,
    details: dict[str, Any],
    bbox: dict[str, Any] | None,
    now: float,
    *,
    annotations: list[dict] | None = None,
    catalog: ProjectCatalog | None = None,
    host: str | None = None,
    revision: int = 1,
    include_bbox: bool = True,
) -> dict[str, Any]:
    """``export.build_result`` (every key it has) plus category, fields, annotations, web_url,
    revision and updated_at; the raw details under ``konfuzio`` without our callback token.

    ``annotations``: the annotations endpoint's list if fetched (it wins), else None. ``catalog``:
    the project's, for the category's name and the fields' skeleton. ``host``: for ``web_url``
    (None: null). ``revision``: 1 for the first export, +1 each time the content changed
    (``content_fingerprint``). ``include_bbox=False`` (``results.bbox: false``) leaves ``bbox`` out.
    """
    if not isinstance(revision, int) or isinstance(revision, bool) or revision < 1:
        raise ValueError(f"revision must be an int >= 1, got {revision!r}")
    base = export.build_result(row, redact_callback_url(details), bbox, now)
    category, items, fields = build_extractions(details, annotations, catalog)
    result = {
        "document_id": base["document_id"],
        "status": base["status"],
        "status_data": base["status_data"],
        "revision": revision,
        "category": category,
        "fields": fields,
        "web_url": web_url(host, base["document_id"]) if host else None,
        "annotations": items,
        "text": base["text"],
        "pages": base["pages"],
        "bbox": base["bbox"],
        "source": base["source"],
        "konfuzio": base["konfuzio"],
        "detected_at": base["detected_at"],
        "uploaded_at": base["uploaded_at"],
        "updated_at": details.get("updated_at"),
        "exported_at": base["exported_at"],
        "exported_by": base["exported_by"],
    }
    if not include_bbox:
        del result["bbox"]
    return result
