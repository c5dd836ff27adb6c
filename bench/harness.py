"""The measuring instruments: the daemon as a real subprocess, /proc readings, config, files.

Nothing here decides what "fast" means; scenarios.py runs the workloads and __main__.py prints.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from konfuzio_watch.emulator import Knobs
from konfuzio_watch.samples import make_pdf

TOKEN = "bench-token-0123456789"
PROJECT_ID = 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROFILE_RATE_HZ = 500


class BenchError(Exception):
    """Something the benchmark waited for never happened; the message says what."""


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.05) -> Any:
    """Poll ``predicate`` until truthy; raise BenchError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out after {timeout_s:.0f} s waiting for: {what}")
        time.sleep(interval_s)


def realistic_knobs(**overrides: Any) -> Knobs:
    """0.25 s per upload, 2 s processing plus up to 1 s jitter."""
    values = {"upload_latency_s": 0.25, "processing_s": 2.0, "processing_jitter_s": 1.0, **overrides}
    return Knobs(**values)


# -- the machine -------------------------------------------------------------------------------


def machine_info(workdir: Path) -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "workdir_fs": filesystem_type(workdir),
    }


def filesystem_type(path: Path) -> str:
    """The file system type of the mount holding ``path`` (longest matching mount point)."""
    best, kind = "", "unknown"
    target = os.path.realpath(path)
    try:
        mounts = Path("/proc/mounts").read_text().splitlines()
    except OSError:
        return kind
    for line in mounts:
        parts = line.split()
        is_under = len(parts) >= 3 and (target == parts[1] or target.startswith(parts[1].rstrip("/") + "/"))
        if is_under and len(parts[1]) >= len(best):
            best, kind = parts[1], parts[2]
    return kind


# -- /proc readings ----------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of the process (all its threads), in seconds; resolution 1/CLK_TCK."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()  # the comm field may contain spaces
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), in seconds."""
    return sum(cpu_times(pid))


def memory_kib(pid: int) -> dict[str, int]:
    """VmHWM (peak RSS) and VmRSS from /proc/<pid>/status, in KiB."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0])
    return out


# -- the daemon as a subprocess ----------------------------------------------------------------


@dataclass
class DaemonConfig:
    """The daemon's config.yaml. ``legacy``: for the code before (``--before``), whose config knows
    no ``monitor`` section; ``results_in_inbox``: done/ and failed/ inside the inbox."""

    workdir: Path
    emulator_url: str
    settle_s: float = 2.0
    concurrency: int = 4
    extra: dict[str, dict[str, Any]] = field(default_factory=dict)
    legacy: bool = False
    results_in_inbox: bool = False

    @property
    def inbox(self) -> Path:
        return self.workdir / "inbox"

    @property
    def done(self) -> Path:
        return (self.inbox if self.results_in_inbox else self.workdir) / "done"

    @property
    def failed(self) -> Path:
        return (self.inbox if self.results_in_inbox else self.workdir) / "failed"

    @property
    def state(self) -> Path:
        return self.workdir / "state"

    @property
    def journal(self) -> Path:
        return self.state / "journal.sqlite3"

    def write(self) -> Path:
        """Write ``config.yaml`` into the workdir; everything not set here is the daemon's default."""
        raw: dict[str, dict[str, Any]] = {
            "konfuzio": {"host": self.emulator_url, "token": TOKEN, "project_id": PROJECT_ID},
            "folders": {
                "inbox": str(self.inbox),
                "done": str(self.done),
                "failed": str(self.failed),
                "state": str(self.state),
            },
            "watch": {"settle_seconds": self.settle_s},
            "callback": {"host": "127.0.0.1", "port": 0},
            "monitor": {"port": 0},
            "upload": {"concurrency": self.concurrency},
        }
        if self.legacy:
            del raw["monitor"]
        for section, values in self.extra.items():
            raw.setdefault(section, {}).update(values)
        for folder in (self.inbox, self.done, self.failed, self.state):
            folder.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
        return path


def daemon_command(config_path: Path, code: Path | None = None) -> list[str]:
    """``.venv/bin/konfuzio-watch run --config ...`` (the console script next to this Python);
    with ``code`` (another checkout, put first on PYTHONPATH): ``python -m konfuzio_watch run ...``."""
    script = Path(sys.executable).parent / "konfuzio-watch"
    head = [str(script)] if script.exists() and code is None else [sys.executable, "-m", "konfuzio_watch"]
    return [*head, "run", "--config", str(config_path)]


FSYNC_CLASS = ("fsync", "fdatasync", "msync", "sync_file_range")
_SYSCALL_LINE = re.compile(r"^\s*(?:\[pid\s+)?(\d+)\]?\s+(\d+\.\d+)\s+(\w+)\(")


def strace_prefix(output: Path) -> list[str]:
    """``strace`` recording every fsync-class call of the daemon and all its threads, with
    timestamps (seccomp-bpf: only these calls stop the daemon, so it runs at nearly full speed)."""
    strace = shutil.which("strace")
    if strace is None:
        raise BenchError("the fsync count needs strace (apt-get install strace)")
    return [
        strace,
        "-f",
        "--seccomp-bpf",
        "-qq",
        "-ttt",
        "-y",
        "-e",
        f"trace={','.join(FSYNC_CLASS)}",
        "-o",
        str(output),
    ]


def syscalls_between(output: Path, start: float, end: float) -> dict[str, int]:
    """Calls per name in a ``strace -f -ttt`` recording whose timestamp lies in [start, end]
    (an interrupted call is counted once, on its ``<unfinished ...>`` line)."""
    counts = dict.fromkeys(FSYNC_CLASS, 0)
    for line in output.read_text(errors="replace").splitlines():
        found = _SYSCALL_LINE.match(line)
        if found and start <= float(found[2]) <= end and found[3] in counts:
            counts[found[3]] += 1
    return counts


class DaemonProcess:
    """``konfuzio-watch run`` in its own process; its log goes to ``<workdir>/daemon.log``."""

    def __init__(
        self,
        config: DaemonConfig,
        profile_dir: Path | None = None,
        name: str = "daemon",
        code: Path | None = None,
        strace_output: Path | None = None,
    ):
        self.config = config
        self.name = name
        self.log_path = config.workdir / f"{name}.log"
        self.profile_dir = profile_dir
        self.code = code  # another checkout to run (--before), else this one
        self.strace_output = strace_output
        self.proc: subprocess.Popen[bytes] | None = None
        self._pid: int | None = None  # the daemon's own pid (under strace: strace's child)
        self._profiler: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0  # time.time() just before the exec
        self.ready_at: float | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        if self._pid is None:
            self._pid = self.proc.pid if self.strace_output is None else _traced_child(self.proc.pid)
        return self._pid

    def start(self) -> DaemonProcess:
        config_path = self.config.write()
        env = {**os.environ, "LOG_TO_FILE": "False"}
        env.pop("KONFUZIO_HOST", None)
        env.pop("KONFUZIO_TOKEN", None)
        if self.code is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(self.code), *filter(None, [env.get("PYTHONPATH")])])
        command = daemon_command(config_path, self.code)
        if self.strace_output is not None:
            command = [*strace_prefix(self.strace_output), *command]
        with open(self.log_path, "wb") as log:
            self.started_at = time.time()
            self.proc = subprocess.Popen(
                command,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.config.workdir,
                env=env,
            )
        if self.profile_dir is not None:
            self._start_profiler()
        return self

    def kill(self) -> None:
        """SIGKILL, as a crash."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        self.proc.wait(30)
        self._stop_profiler()

    def _start_profiler(self) -> None:
        """py-spy samples the daemon (the thread holding the GIL) into a collapsed-stack file."""
        assert self.profile_dir is not None
        self.profile_dir.mkdir(parents=True, exist_ok=True)
        found = Path(sys.executable).parent / "py-spy"
        spy = str(found) if found.exists() else shutil.which("py-spy")
        if spy is None:
            print(f"bench: --profile needs py-spy (next to {sys.executable}, or on PATH)", file=sys.stderr)
            return
        out = self.profile_dir / f"{self.name}.collapsed.txt"
        self._profiler = subprocess.Popen(
            # --nonblocking: never ptrace-stop the daemon (that distorts timings and can swallow SIGTERM)
            [
                spy,
                "record",
                "--pid",
                str(self.pid),
                "--rate",
                str(PROFILE_RATE_HZ),
                "--format",
                "raw",
                "--threads",
                "--gil",
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.profile_dir / f"{self.name}.py-spy.log", "wb"),  # noqa: SIM115
        )

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Wait for the daemon's "ready:" log line; return seconds since start."""

        def ready() -> bool:
            self.check_alive()
            return b" ready: " in self.log_path.read_bytes()

        wait_until(ready, timeout_s, f"{self.name} to log 'ready:' (see {self.log_path})", interval_s=0.02)
        self.ready_at = time.time()
        return self.ready_at - self.started_at

    def check_alive(self) -> None:
        assert self.proc is not None
        if self.proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")

    def cpu_s(self) -> float:
        return cpu_seconds(self.pid)

    def cpu_times(self) -> tuple[float, float]:
        return cpu_times(self.pid)

    def memory_kib(self) -> dict[str, int]:
        return memory_kib(self.pid)

    def stop(self, timeout_s: float = 30.0) -> dict[str, Any]:
        """SIGTERM, wait; SIGKILL if it overruns. Returns exit code and how long the stop took."""
        if self.proc is None or self.proc.poll() is not None:
            self._stop_profiler()
            return {"exit_code": None if self.proc is None else self.proc.returncode, "stop_s": 0.0}
        started = time.monotonic()
        os.kill(self.pid, signal.SIGTERM)
        try:
            code = self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)
            self.proc.kill()
            code = self.proc.wait()
        self._stop_profiler()
        return {"exit_code": code, "stop_s": round(time.monotonic() - started, 3)}

    def _stop_profiler(self) -> None:
        if self._profiler is None:
            return
        try:  # py-spy writes its output when its target exits (or on SIGINT)
            self._profiler.wait(15)
        except subprocess.TimeoutExpired:
            self._profiler.send_signal(signal.SIGINT)
            try:
                self._profiler.wait(15)
            except subprocess.TimeoutExpired:
                self._profiler.kill()
                self._profiler.wait()
        self._profiler = None


def _traced_child(strace_pid: int, timeout_s: float = 10.0) -> int:
    """The pid of the process strace started."""

    def child() -> int | None:
        try:
            found = Path(f"/proc/{strace_pid}/task/{strace_pid}/children").read_text().split()
        except OSError:
            return None
        return int(found[0]) if found else None

    return wait_until(child, timeout_s, "the daemon under strace to start", interval_s=0.01)


def process_cpu_s() -> float:
    """utime + stime of this process (the bench and the emulator it serves), in seconds."""
    return cpu_seconds(os.getpid())


# -- the journal, read-only --------------------------------------------------------------------


def journal_counts(path: Path) -> dict[str, int]:
    """Rows per state, read through a read-only connection; {} while the journal does not exist."""
    if not path.exists():
        return {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=2)
    except sqlite3.Error:
        return {}
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state").fetchall())
    except sqlite3.Error:  # not created yet, or busy
        return {}
    finally:
        conn.close()


# -- documents ---------------------------------------------------------------------------------


def write_documents(folder: Path, count: int, prefix: str) -> list[Path]:
    """``count`` distinct one-page PDFs named ``<prefix>_00001.pdf`` ..."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(1, count + 1):
        path = folder / f"{prefix}_{i:05d}.pdf"
        path.write_bytes(make_pdf(pages=1, label=path.name))
        paths.append(path)
    return paths


def write_big_pdf(path: Path, size: int) -> Path:
    """A valid one-page PDF of about ``size`` bytes: comment lines pad it (written 1 MiB at a time)."""
    head = make_pdf(pages=1, label=path.name)
    line = b"%" + b"0123456789abcdef" * 63 + b"\n"  # 1009 bytes
    chunk = line * (1024 * 1024 // len(line))
    version, _, rest = head.partition(b"\n")
    with open(path, "wb") as f:
        f.write(version + b"\n")
        left = max(0, size - len(head))
        while left > 0:
            piece = chunk[: min(len(chunk), left)]
            piece = piece[: piece.rfind(b"\n") + 1] or b"%\n"
            f.write(piece)
            left -= len(piece)
        f.write(rest)
    return path


def results_in(folder: Path, suffix: str = ".json") -> list[os.DirEntry[str]]:
    """Entries in ``folder`` (not recursive) whose name ends with ``suffix``."""
    try:
        with os.scandir(folder) as entries:
            return [e for e in entries if e.name.endswith(suffix)]
    except FileNotFoundError:
        return []
