"""docs/cluster.md's clustered-mode setup, run as written: the database, each node, two nodes at work.

The ``sh`` block of docs/cluster.md after ``<!-- cluster: database ... -->`` runs as the throwaway server's
superuser (tests/pg.py; its pg_hba.conf asks docs/cluster.md's role for its password over TCP with
scram-sha-256, as a server the nodes reach over the network would); the block after
``<!-- cluster: node ... -->`` runs with ROOT set to a temporary folder, as tests/test_install.py
runs the service install. Then two nodes start on one machine with docs/cluster.md's ``cluster: config``
(only what names this machine is changed: the database's address, each node's id, port and own
callback URL) and the password handed over as systemd would from the drop-in's LoadCredential=.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from .conftest import drop, wait_until
from .helpers import (
    KONFUZIO_WATCH,
    DaemonProcess,
    assert_each_file_finished_exactly_once,
    cluster_node,
    readme_block,
    sample_files,
)
from .pg import README_ROLE, SUPERUSER, free_port

REPO = Path(__file__).resolve().parent.parent
ROLE = DATABASE = README_ROLE  # what docs/cluster.md's blocks create; tests/pg.py asks this role for a password

pytestmark = [pytest.mark.postgres, pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")]


def bash(script: str, *, prefix: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, "bash", "-euo", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )


def with_root(block: str, root: Path) -> str:
    """The block with its first line ``ROOT=`` (empty: this machine) set to ``root``."""
    lines = block.splitlines()
    assert re.fullmatch(r"ROOT=\s*(#.*)?", lines[0]), "the node block starts with ROOT= (empty: this machine)"
    return f"ROOT={shlex.quote(str(root))}\n" + "\n".join(lines[1:])


@pytest.fixture
def server(pg_cluster: Any) -> Iterator[Any]:
    """The session's server without docs/cluster.md's role and database, before and after the test."""

    def drop_them() -> None:
        pg_cluster.admin(f"DROP DATABASE IF EXISTS {DATABASE} WITH (FORCE)")
        pg_cluster.admin(f"DROP ROLE IF EXISTS {ROLE}")

    drop_them()
    yield pg_cluster
    drop_them()


def run_database_block(pg: Any, admin_dir: Path) -> None:
    """As the server's superuser on the server's machine (Debian: the user postgres, through the socket)."""
    env = {
        "PATH": f"{pg.bindir}:{os.environ['PATH']}",
        "LANG": "C.UTF-8",
        "HOME": str(admin_dir),
        "PGHOST": str(pg.root),
        "PGPORT": str(pg.port),
        "PGUSER": SUPERUSER,
        "PGDATABASE": "postgres",
    }
    result = bash(readme_block("cluster: database"), prefix=pg.prefix, cwd=admin_dir, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr == "", result.stderr


def credentials_from_drop_ins(root: Path, into: Path) -> None:
    """What systemd does with LoadCredential= of the unit's drop-ins: a private copy of each file."""
    into.mkdir(mode=0o700)
    drop_ins = sorted((root / "etc/systemd/system/konfuzio-watch.service.d").glob("*.conf"))
    loads = [
        line.split("=", 1)[1]
        for path in drop_ins
        for line in path.read_text().splitlines()
        if line.startswith("LoadCredential=")
    ]
    assert loads, "no drop-in hands the journal's password to the service (LoadCredential=)"
    for value in loads:
        name, source = value.split(":", 1)
        (into / name).write_bytes((root / source.lstrip("/")).read_bytes())


def node_config(pg: Any, node_id: str, port: int) -> dict[str, dict]:
    """docs/cluster.md's config for one node, with this machine's database address and the node's own port and URL."""
    raw = yaml.safe_load(readme_block("cluster: config", "yaml"))
    url = urlsplit(raw["journal"]["url"])
    assert (url.username, url.path) == (ROLE, f"/{DATABASE}"), "the config names docs/cluster.md's role and database"
    raw["journal"]["url"] = url._replace(netloc=f"{url.username}@127.0.0.1:{pg.port}").geturl()
    raw["node"]["id"] = node_id
    raw["callback"].update(host="127.0.0.1", port=port, public_url=f"http://127.0.0.1:{port}")
    return raw


@pytest.fixture
def admin_dir(server: Any) -> Iterator[Path]:
    """Where the blocks are run (the password file passes through it): the server's user's, where it can
    reach it (tmp_path's parents are root's alone here)."""
    path = Path(tempfile.mkdtemp(prefix="kw-cluster-admin-"))
    os.chown(path, server.root.stat().st_uid, -1)  # tests/pg.py gave the server's user its folder
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
def test_the_readmes_cluster_setup_gives_two_nodes_a_journal_behind_a_password(
    server: Any, admin_dir: Path, tmp_path: Path, emulator: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    run_database_block(server, admin_dir)
    password = (admin_dir / "journal-password").read_text().strip()
    assert len(password) >= 20

    root = tmp_path / "root"
    (root / "etc/konfuzio-watch").mkdir(parents=True)  # what install-files made
    result = bash(
        with_root(readme_block("cluster: node"), root),
        prefix=[],
        cwd=admin_dir,
        env={"PATH": os.environ["PATH"], "LANG": "C.UTF-8"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    kept = root / "etc/konfuzio-watch/journal-password"
    assert kept.read_text().strip() == password and kept.stat().st_mode & 0o077 == 0, "root's alone"
    credentials = tmp_path / "credentials"
    credentials_from_drop_ins(root, credentials)

    url = f"postgresql://{ROLE}@127.0.0.1:{server.port}/{DATABASE}"
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    with pytest.raises(psycopg.OperationalError, match="password"):  # the server wants it: the file is needed
        psycopg.connect(url, connect_timeout=10).close()
    psycopg.connect(url, connect_timeout=10, password=password).close()  # the role's password is the file's

    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))  # as the service sees it (DaemonProcess's env)
    shared = tmp_path / "shared"
    (shared / "inbox").mkdir(parents=True)
    nodes: list[DaemonProcess] = []
    own_urls = set()
    try:
        for node_id in ("scan01", "scan02"):
            config = node_config(server, node_id, free_port())
            own_urls.add(config["callback"]["public_url"])
            node = cluster_node(shared, node_id, emulator, url, **config)
            nodes.append(node)
            node.start()
        files = sample_files(6, "setup")
        for rel, data in files.items():
            drop(shared / "inbox" / rel, data)
        wait_until(
            lambda: len(list((shared / "done").rglob("*.json"))) >= len(files),
            60,
            lambda: "all files in done/\n" + "\n".join(n.log.read_text()[-1500:] for n in nodes),
        )

        # status as root outside the service: docs/cluster.md's CREDENTIALS_DIRECTORY=/etc/konfuzio-watch
        env = {**os.environ, "CREDENTIALS_DIRECTORY": str(root / "etc/konfuzio-watch"), "LOG_TO_FILE": "False"}
        status = subprocess.run(
            [*KONFUZIO_WATCH, "status", "--config", str(nodes[0].config)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert re.search(r"^\s+scan01\s", status.stdout, re.M) and re.search(r"^\s+scan02\s", status.stdout, re.M), (
            status.stdout
        )
        for node in nodes:
            assert node.terminate() == 0, node.log.read_text()[-2000:]
    finally:
        for node in nodes:
            node.cleanup()

    assert_each_file_finished_exactly_once(shared, emulator, files)
    assert {u.callback_url.split("/konfuzio-callback/")[0] for u in emulator.uploads} <= own_urls
    with psycopg.connect(server.url(DATABASE), autocommit=True, connect_timeout=10) as conn:
        owners = conn.execute("SELECT DISTINCT tableowner FROM pg_tables WHERE schemaname = 'public'").fetchall()
    assert owners == [(ROLE,)], "the first node creates the tables in the role's own database"


def test_the_readmes_driver_line_installs_pyprojects_postgres_extra() -> None:
    """Not run (it needs the package index): it must name what pyproject.toml's postgres extra names."""
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["postgres"]
    block = readme_block("cluster: driver")
    assert re.fullmatch(r'/opt/konfuzio-watch/\.venv/bin/pip install (".+")\n', block), block
    assert shlex.split(block.split(" install ", 1)[1]) == extra
