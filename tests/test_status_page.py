"""The status page's pure parts: the HTML from a view (every name escaped, lists as given), the
chart's scaling, the minutes' bars, and the retry POST's cross-site checks."""

from __future__ import annotations

from html.parser import HTMLParser

import pytest

from konfuzio_watch.journal import State, display_name
from konfuzio_watch.monitor_page import is_own_host, refusal
from konfuzio_watch.page import chart_svg, nice_ceiling, render_page
from konfuzio_watch.page_view import is_loopback, per_minute

HOSTILE = display_name(b'<script>alert("x")</script><img src=x onerror=alert(1)>\'\n\xff.pdf')
NAMES = frozenset({"localhost", "scan01"})


def view(**changes):  # type: ignore[no-untyped-def]
    counts = {s.value: 0 for s in State} | {"done": 3, "failed": 1, "claimed": 2}
    base = {
        "title": "konfuzio-watch on scan01",
        "status": "ok",
        "line": "2 pending, 3 done, 1 failed",
        "host": "scan01",
        "pid": 42,
        "started_at": "2026-12-06T00:00:00Z",
        "now": "2026-12-06T01:00:00Z",
        "counts": counts,
        "pending": 2,
        "oldest_age_s": 65.0,
        "finished": {"done_1h": 3, "failed_1h": 1, "done_24h": 30, "failed_24h": 4},
        "per_minute": [[0, 0]] * 59 + [[3, 1]],
        "blocked": [{"scope": "api", "reason": "HTTP 503 <b>", "since": "x", "for_seconds": 10.0, "next_probe_s": 4.0}],
        "callbacks": "yes",
        "unsettled": 1,
        "waiting": [{"id": 7, "name": HOSTILE, "state": "claimed", "stage": None, "age_s": 65.0, "error": "<i>"}],
        "waiting_total": 2,
        "failed": [
            {"id": 9, "name": HOSTILE, "stage": "upload", "error": "x", "url": "http://k/d/5/", "age_s": 3.0},
            {"id": 8, "name": "plain.pdf", "stage": "upload", "error": "x", "url": None, "age_s": 3.0},
        ],
        "failed_total": 1,
        "nodes": None,
    }
    return base | changes


class Elements(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def elements(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = Elements()
    parser.feed(page)
    return parser.tags


def test_every_name_and_reason_is_text_not_markup():
    page = render_page(view(), retry_token="tok", nonce="n0nce")
    tags = elements(page)
    assert [t for t, _ in tags].count("script") == 1 and ("script", {"nonce": "n0nce"}) in tags
    assert "img" not in [t for t, _ in tags]
    assert not any(name.startswith("on") for _, attrs in tags for name in attrs)
    assert (
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x onerror=alert(1)&gt;&#x27;\\n\\xff.pdf" in page
    )
    assert "HTTP 503 &lt;b&gt;" in page and "&lt;i&gt;" in page


def test_the_counts_are_the_views_and_the_lists_as_given():
    page = render_page(view(), retry_token=None, nonce="n")
    assert 'data-state="done">3<' in page and 'data-state="claimed">2<' in page and 'data-state="pending">2<' in page
    assert 'data-finished="done_24h">30<' in page and 'data-finished="failed_1h">1<' in page
    assert page.count('<tr data-row="') == 2 and 'href="http://k/d/5/"' in page
    assert "<form" not in page and "Read-only here" in page  # no token: no button


def test_the_retry_forms_carry_the_token_and_the_row():
    page = render_page(view(), retry_token='t"ok', nonce="n")
    forms = [a for t, a in elements(page) if t == "input" and a.get("name") == "token"]
    assert [f["value"] for f in forms] == ['t"ok', 't"ok']
    assert [a["value"] for t, a in elements(page) if t == "input" and a.get("name") == "row"] == ["9", "8"]


def test_nothing_blocked_waiting_or_failed_says_so():
    page = render_page(
        view(blocked=[], waiting=[], waiting_total=0, failed=[], failed_total=0), retry_token="t", nonce="n"
    )
    assert "nothing: all work goes on" in page and "no file waiting" in page and "no failed file" in page


def test_the_nodes_of_a_cluster_are_listed():
    nodes = [{"id": "<a1>", "host": "h", "pid": 3, "heard_s": 2.0, "files": 4, "silent": False}]
    page = render_page(view(nodes=nodes), retry_token=None, nonce="n")
    assert 'id="nodes"' in page and "&lt;a1&gt;" in page
    assert 'id="nodes"' not in render_page(view(), retry_token=None, nonce="n")


@pytest.mark.parametrize(
    ("busiest", "top"), [(0, 1), (1, 1), (2, 2), (3, 5), (5, 5), (6, 10), (11, 20), (99, 100), (101, 200), (2500, 5000)]
)
def test_the_chart_top_is_the_next_1_2_5_step(busiest, top):
    assert nice_ceiling(busiest) == top


def test_the_chart_bars_scale_to_the_top():
    svg = chart_svg([[0, 0], [4, 1], [2, 0]], width=134, height=122)  # plot 100 px high
    assert 'data-top="5"' in svg
    assert 'height="80.0" fill="#2e9d4f"' in svg and 'height="20.0" fill="#d64545"' in svg
    assert svg.count("<rect") == 3


def test_the_minutes_bars_count_the_last_hour():
    now = 10_000.0
    finished = [(State.DONE, now - 1), (State.DONE, now - 59), (State.FAILED, now - 61), (State.DONE, now - 3601)]
    bars = per_minute(finished, now)
    assert len(bars) == 60 and bars[-1] == [2, 0] and bars[-2] == [0, 1] and sum(map(sum, bars)) == 3


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.1.2.3", True), ("::1", True), ("localhost", True), ("0.0.0.0", False), ("::", False)]
    + [("10.0.0.5", False), ("scan01", False)],
)
def test_loopback_addresses(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "own"),
    [("127.0.0.1:9321", True), ("[::1]:9321", True), ("10.0.0.5:9321", True), ("localhost:9321", True)]
    + [("scan01:9321", True), ("evil.example:9321", False), ("127.0.0.1.evil.example", False), ("", False)],
)
def test_own_hosts_are_ip_literals_and_this_machines_names(host, own):
    assert is_own_host(host, NAMES) is own


def check(**changes):  # type: ignore[no-untyped-def]
    request = {
        "form_token": "secret",
        "token": "secret",
        "host_header": "127.0.0.1:9321",
        "origin": "http://127.0.0.1:9321",
        "referer": None,
        "names": NAMES,
    }
    return refusal(**(request | changes))


def test_a_retry_from_the_page_itself_is_not_refused():
    assert check() is None
    assert check(origin=None, referer="http://127.0.0.1:9321/?m=x") is None
    assert check(origin=None) is None  # a client that is no browser: the token alone


@pytest.mark.parametrize(
    ("changes", "why"),
    [
        ({"form_token": None}, "token"),
        ({"form_token": "secreT"}, "token"),
        ({"form_token": ""}, "token"),
        ({"origin": "http://evil.example"}, "another site"),
        ({"origin": "null"}, "another site"),
        ({"origin": "http://127.0.0.1:9999"}, "another site"),
        ({"origin": None, "referer": "http://evil.example/x"}, "another site"),
        ({"host_header": "evil.example:9321", "origin": "http://evil.example:9321"}, "another host"),
    ],
)
def test_a_forged_retry_is_refused(changes, why):
    assert why in check(**changes)


class Source:
    """A page source with a fixed view; records the retries asked for."""

    def __init__(self, retry_allowed: bool = True, broken: bool = False) -> None:
        self.retry_allowed, self.broken, self.retried = retry_allowed, broken, []

    def view(self):  # type: ignore[no-untyped-def]
        if self.broken:
            raise RuntimeError("the journal is closed")
        return view()

    def retry(self, row_id: int) -> str:
        self.retried.append(row_id)
        return f"row {row_id}: back in the inbox <as> x.pdf"


def client(source: Source):  # type: ignore[no-untyped-def]
    from konfuzio_watch.monitor import create_app

    return create_app(lambda: {}, lambda: b"", page=source).test_client()


def test_the_routes_render_refuse_and_retry():
    source = Source()
    web = client(source)
    page = web.get("/", headers={"Host": "127.0.0.1:9321"})
    assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["Content-Security-Policy"]
    token = next(a["value"] for t, a in elements(page.text) if t == "input" and a.get("name") == "token")
    forged = web.post(
        "/retry", data={"row": "9"}, headers={"Host": "127.0.0.1:9321", "Origin": "http://127.0.0.1:9321"}
    )
    assert forged.status_code == 403 and source.retried == []
    done = web.post(
        "/retry",
        data={"row": "9", "token": token},
        headers={"Host": "127.0.0.1:9321", "Origin": "http://127.0.0.1:9321"},
    )
    assert done.status_code == 303 and source.retried == [9]
    shown = web.get(done.headers["Location"], headers={"Host": "127.0.0.1:9321"}).text
    assert "row 9: back in the inbox &lt;as&gt; x.pdf" in shown
    assert "back in the inbox" not in web.get("/?m=made-up", headers={"Host": "127.0.0.1:9321"}).text


def test_a_page_that_cannot_be_read_is_a_503_line():
    answer = client(Source(broken=True)).get("/")
    assert answer.status_code == 503 and "the journal is closed" in answer.text


def test_a_retry_without_a_file_number_is_a_bad_request():
    source = Source()
    web = client(source)
    page = web.get("/", headers={"Host": "127.0.0.1:9321"})
    token = next(a["value"] for t, a in elements(page.text) if t == "input" and a.get("name") == "token")
    answer = web.post(
        "/retry",
        data={"row": "nine", "token": token},
        headers={"Host": "127.0.0.1:9321", "Origin": "http://127.0.0.1:9321"},
    )
    assert answer.status_code == 400 and "not a number" in answer.text and source.retried == []
