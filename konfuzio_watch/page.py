"""The status page the monitor serves at ``/``: one HTML document rendered from a plain dict (the
``view``, built by ``page_view.py`` from the daemon's snapshot and the journal), with nothing from
elsewhere: inline CSS, an inline SVG chart, and a few lines of inline JavaScript that refresh it
(without JavaScript a ``<meta http-equiv=refresh>`` does).

Every text that comes from a file name, an error or the server is escaped here (``_e``), once, at
the point it enters the markup; the page's own script runs only with the nonce the monitor sends
in its Content-Security-Policy, so a name that escaped would still not run.

The view (every key present; lists already bounded by the builder)::

    {"title", "status", "line", "host", "pid", "started_at", "now",
     "counts": {state: n}, "pending", "oldest_age_s",
     "finished": {"done_1h", "failed_1h", "done_24h", "failed_24h"},
     "per_minute": [[done, failed], ...],   # the last hour, oldest minute first
     "blocked": [{"scope", "reason", "since", "for_seconds", "next_probe_s"}],
     "callbacks", "unsettled",
     "waiting": [{"id", "name", "state", "stage", "age_s", "error"}], "waiting_total",
     "failed": [{"id", "name", "stage", "error", "url", "age_s"}], "failed_total",
     "nodes": None | [{"id", "host", "pid", "heard_s", "files", "silent"}]}
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

from .states import ACTIVE, State
from .summary import format_age

REFRESH_S = 5  # the page's own refresh (a fetch with JavaScript, a meta refresh without)
CHART_W, CHART_H = 600, 120

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
header{background:#1d2330;color:#fff;padding:10px 20px}header h1{font-size:18px;margin:0}
header p{margin:2px 0 0;color:#c8cdd8}main{padding:12px 20px;max-width:1200px}
section{background:#fff;border:1px solid #dde1e8;border-radius:6px;padding:10px 14px;margin:0 0 12px}
h2{font-size:15px;margin:0 0 8px}table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:3px 8px;border-bottom:1px solid #eef0f4;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
.name{font-family:ui-monospace,monospace;word-break:break-all}.muted{color:#6b7385}
.blocked{background:#fff1f0;border-color:#f3b5ae}.ok{color:#1a7f37}.bad{color:#c62828}
.msg{background:#eef6ff;border-color:#a9cdf5}.grid{display:flex;gap:12px;flex-wrap:wrap}
.grid section{flex:1 1 300px}button{font:inherit;padding:1px 8px}form{margin:0}
svg text{font:11px system-ui,sans-serif;fill:#6b7385}
"""

# Refresh by fetching the page and swapping <main>: no flicker, no lost scroll; paused while hidden.
_JS = """
setInterval(function(){if(document.hidden)return;fetch(location.pathname,{cache:"no-store"})
.then(function(r){return r.ok?r.text():null}).then(function(t){if(!t)return;
var d=new DOMParser().parseFromString(t,"text/html");var m=d.querySelector("main");
if(m)document.querySelector("main").replaceWith(m)}).catch(function(){})},%d000);
"""


def _e(value: object) -> str:
    """Text for the markup: every <, >, &, and both quotes escaped (safe in text and attributes)."""
    return html.escape(str(value), quote=True)


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else format_age(seconds)


def nice_ceiling(value: float) -> int:
    """The chart's top: the smallest 1, 2 or 5 x 10^k at or above ``value`` (at least 1)."""
    if value <= 1:
        return 1
    power = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return int(step * power)
    return int(10 * power)  # pragma: no cover - the loop ends at 10 x power >= value


def chart_svg(per_minute: Sequence[Sequence[int]], width: int = CHART_W, height: int = CHART_H) -> str:
    """Stacked bars, one per minute (done below, failed above), oldest left; the y axis from 0 to
    ``nice_ceiling`` of the busiest minute."""
    top = nice_ceiling(max((done + failed for done, failed in per_minute), default=0))
    left, bottom, plot_h = 34, 16, height - 22
    plot_w = width - left - 4
    slot = plot_w / max(1, len(per_minute))
    bars = []
    for i, (done, failed) in enumerate(per_minute):
        x = left + i * slot
        done_h = plot_h * done / top
        failed_h = plot_h * failed / top
        y = height - bottom - done_h
        if done:
            bars.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{max(1.0, slot - 1):.1f}" height="{done_h:.1f}" fill="#2e9d4f">'
                f"<title>{done} done</title></rect>"
            )
        if failed:
            bars.append(
                f'<rect x="{x:.1f}" y="{y - failed_h:.1f}" width="{max(1.0, slot - 1):.1f}" height="{failed_h:.1f}"'
                f' fill="#d64545"><title>{failed} failed</title></rect>'
            )
    base = height - bottom
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}"'
        f' role="img" aria-label="files finished per minute, the last hour" data-top="{top}">'
        f'<line x1="{left}" y1="{base}" x2="{width - 4}" y2="{base}" stroke="#aab"/>'
        f'<line x1="{left}" y1="{base - plot_h}" x2="{width - 4}" y2="{base - plot_h}" stroke="#eee"/>'
        f'<text x="{left - 4}" y="{base - plot_h + 4}" text-anchor="end">{top}/min</text>'
        f'<text x="{left - 4}" y="{base}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 2}">-60 min</text>'
        f'<text x="{width - 4}" y="{height - 2}" text-anchor="end">now</text>' + "".join(bars) + "</svg>"
    )


def render_page(view: Mapping[str, Any], *, retry_token: str | None, nonce: str, message: str | None = None) -> str:
    """The whole document. ``retry_token``: the form token (None: the page is read-only)."""
    parts = [
        _counts(view),
        _throughput(view),
        _blocked(view),
        _waiting(view),
        _failed(view, retry_token),
        _nodes(view),
    ]
    msg = f'<section class="msg" id="message">{_e(message)}</section>' if message else ""
    title = _e(view["title"])
    return (
        "<!doctype html>\n"
        f'<html lang="en"><head><meta charset="utf-8"><title>{title}</title>'
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f'<noscript><meta http-equiv="refresh" content="{REFRESH_S * 2}"></noscript>'
        f"<style>{_CSS}</style></head><body>"
        f'<header><h1>{title}</h1><p id="line">{_e(view["line"])}</p>'
        f'<p>status <b id="status">{_e(view["status"])}</b> · pid {_e(view["pid"])} · started '
        f'{_e(view["started_at"])} · shown {_e(view["now"])} · <a href="/" style="color:#9cc3ff">reload</a>'
        f' · <a href="/status" style="color:#9cc3ff">/status</a> · <a href="/metrics" style="color:#9cc3ff">'
        "/metrics</a></p></header>"
        f"<main>{msg}{''.join(parts)}</main>"
        f'<script nonce="{_e(nonce)}">{_JS % REFRESH_S}</script></body></html>\n'
    )


def _counts(view: Mapping[str, Any]) -> str:
    counts = view["counts"]
    rows = "".join(
        f'<tr><td>{_e(state.value)}</td><td class="n" data-state="{_e(state.value)}">{int(counts.get(state.value, 0))}'
        "</td></tr>"
        for state in State
    )
    oldest = f" (oldest {_age(view['oldest_age_s'])})" if view["oldest_age_s"] is not None else ""
    unsettled = view.get("unsettled")
    seen = (
        f'<p class="muted">seen in the inbox, not settled yet: <span id="unsettled">{int(unsettled)}</span></p>'
        if unsettled is not None
        else ""
    )
    callbacks = f'<p class="muted">callbacks arriving: {_e(view["callbacks"])}</p>' if view.get("callbacks") else ""
    return (
        '<div class="grid"><section id="counts"><h2>Files by state</h2><table>'
        f'<tr><th>state</th><th class="n">files</th></tr>{rows}'
        f'<tr><th>pending</th><th class="n" data-state="pending">{int(view["pending"])}</th></tr></table>'
        f'<p class="muted" id="oldest">{int(view["pending"])} pending{_e(oldest)}</p>{seen}{callbacks}</section>'
    )


def _throughput(view: Mapping[str, Any]) -> str:
    f = view["finished"]
    return (
        '<section id="throughput"><h2>Finished</h2><table>'
        '<tr><th></th><th class="n">last hour</th><th class="n">last 24 h</th></tr>'
        f'<tr><td class="ok">done</td><td class="n" data-finished="done_1h">{int(f["done_1h"])}</td>'
        f'<td class="n" data-finished="done_24h">{int(f["done_24h"])}</td></tr>'
        f'<tr><td class="bad">failed</td><td class="n" data-finished="failed_1h">{int(f["failed_1h"])}</td>'
        f'<td class="n" data-finished="failed_24h">{int(f["failed_24h"])}</td></tr></table>'
        f"{chart_svg(view['per_minute'])}</section></div>"
    )


def _blocked(view: Mapping[str, Any]) -> str:
    gates = view["blocked"]
    if not gates:
        return '<section id="blocked"><h2>Blocked</h2><p class="ok">nothing: all work goes on</p></section>'
    rows = "".join(
        f'<tr><td data-scope="{_e(g["scope"])}"><b>{_e(g["scope"])}</b></td><td>{_e(g["reason"])}</td>'
        f"<td>{_e(g.get('since') or '-')} ({_age(g.get('for_seconds'))})</td>"
        f"<td>{'in ' + _age(g['next_probe_s']) if g.get('next_probe_s') is not None else 'probing'}</td></tr>"
        for g in gates
    )
    return (
        f'<section id="blocked" class="blocked"><h2>Blocked: {len(gates)}</h2><table>'
        f"<tr><th>work</th><th>why</th><th>since</th><th>next probe</th></tr>{rows}</table>"
        '<p class="muted">Files wait at no cost in attempts; work resumes by itself once a probe succeeds.</p>'
        "</section>"
    )


def _waiting(view: Mapping[str, Any]) -> str:
    shown, total = view["waiting"], int(view["waiting_total"])
    if not total:
        return '<section id="waiting"><h2>Waiting</h2><p class="muted">no file waiting</p></section>'
    rows = "".join(
        f'<tr><td class="name">{_e(w["name"])}</td><td>{_e(w["state"])}</td><td>{_e(w.get("stage") or "")}</td>'
        f'<td class="n">{_age(w["age_s"])}</td><td>{_e(w.get("error") or "")}</td></tr>'
        for w in shown
    )
    return (
        f'<section id="waiting"><h2>Waiting: {total} (the {len(shown)} oldest)</h2><table>'
        f'<tr><th>file</th><th>state</th><th>stage</th><th class="n">age</th><th>last error</th></tr>{rows}'
        "</table></section>"
    )


def _failed(view: Mapping[str, Any], retry_token: str | None) -> str:
    shown, total = view["failed"], int(view["failed_total"])
    if not total:
        return '<section id="failed"><h2>Failed</h2><p class="muted">no failed file</p></section>'
    rows = []
    for f in shown:
        url = f.get("url")
        link = (
            f'<a href="{_e(url)}" rel="noreferrer">document {_e(url.rstrip("/").rsplit("/", 1)[-1])}</a>' if url else ""
        )
        retry = (
            f'<form method="post" action="/retry"><input type="hidden" name="token" value="{_e(retry_token)}">'
            f'<input type="hidden" name="row" value="{int(f["id"])}"><button type="submit">retry</button></form>'
            if retry_token
            else ""
        )
        rows.append(
            f'<tr data-row="{int(f["id"])}"><td class="name">{_e(f["name"])}</td><td>{_e(f.get("stage") or "")}</td>'
            f"<td>{_e(f.get('error') or '')}</td><td>{link}</td>"
            f'<td class="n">{_age(f["age_s"])} ago</td><td>{retry}</td></tr>'
        )
    note = (
        "Retry puts the file back into the inbox, as <code>konfuzio-watch retry</code> does."
        if retry_token
        else "Read-only here: <code>konfuzio-watch retry PATH</code> puts a file through again."
    )
    return (
        f'<section id="failed"><h2>Failed: {total} (the {len(shown)} latest)</h2><table>'
        f'<tr><th>file</th><th>stage</th><th>reason</th><th>in Konfuzio</th><th class="n">failed</th><th></th></tr>'
        f'{"".join(rows)}</table><p class="muted">{note}</p></section>'
    )


def _nodes(view: Mapping[str, Any]) -> str:
    nodes = view.get("nodes")
    if nodes is None:
        return ""
    rows = "".join(
        f'<tr><td class="name">{_e(n["id"])}</td><td>{_e(n["host"])}</td><td class="n">{_e(n.get("pid") or "-")}</td>'
        f'<td class="n">{_age(n.get("heard_s"))}</td><td class="n">{int(n.get("files") or 0)}</td>'
        f"<td>{'SILENT: its files pass to the other nodes' if n.get('silent') else ''}</td></tr>"
        for n in nodes
    )
    return (
        '<section id="nodes"><h2>Nodes sharing the journal</h2><table><tr><th>node</th><th>host</th>'
        f'<th class="n">pid</th><th class="n">heard</th><th class="n">files</th><th></th></tr>'
        f"{rows or '<tr><td colspan=6>(none running)</td></tr>'}</table></section>"
    )


def pending_of(counts: Mapping[str, int]) -> int:
    """The files not finished yet, as ``status`` sums them."""
    return sum(int(counts.get(s.value, 0)) for s in ACTIVE)
