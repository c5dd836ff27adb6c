"""The emulator's control endpoints (what people do in the web app) are documented where people look:
``python -m konfuzio_watch.emulator --help`` and docs/emulator.md, each with an example, and the page's
examples work as written against a real emulator."""

from __future__ import annotations

import os

os.environ.setdefault("LOG_TO_FILE", "False")  # before konfuzio_sdk is imported anywhere

import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Iterator  # noqa: E402

import pytest  # noqa: E402
from konfuzio_sdk.api import get_document_details, konfuzio_session  # noqa: E402
from konfuzio_sdk.urls import get_upload_document_url  # noqa: E402

from konfuzio_watch.emulator import SPLIT_MARKER, Emulator, Knobs  # noqa: E402
from konfuzio_watch.emulator.accounting import KINDS  # noqa: E402
from konfuzio_watch.emulator.app import create_app  # noqa: E402
from konfuzio_watch.samples import make_pdf  # noqa: E402

from .conftest import TOKEN, wait_until  # noqa: E402
from .helpers import DOCS, file_of, readme_block  # noqa: E402

pytestmark = pytest.mark.slow  # every test runs the emulator, as a command or in this process

README_URL = "http://127.0.0.1:8000"  # the emulator's address in docs/emulator.md's examples (its --port 8000)


def control_routes() -> list[tuple[str, str]]:
    """(method, rule) of every route the emulator serves under /emulator/, e.g.
    ("POST", "/emulator/documents/<int:doc_id>/review")."""
    app = create_app(Emulator(token=TOKEN))
    return sorted(
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        if rule.rule.startswith("/emulator/")
        for method in rule.methods - {"HEAD", "OPTIONS"}
    )  # type: ignore[operator]


def documented(rule: str) -> re.Pattern[str]:
    """``POST /emulator/documents/<id>/review``: the rule, any name for its variables."""
    return re.compile(r"<[a-z_]+>".join(re.escape(part) for part in re.split(r"<[^>]+>", rule)))


def example(method: str, rule: str) -> re.Pattern[str]:
    """A curl line calling the rule with numbers for its variables (``-X POST`` for a POST)."""
    path = r"\d+".join(re.escape(part) for part in re.split(r"<[^>]+>", rule))
    post = r"(?=.*-X POST)" if method == "POST" else r"(?!.*-X )"
    return re.compile(rf"^{post}.*\bcurl\b.*{path}\b", re.M)


def is_documented(method: str, rule: str, text: str) -> bool:
    return bool(re.search(rf"\b{method} {documented(rule).pattern}", text) and example(method, rule).search(text))


def emulator_section() -> str:
    return (DOCS / "emulator.md").read_text(encoding="utf-8")


def test_every_control_route_is_in_the_help_and_the_readme_with_an_example() -> None:
    routes = control_routes()
    assert {rule.rsplit("/", 1)[1] for _, rule in routes} >= {"review", "reextract", "confirm-split"}
    help_text = subprocess.run(
        [sys.executable, "-m", "konfuzio_watch.emulator", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    section = emulator_section()
    missing = [
        f"{method} {rule}: {where}"
        for method, rule in routes
        for where, text in (("--help", help_text), ("README", section))
        if not is_documented(method, rule, text)
    ]
    assert not missing, "undocumented, or without a curl example:\n" + "\n".join(missing)


@pytest.fixture
def emu() -> Iterator[Emulator]:
    with Emulator(token=TOKEN, project_ids=(1,), knobs=Knobs(processing_s=0.2)).start() as emulator:
        yield emulator


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
def test_the_readmes_people_actions_work_as_written(emu: Emulator) -> None:
    """Document 1 a done invoice, document 2 waiting in status 41 for its split (docs/emulator.md's premise)."""
    session = konfuzio_session(TOKEN, host=emu.url, num_retries=0)
    for data in (file_of("invoice", tag="readme"), make_pdf(2, label=SPLIT_MARKER.decode())):
        form = {"project": 1, "sync": False, "callback_url": ""}
        files = {"data_file": ("scan.pdf", data, "multipart/form-data")}
        session.post(get_upload_document_url(emu.url), files=files, data=form).raise_for_status()
    wait_until(
        lambda: [get_document_details(i, session=session)["status_data"] for i in (1, 2)] == [2, 41],
        10,
        "document 1 done, document 2 waiting for its split",
    )
    block = readme_block("emulator: people")
    assert README_URL in block

    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.replace(README_URL, emu.url)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert emu.wait_idle(10)
    first, second = (get_document_details(i, session=session) for i in (1, 2))
    assert first["is_reviewed"] is True and first["status_data"] == 2
    assert "INV-CORRECTED" in [
        a["offset_string"] for s in first["annotation_sets"] for label in s["labels"] for a in label["annotations"]
    ]
    assert second["status_data"] == 2 and second["split_is_revised"] is True
    *answers, stats = [json.loads(line) for line in result.stdout.splitlines()]
    assert {"first_id": 3, "last_id": 50_002, "count": 50_000} in answers  # the seed
    assert stats["upload"]["count"] == 2 and set(stats) <= {*KINDS.values(), "other"}  # the uploads above, by kind
