"""A throwaway PostgreSQL server for the tests, from the machine's own binaries (Debian's package).

``PgCluster.start_new()`` runs ``initdb`` in a new temporary folder (trust authentication, no fsync:
nothing in it outlives the session) and ``pg_ctl start`` with a Unix socket in that folder and a
free loopback TCP port; ``url(db)`` is how the journal connects, ``create_database()`` gives each
test a database of its own (``CREATE DATABASE`` from an empty template: a few milliseconds).

PostgreSQL refuses to run as root. As root the server runs as the ``postgres`` user (the package
creates it) or, without one, as ``nobody``: ``setpriv`` switches user and groups for ``initdb`` and
``pg_ctl`` only, and the folder is given to that user.

Where no PostgreSQL is installed the fixtures skip with a loud reason, except where one is
required (``CI`` or ``KONFUZIO_WATCH_REQUIRE_POSTGRES`` set, as ``.ci/run`` does): there they fail.
"""

from __future__ import annotations

import itertools
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

SUPERUSER = "kw_test"
PASSWORD_USER = "kw_password"  # a role that must give a password (scram-sha-256 over TCP)
README_ROLE = "konfuzio_watch"  # docs/cluster.md's setup creates it: it must give its password too
HBA = f"""local all all trust
host all {PASSWORD_USER},{README_ROLE} 127.0.0.1/32 scram-sha-256
host all all 127.0.0.1/32 trust
"""
SKIP_REASON = "PostgreSQL tests not run"


class PgUnavailable(Exception):
    """No PostgreSQL server can be started here (the message says why)."""


def required() -> bool:
    """Whether a missing PostgreSQL is a failure (CI) rather than a skip (a developer's machine)."""
    return any(
        os.environ.get(name, "").lower() not in ("", "0", "false", "no")
        for name in ("KONFUZIO_WATCH_REQUIRE_POSTGRES", "CI")
    )


def find_bindir() -> Path:
    """The folder with ``initdb``, ``pg_ctl`` and ``postgres``: ``$PG_BINDIR`` if set (and then only
    there), else Debian's newest ``/usr/lib/postgresql/<version>/bin`` or where ``pg_ctl`` on the PATH is."""
    if os.environ.get("PG_BINDIR"):
        candidates = [Path(os.environ["PG_BINDIR"])]
    else:
        candidates = sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: [int(x) for x in re.findall(r"\d+", p.parent.name)],
            reverse=True,
        )
        if shutil.which("pg_ctl"):
            candidates.append(Path(os.path.realpath(shutil.which("pg_ctl") or "")).parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "pg_ctl", "postgres")):
            return bindir
    where = (
        f"PG_BINDIR={os.environ['PG_BINDIR']}"
        if os.environ.get("PG_BINDIR")
        else "/usr/lib/postgresql/*/bin or on the PATH"
    )
    raise PgUnavailable(
        f"no PostgreSQL server binaries (initdb, pg_ctl, postgres) in {where}: "
        "apt-get install postgresql (or set PG_BINDIR)"
    )


def server_user() -> tuple[list[str], int, int]:
    """The command prefix that runs a program as the server's user, and that user's uid and gid."""
    if os.geteuid() != 0:
        return [], os.getuid(), os.getgid()
    for name in ("postgres", "nobody"):
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if shutil.which("setpriv"):
            return (
                ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups", "--"],
                entry.pw_uid,
                entry.pw_gid,
            )
        if shutil.which("runuser"):
            return ["runuser", "-u", name, "--"], entry.pw_uid, entry.pw_gid
    raise PgUnavailable(
        "running as root, and neither a postgres nor a nobody user with setpriv or runuser "
        "to run the server as (PostgreSQL refuses root)"
    )


def free_port() -> int:
    """A port for a server to bind now and again after each restart (a daemon of the tests, this
    module's PostgreSQL after an outage): below the kernel's ephemeral range. A port from that
    range (what a bind to port 0 gives) can be taken meanwhile by any outgoing connection of a test
    running in parallel, and the restarted server then fails with "Address already in use" (seen
    in the cluster tests under the full suite)."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768  # Linux's default
    candidates = list(range(max(1024, low - 16384), low))
    random.SystemRandom().shuffle(candidates)
    for port in candidates[:200]:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # (no room below the range: take the kernel's pick)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PgCluster:
    bindir: Path
    root: Path  # owned by the server's user: data/, the socket, server.log
    prefix: list[str]
    port: int = 0
    _names: itertools.count = field(default_factory=itertools.count)

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logfile(self) -> Path:
        return self.root / "server.log"

    @classmethod
    def start_new(cls) -> PgCluster:
        bindir = find_bindir()
        prefix, uid, gid = server_user()
        root = Path(tempfile.mkdtemp(prefix="kw-pg-"))
        os.chown(root, uid, gid)
        cluster = cls(bindir, root, prefix)
        try:
            cluster._run(
                "initdb",
                "-D",
                str(cluster.data),
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            )
            (cluster.data / "pg_hba.conf").write_text(HBA)  # rewritten in place: still the server user's
            for attempt in range(3):  # a port taken between free_port() and the server's bind: another one
                cluster.port = free_port()
                try:
                    cluster.start()
                    break
                except PgUnavailable:
                    if attempt == 2 or "already in use" not in cluster.log_tail():
                        raise
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def _run(self, tool: str, *args: str, timeout: float = 120) -> str:
        command = [*self.prefix, str(self.bindir / tool), *args]
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "TZ": "UTC"}
        try:
            done = subprocess.run(
                command,
                cwd=self.root,
                env=env,
                capture_output=True,
                text=True,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PgUnavailable(f"{tool}: {exc}") from None
        if done.returncode != 0:
            raise PgUnavailable(
                f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}\n{self.log_tail()}"
            )
        return done.stdout

    def log_tail(self) -> str:
        try:
            return "server log: ...\n" + self.logfile.read_text(errors="replace")[-2000:]
        except OSError:
            return ""

    def start(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off"
            " -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
            " -c shared_buffers=32MB"
        )
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.logfile), "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def url(self, database: str = "postgres", user: str = SUPERUSER) -> str:
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(self.url(database), autocommit=True, connect_timeout=10) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create_database(self) -> str:
        name = f"kw_{os.getpid()}_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name} TEMPLATE template0 STRATEGY FILE_COPY")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def destroy(self) -> None:
        if self.running():
            try:
                self.stop()
            except PgUnavailable:
                with suppress(OSError, ValueError, IndexError):  # the server this cluster started, only
                    pid = int((self.data / "postmaster.pid").read_text().split()[0])
                    os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + 10
                    while time.monotonic() < deadline:  # gone before its data folder is removed
                        os.kill(pid, 0)  # raises ProcessLookupError (an OSError) once it is gone
                        time.sleep(0.02)
        shutil.rmtree(self.root, ignore_errors=True)
