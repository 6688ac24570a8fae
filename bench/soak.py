"""``bench/soak``: a real ``sidecar serve`` under mixed load for minutes; is it flat and correct?

Starts, on loopback and free ports, the Plex-like upstream and the SDK's MCP server
(``bench/soak_upstream.py``, a process each) and ``sidecar serve`` with the full
pipeline (keys, a never-reached rate limit, a cache rule, metrics, access log to a
file, the MCP gateway). Then ``bench/soak_load.py`` drives it for ``--minutes`` while
this samples the sidecar every 10 s: RSS, open file descriptors (by kind: client and
upstream sockets, the rest), ``/metrics`` (requests, the event-loop lag histogram the
sidecar exports as ``sidecar_event_loop_lag_seconds``) and the time ``/healthz`` takes.

At the end, once every client connection is closed: the access log's line count
against ``sidecar_requests_total`` summed, client sockets back to zero, and the other
descriptors back to where they started. The report goes to stdout and
``bench/results/soak-latest.md``; ``--json`` writes the figures for tests. Exit 0
when every bar holds, 1 on a miss, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .harness import sidecar_argv
from .procs import Proc, ProcError, free_ports, read_status_kib, wait_http
from .soak_load import Load, Plan
from .soak_report import Sample, render, verdicts

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "soak-latest.md"
SAMPLE_EVERY = 10.0
RSS_SLOPE_BAR = 1.0  # MiB per minute after warm-up


@dataclass
class Settings:
    minutes: float
    connections: int
    rate: float
    websockets: int
    streams: int
    out: Path
    json_out: Path | None
    keep: bool
    churn_every: float = 2.0
    sample_every: float = SAMPLE_EVERY
    rss_slope_bar: float = RSS_SLOPE_BAR

    @property
    def seconds(self) -> float:
        return self.minutes * 60

    @property
    def warmup(self) -> float:
        """One minute, or 20% of a short run."""
        return min(60.0, 0.2 * self.seconds)


def parse_args(argv: Sequence[str] | None) -> Settings:
    ap = argparse.ArgumentParser(prog="bench/soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="how long the load runs (default 10; 0.5 is fine)")
    ap.add_argument("--connections", type=int, default=500, help="concurrent client connections (default 500)")
    ap.add_argument("--rate", type=float, help="HTTP requests per second over all workers (default 1.6 x connections)")
    ap.add_argument("--websockets", type=int, help="websocket clients (default connections/25)")
    ap.add_argument("--streams", type=int, help="long-stream clients (default connections/100, at least 1)")
    ap.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="Markdown report (default bench/results/soak-latest.md)"
    )
    ap.add_argument("--json", type=Path, dest="json_out", help="also write the figures as JSON here")
    ap.add_argument(
        "--churn-every", type=float, default=2.0, help="seconds between admin key creates (default 2; 0: no churn)"
    )
    ap.add_argument(
        "--sample-every", type=float, help="seconds between samples (default 10; runs under a minute: a sixth of it)"
    )
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    a = ap.parse_args(argv)
    if a.minutes <= 0 or a.connections < 10:
        ap.error("--minutes must be positive and --connections at least 10")
    c = a.connections
    return Settings(
        minutes=a.minutes, connections=c, rate=a.rate if a.rate is not None else 1.6 * c,
        websockets=a.websockets if a.websockets is not None else max(2, c // 25),
        streams=a.streams if a.streams is not None else max(1, c // 100),
        out=a.out, json_out=a.json_out, keep=a.keep, churn_every=a.churn_every,
        sample_every=a.sample_every or min(SAMPLE_EVERY, max(1.0, a.minutes * 10)),
    )  # fmt: skip


# --------------------------------------------------------------------------- the sidecar, seen from outside


def tcp_table() -> dict[int, tuple[int, int, str]]:
    """Socket inode -> (local port, remote port, state) from /proc/net/tcp and tcp6."""
    out: dict[int, tuple[int, int, str]] = {}
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(name) as f:
                next(f)
                for line in f:
                    parts = line.split()
                    out[int(parts[9])] = (
                        int(parts[1].rsplit(":", 1)[1], 16),
                        int(parts[2].rsplit(":", 1)[1], 16),
                        parts[3],
                    )
        except (OSError, ValueError, IndexError, StopIteration):
            continue
    return out


def fd_kinds(pid: int, proxy_port: int, upstream_ports: set[int]) -> dict[str, int]:
    """The process's open descriptors by kind: client connections, upstream connections, the rest."""
    kinds = {"total": 0, "client": 0, "upstream": 0, "other": 0}
    table = tcp_table()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return kinds
    for name in names:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        kinds["total"] += 1
        kind = "other"
        if target.startswith("socket:["):
            entry = table.get(int(target[8:-1]))
            if entry is not None:
                local, remote, state = entry
                if local == proxy_port and state != "0A":  # 0A: LISTEN
                    kind = "client"
                elif remote in upstream_ports:
                    kind = "upstream"
        kinds[kind] += 1
    return kinds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time the process has used (``/proc/PID/stat``), in seconds."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def parse_metrics(text: str) -> tuple[float, dict[str, float]]:
    """(sidecar_requests_total summed, the lag histogram's cumulative buckets by ``le``)."""
    total = 0.0
    lag: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("sidecar_requests_total{"):
            total += float(line.rsplit(" ", 1)[1])
        elif line.startswith("sidecar_event_loop_lag_seconds_bucket{"):
            le = line.split('le="', 1)[1].split('"', 1)[0]
            lag[le] = float(line.rsplit(" ", 1)[1])
    return total, lag


@dataclass
class Soak:
    s: Settings
    tmp: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="sidecar-soak-")))
    procs: list[Proc] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    sidecar: Proc | None = None

    def log(self, msg: str) -> None:
        print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def start(self, name: str, argv: list[str]) -> Proc:
        p = Proc(name, argv, self.tmp / f"{name}.log", env=self.env)
        self.procs.append(p)
        return p

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()
        if self.s.keep:
            self.log(f"kept {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def start_all(self) -> None:
        import yaml

        plex, mcp, proxy, admin = free_ports(4)
        self.ports = {"plex": plex, "mcp": mcp, "proxy": proxy, "admin": admin}
        self.env = dict(
            os.environ, PLEX_TOKEN=secrets.token_hex(10), MCP_TOKEN=secrets.token_hex(16),
            SIDECAR_ADMIN_TOKEN=secrets.token_hex(16), PYTHONPATH=str(BENCH_DIR.parent),
        )  # fmt: skip
        up = [sys.executable, "-m", "bench.soak_upstream"]
        p = self.start("plex-upstream", [*up, "plex", "--port", str(plex), "--token-env", "PLEX_TOKEN"])
        m = self.start("mcp-upstream", [*up, "mcp", "--port", str(mcp), "--token-env", "MCP_TOKEN"])  # side by side
        wait_http(p, f"http://127.0.0.1:{plex}/identity", headers={"X-Plex-Token": self.env["PLEX_TOKEN"]})
        wait_http(m, f"http://127.0.0.1:{mcp}/.well-known/oauth-protected-resource")
        cfg = {
            "listen": f"127.0.0.1:{proxy}",
            "admin": {"listen": f"127.0.0.1:{admin}", "token_env": "SIDECAR_ADMIN_TOKEN"},
            "store": {"kind": "sqlite", "path": str(self.tmp / "sidecar.db")},
            "keys": {"argon2": "cheapest"},
            "upstreams": [
                {"id": "plex", "kind": "plex", "url": f"http://127.0.0.1:{plex}", "token_env": "PLEX_TOKEN",
                 "path_prefix": "/"},
                {"id": "mcp", "kind": "mcp", "url": f"http://127.0.0.1:{mcp}/mcp", "path_prefix": "/mcp/tools",
                 "headers": {"Authorization": "Bearer ${MCP_TOKEN}"}},
            ],
            "rate_limits": {"backend": "memory", "default": ["1000000/second"]},  # counted, never reached
            "cache": {"max_bytes": "64MiB",
                      "rules": [{"upstream": "plex", "path": "/library/sections", "ttl": "600s"}]},
            "log": {"access": str(self.tmp / "access.log"), "level": "warning"},
            "server": {"shutdown_grace": "2s", "trusted_proxies": ["127.0.0.1/32"]},
        }  # fmt: skip
        path = self.tmp / "sidecar.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        self.sidecar = self.start("sidecar", [*sidecar_argv(), "serve", "-c", str(path)])
        wait_http(self.sidecar, f"http://127.0.0.1:{admin}/healthz", timeout=60)

    async def main_key(self, session: aiohttp.ClientSession) -> str:
        body = {"name": "soak", "permissions": {"upstreams": ["*"], "tools": {"mcp": ["search", "fetch"]}}}
        headers = {"Authorization": f"Bearer {self.env['SIDECAR_ADMIN_TOKEN']}"}
        async with session.post(self.admin_url("/admin/keys"), json=body, headers=headers) as r:
            data = await r.json()
            if r.status != 201:
                raise ProcError(f"could not create the soak key: {r.status} {data}")
            return str(data["data"]["key"])

    def admin_url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.ports['admin']}{path}"

    async def sample(self, session: aiohttp.ClientSession, t0: float, phase: str) -> Sample:
        assert self.sidecar is not None
        pid = self.sidecar.pid
        t = time.monotonic()
        async with session.get(self.admin_url("/healthz")) as r:
            await r.read()
        healthz = time.monotonic() - t
        async with session.get(self.admin_url("/metrics")) as r:
            total, lag = parse_metrics(await r.text())
        fds = fd_kinds(pid, self.ports["proxy"], {self.ports["plex"], self.ports["mcp"]})
        rss = (read_status_kib(pid, "VmRSS") or 0) / 1024
        s = Sample(time.monotonic() - t0, phase, rss, fds, total, lag, healthz, cpu_seconds(pid))
        self.samples.append(s)
        return s

    async def drive(self) -> dict[str, Any]:
        s = self.s
        async with aiohttp.ClientSession() as session:
            key = await self.main_key(session)
            t0 = time.monotonic()
            await self.sample(session, t0, "start")
            plan = Plan(
                base=f"http://127.0.0.1:{self.ports['proxy']}", admin=self.admin_url(""),
                admin_token=self.env["SIDECAR_ADMIN_TOKEN"], key=key, connections=s.connections, rate=s.rate,
                seconds=s.seconds, websockets=s.websockets, streams=s.streams,
                period=60.0 if s.seconds >= 180 else 10.0, churn_every=s.churn_every,
            )  # fmt: skip
            load = Load(plan)

            async def sampler() -> None:
                while True:
                    await asyncio.sleep(s.sample_every)
                    try:
                        x = await self.sample(session, t0, "load")
                    except (aiohttp.ClientError, OSError) as e:  # judged at the end: the sidecar must live
                        self.log(f"sample failed: {type(e).__name__}: {e}")
                        continue
                    self.log(
                        f"t={x.t:5.0f}s rss={x.rss_mib:6.1f} MiB fds={x.fds['total']} "
                        f"(clients {x.fds['client']}, upstream {x.fds['upstream']}) requests={x.requests_total:.0f}"
                    )

            self.log(f"load: {s.connections} connections, ~{s.rate:.0f} HTTP req/s, {s.minutes:g} min")
            stats = await load.run(sampler)
            # Every client connection is closed: wait until the sidecar has seen them all go.
            end = await self.sample(session, t0, "end")
            deadline = time.monotonic() + 10
            while end.fds["client"] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                end = await self.sample(session, t0, "end")
            await asyncio.sleep(0.3)  # the access log writes within 50 ms
            end = await self.sample(session, t0, "end")
            self.samples = [x for x in self.samples if x.phase != "end"] + [end]  # only the settled one
        with open(self.tmp / "access.log", "rb") as fh:
            log_lines = sum(1 for _ in fh)
        sidecar_log = (self.tmp / "sidecar.log").read_text(errors="replace")
        return {
            "stats": stats, "plan": plan, "access_log_lines": log_lines,
            "sidecar_log_tracebacks": sidecar_log.count("Traceback"),
            "sidecar_log_errors": [ln for ln in sidecar_log.splitlines() if " ERROR " in ln or "CRITICAL" in ln][:10],
            "sidecar_alive": self.sidecar is not None and self.sidecar.alive(),
            "end": end,
        }  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    s = parse_args(argv)
    soak = Soak(s)
    try:
        import uvloop

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        soak.start_all()
        result = runner(soak.drive())
    except KeyboardInterrupt:
        soak.log("interrupted")
        return 130
    except ProcError as e:
        soak.log(str(e))
        return 1
    except (aiohttp.ClientError, OSError) as e:  # the sidecar went away: say so with its last words
        tail = soak.sidecar.log_tail(30) if soak.sidecar is not None else ""
        soak.log(f"MISS  the sidecar stopped answering: {type(e).__name__}: {e}\n{tail}")
        return 1
    finally:
        soak.stop_all()
    checks, figures = verdicts(s, soak.samples, result)
    text = render(s, soak.samples, result, checks, figures)
    print(text)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    s.out.write_text(text)
    if s.json_out is not None:
        doc = {"figures": figures, "checks": [asdict(c) for c in checks], "samples": [asdict(x) for x in soak.samples]}
        s.json_out.write_text(json.dumps(doc, indent=1, default=str))
    return 0 if all(c.ok for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
