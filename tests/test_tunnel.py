"""The tunnel through the real pyngrok, driving a fake ngrok agent (tests/fake_ngrok.py) over its real API."""

from __future__ import annotations

import gc
import json
import os
import signal
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml
from pyngrok import installer

from konfuzio_watch.callback import create_app
from konfuzio_watch.server import ServerThread
from konfuzio_watch.tunnel import ENDPOINT_NAME, Tunnel, TunnelError, TunnelSettings

from .conftest import wait_until

TOKEN = "cb-token-0123456789abcdefghij"


@pytest.fixture
def callbacks() -> Iterator[tuple[ServerThread, list[str]]]:
    """The daemon's real callback app under Waitress: what the tunnel must lead to."""
    received: list[str] = []

    def record(token: str, _claimed_id: int | None) -> str:
        received.append(token)
        return "recorded"

    server = ServerThread(create_app(record), "127.0.0.1", 0, threads=2).start()
    yield server, received
    server.close()


@pytest.fixture
def make_tunnel(
    tmp_path: Path, agent_path: Path, records: Path, callbacks: tuple[ServerThread, list[str]]
) -> Iterator[Callable[..., Tunnel]]:
    tunnels: list[Tunnel] = []

    def make(**settings: object) -> Tunnel:
        settings.setdefault("ngrok_path", agent_path)
        tunnel = Tunnel(TunnelSettings(**settings), callbacks[0].port, state_dir=tmp_path / "state")  # type: ignore[arg-type]
        tunnels.append(tunnel)
        return tunnel

    yield make
    for tunnel in tunnels:
        tunnel.close()


def agent_record(records: Path, pid: int | None) -> dict:
    return json.loads((records / f"agent-{pid}.json").read_text())


def post_through_tunnel(forward_url: str) -> int:
    request = urllib.request.Request(
        f"{forward_url}/konfuzio-callback/{TOKEN}",
        data=b'{"id": 7}',
        method="POST",
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status


def open_fds() -> int:
    # Garbage from earlier tests in this worker (a server in a reference cycle holds its sockets)
    # would otherwise be collected in the middle of the count and make it smaller.
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


def is_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.slow
def test_open_gives_an_https_url_that_leads_to_the_callback_server(
    make_tunnel: Callable[..., Tunnel], records: Path, tmp_path: Path, callbacks: tuple[ServerThread, list[str]]
) -> None:
    server, received = callbacks
    tunnel = make_tunnel()

    url = tunnel.open()

    assert url.startswith("https://") and url == tunnel.public_url
    assert tunnel.is_alive()
    record = agent_record(records, tunnel.agent_pid)
    assert record["argv"] == ["start", "--none", "--log", "stdout", "--config", str(tmp_path / "state" / "ngrok.yml")]
    (post,) = record["posts"]
    assert post["name"] == ENDPOINT_NAME
    assert post["upstream"] == {"url": f"http://127.0.0.1:{server.port}"}
    assert ["GET", "/api/endpoints"] in record["api_calls"]  # pyngrok's health probe (config v3)
    assert post_through_tunnel(record["endpoints"][0]["test_forward_url"]) == 202
    assert received == [TOKEN]


@pytest.mark.slow
def test_authtoken_goes_into_a_private_config_file_never_on_the_command_line(
    make_tunnel: Callable[..., Tunnel], records: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NGROK_AUTHTOKEN", "token-from-env")  # pyngrok would put this on argv too
    tunnel = make_tunnel(authtoken="s3cret-authtoken", domain="scans.example.com", region="eu")

    url = tunnel.open()

    record = agent_record(records, tunnel.agent_pid)
    assert "--authtoken" not in record["argv"]
    assert not any("s3cret" in arg or "token-from-env" in arg for arg in record["argv"])
    assert record["argv"][-2:] == ["--region", "eu"]
    assert yaml.safe_load(record["config_text"]) == {"version": "3", "agent": {"authtoken": "s3cret-authtoken"}}
    assert record["config_mode"] == "0o600"
    assert record["posts"][0]["url"] == "https://scans.example.com"
    assert url == "https://scans.example.com"


@pytest.mark.slow
def test_an_existing_config_is_kept_and_the_authtoken_merged_in(
    make_tunnel: Callable[..., Tunnel], records: Path, tmp_path: Path
) -> None:
    config = tmp_path / "ngrok.yml"
    config.write_text('version: "3"\nagent:\n  console_ui: false\n')
    config.chmod(0o644)
    tunnel = make_tunnel(authtoken="s3cret-authtoken", config_path=config)

    tunnel.open()

    assert yaml.safe_load(config.read_text()) == {
        "version": "3",
        "agent": {"console_ui": False, "authtoken": "s3cret-authtoken"},
    }
    assert config.stat().st_mode & 0o777 == 0o600
    assert agent_record(records, tunnel.agent_pid)["argv"][-2:] == ["--config", str(config)]


@pytest.mark.slow
def test_close_removes_the_endpoint_and_stops_the_agent(make_tunnel: Callable[..., Tunnel], records: Path) -> None:
    tunnel = make_tunnel()
    fds_before = open_fds()
    tunnel.open()
    pid = tunnel.agent_pid
    assert pid is not None and is_running(pid)

    tunnel.close()

    assert open_fds() == fds_before, "the agent's stdout pipe must be closed"
    assert agent_record(records, pid)["deletes"] == [ENDPOINT_NAME]
    assert not is_running(pid)
    assert tunnel.public_url is None and tunnel.agent_pid is None and not tunnel.is_alive()
    tunnel.close()  # idempotent


@pytest.mark.slow
def test_a_killed_agent_is_noticed_and_replaced_with_a_working_tunnel(
    make_tunnel: Callable[..., Tunnel], records: Path, callbacks: tuple[ServerThread, list[str]]
) -> None:
    _, received = callbacks
    tunnel = make_tunnel()
    fds_before = open_fds()
    first_url = tunnel.open()
    first_pid = tunnel.agent_pid
    assert first_pid is not None
    assert tunnel.ensure_open() == first_url  # alive: nothing to do

    os.kill(first_pid, signal.SIGKILL)
    wait_until(lambda: not tunnel.is_alive(), 5, "the tunnel to be reported dead")
    second_url = tunnel.ensure_open()

    assert second_url != first_url and second_url == tunnel.public_url
    assert tunnel.agent_pid not in (None, first_pid)
    assert tunnel.is_alive()
    record = agent_record(records, tunnel.agent_pid)
    assert post_through_tunnel(record["endpoints"][0]["test_forward_url"]) == 202
    assert received == [TOKEN]
    tunnel.close()
    assert open_fds() == fds_before, "both agents' pipes must be closed"


def test_a_missing_agent_is_refused_and_nothing_is_downloaded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    downloads: list[str] = []
    monkeypatch.setattr(installer, "_download_file", lambda url, *a, **k: downloads.append(url) or "")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    tunnel = Tunnel(TunnelSettings(ngrok_path=bin_dir / "ngrok"), 8080, state_dir=tmp_path / "state")

    with pytest.raises(TunnelError, match=r"ngrok agent not found at .*bin/ngrok; install it"):
        tunnel.open()

    assert list(bin_dir.iterdir()) == []
    assert downloads == []
    with pytest.raises(TunnelError, match="ngrok agent not found"):
        tunnel.ensure_open()
    tunnel.close()


@pytest.mark.slow
def test_an_agent_that_is_not_executable_is_refused(make_tunnel: Callable[..., Tunnel], agent_path: Path) -> None:
    agent_path.chmod(0o644)

    with pytest.raises(TunnelError, match="not executable"):
        make_tunnel().open()


@pytest.mark.slow
def test_an_agent_start_error_becomes_a_tunnel_error(
    make_tunnel: Callable[..., Tunnel], records: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "error")
    tunnel = make_tunnel()

    with pytest.raises(TunnelError, match="authentication failed: bad token"):
        tunnel.open()

    (record,) = [json.loads(p.read_text()) for p in records.glob("agent-*.json")]
    assert not is_running(record["pid"])
    assert tunnel.agent_pid is None and tunnel.public_url is None


@pytest.mark.slow
def test_a_silent_agent_is_killed_after_the_startup_timeout(
    make_tunnel: Callable[..., Tunnel], records: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_NGROK_MODE", "silent")
    tunnel = make_tunnel(startup_timeout_s=0.5)

    with pytest.raises(TunnelError, match="did not open a tunnel"):
        tunnel.open()

    (record,) = [json.loads(p.read_text()) for p in records.glob("agent-*.json")]
    assert not is_running(record["pid"])


@pytest.mark.slow
def test_an_agent_that_cannot_be_executed_becomes_a_tunnel_error(
    make_tunnel: Callable[..., Tunnel], agent_path: Path
) -> None:
    agent_path.write_bytes(b"\x7fELF not really")

    with pytest.raises(TunnelError, match="did not open a tunnel: .*Exec format error"):
        make_tunnel().open()
