#!/usr/bin/env python3
"""A stand-in for the ngrok v3 agent, for driving the real pyngrok in tests. Standard library only.

Speaks what pyngrok 9.1 uses (OPERATIONS.md): ``ngrok --version``; ``ngrok start --none --log stdout
[--config P] [--authtoken T] [--region R]`` prints the logfmt start-up lines and serves the agent API
on 127.0.0.1: ``GET /api/endpoints``, ``POST /api/endpoints``, ``GET|DELETE /api/endpoints/<name>``.

Each endpoint gets a made-up https URL (or ``https://<domain>`` when the POST asks for a ``url``)
and a real local forwarder to its upstream, listed as ``test_forward_url``, so a test can send a
request "through the tunnel" and see it reach the daemon's port.

Environment: ``FAKE_NGROK_RECORD_DIR`` — write ``agent-<pid>.json`` there (argv, config file, API
calls, POST bodies, endpoints made); ``FAKE_NGROK_MODE`` — ``ok`` (default), ``silent`` (print nothing, hang),
``error`` (log an error line and exit 1).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

VERSION = "3.99.0-fake"


class Recorder:
    """Everything the agent was told, rewritten atomically after each change."""

    def __init__(self, directory: str | None, **facts: object):
        self.path = os.path.join(directory, f"agent-{os.getpid()}.json") if directory else None
        self.data: dict = {"pid": os.getpid(), "api_calls": [], "posts": [], "endpoints": [], "deletes": [], **facts}
        self.lock = threading.Lock()
        self.save()

    def add(self, key: str, item: object) -> None:
        with self.lock:
            self.data[key].append(item)
            self.save()

    def save(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f)
            os.replace(tmp, self.path)


class Forwarder(BaseHTTPRequestHandler):
    """Relays any request to the endpoint's upstream, like the real tunnel does."""

    upstream = ""

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        target = urlsplit(self.upstream)
        conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
        try:
            conn.request(self.command, self.path, body, {"Content-Type": self.headers.get("Content-Type", "")})
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        self.send_header("Content-Type", resp.getheader("Content-Type", "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _relay

    def log_message(self, *args: object) -> None:
        pass


class AgentApi(BaseHTTPRequestHandler):
    endpoints: dict[str, dict] = {}
    forwarders: dict[str, ThreadingHTTPServer] = {}
    recorder: Recorder

    def do_GET(self) -> None:
        self.recorder.add("api_calls", ["GET", self.path])
        if self.path in ("/api/endpoints", "/api/tunnels"):
            key = "endpoints" if self.path == "/api/endpoints" else "tunnels"
            self._json(200, {key: list(self.endpoints.values()), "uri": self.path})
        elif self._name() in self.endpoints:
            self._json(200, self.endpoints[self._name()])
        else:
            self._json(404, {"error_code": 100, "msg": "endpoint not found"})

    def do_POST(self) -> None:
        self.recorder.add("api_calls", ["POST", self.path])
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        self.recorder.add("posts", body)
        upstream = (body.get("upstream") or {}).get("url")
        if self.path != "/api/endpoints" or not body.get("name") or not upstream:
            self._json(400, {"error_code": 102, "msg": "name and upstream.url are required"})
            return
        if body["name"] in self.endpoints:
            self._json(400, {"error_code": 103, "msg": f"endpoint {body['name']} already exists"})
            return
        url = body.get("url") or f"https://{uuid.uuid4().hex[:12]}.ngrok-free.app"
        handler = type("Forward", (Forwarder,), {"upstream": upstream})
        forwarder = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=forwarder.serve_forever, args=(0.05,), daemon=True).start()
        endpoint = {
            "id": f"ep_{uuid.uuid4().hex}",
            "name": body["name"],
            "uri": f"/api/endpoints/{body['name']}",
            "url": url,
            "public_url": url,
            "proto": urlsplit(url).scheme,
            "upstream": {"url": upstream},
            "test_forward_url": f"http://127.0.0.1:{forwarder.server_address[1]}",
        }
        self.endpoints[body["name"]], self.forwarders[body["name"]] = endpoint, forwarder
        self.recorder.add("endpoints", endpoint)
        self._json(201, endpoint)

    def do_DELETE(self) -> None:
        self.recorder.add("api_calls", ["DELETE", self.path])
        name = self._name()
        if name not in self.endpoints:
            self._json(404, {"error_code": 100, "msg": "endpoint not found"})
            return
        self.recorder.add("deletes", name)
        del self.endpoints[name]
        self.forwarders.pop(name).shutdown()
        self.send_response(204)
        self.end_headers()

    def _name(self) -> str:
        prefix = "/api/endpoints/"
        return self.path[len(prefix) :] if self.path.startswith(prefix) else ""

    def _json(self, status: int, data: dict) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def log_message(self, *args: object) -> None:
        pass


def say(line: str) -> None:
    print(f"t=2026-01-01T00:00:00+0000 {line}", flush=True)


def start(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ngrok start")
    parser.add_argument("--none", action="store_true")
    parser.add_argument("--log", required=True)
    parser.add_argument("--config")
    parser.add_argument("--authtoken")
    parser.add_argument("--region")
    args = parser.parse_args(argv)
    config_text, config_mode = None, None
    if args.config:
        with open(args.config) as f:
            config_text, config_mode = f.read(), oct(os.fstat(f.fileno()).st_mode & 0o777)
    AgentApi.recorder = Recorder(
        os.environ.get("FAKE_NGROK_RECORD_DIR"),
        argv=sys.argv[1:],
        config_path=args.config,
        config_text=config_text,
        config_mode=config_mode,
        env_authtoken=os.environ.get("NGROK_AUTHTOKEN"),
    )
    mode = os.environ.get("FAKE_NGROK_MODE", "ok")
    if mode == "silent":
        threading.Event().wait()
    if mode == "error":
        say('lvl=eror msg="failed to reconnect session" obj=tunnels.session err="authentication failed: bad token"')
        return 1
    api = ThreadingHTTPServer(("127.0.0.1", 0), AgentApi)
    threading.Thread(target=api.serve_forever, daemon=True).start()
    say('lvl=info msg="no configuration paths supplied"')
    say(f'lvl=info msg="starting web service" obj=web addr=127.0.0.1:{api.server_address[1]} allow_hosts=[]')
    say('lvl=info msg="client session established" obj=tunnels.session')
    say('lvl=info msg="tunnel session started" obj=tunnels.session')
    threading.Event().wait()  # until killed, like the real agent
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] in (["--version"], ["version"]):
        print(f"ngrok version {VERSION}")
        return 0
    if argv[:1] == ["start"]:
        return start(argv[1:])
    print(f"fake ngrok: unsupported command {argv!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
