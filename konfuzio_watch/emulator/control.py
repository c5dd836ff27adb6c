"""The emulator's own control endpoints under ``/emulator/`` (no token, no faults, not counted):
what a person does in the web app, and what a benchmark wants to set up or read, for processes
that drive an emulator they did not start (``python -m konfuzio_watch.emulator``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING

from flask import Flask, Response, jsonify, request

from konfuzio_watch.emulator.documents import REVIEWER, SEEDED_NAME, NotAllowed

if TYPE_CHECKING:
    from konfuzio_watch.emulator.core import Emulator


def add_routes(app: Flask, emu: Emulator) -> None:
    @app.post("/emulator/documents/<int:doc_id>/review")
    def review(doc_id: int) -> Response:
        """Body (all optional): ``{"changes": {"<label name or id>": "<value>"}, "category": <id>,
        "reviewer": "<name>"}``."""
        body = _body()
        return _act(lambda: emu.review(doc_id, body.get("changes") or {}, body.get("category"),
                                       body.get("reviewer") or REVIEWER))  # fmt: skip

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
        return _act(lambda: _range(emu.seed_documents(project_id, int(body.get("count", 0)),
                                                      callback_url=body.get("callback_url"),
                                                      name=body.get("name") or SEEDED_NAME)), 201)  # fmt: skip

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
