"""Child processes of a benchmark run: free ports, nginx configs, start, readiness, stop, memory.

Every server runs in its own session (process group), so one ``killpg`` stops it with
its workers, and a terminal's Ctrl-C reaches only the harness, which then stops
everything in order. On Linux each child also gets ``PR_SET_PDEATHSIG``: if the harness
itself is killed hard, its children receive SIGTERM instead of lingering on the ports.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

__all__ = [
    "Proc",
    "ProcError",
    "free_ports",
    "nginx_proxy_conf",
    "nginx_upstream_conf",
    "read_status_kib",
    "wait_http",
]

READY_TIMEOUT = 30.0
STOP_TIMEOUT = 5.0


class ProcError(RuntimeError):
    """A server did not start or died; the message carries the tail of its log."""


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports the OS says are free (held together so none repeats)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _child_setup() -> None:
    """Runs in the child before exec: get SIGTERM when the harness dies (Linux only)."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Proc:
    """One server process (and its process group), its log in ``log_path``."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path, env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                preexec_fn=_child_setup,
            )
        self.started_at = time.monotonic()

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def fail(self, what: str) -> ProcError:
        tail = self.log_tail()
        return ProcError(f"{self.name}: {what}" + (f"\n--- {self.log_path} (tail)\n{tail}" if tail else ""))

    def stop(self) -> None:
        """SIGTERM to the whole group, SIGKILL after a bounded wait. Safe to call twice."""
        if self.popen.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGTERM)
        try:
            self.popen.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, signal.SIGKILL)
            self.popen.wait(STOP_TIMEOUT)
        # nginx workers (same group) may outlive their master by a moment.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def group_pids(self) -> list[int]:
        """PIDs in this process group (nginx master and workers)."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if os.getpgid(int(entry.name)) == self.popen.pid:
                    out.append(int(entry.name))
            except (ProcessLookupError, PermissionError):
                continue
        return out


def wait_http(proc: Proc, url: str, timeout: float = READY_TIMEOUT, headers: Mapping[str, str] | None = None) -> float:
    """Poll ``url`` until it answers 200; seconds it took. Raises ProcError if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise proc.fail(f"exited with status {proc.popen.returncode} before it was ready")
        try:
            req = urllib.request.Request(url, headers=dict(headers or {}))
            with urllib.request.urlopen(req, timeout=1.0) as resp:
                if resp.status == 200:
                    return time.monotonic() - proc.started_at
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as e:
            last = f"HTTP {e.code}"
        except (OSError, urllib.error.URLError) as e:
            last = str(getattr(e, "reason", e))
        time.sleep(0.02)  # polling interval, not a guess at start-up time
    raise proc.fail(f"not ready after {timeout:.0f}s at {url} ({last})")


def read_status_kib(pid: int, field: str) -> int | None:
    """A ``/proc/PID/status`` field in KiB (``VmHWM``: peak RSS, ``VmRSS``: current), or None."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


# --------------------------------------------------------------------------- nginx


def _nginx_common(workdir: Path, name: str, workers: int) -> Iterator[str]:
    tmp = workdir / f"{name}-tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        # Debian's nginx would drop its workers to nobody/www-data, who cannot read our temp dir.
        yield "user root root;"
    yield f"worker_processes {workers};"
    yield f"pid {workdir / (name + '.pid')};"
    yield f"error_log {workdir / (name + '-error.log')} warn;"
    yield "events { worker_connections 4096; multi_accept on; }"
    yield "http {"
    yield "  access_log off;"
    yield "  sendfile on; tcp_nopush on; tcp_nodelay on;"
    yield "  keepalive_timeout 75s; keepalive_requests 1000000;"
    for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
        yield f"  {kind}_temp_path {tmp / kind};"


def nginx_upstream_conf(workdir: Path, docroot: Path, port: int, workers: int = 1) -> str:
    """The fast upstream: static files from ``docroot``."""
    lines = list(_nginx_common(workdir, "upstream", workers))
    lines += [
        "  types { application/json json; application/octet-stream bin; text/plain txt; }",
        "  default_type application/octet-stream;",
        f"  server {{ listen 127.0.0.1:{port} reuseport; root {docroot}; location / {{ }} }}",
        "}",
    ]
    return "\n".join(lines) + "\n"


def nginx_proxy_conf(workdir: Path, port: int, upstream_port: int, workers: int = 1) -> str:
    """nginx as a plain reverse proxy: stock proxy settings plus a keep-alive upstream pool."""
    lines = list(_nginx_common(workdir, "proxy", workers))
    lines += [
        "  upstream up {",
        f"    server 127.0.0.1:{upstream_port};",
        "    keepalive 64; keepalive_requests 1000000;",
        "  }",
        f"  server {{ listen 127.0.0.1:{port} reuseport;",
        "    location / {",
        "      proxy_pass http://up;",
        "      proxy_http_version 1.1;",
        '      proxy_set_header Connection "";',
        "    }",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"
