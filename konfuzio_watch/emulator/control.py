"""The emulator's own control endpoints under ``/emulator/`` (no token, no faults, not counted):
what a person does in the web app, and what a benchmark wants to set up or read, for processes
that drive an emulator they did not start (``python -m konfuzio_watch.emulator``).

``ENDPOINTS`` says what each does, with an example: ``--help`` shows it, and docs/emulator.md
lists the same (tests/test_emulator_docs.py checks both against the routes served here).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Flask, Response, jsonify, request

from konfuzio_watch.emulator.documents import REVIEWER, SEEDED_NAME, NotAllowed

if TYPE_CHECKING:
    from konfuzio_watch.emulator.core import Emulator


EXAMPLE_URL = "http://127.0.0.1:8000"  # the emulator's address in the examples (its default --port)
_JSON = "-H 'Content-Type: application/json' -d"
# (method and route, what it does, a curl line)
ENDPOINTS = (
    (
        "POST /emulator/documents/<id>/review",
        'a person reviews a done document: every annotation accepted, "changes" corrected (label name or id\n'
        '-> value), optionally another "category" (extracted again for it), "reviewer"; the callback is sent\n'
        "again. 200 with the details",
        f"curl -X POST {EXAMPLE_URL}/emulator/documents/1/review {_JSON} "
        """'{"changes": {"Invoice Number": "INV-CORRECTED"}, "reviewer": "anna@example.com"}'""",
    ),
    (
        "POST /emulator/documents/<id>/reextract",
        "extraction runs again on a done document (status 1, 20, then 2 with new annotations; reviewed ones\n"
        'are kept) for "duration_s" (default: half of --processing-s), then the callback again. 202',
        f"curl -X POST {EXAMPLE_URL}/emulator/documents/1/reextract {_JSON} '{{\"duration_s\": 2}}'",
    ),
    (
        "POST /emulator/documents/<id>/confirm-split",
        "a person confirms the proposed split of a document waiting in status 41 (--split-rate): it is\n"
        "extracted, ends done, and the callback is sent. 202",
        f"curl -X POST {EXAMPLE_URL}/emulator/documents/2/confirm-split",
    ),
    (
        "POST /emulator/projects/<id>/seed",
        '"count" done documents added to a project at once (50,000 in milliseconds), for listing and\n'
        'reconciliation at scale; "callback_url" and "name" may hold {id}. 201 with first_id, last_id, count',
        f"curl -X POST {EXAMPLE_URL}/emulator/projects/1/seed {_JSON} '{{\"count\": 50000}}'",
    ),
    ("GET /emulator/stats", "the API requests served so far, by kind", f"curl {EXAMPLE_URL}/emulator/stats"),
)


def endpoints_help() -> str:
    """The control endpoints for ``--help``: each with what it does and an example."""
    lines = [
        "control endpoints (no token; never faulted or counted): what people do in Konfuzio's web app,",
        "and set-up for benchmarks. An unknown id answers 404, a document in another state 409, a bad body",
        "400.",
        "",
    ]
    for route, what, example in ENDPOINTS:
        lines += [f"  {route}", *(f"      {line}" for line in what.splitlines()), f"      {example}", ""]
    return "\n".join(lines)


def add_routes(app: Flask, emu: Emulator) -> None:
    @app.post("/emulator/documents/<int:doc_id>/review")
    def review(doc_id: int) -> Response:
        """Body (all optional): ``{"changes": {"<label name or id>": "<value>"}, "category": <id>,
        "reviewer": "<name>"}``."""
        body = _body()
        return _act(
            lambda: emu.review(
                doc_id, body.get("changes") or {}, body.get("category"), body.get("reviewer") or REVIEWER
            )
        )

    @app.post("/emulator/documents/<int:doc_id>/reextract")
    def reextract(doc_id: int) -> Response:
        """Body (optional): ``{"duration_s": <seconds>}``. Answers 202 with the details in status 1."""
        return _act(lambda: emu.reextract(doc_id, _body().get("duration_s")), 202)

    @app.post("/emulator/documents/<int:doc_id>/confirm-split")
    def confirm_split(doc_id: int) -> Response:
        return _act(lambda: emu.confirm_split(doc_id), 202)

    @app.post("/emulator/projects/<int:project_id>/seed")
    def seed(project_id: int) -> Response:
        """Body: ``{"count": <n>, "callback_url": "...{id}...", "name": "...{id}..."}``."""
        body = _body()
        return _act(
            lambda: _range(
                emu.seed_documents(
                    project_id,
                    int(body.get("count", 0)),
                    callback_url=body.get("callback_url"),
                    name=body.get("name") or SEEDED_NAME,
                )
            ),
            201,
        )

    @app.get("/emulator/stats")
    def stats() -> Response:
        return jsonify({kind: dataclasses.asdict(s) for kind, s in emu.request_stats().items()})


def _body() -> dict:
    body = request.get_json(silent=True)
    return body if isinstance(body, dict) else {}


def _range(ids: range) -> dict:
    return {"first_id": ids.start, "last_id": ids.stop - 1, "count": len(ids)}


def _act(action: Callable[[], object], status: int = 200) -> Response:
    try:
        result = action()
    except KeyError:
        return _error("Not found.", 404)
    except NotAllowed as exc:
        return _error(str(exc), 409)
    except (ValueError, TypeError) as exc:
        return _error(str(exc), 400)
    response = jsonify(result)
    response.status_code = status
    return response


def _error(detail: str, status: int) -> Response:
    response = jsonify({"detail": detail})
    response.status_code = status
    return response
