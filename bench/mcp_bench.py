"""MCP through Sidecar against the SDK's own server directly (``bench/run mcp``).

Starts, on loopback ports the OS hands out, the official SDK's MCP server
(``bench/mcp_upstream.py``, a process of its own) and ``sidecar serve`` in front of it,
then measures, direct and through Sidecar, in interleaved rounds:

- ``tools/call`` (a small JSON answer) and ``tools/list`` at 1 and 32 connections, each
  connection its own Streamable HTTP session, driven by raw aiohttp (so the client costs
  little next to the server): calls/s and p50;
- one SDK ``ClientSession`` calling the tool in a loop (what an agent does): calls/s, p50;
- ``tools/call`` at 1 connection of a tool that waits a few ms on I/O before answering (a
  direct call then takes about the 8 ms the issue measured for the SDK server);
- session creation (``initialize`` + ``notifications/initialized``): p50, with sealing;
- Sidecar's CPU per call: ``utime + stime`` of its process from ``/proc/PID/stat`` over
  the round, divided by the calls (robust to a loaded machine, unlike req/s);
- sealing and unsealing one session id, in process;
- for reference, the bare aiohttp forwarder (``bench/bare_forwarder.py``: no auth, no
  features, aiohttp's client), the lean Python proxy (``bench/lean_forwarder.py``: httptools
  and Sidecar's pool, no aiohttp, no features), the Python pipe (``bench/pipe_forwarder.py``: bytes copied
  between asyncio protocols, no HTTP: the floor for any proxy in Python) and nginx
  ``proxy_pass`` (keep-alive pool, no buffering) in front of the same server, nginx when it
  is installed: what one proxy hop costs at all. At one connection a
  call is latency-bound, so any hop lowers calls/s (the ratio is direct p50 / proxied p50);
  the throughput goal is about the loaded case, where the SDK server is the bottleneck.

Prints a Markdown table and writes ``bench/results/mcp-latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from .mcp_upstream import LOOKUP_WAIT
from .procs import Proc, _nginx_common, free_ports, wait_http

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_OUT = BENCH_DIR / "results" / "mcp-latest.md"
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "bench", "version": "1"}},
}
INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}
TICK = os.sysconf("SC_CLK_TCK")
SESSIONS = 300  # sessions opened to measure one's cost: CPU time comes in 10 ms ticks
SEALING = importlib.util.find_spec("sidecar.upstreams.mcp.sealing") is not None


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its threads included), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def tree_cpu_seconds(pid: int) -> float:
    """The process's CPU and its children's (nginx: the master and its worker), from /proc."""
    total = cpu_seconds(pid)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            total += (int(fields[11]) + int(fields[12])) / TICK
    return total


REFERENCES = (  # (target, column title): the other proxies in front of the same server
    ("bare", "bare aiohttp"),
    ("lean", "lean Python"),
    ("pipe", "Python pipe"),
    ("nginx", "nginx"),
)


@dataclass
class Row:
    """One scenario's figures per round, by target: direct, sidecar, and each of ``REFERENCES``."""

    name: str
    calls: dict[str, list[float]] = field(default_factory=dict)  # calls/s per round
    p50: dict[str, list[float]] = field(default_factory=dict)  # ms
    cpu: dict[str, list[float]] = field(default_factory=dict)  # the proxy's CPU ms per call

    def add(self, target: str, n: int, lat: list[float], elapsed: float, used: float) -> None:
        self.calls.setdefault(target, []).append(n / elapsed)
        self.p50.setdefault(target, []).append(p50(lat))
        if target != "direct":
            self.cpu.setdefault(target, []).append(used / n * 1000)


# ------------------------------------------------------------------ raw Streamable HTTP client


async def _answer(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    """The JSON-RPC answer of a POST: a JSON body or the first ``message`` event of an SSE body."""
    body = await resp.read()
    if resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        for line in body.split(b"\n"):
            if line.startswith(b"data:"):
                data = line[5:].strip()
                if data:
                    return json.loads(data)  # type: ignore[no-any-return]
        raise RuntimeError(f"no message in the SSE answer: {body[:200]!r}")
    return json.loads(body)  # type: ignore[no-any-return]


async def open_session(http: aiohttp.ClientSession, url: str, headers: dict[str, str]) -> dict[str, str]:
    async with http.post(url, json=INIT, headers={**ACCEPT, **headers}) as r:
        if r.status != 200:
            raise RuntimeError(f"initialize: HTTP {r.status}: {(await r.text())[:200]}")
        sid = r.headers["Mcp-Session-Id"]
        await _answer(r)
    h = {**ACCEPT, **headers, "Mcp-Session-Id": sid, "MCP-Protocol-Version": "2025-11-25"}
    async with http.post(url, json=INITIALIZED, headers=h) as r:
        await r.read()
    return h


async def drive(
    url: str,
    headers: dict[str, str],
    method: str,
    connections: int,
    seconds: float,
    cpu: Callable[[], float],
    tool: str = "echo",
) -> tuple[int, list[float], float, float]:
    """``connections`` sessions calling ``method`` back to back: (calls, latencies in ms, elapsed, cpu used)."""
    body: dict[str, Any] = {"jsonrpc": "2.0", "id": 1, "method": method}
    if method == "tools/call":
        body["params"] = {"name": tool, "arguments": {"text": "hello"}}
    raw = json.dumps(body).encode()
    conn = aiohttp.TCPConnector(limit=connections, force_close=False)
    async with aiohttp.ClientSession(connector=conn) as http:
        # Opened and warmed side by side: each session on a connection of its own before the clock starts.
        sessions = await asyncio.gather(*(open_session(http, url, headers) for _ in range(connections)))

        async def warm(h: dict[str, str]) -> None:
            async with http.post(url, data=raw, headers=h) as r:
                await _answer(r)

        await asyncio.gather(*(warm(h) for h in sessions))
        lat: list[float] = []
        stop = time.perf_counter() + seconds
        cpu0, t0 = cpu(), time.perf_counter()

        async def worker(h: dict[str, str]) -> None:
            while time.perf_counter() < stop:
                s = time.perf_counter()
                async with http.post(url, data=raw, headers=h) as r:
                    msg = await _answer(r)
                if "result" not in msg:
                    raise RuntimeError(f"{method}: {msg}")
                lat.append((time.perf_counter() - s) * 1000)

        await asyncio.gather(*(worker(h) for h in sessions))
        elapsed, used = time.perf_counter() - t0, cpu() - cpu0
    return len(lat), lat, elapsed, used


Run = tuple[int, list[float], float, float]  # calls, latencies (ms), elapsed (s), the proxy's CPU used (s)


async def sdk_session(url: str, headers: dict[str, str], seconds: float, cpu: Callable[[], float]) -> Run:
    """The issue's measurement: the SDK's ClientSession calling the tool in a loop, one session."""
    import httpx2
    from mcp.client.session import ClientSession
    from mcp.client.streamable_http import streamable_http_client

    async with (
        httpx2.AsyncClient(headers=headers) as hc,
        streamable_http_client(url, http_client=hc) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        await session.call_tool("echo", {"text": "warm"})
        lat: list[float] = []
        stop = time.perf_counter() + seconds
        cpu0, t0 = cpu(), time.perf_counter()
        while time.perf_counter() < stop:
            s = time.perf_counter()
            await session.call_tool("echo", {"text": "hello"})
            lat.append((time.perf_counter() - s) * 1000)
        return len(lat), lat, time.perf_counter() - t0, cpu() - cpu0


async def session_cost(
    url: str, headers: dict[str, str], n: int, cpu: Callable[[], float]
) -> tuple[list[float], float]:
    """``n`` sessions opened one after another on one connection: latencies (ms), CPU used."""
    lat: list[float] = []
    async with aiohttp.ClientSession() as http:
        await open_session(http, url, headers)
        cpu0 = cpu()
        for _ in range(n):
            s = time.perf_counter()
            await open_session(http, url, headers)
            lat.append((time.perf_counter() - s) * 1000)
        return lat, cpu() - cpu0


def seal_cost(n: int = 20_000) -> tuple[float, float, float]:
    """µs to seal one session id, to open a token the first time, and to open it again (remembered)."""
    from sidecar.upstreams.mcp.sealing import Sealer

    sealer = Sealer.random()
    sid = "3f9a" * 8
    t = time.perf_counter()
    tokens = [sealer.seal("tools", "61157d8cc790", sid) for _ in range(n)]
    sealed = (time.perf_counter() - t) / n * 1e6
    sealer = Sealer.random()
    tokens = [sealer.seal("tools", "61157d8cc790", sid) for _ in range(min(n, 10_000))]
    t = time.perf_counter()
    for token in tokens:
        sealer.unseal("tools", token)
    first = (time.perf_counter() - t) / len(tokens) * 1e6
    t = time.perf_counter()
    for token in tokens:
        sealer.unseal("tools", token)
    return sealed, first, (time.perf_counter() - t) / len(tokens) * 1e6


# ------------------------------------------------------------------ processes


def start(tmp: Path, env: dict[str, str]) -> tuple[Proc, Proc, str, str, dict[str, str]]:
    import yaml

    up_port, port, admin = free_ports(3)
    py = sys.executable
    up = Proc("mcp-upstream", [py, "-m", "bench.mcp_upstream", str(up_port)], tmp / "upstream.log", env=env)
    cfg = {
        "listen": f"127.0.0.1:{port}",
        "admin": {"listen": f"127.0.0.1:{admin}", "token_env": "SIDECAR_ADMIN_TOKEN"},
        "store": {"kind": "sqlite", "path": str(tmp / "sidecar.db")},
        "keys": {"argon2": "cheapest"},
        "upstreams": [
            {
                "id": "tools",
                "kind": "mcp",
                "url": f"http://127.0.0.1:{up_port}/mcp",
                "path_prefix": "/mcp/tools",
                "timeouts": {"read": "30s"},
            }
        ],
        "rate_limits": {"backend": "memory", "default": ["1000000/second"]},
        "log": {"access": str(tmp / "access.log"), "level": "warning"},
        "server": {"shutdown_grace": "1s"},
    }
    if SEALING:
        cfg["mcp_sessions"] = {"seal_key_env": "SIDECAR_SEAL_KEY"}
    path = tmp / "sidecar.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    argv = [py, "-m", "sidecar"]
    out = subprocess.run(
        [*argv, "keys", "create", "-c", str(path), "--name", "bench", "--upstream", "tools", "--json"],
        capture_output=True, text=True, env=env, timeout=60, check=True,
    )  # fmt: skip
    key = json.loads(out.stdout)["key"]
    sc = Proc("sidecar", [*argv, "serve", "-c", str(path)], tmp / "sidecar.log", env=env)
    wait_http(sc, f"http://127.0.0.1:{admin}/healthz", timeout=60)
    direct = _ready(up, f"http://127.0.0.1:{up_port}/mcp", timeout=30)  # no health route: initialize answers
    return up, sc, direct, f"http://127.0.0.1:{port}/mcp/tools", {"Authorization": f"Bearer {key}"}


def nginx_mcp_conf(workdir: Path, port: int, upstream_port: int) -> str:
    """nginx in front of the MCP server: keep-alive pool, answers unbuffered, the server's own Host."""
    lines = list(_nginx_common(workdir, "mcp-proxy", 1))
    lines += [
        f"  upstream up {{ server 127.0.0.1:{upstream_port}; keepalive 64; keepalive_requests 1000000; }}",
        f"  server {{ listen 127.0.0.1:{port} reuseport;",
        "    location / {",
        "      proxy_pass http://up; proxy_http_version 1.1; proxy_buffering off;",
        f'      proxy_set_header Connection ""; proxy_set_header Host 127.0.0.1:{upstream_port};',
        "    }",
        "  }",
        "}",
    ]
    return "\n".join(lines) + "\n"


def start_nginx(tmp: Path, upstream_port: int) -> tuple[Proc, str] | None:
    """The reference proxy, or None when nginx is not installed (bench/run installs it for the main bench)."""
    exe = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if exe is None:
        return None
    (port,) = free_ports(1)
    conf = tmp / "mcp-nginx.conf"
    conf.write_text(nginx_mcp_conf(tmp, port, upstream_port))
    proc = Proc("mcp-nginx", [exe, "-p", str(tmp), "-c", str(conf), "-g", "daemon off;"], tmp / "mcp-nginx.log")
    return proc, _ready(proc, f"http://127.0.0.1:{port}/mcp")


def start_forwarder(tmp: Path, name: str, upstream_port: int, env: dict[str, str]) -> tuple[Proc, str]:
    """A Python reference in front of the server: ``bare`` (aiohttp, no features), ``lean`` (httptools and
    Sidecar's pool, no features) or ``pipe`` (bytes only)."""
    (port,) = free_ports(1)
    target = f"http://127.0.0.1:{upstream_port}" if name == "bare" else f"127.0.0.1:{upstream_port}"
    argv = [sys.executable, str(BENCH_DIR / f"{name}_forwarder.py"), "--listen", f"127.0.0.1:{port}",
            "--upstream", target]  # fmt: skip
    proc = Proc(name, argv, tmp / f"{name}.log", env=env)
    return proc, _ready(proc, f"http://127.0.0.1:{port}/mcp")


def _ready(proc: Proc, url: str, timeout: float = 15) -> str:
    """``url`` once an MCP initialize through it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            asyncio.run(_probe(url))
            return url
        except (OSError, aiohttp.ClientError, RuntimeError):
            if time.monotonic() > deadline or not proc.alive():
                raise proc.fail("not ready") from None
            time.sleep(0.05)


async def _probe(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        await open_session(http, url, {})


# ------------------------------------------------------------------ run


def p50(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def run(seconds: float, rounds: int, out: Path, sessions: int = SESSIONS) -> str:
    import base64
    import secrets

    env = dict(os.environ)
    env["SIDECAR_ADMIN_TOKEN"] = secrets.token_hex(16)
    env["SIDECAR_SEAL_KEY"] = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    env["PYTHONPATH"] = str(BENCH_DIR.parent) + os.pathsep + env.get("PYTHONPATH", "")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="sidecar-mcp-bench-") as d:
        tmp = Path(d)
        up, sc, direct, proxied, auth = start(tmp, env)
        refs: dict[str, tuple[Proc, str]] = {}
        try:
            up_port = int(direct.rsplit(":", 1)[1].split("/")[0])
            for name in ("bare", "lean", "pipe"):
                refs[name] = start_forwarder(tmp, name, up_port, env)
            if (ngx := start_nginx(tmp, up_port)) is not None:
                refs["nginx"] = ngx
            cpu = lambda: cpu_seconds(sc.pid)  # noqa: E731
            # Each proxy's own CPU: Sidecar's process, each forwarder's, nginx's master and worker.
            targets: list[tuple[str, str, dict[str, str], Callable[[], float]]] = [
                ("direct", direct, {}, cpu),
                ("sidecar", proxied, auth, cpu),
            ]
            for name, (proc, url) in refs.items():
                targets.append((name, url, {}, lambda p=proc.pid: tree_cpu_seconds(p)))
            for _, url, h, used_by in targets[1:]:
                for method in ("tools/call", "tools/list"):  # warm-up, not measured: lazy imports, caches
                    asyncio.run(drive(url, h, method, 4, min(1.0, seconds), used_by))  # (a tiny run: tiny warm-up)
            cases: list[tuple[str, Callable[[str, dict[str, str], Callable[[], float]], Coroutine[Any, Any, Run]]]] = []
            for method, label in (("tools/call", "tools/call"), ("tools/list", "tools/list")):
                for conns in (1, 32):
                    cases.append(
                        (f"{label}, {conns} conn.", lambda u, h, c, m=method, n=conns: drive(u, h, m, n, seconds, c))
                    )
            cases.append(("SDK ClientSession, 1 session", lambda u, h, c: sdk_session(u, h, seconds, c)))
            cases.append(
                (
                    f"tools/call of a tool that waits {LOOKUP_WAIT * 1000:g} ms, 1 conn.",
                    lambda u, h, c: drive(u, h, "tools/call", 1, seconds, c, tool="lookup"),
                )
            )
            for name, fn in cases:
                row = Row(name)
                for i in range(rounds):
                    for which, url, h, used_by in targets if i % 2 == 0 else targets[::-1]:
                        n, lat, elapsed, used = asyncio.run(fn(url, h, used_by))
                        row.add(which, n, lat, elapsed, used)
                rows.append(row)
                print(f"  {name}: done", file=sys.stderr)
            sess_d, _ = asyncio.run(session_cost(direct, {}, sessions, cpu))
            sess_s, sess_cpu = asyncio.run(session_cost(proxied, auth, sessions, cpu))
        finally:
            for proc, _ in refs.values():
                proc.stop()
            sc.stop()
            up.stop()
    seal = seal_cost() if SEALING else (float("nan"),) * 3
    return report(rows, seconds, rounds, (p50(sess_d), p50(sess_s), sess_cpu / sessions * 1000), seal, out)


def cpu_cell(ms: list[float]) -> str:
    """The median CPU per call, and the spread over the rounds when there were several."""
    cell = f"{p50(ms):.3f} ms"
    return cell + f" ({min(ms):.2f}–{max(ms):.2f})" if len(ms) > 1 else cell


def report(
    rows: list[Row],
    seconds: float,
    rounds: int,
    sess: tuple[float, float, float],
    seal: tuple[float, float, float],
    out: Path,
) -> str:
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    lines = [
        "# MCP through Sidecar vs the SDK server directly",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {rounds} round(s) of {seconds:g}s per cell, "
        f"interleaved; load average at the end {' '.join(load)} (other work on the machine skews req/s, "
        "not CPU per call).",
        "",
        "| scenario | direct calls/s | Sidecar calls/s | ratio | direct p50 | Sidecar p50 | added p50 "
        "| Sidecar CPU/call | "
        + " | ".join(f"{title} ratio | {title} added p50 | {title} CPU/call" for _, title in REFERENCES)
        + " |",
        "|---|" + "---:|" * (7 + 3 * len(REFERENCES)),
    ]
    for r in rows:
        d, s = statistics.mean(r.calls["direct"]), statistics.mean(r.calls["sidecar"])
        pd, ps = p50(r.p50["direct"]), p50(r.p50["sidecar"])
        cells = [
            r.name, f"{d:,.0f}", f"{s:,.0f}", f"{s / d:.2f}×", f"{pd:.2f} ms", f"{ps:.2f} ms",
            f"{ps - pd:+.2f} ms", cpu_cell(r.cpu["sidecar"]),
        ]  # fmt: skip
        for target, _ in REFERENCES:
            if target in r.calls:
                ratio, added = statistics.mean(r.calls[target]) / d, p50(r.p50[target]) - pd
                cells += [f"{ratio:.2f}×", f"{added:+.2f} ms", cpu_cell(r.cpu[target])]
            else:
                cells += ["–"] * 3
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Session creation (initialize + initialized, sealed id): direct p50 {sess[0]:.2f} ms, "
        f"through Sidecar p50 {sess[1]:.2f} ms (added {sess[1] - sess[0]:+.2f} ms), Sidecar CPU "
        f"{sess[2]:.3f} ms per session. Sealing one id: {seal[0]:.1f} µs; opening a token: {seal[1]:.1f} µs "
        f"the first time, {seal[2]:.2f} µs after (remembered).",
        "",
        "Goals (issue 19): added p50 ≤ 1 ms, Sidecar CPU ≤ 0.5 ms per call, ≥ 0.9× direct throughput "
        '"(the SDK server is the bottleneck, so Sidecar must not be)". The throughput goal is read '
        "where the server is the bottleneck: at 32 connections, and at one connection against the tool "
        "that waits (a direct call then takes about the issue's measured 8 ms). At one connection "
        "against the echo tool, which answers in under 1 ms, a call is latency-bound: calls/s is direct "
        "p50 / proxied p50, so that ratio measures the hop's own time, which the added-p50 goal bounds "
        "(reference columns, each in front of the same server: the bare aiohttp forwarder, no features; the "
        "lean Python proxy, httptools on an asyncio protocol and Sidecar's pool, no features: the best case "
        "for an HTTP proxy in Python; "
        "the Python pipe, a TCP byte copy on asyncio protocols, no HTTP at all: the floor for a proxy "
        "in Python; nginx proxy_pass). CPU per call: the median over the rounds, their range in brackets.",
    ]
    text = "\n".join(lines) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/run mcp", description=__doc__.split("\n", 1)[0])
    ap.add_argument("--duration", type=float, default=4.0, help="seconds per cell (default 4)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds per scenario (default 2)")
    ap.add_argument("--quick", action="store_true", help="1.5 s cells, one round")
    ap.add_argument(
        "--sessions", type=int, default=SESSIONS, help=f"sessions opened to measure one's cost (default {SESSIONS})"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    a = ap.parse_args(argv)
    seconds, rounds = (1.5, 1) if a.quick else (a.duration, a.rounds)
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(run(seconds, rounds, a.out, max(1, a.sessions)))
    print(f"bench/run mcp: wrote {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
